//! The daemon's HTTP server: axum's router behind an accept loop that a root daemon can
//! afford to face anyone on the host with. `axum::serve` sets no timer, so an idle or
//! half-sent connection is held forever; enough of them exhaust file descriptors, and one
//! blocks graceful shutdown. Here:
//! - every connection must send a complete request head within `header_timeout`, also
//!   between keep-alive requests (hyper's header-read timer also runs while idle);
//! - at most `max_connections` are open: past that the oldest is closed, so a flood of
//!   idle sockets cannot lock a scraper out (its fresh connection is the newest); with
//!   TLS, the oldest that has not finished its handshake goes first, so a flood of
//!   unauthenticated sockets cannot cut a peer's fetch short either;
//! - a failed accept (EMFILE) backs off instead of spinning;
//! - shutdown asks every connection to finish and drops whatever is left after
//!   `shutdown_deadline`.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{Notify, watch},
};

/// Bounds on what clients may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// Time to send a request head, and the longest idle keep-alive.
    pub header_timeout: Duration,
    /// The longest a connection lives, however busy (a slow reader of a large response).
    pub max_connection_age: Duration,
    /// How long shutdown waits for connections to finish.
    pub shutdown_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            header_timeout: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(120),
            shutdown_deadline: Duration::from_secs(2),
        }
    }
}

/// Counters of the server, for the exposition.
#[derive(Debug, Default)]
pub struct Stats {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    /// Closed to make room for a newer connection.
    pub evicted: AtomicU64,
    pub accept_errors: AtomicU64,
    /// JSON requests refused (503) because too many were being built at once.
    pub busy: AtomicU64,
    /// TLS handshakes that failed or did not finish in time.
    pub tls_failures: AtomicU64,
}

/// Something that accepts connections (a TCP or a unix listener).
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (s, _) = tokio::net::TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
}

/// Open connections, oldest first: (id, the signal that closes it, whether its TLS
/// handshake finished; always true without TLS).
type Registry = Arc<Mutex<VecDeque<(u64, Arc<Notify>, Arc<AtomicBool>)>>>;

/// Makes room for one more connection: closes the oldest one that has not finished its
/// handshake, or else the oldest.
fn evict_one(reg: &mut VecDeque<(u64, Arc<Notify>, Arc<AtomicBool>)>) -> bool {
    let at = reg
        .iter()
        .position(|(_, _, done)| !done.load(Ordering::Relaxed))
        .unwrap_or(0);
    match reg.remove(at) {
        Some((_, close, _)) => {
            close.notify_one();
            true
        }
        None => false,
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then closes every connection
/// within the deadline.
pub async fn serve<L: Accept>(
    listener: L,
    app: Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) {
    let open: Registry = Arc::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let io = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            r = listener.accept() => r,
        };
        let io = match io {
            Ok(io) => io,
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE) or a reset before accept: the
                // connection waits in the backlog; retry a little later, not in a loop.
                if stats.accept_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!("accepting an HTTP connection: {e} (counted from now on)");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        let authenticated = Arc::new(AtomicBool::new(tls.is_none()));
        let id = next_id;
        next_id += 1;
        {
            let mut reg = open.lock().unwrap_or_else(|e| e.into_inner());
            while reg.len() >= limits.max_connections.max(1) && evict_one(&mut reg) {
                stats.evicted.fetch_add(1, Ordering::Relaxed);
            }
            reg.push_back((id, close.clone(), authenticated.clone()));
        }
        stats.open.fetch_add(1, Ordering::Relaxed);
        let (app, open, stats, stop) = (app.clone(), open.clone(), stats.clone(), stop_rx.clone());
        let tls = tls.clone();
        tasks.spawn(async move {
            match tls {
                // The handshake runs here, not in the accept loop, and within the header
                // timeout: a client that never finishes it holds only its own task.
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_timeout, acceptor.accept(io));
                    let evicted = close.clone();
                    let done = tokio::select! {
                        r = handshake => Some(r),
                        _ = evicted.notified() => None,
                    };
                    match done {
                        Some(Ok(Ok(stream))) => {
                            authenticated.store(true, Ordering::Relaxed);
                            connection(stream, app, limits, close, stop).await
                        }
                        None => {}
                        Some(Ok(Err(_)) | Err(_)) => {
                            stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                None => connection(io, app, limits, close, stop).await,
            }
            open.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(i, _, _)| *i != id);
            stats.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(
        limits.shutdown_deadline + Duration::from_millis(500),
        async { while tasks.join_next().await.is_some() {} },
    )
    .await;
    if drained.is_err() {
        tracing::warn!("HTTP connections still open at the shutdown deadline: dropped");
    }
    tasks.abort_all();
}

/// Serves HTTP/1.1 on one connection until it ends, is evicted, grows too old, or the
/// server stops (then it may finish within the shutdown deadline).
async fn connection<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: I,
    app: Router,
    limits: Limits,
    close: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = close.notified() => {}
        _ = tokio::time::sleep(limits.max_connection_age) => {}
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.shutdown_deadline, conn).await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading TLS {what} {path}: {message}")]
    Read {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("TLS certificate and key do not make a server configuration: {0}")]
    Config(String),
}

/// A TLS acceptor from PEM files (a certificate chain and its private key).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let read = |what: &'static str, path: &std::path::Path, message: String| TlsError::Read {
        what,
        path: path.display().to_string(),
        message,
    };
    let certs = crate::util::pem::certs(cert).map_err(|m| read("certificate", cert, m))?;
    let key = crate::util::pem::key(key).map_err(|m| read("key", key, m))?;
    let provider = crate::util::pem::provider();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of connections that never finish their TLS handshake closes one another,
    /// not the authenticated connection that came first.
    #[test]
    fn unauthenticated_floods_do_not_evict_an_authenticated_connection() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = std::env::temp_dir().join(format!("memfabric-evict-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("c.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("k.pem"), cert.signing_key.serialize_pem()).unwrap();
        let acceptor = tls_acceptor(&dir.join("c.pem"), &dir.join("k.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let client = tokio_rustls::TlsConnector::from(Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stats = Arc::new(Stats::default());
        let answered = rt.block_on(async {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let app = Router::new().route("/", axum::routing::get(|| async { "hello" }));
            let limits = Limits {
                max_connections: 4,
                ..Limits::default()
            };
            let (stop_tx, stop_rx) = watch::channel(false);
            let server = tokio::spawn(serve(
                listener,
                app,
                limits,
                Some(acceptor),
                stats.clone(),
                async move {
                    let mut rx = stop_rx;
                    let _ = rx.wait_for(|s| *s).await;
                },
            ));
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut peer = client.connect(name, tcp).await.unwrap();
            // 20 sockets that never say a word.
            let mut flood = Vec::new();
            for _ in 0..20 {
                flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            peer.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            let _ = peer.read_to_string(&mut out).await;
            let _ = stop_tx.send(true);
            drop(flood);
            let _ = server.await;
            out
        });
        assert!(
            answered.starts_with("HTTP/1.1 200") && answered.ends_with("hello"),
            "{answered:?}"
        );
        assert!(stats.evicted.load(Ordering::Relaxed) >= 17);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
