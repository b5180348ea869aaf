//! PEM files, one way: certificate chains and private keys for the HTTPS endpoints and
//! the fabric's mutual TLS, and the crypto provider both use.

use std::{path::Path, sync::Arc};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

/// The certificates in `path`, in order; an error text when it cannot be read or holds
/// none.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(certs)
}

/// The private key in `path`.
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| e.to_string())
}

/// The crypto provider of every TLS configuration memfabric builds.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_empty_and_valid_files() {
        let dir = std::env::temp_dir().join(format!("memfabric-pem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(certs(&dir.join("absent.pem")).is_err());
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        assert_eq!(
            certs(&dir.join("empty.pem")).unwrap_err(),
            "no certificate in the file"
        );
        let c = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap();
        std::fs::write(dir.join("c.pem"), c.cert.pem()).unwrap();
        std::fs::write(dir.join("k.pem"), c.signing_key.serialize_pem()).unwrap();
        assert_eq!(certs(&dir.join("c.pem")).unwrap().len(), 1);
        assert!(key(&dir.join("k.pem")).is_ok());
        assert!(key(&dir.join("c.pem")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
