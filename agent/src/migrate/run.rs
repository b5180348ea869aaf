//! One migration end to end on each side: the source points its QEMU at the proxy over
//! QMP and watches QEMU's own progress; the destination indexes its VMs, serves its filter
//! and feeds the incoming QEMU. Either side's failure leaves the VM running on the source:
//! the source cancels QEMU's migration, or resumes the guest if QEMU had already finished
//! writing when the destination failed.

use std::{
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering, mpsc::RecvTimeoutError},
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::{
    Failure, Progress, dest,
    downtime::{self, Governor},
    holdings::Holdings,
    limit_journal::{self, Journal},
    link::{self, Channel},
    settled, source,
};
use crate::{
    actuate::qmp::Qmp,
    fabric::tls,
    host::inventory::{self, Selector},
};

/// QEMU's capabilities that change the stream's records or channels in ways the proxy
/// does not carry: off through it. (`multifd` is carried: each channel on a link of its
/// own, uncompressed pages only.) Postcopy runs the guest on the destination before its
/// stream has arrived, which the proxies' promise (the guest starts there only once
/// every byte was verified, and runs on the source otherwise) cannot keep.
const REFUSED_CAPABILITIES: &[&str] = &[
    "compress",
    "xbzrle",
    "postcopy-ram",
    "postcopy-preempt",
    "x-colo",
    "background-snapshot",
    "zero-copy-send",
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The fabric's certificates: this host's, and the CA every agent's is signed by.
#[derive(Clone, Debug)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    pub fn load(&self) -> Result<tls::TlsConfigs, Failure> {
        tls::load(&self.ca, &self.cert, &self.key).map_err(Failure::Setup)
    }
}

/// What a migration did, at either end.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// QEMU's stream (what a plain migration would have sent).
    pub stream_bytes: u64,
    /// What this end wrote to the link.
    pub wire_bytes: u64,
    /// What this end read from the link after the filter (destination: the migration's
    /// frames).
    #[serde(default)]
    pub link_in_bytes: u64,
    pub filter_bytes: u64,
    pub pages: u64,
    pub referenced: u64,
    pub resent: u64,
    pub seconds: f64,
    /// QEMU's downtime (source only).
    pub downtime_ms: Option<u64>,
    /// The lowest downtime limit QEMU was given, when the proxies' correction lowered it
    /// (source only).
    #[serde(default)]
    pub downtime_limit_ms: Option<u64>,
    /// QEMU's channels through the proxies: 1, or 1 + its multifd channels.
    #[serde(default)]
    pub channels: u64,
}

impl Summary {
    fn of(p: &Progress, started: Instant, downtime_ms: Option<u64>) -> Summary {
        Summary {
            stream_bytes: Progress::get(&p.qemu_bytes),
            wire_bytes: Progress::get(&p.wire_bytes),
            link_in_bytes: Progress::get(&p.link_in_bytes),
            filter_bytes: Progress::get(&p.filter_bytes),
            pages: Progress::get(&p.pages),
            referenced: Progress::get(&p.referenced),
            resent: Progress::get(&p.resent),
            seconds: started.elapsed().as_secs_f64(),
            downtime_ms,
            downtime_limit_ms: Some(Progress::get(&p.lowest_downtime_limit))
                .filter(|&ms| ms != Progress::UNKNOWN),
            channels: Progress::get(&p.channels),
        }
    }
}

/// Where the source sends: the destination proxy's address and the node name its
/// certificate must carry.
#[derive(Clone, Debug)]
pub struct SendOptions {
    pub qmp: PathBuf,
    pub to: String,
    pub node: String,
    pub tls: Tls,
    /// A private directory for the proxy's socket (created 0700, removed after).
    pub work_dir: PathBuf,
    /// Bytes per second the migration may put on the link (none: unlimited). QEMU's own
    /// `max-bandwidth` caps its stream before deduplication; this caps the wire.
    pub bandwidth: Option<u64>,
    /// The one-time token the destination's agent answered with (`migrate --to`): sent
    /// first on the link, so that no other member of the cluster can feed the incoming
    /// QEMU. None for a destination run by hand (`migrate receive`).
    pub token: Option<Token>,
}

