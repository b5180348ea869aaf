//! Mutual TLS for the fabric's HTTPS channel: both ends present a certificate signed by the
//! cluster CA, and a client checks that the server's certificate names the address it
//! dialled (the address the peer advertised in gossip).

use std::{path::Path, sync::Arc};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("reading the {what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no {what}", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("reading the fabric key {}: {e}", path.display()))
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca, "cluster CA certificate")? {
        roots
            .add(c)
            .map_err(|e| format!("the cluster CA {}: {e}", ca.display()))?;
    }
    Ok(Arc::new(roots))
}

/// Both sides' TLS configurations from the PEM files.
pub struct TlsConfigs {
    pub server: tokio_rustls::TlsAcceptor,
    pub client: tokio_rustls::TlsConnector,
}

pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<TlsConfigs, String> {
    let roots = roots(ca)?;
    let chain = read_certs(cert, "fabric certificate")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), read_key(key)?)
        .map_err(|e| format!("the fabric certificate and key: {e}"))?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, read_key(key)?)
        .map_err(|e| format!("the fabric certificate and key: {e}"))?;
    Ok(TlsConfigs {
        server: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        client: tokio_rustls::TlsConnector::from(Arc::new(client)),
    })
}
