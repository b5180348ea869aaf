//! Mutual TLS for the fabric's HTTPS channel: both ends present a certificate signed by the
//! cluster CA, and a client checks that the server's certificate names the node whose
//! summary it fetches (a subject alternative name equal to the node name gossip
//! announced): a member cannot serve a summary under another host's name.

use std::{path::Path, sync::Arc};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
};

use crate::util::pem::provider;

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    crate::util::pem::certs(path).map_err(|e| format!("reading the {what} {}: {e}", path.display()))
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    crate::util::pem::key(path)
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

/// The configurations of node `name` among the certificates `memfabric_harness::Pki::write`
/// put in `dir` (`ca.crt`, `NAME.crt`, `NAME.key`), for tests.
#[cfg(test)]
pub(crate) fn load_written(dir: &Path, name: &str) -> Result<TlsConfigs, String> {
    load(
        &dir.join("ca.crt"),
        &dir.join(format!("{name}.crt")),
        &dir.join(format!("{name}.key")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a client (`client`'s certificate) that expects node `expect` completes a
    /// handshake with a server holding `server`'s.
    fn handshake(dir: &Path, server: &str, client: &str, expect: &str) -> bool {
        let (s, c) = (
            load_written(dir, server).unwrap(),
            load_written(dir, client).unwrap(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let (a, b) = tokio::io::duplex(64 << 10);
            let server = tokio::spawn(async move {
                let mut t = s.server.accept(b).await.ok()?;
                t.write_all(b"ok").await.ok()?;
                t.flush().await.ok()
            });
            let name = rustls::pki_types::ServerName::try_from(expect.to_owned()).unwrap();
            let ok = match c.client.connect(name, a).await {
                Ok(mut t) => {
                    let mut buf = [0u8; 2];
                    t.read_exact(&mut buf).await.is_ok() && &buf == b"ok"
                }
                Err(_) => false,
            };
            server.abort();
            ok
        })
    }

    #[test]
    fn a_member_cannot_serve_under_another_nodes_name() {
        let dir = std::env::temp_dir().join(format!("memfabric-tls-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        memfabric_harness::Pki::new("test cluster").write(&dir, &["node-a", "node-b", "rogue"]);
        assert!(handshake(&dir, "node-b", "node-a", "node-b"));
        // The rogue holds a valid cluster certificate, for its own name only.
        assert!(!handshake(&dir, "rogue", "node-a", "node-b"));
        assert!(handshake(&dir, "rogue", "node-a", "rogue"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