/// A migration's one-time token.
pub type Token = [u8; 16];

pub(super) fn qmp<T>(
    path: &Path,
    f: impl FnOnce(&mut Qmp) -> Result<T, crate::actuate::qmp::QmpError>,
) -> Result<T, Failure> {
    let mut q = Qmp::connect(path).map_err(|e| Failure::Setup(e.to_string()))?;
    f(&mut q).map_err(|e| Failure::Setup(e.to_string()))
}

/// Polls QEMU's `query-migrate` on one session until its status settles or `within`
/// passes: the status and QEMU's downtime.
pub fn await_status(
    q: &mut Qmp,
    within: Duration,
) -> Result<(String, Option<u64>), crate::actuate::qmp::QmpError> {
    let deadline = Instant::now() + within;
    loop {
        let v = q.execute("query-migrate", serde_json::json!({}))?;
        let status = v["status"].as_str().unwrap_or("none").to_owned();
        if settled(&status) || Instant::now() > deadline {
            return Ok((status, v["downtime"].as_u64()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The source QEMU's migration settings that the incoming QEMU must share: QEMU stalls
/// or fails a migration whose return path or channels its peer does not expect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// QEMU's `return-path` capability.
    #[serde(default)]
    pub return_path: bool,
    /// Its multifd channels besides the main one (0: `multifd` is off).
    #[serde(default)]
    pub multifd: u8,
}

/// Refuses a QEMU whose migration capabilities would change the stream's records; the
/// settings the incoming QEMU must share.
pub(super) fn check_capabilities(path: &Path) -> Result<Capabilities, Failure> {
    let caps = qmp(path, |q| {
        q.execute("query-migrate-capabilities", serde_json::json!({}))
    })?;
    let on: Vec<&str> = caps
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"] == true)
        .filter_map(|c| c["capability"].as_str())
        .collect();
    let refused: Vec<&str> = on
        .iter()
        .copied()
        .filter(|c| REFUSED_CAPABILITIES.contains(c))
        .collect();
    if !refused.is_empty() {
        return Err(Failure::Setup(format!(
            "QEMU has migration capabilities on that the proxy does not carry: {} \
             (turn them off: migrate-set-capabilities)",
            refused.join(", ")
        )));
    }
    let return_path = on.contains(&"return-path");
    if !on.contains(&"multifd") {
        return Ok(Capabilities {
            return_path,
            multifd: 0,
        });
    }
    let params = qmp(path, |q| {
        q.execute("query-migrate-parameters", serde_json::json!({}))
    })?;
    Ok(Capabilities {
        return_path,
        multifd: multifd_channels(&params)?,
    })
}

/// The multifd channels QEMU's migration parameters ask for, when the proxy carries them:
/// uncompressed (`multifd-compression` none), at most [`link::MAX_MULTIFD`].
fn multifd_channels(params: &serde_json::Value) -> Result<u8, Failure> {
    let compression = params["multifd-compression"].as_str().unwrap_or("none");
    if compression != "none" {
        return Err(Failure::Setup(format!(
            "QEMU compresses its multifd channels ({compression}), which the proxy does not \
             carry (migrate-set-parameters multifd-compression=none)"
        )));
    }
    let n = params["multifd-channels"].as_u64().unwrap_or(2);
    match u8::try_from(n) {
        Ok(n) if (1..=link::MAX_MULTIFD).contains(&n) => Ok(n),
        _ => Err(Failure::Setup(format!(
            "QEMU's multifd-channels is {n}; the proxy carries 1 to {} \
             (migrate-set-parameters multifd-channels=N)",
            link::MAX_MULTIFD
        ))),
    }
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::Setup(format!("a blocking task: {e}")))?
}

/// The link to the destination proxy at `to`, whose certificate must name `node`; the
/// migration's token (if any) sent first.
async fn connect_destination(
    tls: &Tls,
    to: &str,
    node: &str,
    token: Option<&Token>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Failure> {
    let configs = tls.load()?;
    let name = rustls::pki_types::ServerName::try_from(node.to_owned())
        .map_err(|e| Failure::Setup(format!("node name {node:?}: {e}")))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .map_err(|_| Failure::Setup(format!("connecting to {to}: timed out")))?
        .map_err(|e| Failure::Setup(format!("connecting to {to}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let mut link = tokio::time::timeout(CONNECT_TIMEOUT, configs.client.connect(name, tcp))
        .await
        .map_err(|_| Failure::Setup("TLS with the destination: timed out".into()))?
        .map_err(|e| Failure::Setup(format!("TLS with the destination {node}: {e}")))?;
    if let Some(t) = token {
        use tokio::io::AsyncWriteExt as _;
        link.write_all(t).await?;
    }
    Ok(link)
}

/// Where QEMU connects when something else drives it (libvirt: `virsh migrate
/// --migrateuri unix://PATH`): the proxy listens on `socket` and relays what comes.
#[derive(Clone, Debug)]
pub struct SocketSendOptions {
    pub socket: PathBuf,
    pub to: String,
    pub node: String,
    pub tls: Tls,
    pub bandwidth: Option<u64>,
    /// The multifd channels QEMU opens besides the main one (0: multifd off): without
    /// QMP the proxy cannot ask QEMU.
    pub multifd: u8,
    /// How long to wait for QEMU to connect.
    pub accept_timeout: Duration,
}

/// A migration whose QEMU is driven by someone else (libvirt holds its QMP socket): the
/// proxy listens on `opts.socket` (mode 0600; an existing socket file there is replaced,
/// anything else refused), takes QEMU's connection (with multifd, as many as the
/// operator said) and relays it through the proxies. No QMP here: QEMU's capabilities
/// are not checked (turn compression, XBZRLE and postcopy off; `opts.multifd` must be
/// QEMU's multifd channels), and on failure whoever drives QEMU cancels its migration
/// (libvirt resumes the guest on the source).
pub async fn send_via_socket(
    opts: SocketSendOptions,
    progress: Arc<Progress>,
) -> Result<Summary, Failure> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let started = Instant::now();
    let (links, filter) = open_links(
        &opts.tls,
        &opts.to,
        &opts.node,
        None,
        opts.multifd,
        &progress,
    )
    .await?;
    match std::fs::symlink_metadata(&opts.socket) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(&opts.socket);
        }
        Ok(_) => {
            return Err(Failure::Setup(format!(
                "{} exists and is not a socket: not replaced",
                opts.socket.display()
            )));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(&opts.socket)
        .map_err(|e| Failure::Setup(format!("{}: {e}", opts.socket.display())))?;
    let _ = std::fs::set_permissions(&opts.socket, std::fs::Permissions::from_mode(0o600));
    let relayed = relay_channels(
        &listener,
        opts.accept_timeout,
        links,
        filter,
        &progress,
        opts.bandwidth,
    )
    .await;
    let _ = std::fs::remove_file(&opts.socket);
    relayed?;
    Ok(Summary::of(&progress, started, None))
}

/// A link to the destination for each of the migration's channels (the main one first:
/// it brings the destination's filter, which every channel uses), opened before QEMU
/// starts sending.
async fn open_links(
    tls: &Tls,
    to: &str,
    node: &str,
    token: Option<&Token>,
    multifd: u8,
    progress: &Progress,
) -> Result<
    (
        Vec<tokio_rustls::client::TlsStream<TcpStream>>,
        Option<Arc<super::holdings::Filter>>,
    ),
    Failure,
> {
    let mut links = Vec::with_capacity(usize::from(multifd) + 1);
    let mut filter = None;
    for index in 0..=multifd {
        let mut link = connect_destination(tls, to, node, token).await?;
        let channel = Channel { index, multifd };
        if let Some(f) = source::open(&mut link, channel, progress).await? {
            filter = Some(f);
        }
        links.push(link);
    }
    Ok((links, filter))
}

/// Migrates the VM behind `opts.qmp` through the proxies; `progress` is updated as it
/// goes. On failure the VM runs on the source.
pub async fn send(opts: SendOptions, progress: Arc<Progress>) -> Result<Summary, Failure> {
    let started = Instant::now();
    let qmp_path = opts.qmp.clone();
    let multifd = blocking(move || {
        // What a migration command that did not finish left lowered (this QEMU's
        // included, before its limit is read as the operator's).
        limit_journal::recover(Path::new(limit_journal::DIR));
        check_capabilities(&qmp_path)
    })
    .await?
    .multifd;
    let (links, filter) = open_links(
        &opts.tls,
        &opts.to,
        &opts.node,
        opts.token.as_ref(),
        multifd,
        &progress,
    )
    .await?;
    let _ = std::fs::remove_dir_all(&opts.work_dir);
    // Not recursive: a directory someone else created meanwhile (the default lives under
    // the temporary directory) is an error, never a place for QEMU's socket.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&opts.work_dir)
        .map_err(|e| Failure::Setup(format!("{}: {e}", opts.work_dir.display())))?;
    let sock = opts.work_dir.join("qemu.sock");
    let listener = UnixListener::bind(&sock)
        .map_err(|e| Failure::Setup(format!("{}: {e}", sock.display())))?;
    let (qmp_path, uri) = (opts.qmp.clone(), format!("unix:{}", sock.display()));
    blocking(move || {
        qmp(&qmp_path, |q| {
            q.execute("migrate", serde_json::json!({ "uri": uri }))
        })
    })
    .await?;
    // Dropping the sender stops the poller at once (also when this future is dropped: an
    // interrupted migration).
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let poller = {
        let (path, progress) = (opts.qmp.clone(), progress.clone());
        tokio::task::spawn_blocking(move || watch_qemu(&path, &stopped, &progress))
    };
    let result = relay_channels(
        &listener,
        CONNECT_TIMEOUT,
        links,
        filter,
        &progress,
        opts.bandwidth,
    )
    .await;
    let _ = std::fs::remove_dir_all(&opts.work_dir);
    // Stopped before the checks below open their own QMP sessions.
    drop(stop);
    let _ = poller.await;
    // QEMU's own view: it must end `completed` (then the guest is paused on the source
    // and runs on the destination once started there).
    let qmp_path = opts.qmp.clone();
    let (status, downtime) =
        blocking(move || qmp(&qmp_path, |q| await_status(q, Duration::from_secs(30)))).await?;
    match result {
        Ok(_) if status == "completed" => Ok(Summary::of(&progress, started, downtime)),
        Ok(_) => {
            keep_on_source(&opts.qmp).await;
            Err(Failure::Setup(format!(
                "QEMU's migration ended {status} though the proxies agreed"
            )))
        }
        Err(e) => {
            keep_on_source(&opts.qmp).await;
            Err(e)
        }
    }
}

/// QEMU's connections to the proxy's socket, each relayed on its link in the order QEMU
/// opened them (the main channel, then its multifd channels), until every channel's
/// stream was confirmed; the first failure stops them all. QEMU's first connection is
/// awaited `first_within`, each further one [`CONNECT_TIMEOUT`].
async fn relay_channels<L>(
    listener: &UnixListener,
    first_within: Duration,
    links: Vec<L>,
    filter: Option<Arc<super::holdings::Filter>>,
    progress: &Arc<Progress>,
    bandwidth: Option<u64>,
) -> Result<(), Failure>
where
    L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let channels = links.len();
    // The operator's bandwidth is the link's, shared by the channels.
    let pace = super::Pace::new(bandwidth);
    let mut relays = tokio::task::JoinSet::new();
    let mut links = links.into_iter();
    let mut accepted = 0;
    while accepted < channels {
        let within = if accepted == 0 {
            first_within
        } else {
            CONNECT_TIMEOUT
        };
        let deadline = tokio::time::Instant::now() + within;
        let qemu = tokio::select! {
            a = tokio::time::timeout_at(deadline, listener.accept()) => match a {
                Ok(Ok((qemu, _))) => qemu,
                Ok(Err(e)) => return Err(Failure::Setup(format!("QEMU's connection: {e}"))),
                Err(_) => {
                    return Err(Failure::Setup(format!(
                        "QEMU opened {accepted} of its {channels} migration channels to the \
                         proxy"
                    )));
                }
            },
            // A channel that failed meanwhile ends the migration at once.
            Some(r) = relays.join_next(), if !relays.is_empty() => {
                relayed(r)?;
                continue;
            }
        };
        let Some(link) = links.next() else { break };
        accepted += 1;
        relays.spawn(source::relay(
            qemu,
            link,
            filter.clone(),
            progress.clone(),
            pace.clone(),
        ));
    }
    while let Some(r) = relays.join_next().await {
        relayed(r)?;
    }
    Ok(())
}

/// One channel's end: its failure, or a relay task that did not finish.
fn relayed(
    r: Result<Result<super::link::Sum, Failure>, tokio::task::JoinError>,
) -> Result<(), Failure> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(Failure::Peer(format!("a relay task: {e}"))),
    }
}

/// How often the poller looks at QEMU: its downtime threshold follows the bandwidth it
/// measures every 100 ms.
const POLL: Duration = Duration::from_millis(100);

/// Watches QEMU until `stop`'s sender is dropped: its downtime limit corrected for the
/// references ([`Governor`]) every [`POLL`], the operator's put back at the end, and its
/// remaining RAM recorded in `progress` (the ETA). A runtime waits for its blocking
/// threads before it exits, so the poller must end with the migration, and at once: the
/// migration's last step waits for it. One short QMP session per poll: QEMU serves one
/// QMP client at a time, and the migration's own commands must not wait behind a held
/// session. A poll that fails is skipped (progress is not worth failing a migration
/// over); without the operator's limit, the limit is never touched.
fn watch_qemu(path: &Path, stop: &std::sync::mpsc::Receiver<()>, progress: &Progress) {
    let mut governor: Option<Governor> = None;
    // The operator's limit, written down before QEMU is given another (none: not yet).
    let mut journal: Option<(Journal, u64)> = None;
    // The journal could not be written: the limit is left alone.
    let mut uncorrected = false;
    loop {
        let _ = qmp(path, |q| {
            let m = q.execute("query-migrate", serde_json::json!({}))?;
            if let Some(r) = m["ram"]["remaining"].as_u64() {
                progress.ram_remaining.store(r, Ordering::Relaxed);
            }
            if uncorrected {
                return Ok(());
            }
            let Some(limit_ms) = downtime_limit(q)? else {
                return Ok(());
            };
            let g = governor.get_or_insert_with(|| Governor::new(limit_ms));
            let poll = downtime::Poll {
                stream: Progress::get(&progress.qemu_bytes),
                wire: Progress::get(&progress.wire_bytes),
                limit_ms,
                syncs: m["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
            };
            if let Some(ms) = g.poll(poll) {
                let operator = g.operator_ms();
                if journal.as_ref().is_none_or(|(_, j)| *j != operator) {
                    match Journal::record(Path::new(limit_journal::DIR), path, operator) {
                        Ok(j) => journal = Some((j, operator)),
                        Err(e) => {
                            // Never changed without being written down: left as it is.
                            tracing::warn!(
                                "QEMU's downtime limit left uncorrected: {}: {e}",
                                limit_journal::DIR
                            );
                            g.forget(ms);
                            uncorrected = true;
                            return Ok(());
                        }
                    }
                }
                if let Err(e) = set_downtime_limit(q, ms) {
                    // QEMU kept its limit: not to be taken for someone else's next poll.
                    g.forget(ms);
                    return Err(e);
                }
                progress
                    .lowest_downtime_limit
                    .fetch_min(ms, Ordering::Relaxed);
            }
            Ok(())
        });
        if stop.recv_timeout(POLL) != Err(RecvTimeoutError::Timeout) {
            break;
        }
    }
    let mut put_back = Ok(());
    if let Some(g) = governor.filter(Governor::changed) {
        let ms = g.operator_ms();
        // A few tries: QEMU's one QMP client may be busy for a moment.
        for i in 0..3 {
            if i > 0 {
                std::thread::sleep(POLL);
            }
            put_back = qmp(path, |q| set_downtime_limit(q, ms)).map_err(|e| (ms, e));
            if put_back.is_ok() {
                break;
            }
        }
    }
    match (put_back, journal) {
        (Ok(()), Some((j, _))) => j.remove(),
        (Ok(()), None) => {}
        // The journal stays: the next migration command or the daemon's start puts it back.
        (Err((ms, e)), _) => tracing::warn!(
            "QEMU's downtime-limit could not be put back to {ms} ms yet: {e} \
             (migrate-set-parameters downtime-limit={ms})"
        ),
    }
}

/// QEMU's `downtime-limit` in ms (None from a QEMU that does not say).
fn downtime_limit(q: &mut Qmp) -> Result<Option<u64>, crate::actuate::qmp::QmpError> {
    let p = q.execute("query-migrate-parameters", serde_json::json!({}))?;
    Ok(p["downtime-limit"].as_u64())
}

fn set_downtime_limit(q: &mut Qmp, ms: u64) -> Result<(), crate::actuate::qmp::QmpError> {
    q.execute(
        "migrate-set-parameters",
        serde_json::json!({ "downtime-limit": ms }),
    )
    .map(drop)
}

/// After a failure: cancel QEMU's migration, and resume the guest if QEMU had finished
/// (the destination did not get a verified stream, so it must not run there).
pub(super) async fn keep_on_source(path: &Path) {
    let path = path.to_owned();
    let _ = blocking(move || {
        qmp(&path, |q| {
            let _ = q.execute("migrate_cancel", serde_json::json!({}));
            // Failed or cancelled: QEMU resumes the guest itself; completed: it stays
            // paused unless resumed here.
            let _ = await_status(q, Duration::from_secs(10));
            let running = q.execute("query-status", serde_json::json!({}))?;
            if running["running"] != true {
                q.execute("cont", serde_json::json!({}))?;
            }
            Ok(())
        })
    })
    .await;
}

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub listen: String,
    /// The unix socket the incoming QEMU listens on (`-incoming unix:PATH`).
    pub incoming: PathBuf,
    /// The migrating VM's UUID: its own QEMUs are not donors.
    pub uuid: Option<String>,
    pub tls: Tls,
    /// How long to wait for the source.
    pub accept_timeout: Duration,
}

/// Indexes this host's VMs, then receives one migration.
pub async fn receive(
    opts: ReceiveOptions,
    ready: impl FnOnce(std::net::SocketAddr, &Holdings),
    progress: Arc<Progress>,
) -> Result<Summary, Failure> {
    let configs = opts.tls.load()?;
    let listener = TcpListener::bind(&opts.listen)
        .await
        .map_err(|e| Failure::Setup(format!("listening on {}: {e}", opts.listen)))?;
    let holdings = index(opts.uuid.clone()).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::Setup(e.to_string()))?;
    ready(addr, &holdings);
    receive_on(
        listener,
        &configs.server,
        holdings,
        &opts.incoming,
        opts.accept_timeout,
        None,
        progress,
    )
    .await
}

/// This host's VMs' pages, the VM `uuid` left out (its own QEMUs are not donors).
pub async fn index(uuid: Option<String>) -> Result<Arc<Holdings>, Failure> {
    Ok(Arc::new(
        blocking(move || {
            let vms: Vec<_> = inventory::discover(&Selector::default())
                .into_values()
                .collect();
            Ok(Holdings::scan(&vms, uuid.as_deref()))
        })
        .await?,
    ))
}

/// Receives one migration on `listener` (mutual TLS as `server`) into the incoming QEMU
/// listening on `incoming`: from the first source within `accept_timeout` that completes
/// the handshake and, when `token` is given, sends it first; with multifd, a link per
/// channel, each connected to the incoming QEMU in the source QEMU's order. A connection
/// that fails either, or names a channel this migration does not have (or has already),
/// is dropped and the next one awaited, so that a stray or hostile connection cannot end
/// the migration (the last refusal is named if none succeeds).
pub async fn receive_on(
    listener: TcpListener,
    server: &tokio_rustls::TlsAcceptor,
    holdings: Arc<Holdings>,
    incoming: &Path,
    accept_timeout: Duration,
    token: Option<Token>,
    progress: Arc<Progress>,
) -> Result<Summary, Failure> {
    let deadline = tokio::time::Instant::now() + accept_timeout;
    let mut refused: Option<String> = None;
    let mut started: Option<Instant> = None;
    // The channels' links by index, once the first told how many there are.
    let mut links: Vec<Option<_>> = Vec::new();
    while links.is_empty() || links.iter().any(Option::is_none) {
        let accepted = tokio::time::timeout_at(deadline, listener.accept()).await;
        let (tcp, peer) = match accepted {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(Failure::Setup(format!("accepting: {e}"))),
            Err(_) => {
                let have = links.iter().filter(|l| l.is_some()).count();
                return Err(match refused {
                    Some(why) => Failure::Peer(why),
                    None if have > 0 => Failure::Peer(format!(
                        "the source opened {have} of its {} channels in time",
                        links.len()
                    )),
                    None => Failure::Setup("no source connected in time".into()),
                });
            }
        };
        let _ = tcp.set_nodelay(true);
        // A link that fails its handshake, or names a channel that does not fit, is refused.
        let admitted =
            handshake(server, tcp, peer, token.as_ref())
                .await
                .and_then(|(link, channel)| {
                    if links.is_empty() {
                        links.resize_with(usize::from(channel.multifd) + 1, || None);
                    }
                    let index = usize::from(channel.index);
                    if links.len() != usize::from(channel.multifd) + 1 || links[index].is_some() {
                        return Err(format!(
                            "{peer}: channel {} of 1 + {} does not fit the migration's 1 + {}",
                            channel.index,
                            channel.multifd,
                            links.len() - 1
                        ));
                    }
                    Ok((link, channel, index))
                });
        let (mut link, channel, index) = match admitted {
            Ok(l) => l,
            Err(why) => {
                tracing::warn!("migration proxy: {why}");
                refused = Some(why);
                continue;
            }
        };
        if channel.is_main() {
            dest::offer(&mut link, &holdings, &progress).await?;
        }
        started.get_or_insert_with(Instant::now);
        links[index] = Some((link, channel));
    }
    // In the source QEMU's order: the main channel first (QEMU 7.2 takes its first
    // connection for it), each connected before the next.
    let mut serving = tokio::task::JoinSet::new();
    for (link, channel) in links.into_iter().flatten() {
        let qemu = connect_incoming(incoming).await?;
        serving.spawn(dest::serve(
            link,
            qemu,
            channel,
            holdings.clone(),
            progress.clone(),
        ));
    }
    while let Some(r) = serving.join_next().await {
        relayed(r)?;
    }
    Ok(Summary::of(
        &progress,
        started.unwrap_or_else(Instant::now),
        None,
    ))
}

/// One connection's handshake, each step within [`CONNECT_TIMEOUT`]: mutual TLS, the
/// migration's token (when one is given) and the channel the link carries; or why the
/// connection is refused.
async fn handshake(
    server: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    token: Option<&Token>,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Channel), String> {
    let mut link = match tokio::time::timeout(CONNECT_TIMEOUT, server.accept(tcp)).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return Err(format!("TLS from {peer}: {e}")),
        Err(_) => return Err(format!("TLS from {peer}: timed out")),
    };
    if let Some(expected) = token {
        use tokio::io::AsyncReadExt as _;
        let mut got = [0u8; 16];
        let read = tokio::time::timeout(CONNECT_TIMEOUT, link.read_exact(&mut got)).await;
        if !matches!(read, Ok(Ok(_))) || !tokens_match(&got, expected) {
            return Err(format!("{peer} did not present the migration's token"));
        }
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, dest::accept(&mut link)).await {
        Ok(Ok(channel)) => Ok((link, channel)),
        Ok(Err(e)) => Err(format!("{peer}: {e}")),
        Err(_) => Err(format!("{peer}: no channel named in time")),
    }
}

/// Compares tokens in time independent of where they differ.
fn tokens_match(a: &Token, b: &Token) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The incoming QEMU's socket, retried while QEMU starts.
async fn connect_incoming(path: &Path) -> Result<UnixStream, Failure> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                return Err(Failure::Setup(format!(
                    "the incoming QEMU's socket {}: {e}",
                    path.display()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[test]
    fn multifd_is_carried_uncompressed_within_the_channel_bound() {
        let params = |v: serde_json::Value| multifd_channels(&v);
        let ok = serde_json::json!({ "multifd-channels": 4, "multifd-compression": "none" });
        assert_eq!(params(ok).unwrap(), 4);
        // QEMU's default when it does not say.
        assert_eq!(params(serde_json::json!({})).unwrap(), 2);
        for bad in [
            serde_json::json!({ "multifd-channels": 4, "multifd-compression": "zstd" }),
            serde_json::json!({ "multifd-channels": 0 }),
            serde_json::json!({ "multifd-channels": 255 }),
        ] {
            let e = params(bad.clone()).expect_err("refused").to_string();
            assert!(e.contains("migrate-set-parameters"), "{bad}: {e}");
        }
    }

    #[test]
    fn tokens_match_only_byte_for_byte() {
        let a = [7u8; 16];
        let mut b = a;
        assert!(tokens_match(&a, &b));
        b[15] ^= 1;
        assert!(!tokens_match(&a, &b));
    }

    /// A member of the cluster that connects first without the migration's token (or
    /// without a certificate at all) neither ends the migration nor reaches the incoming
    /// QEMU; the source with the token does (here: on to the incoming QEMU's socket,
    /// which this test leaves absent).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_source_with_the_token_gets_through() {
        let dir = std::env::temp_dir().join(format!("mf-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        memfabric_harness::Pki::new("test cluster").write(&dir, &["dst", "src", "other"]);
        let load = |n: &str| tls::load_written(&dir, n).unwrap();
        let (server, src, other) = (load("dst").server, load("src").client, load("other").client);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = [9u8; 16];
        let absent = dir.join("absent.sock");
        let receiving = tokio::spawn(async move {
            receive_on(
                listener,
                &server,
                Arc::new(Holdings::scan(&[], None)),
                &absent,
                Duration::from_secs(30),
                Some(token),
                Arc::new(Progress::default()),
            )
            .await
        });
        let name = || rustls::pki_types::ServerName::try_from("dst").unwrap();
        // No certificate: a plain TCP connection that sends garbage.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        drop(plain);
        // A cluster member with a wrong token.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut rogue = other.connect(name(), tcp).await.unwrap();
        rogue.write_all(&[1u8; 16]).await.unwrap();
        rogue.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !receiving.is_finished(),
            "a stray connection ended the migration"
        );
        // The source.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut link = src.connect(name(), tcp).await.unwrap();
        link.write_all(&token).await.unwrap();
        link::hello(&mut link).await.unwrap();
        Channel::ALONE.write(&mut link).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(20), receiving)
            .await
            .expect("the proxy went on")
            .unwrap();
        let e = r.expect_err("no incoming QEMU").to_string();
        assert!(e.contains("incoming QEMU's socket"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
