//! Requests to a peer over mutual TLS with hyper's HTTP/1.1 client: its summary (`GET
//! /v1/fabric/summary`) and a migration's requests. Bounded everywhere: the response head
//! by hyper's buffer, the body by the caller's limit ([`MAX_SUMMARY`] for a summary)
//! before a byte of it is used. The server's certificate must name the node: a member
//! with a valid certificate of its own cannot answer for another host.

use std::{net::SocketAddr, sync::Arc};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;

use super::{
    stats::{FabricStats, Reject},
    summary::{MAX_SUMMARY, Summary},
};

/// Why a fetch failed: the refusal to count (none for an unreachable peer) and the text.
pub type FetchError = (Option<Reject>, String);

/// The largest response head read (hyper's read buffer; its minimum is 8 KiB).
const MAX_HEAD: usize = 16 << 10;

/// One summary of `node` at `addr`. The caller bounds the time.
pub async fn summary(
    connector: &tokio_rustls::TlsConnector,
    stats: &Arc<FabricStats>,
    node: &str,
    addr: SocketAddr,
) -> Result<Summary, FetchError> {
    let (status, body) = call(
        connector,
        stats,
        node,
        addr,
        hyper::Method::GET,
        "/v1/fabric/summary",
        Vec::new(),
        MAX_SUMMARY,
    )
    .await?;
    if status != hyper::StatusCode::OK {
        return Err((Some(Reject::BadSummary), format!("answered {status}")));
    }
    let s = Summary::decode(&body).map_err(|e| (Some(Reject::BadSummary), e.to_string()))?;
    if s.host != node {
        return Err((
            Some(Reject::BadSummary),
            format!("the summary is {:?}'s, not {node:?}'s", s.host),
        ));
    }
    Ok(s)
}

/// One request to the peer `node` at `addr` over mutual TLS: the answer's status and
/// body, at most `limit` bytes (a longer one announced is refused before it is read; one
/// without a length is refused). The caller bounds the time.
#[expect(
    clippy::too_many_arguments,
    reason = "one request's parts: the channel, the peer, and the HTTP request"
)]
pub async fn call(
    connector: &tokio_rustls::TlsConnector,
    stats: &Arc<FabricStats>,
    node: &str,
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    body: Vec<u8>,
    limit: usize,
) -> Result<(hyper::StatusCode, Bytes), FetchError> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| (None, format!("connecting: {e}")))?;
    let name = rustls::pki_types::ServerName::try_from(node.to_owned()).map_err(|_| {
        (
            Some(Reject::Tls),
            format!("{node:?} is no DNS name or address"),
        )
    })?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| (Some(Reject::Tls), format!("TLS: {e}")))?;
    // What the peer sends counts into the fabric's exchange figures.
    let received = stats.clone();
    let io = hyper_util::rt::TokioIo::new(crate::util::counted::CountedReads::new(tls, move |n| {
        received.add_in(n)
    }));
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .handshake::<_, Full<Bytes>>(io)
        .await
        .map_err(|e| (Some(Reject::BadSummary), format!("HTTP: {e}")))?;
    // The connection's driver; it ends with the response (Connection: close) or when
    // the caller's timeout drops this future and the task's handle with it.
    let driver = tokio::spawn(conn);
    let _abort = AbortOnDrop(driver);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONNECTION, "close");
    if !body.is_empty() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| (None, format!("request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| (Some(Reject::BadSummary), format!("HTTP: {e}")))?;
    let status = resp.status();
    // An announced body over the limit is refused before any of it is read.
    let announced = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    match announced {
        None => {
            return Err((Some(Reject::BadSummary), "no Content-Length".into()));
        }
        Some(n) if n > limit => {
            return Err((
                Some(Reject::Oversize),
                format!("an answer of {n} bytes (at most {limit})"),
            ));
        }
        Some(_) => {}
    }
    // hyper ends the body at Content-Length and fails a shorter one; Limited bounds it
    // again, whatever the head said.
    let body = Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|e| (Some(Reject::BadSummary), format!("reading: {e}")))?
        .to_bytes();
    Ok((status, body))
}

