//! The source's side of `memfabric migrate --to`: asks the destination's agent for an
//! incoming migration (it starts the incoming QEMU, see [`super::incoming`]), streams the
//! VM through the proxies, then tells the destination to start the guest and quits the
//! source QEMU once it runs there.
//!
//! Never two running copies: the source resumes its guest only when the destination said
//! it will not run it (refused, failed, or a stream that did not verify); when the answer
//! to the start is lost, the source stays paused and the error says where to look.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::signal::unix::{SignalKind, signal};

use super::{
    Failure, Progress,
    incoming::{Accepted, Request, Status},
    run::{self, SendOptions, Summary, Tls},
};
use crate::fabric::{client, stats::FabricStats};

/// The request may wait for the destination to index its VMs' pages.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// The start waits for the destination's last checks.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A cancel is answered at once (the destination stops its QEMU after answering).
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read from the destination.
const MAX_ANSWER: usize = 64 << 10;

/// The VM to move and where.
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    /// The source QEMU's PID (its command line is the destination's) and QMP socket.
    pub pid: u32,
    pub qmp: PathBuf,
    pub name: String,
    pub uuid: Option<String>,
    /// The destination: its node name (its certificate carries it) and fabric address.
    pub node: String,
    pub addr: SocketAddr,
    pub tls: Tls,
    pub work_dir: PathBuf,
    pub bandwidth: Option<u64>,
}

/// One JSON request to the destination's agent.
async fn call<T: serde::de::DeserializeOwned>(
    connector: &tokio_rustls::TlsConnector,
    opts: &RemoteOptions,
    path: &str,
    body: Vec<u8>,
    within: Duration,
) -> Result<T, Failure> {
    let stats = Arc::new(FabricStats::default());
    let (status, answer) = tokio::time::timeout(
        within,
        client::call(
            connector,
            &stats,
            &opts.node,
            opts.addr,
            hyper::Method::POST,
            path,
            body,
            MAX_ANSWER,
        ),
    )
    .await
    .map_err(|_| {
        Failure::Peer(format!(
            "{} did not answer in {} s",
            opts.node,
            within.as_secs()
        ))
    })?
    .map_err(|(_, e)| Failure::Peer(format!("{} at {}: {e}", opts.node, opts.addr)))?;
    if !status.is_success() {
        let why = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
        return Err(Failure::Refused(format!(
            "{} answered {status}: {why}",
            opts.node
        )));
    }
    serde_json::from_slice(&answer)
        .map_err(|e| Failure::Peer(format!("{}'s answer: {e}", opts.node)))
}