/// Aborts the connection task when the fetch ends (done, failed or timed out).
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{fabric::tls, sketch::Sketch};

    /// Fetches from a mutual-TLS server (certificate `node-b`) that reads the request and
    /// answers `answer`, byte for byte; the fetch expects node `expect`.
    fn fetch_from(answer: Vec<u8>, expect: &str) -> Result<Summary, FetchError> {
        let dir = std::env::temp_dir().join(format!(
            "memfabric-client-{}-{:x}",
            std::process::id(),
            xxhash_rust::xxh3::xxh3_64(&answer)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        memfabric_harness::Pki::new("test cluster").write(&dir, &["node-a", "node-b"]);
        let load = |n: &str| tls::load_written(&dir, n).unwrap();
        let (server, client) = (load("node-b").server, load("node-a").client);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let out = rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.ok()?;
                let mut t = server.accept(tcp).await.ok()?;
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = t.read(&mut b).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    head.extend_from_slice(&b[..n]);
                }
                t.write_all(&answer).await.ok()?;
                t.shutdown().await.ok()
            });
            let stats = Arc::new(FabricStats::default());
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                summary(&client, &stats, expect, addr),
            )
            .await
            .expect("the fetch ends by itself")
        });
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    fn response(head: &str, body: &[u8]) -> Vec<u8> {
        let mut r = head.as_bytes().to_vec();
        r.extend_from_slice(body);
        r
    }

    fn summary_of(host: &str) -> Vec<u8> {
        Summary {
            host: host.into(),
            capacity_bytes: 1 << 30,
            used_bytes: 1 << 20,
            sketch: Sketch::new(64),
            vms: Vec::new(),
        }
        .encode()
    }

    #[test]
    fn a_well_formed_summary_of_the_named_node_is_taken() {
        let body = summary_of("node-b");
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        let s = fetch_from(response(&head, &body), "node-b").unwrap();
        assert_eq!(s.host, "node-b");
        assert_eq!(s.capacity_bytes, 1 << 30);
    }

    #[test]
    fn hostile_and_broken_answers_are_refused() {
        let body = summary_of("node-b");
        let refused = |answer: Vec<u8>| fetch_from(answer, "node-b").unwrap_err();
        // Not 200.
        let (r, m) = refused(response(
            "HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n",
            b"",
        ));
        assert_eq!(r, Some(Reject::BadSummary), "{m}");
        // A body announced over the limit: refused before it is read (none is sent).
        let (r, m) = refused(response(
            &format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                MAX_SUMMARY + 1
            ),
            b"",
        ));
        assert_eq!(r, Some(Reject::Oversize), "{m}");
        // Truncated: fewer bytes than announced, then the close.
        let (r, m) = refused(response(
            &format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()),
            &body[..body.len() / 2],
        ));
        assert_eq!(r, Some(Reject::BadSummary), "{m}");
        // No length at all (a body until the close).
        let (r, m) = refused(response("HTTP/1.1 200 OK\r\n\r\n", &body));
        assert_eq!(r, Some(Reject::BadSummary), "{m}");
        // A head larger than the client reads.
        let long = format!("HTTP/1.1 200 OK\r\nx: {}\r\n\r\n", "a".repeat(64 << 10));
        let (r, m) = refused(response(&long, b""));
        assert_eq!(r, Some(Reject::BadSummary), "{m}");
        // Garbage.
        let (r, m) = refused(b"garbage\r\n\r\n".to_vec());
        assert_eq!(r, Some(Reject::BadSummary), "{m}");
        // Well formed, but another host's summary.
        let other = summary_of("node-c");
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", other.len());
        let (r, m) = refused(response(&head, &other));
        assert_eq!(r, Some(Reject::BadSummary), "{m}");
        assert!(m.contains("node-c"), "{m}");
    }
}