/// Moves the VM; on success it runs on the destination and its source QEMU has quit.
///
/// An operator's Ctrl-C before the start cancels the migration wherever it stands: the
/// guest keeps running on the source and the destination stops the QEMU it started (told
/// so explicitly; a request still being answered is awaited for that, a second Ctrl-C
/// leaves at once and the destination stops its QEMU when no stream arrives).
pub async fn migrate(opts: RemoteOptions, progress: Arc<Progress>) -> Result<Summary, Failure> {
    // Caught from the first step: a Ctrl-C that killed the process while the destination
    // prepares would leave its QEMU waiting for a stream that never comes.
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| Failure::Setup(format!("catching Ctrl-C: {e}")))?;
    let qmp_path = opts.qmp.clone();
    let capabilities = run::blocking(move || run::check_capabilities(&qmp_path)).await?;
    let connector = opts.tls.load()?.client;
    let args: Vec<String> = crate::actuate::qmp::cmdline(opts.pid)
        .map_err(|e| Failure::Setup(format!("the VM's command line: {e}")))?
        .into_iter()
        .skip(1)
        .filter(|a| !a.is_empty())
        .collect();
    let request = serde_json::to_vec(&Request {
        name: opts.name.clone(),
        uuid: opts.uuid.clone(),
        args,
        source: Some((super::incoming_qemu::boot_id(), opts.pid)),
        capabilities,
    })
    .map_err(|e| Failure::Setup(e.to_string()))?;
    let asking = call::<Accepted>(
        &connector,
        &opts,
        "/v1/fabric/migrations",
        request,
        REQUEST_TIMEOUT,
    );
    tokio::pin!(asking);
    let accepted = tokio::select! {
        r = &mut asking => r?,
        _ = interrupt.recv() => {
            // The destination may be starting a QEMU for this request: its answer names
            // the migration to cancel.
            tracing::warn!(
                "interrupted: waiting for {}'s answer to cancel the migration it prepares \
                 (Ctrl-C again to leave now)",
                opts.node
            );
            tokio::select! {
                r = &mut asking => {
                    if let Ok(a) = r {
                        cancel(&connector, &opts, &a.id).await;
                    }
                }
                _ = interrupt.recv() => {
                    return Err(Failure::Setup(format!(
                        "interrupted (Ctrl-C) twice: migration cancelled before {} \
                         answered; it stops what it prepared when no stream arrives",
                        opts.node
                    )));
                }
            }
            return Err(interrupted());
        }
    };
    let token = super::incoming::token_of_hex(&accepted.token)
        .ok_or_else(|| Failure::Peer(format!("{} answered no valid token", opts.node)))?;
    // The stream: on failure `send` already put the guest back (and the destination,
    // whose link closed, stops its QEMU).
    let sending = run::send(
        SendOptions {
            qmp: opts.qmp.clone(),
            to: SocketAddr::new(opts.addr.ip(), accepted.port).to_string(),
            node: opts.node.clone(),
            tls: opts.tls.clone(),
            work_dir: opts.work_dir.clone(),
            bandwidth: opts.bandwidth,
            token: Some(token),
        },
        progress,
    );
    // A Ctrl-C while the stream flows cancels the migration; the start below is not
    // interrupted (a Ctrl-C then is caught and ignored: the guest is paused between the
    // two hosts until the destination answers).
    let summary = tokio::select! {
        r = sending => r?,
        _ = interrupt.recv() => {
            run::keep_on_source(&opts.qmp).await;
            cancel(&connector, &opts, &accepted.id).await;
            return Err(interrupted());
        }
    };
    let start = format!("/v1/fabric/migrations/{}/start", accepted.id);
    match call::<Status>(&connector, &opts, &start, Vec::new(), START_TIMEOUT).await {
        Ok(_) => {
            quit(&opts).await;
            Ok(summary)
        }
        Err(e @ Failure::Refused(_)) => {
            // The destination will not run it: the guest resumes here.
            run::keep_on_source(&opts.qmp).await;
            Err(e)
        }
        Err(e) => Err(Failure::Undecided(format!(
            "the stream arrived and was verified, but {}'s answer to the start was lost \
             ({e}): the guest may run there (GET /v1/fabric/migrations/{} on it). The \
             source QEMU is left paused, not resumed, so that the guest never runs twice: \
             quit it if the guest runs on {}, resume it (QMP cont) if not",
            opts.node, accepted.id, opts.node
        ))),
    }
}

fn interrupted() -> Failure {
    Failure::Setup("interrupted (Ctrl-C): migration cancelled".into())
}

/// Tells the destination to stop what it prepared for migration `id` (its QEMU, its
/// proxy). Best effort: a destination that does not answer stops it when no stream
/// arrives, or when the source does not start the guest.
async fn cancel(connector: &tokio_rustls::TlsConnector, opts: &RemoteOptions, id: &str) {
    let path = format!("/v1/fabric/migrations/{id}/cancel");
    if let Err(e) = call::<Status>(connector, opts, &path, Vec::new(), CANCEL_TIMEOUT).await {
        tracing::warn!("cancelling migration {id} on {}: {e}", opts.node);
    }
}

/// Quits the source QEMU (its guest runs on the destination now). A QEMU that lingers is
/// left paused: it never runs again without an operator.
async fn quit(opts: &RemoteOptions) {
    let (path, pid) = (opts.qmp.clone(), opts.pid);
    let gone = run::blocking(move || {
        // QEMU may close the socket before it answers `quit`: its exit is the answer.
        let _ = run::qmp(&path, |q| q.execute("quit", serde_json::json!({})));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(!std::path::Path::new(&format!("/proc/{pid}")).exists())
    })
    .await;
    if !matches!(gone, Ok(true)) {
        tracing::warn!(
            "the guest runs on {}; the paused source QEMU {pid} did not quit (stop it)",
            opts.node
        );
    }
}
