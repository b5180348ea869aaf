//! Deduplicating live migration of QEMU guests: a proxy on each host, between QEMU's
//! migration stream and the fabric's mutual-TLS channel, that sends a page the
//! destination host already holds as a reference to its content instead of its 4 KiB.
//!
//! ```text
//! source QEMU --unix--> source proxy ==TLS== destination proxy --unix--> incoming QEMU
//!   (QMP migrate)        splits pages        resolves references       (-incoming)
//! ```
//!
//! Stock QEMU on both ends: the source's QMP `migrate` points at the source proxy's
//! socket, the destination QEMU listens with `-incoming unix:PATH`. With QEMU's `multifd`
//! each of its channels crosses on a link of its own ([`link::Channel`]), connected to the
//! incoming QEMU in the order the source QEMU opened them, its pages referenced like the
//! main channel's with the filter the main link brought. QEMU's own compression (of the
//! main channel or of multifd's), XBZRLE and postcopy stay off through the proxy (refused
//! before anything starts): their records are not split, and postcopy runs the guest on
//! the destination before its stream was verified. What the incoming QEMU is handed is
//! checked end to end, channel by channel (length and XXH3-128 checksum), against what the
//! source QEMU wrote; a failure anywhere cancels the migration and the VM keeps running on
//! the source.

pub mod command;
pub mod dest;
pub mod downtime;
pub mod holdings;
pub mod incoming;
pub mod incoming_qemu;
pub mod limit_journal;
pub mod link;
pub mod outgoing;
pub mod remote;
pub mod run;
pub mod source;
pub mod stream;

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _},
    sync::mpsc,
};

/// A migration's counters, read while it runs (progress) and after (the summary).
#[derive(Debug)]
pub struct Progress {
    /// QEMU's stream: written by the source QEMU, or handed to the incoming one.
    pub qemu_bytes: AtomicU64,
    /// Frames written to the link by this end.
    pub wire_bytes: AtomicU64,
    /// Frames read from the link by this end (destination: what the migration took on
    /// the link, against `qemu_bytes` a plain one would have).
    pub link_in_bytes: AtomicU64,
    /// The destination's filter.
    pub filter_bytes: AtomicU64,
    /// Page records seen (source).
    pub pages: AtomicU64,
    /// Pages sent (source) or resolved (destination) as references.
    pub referenced: AtomicU64,
    /// References the destination could not resolve: pages sent again.
    pub resent: AtomicU64,
    /// RAM QEMU still has to send (`query-migrate`'s `ram.remaining`, polled by the
    /// source once a second); [`Progress::UNKNOWN`] before the first answer.
    pub ram_remaining: AtomicU64,
    /// The lowest downtime limit QEMU was given for this migration, in ms (source, see
    /// [`downtime`]); [`Progress::UNKNOWN`] while it was left as the operator set it.
    pub lowest_downtime_limit: AtomicU64,
    /// QEMU's channels relayed: 1, or 1 + its multifd channels.
    pub channels: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            qemu_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            link_in_bytes: AtomicU64::new(0),
            filter_bytes: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            referenced: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            ram_remaining: AtomicU64::new(Progress::UNKNOWN),
            lowest_downtime_limit: AtomicU64::new(Progress::UNKNOWN),
            channels: AtomicU64::new(0),
        }
    }
}

impl Progress {
    /// A counter not known yet.
    pub const UNKNOWN: u64 = u64::MAX;

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Seconds left, from the RAM QEMU still has to send and the rate its stream reached
    /// in `elapsed`: the stream, not the wire, because references make the wire's bytes
    /// a varying fraction of QEMU's. `None` before QEMU answered or wrote anything; a
    /// guest dirtying memory faster than the link keeps `remaining` up, and the estimate
    /// with it, which is what the operator should see.
    pub fn eta(&self, elapsed: std::time::Duration) -> Option<std::time::Duration> {
        let remaining = Progress::get(&self.ram_remaining);
        let rate = Progress::get(&self.qemu_bytes) as f64 / elapsed.as_secs_f64();
        (remaining != Progress::UNKNOWN && rate.is_finite() && rate > 0.0)
            .then(|| std::time::Duration::from_secs_f64((remaining as f64 / rate).min(1e7)))
    }
}

/// A migration status QEMU leaves only for a new migration.
pub fn settled(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled" | "none")
}

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("the link to the other proxy: {0}")]
    Link(#[from] link::LinkError),
    #[error("QEMU's migration socket: {0}")]
    Qemu(std::io::Error),
    #[error("the other proxy: {0}")]
    Peer(String),
    #[error(
        "the destination was handed {delivered} bytes unlike the {sent} the source wrote \
         (length or digest differ): the destination must not run"
    )]
    Mismatch { sent: u64, delivered: u64 },
    #[error("{0}")]
    Setup(String),
    /// The destination's agent said no (refused the request or could not start the
    /// guest): the VM runs on the source.
    #[error("{0}")]
    Refused(String),
    /// The outcome is not known here: the VM is paused on the source (see the text).
    #[error("{0}")]
    Undecided(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Link(link::LinkError::Io(e))
    }
}

impl Failure {
    fn closed() -> Failure {
        Failure::Peer("the link closed".into())
    }
}

/// How long to wait before writing more, so that `sent` bytes in `elapsed` stay within
/// `limit` bytes per second (none: never wait).
fn pace(sent: u64, elapsed: std::time::Duration, limit: Option<u64>) -> std::time::Duration {
    match limit {
        Some(l) if l > 0 => {
            let due = std::time::Duration::from_secs_f64(sent as f64 / l as f64);
            due.saturating_sub(elapsed)
        }
        _ => std::time::Duration::ZERO,
    }
}

/// The operator's cap on the bytes a migration puts on the link (`--bandwidth`), shared
/// by the writers of all its channels' links.
#[derive(Debug)]
pub struct Pace {
    limit: Option<u64>,
    started: std::time::Instant,
    sent: AtomicU64,
}

impl Pace {
    /// At most `limit` bytes per second from now on (none: no cap).
    pub fn new(limit: Option<u64>) -> std::sync::Arc<Pace> {
        std::sync::Arc::new(Pace {
            limit,
            started: std::time::Instant::now(),
            sent: AtomicU64::new(0),
        })
    }

    /// How long a writer waits before it writes `n` more bytes.
    fn before(&self, n: u64) -> std::time::Duration {
        let sent = self.sent.fetch_add(n, Ordering::Relaxed);
        pace(sent, self.started.elapsed(), self.limit)
    }
}

/// The one writer of a link: frames from every task of a proxy, in the order sent, within
/// the migration's `pace`.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
    progress: std::sync::Arc<Progress>,
    pace: std::sync::Arc<Pace>,
) -> std::io::Result<()> {
    while let Some(frames) = rx.recv().await {
        let wait = pace.before(frames.len() as u64);
        if !wait.is_zero() {
            w.flush().await?;
            tokio::time::sleep(wait).await;
        }
        w.write_all(&frames).await?;
        progress
            .wire_bytes
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{
        holdings::{Holdings, digest, tests::donor},
        link::Frame as _,
        stream::PAGE,
        *,
    };

    #[test]
    fn eta_is_the_remaining_ram_at_the_streams_rate_once_known() {
        let p = Progress::default();
        let sec = std::time::Duration::from_secs(1);
        // Nothing from QEMU yet.
        assert_eq!(p.eta(sec), None);
        p.ram_remaining.store(300 << 20, Ordering::Relaxed);
        assert_eq!(p.eta(sec), None, "no stream yet: no rate");
        p.qemu_bytes.store(100 << 20, Ordering::Relaxed);
        // 100 MiB in 2 s: 50 MiB/s, 300 MiB left: 6 s.
        assert_eq!(p.eta(2 * sec), Some(6 * sec));
        assert_eq!(p.eta(std::time::Duration::ZERO), None);
    }

    /// The sample stream through both proxies over an in-memory link; what the "incoming
    /// QEMU" reads and the counters at both ends.
    async fn through(
        stream: Vec<u8>,
        holdings: Holdings,
    ) -> (Vec<u8>, Arc<Progress>, Arc<Progress>) {
        let (src_qemu, mut qemu_out) = tokio::io::duplex(1 << 16);
        let (dst_qemu, mut qemu_in) = tokio::io::duplex(1 << 16);
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ps, pd) = (Arc::new(Progress::default()), Arc::new(Progress::default()));
        let holdings = Arc::new(holdings);
        let s = tokio::spawn(source::run(src_qemu, a, ps.clone(), None));
        let d = tokio::spawn(dest::run(b, dst_qemu, holdings, pd.clone()));
        let feed = tokio::spawn(async move {
            qemu_out.write_all(&stream).await.unwrap();
            qemu_out.shutdown().await.unwrap();
            // Hold the socket as QEMU does until the migration ends.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut qemu_out, &mut sink).await;
        });
        let mut got = Vec::new();
        let read = tokio::spawn(async move {
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut qemu_in, &mut got).await;
            got
        });
        let (s, d) = (s.await.unwrap(), d.await.unwrap());
        assert_eq!(s.as_ref().unwrap(), d.as_ref().unwrap());
        feed.abort();
        (read.await.unwrap(), ps, pd)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_pages_go_as_references_and_arrive_byte_for_byte() {
        let pages = [[1u8; PAGE], [2u8; PAGE], [3u8; PAGE]];
        let stream = stream::tests::sample(&pages);
        // The destination holds pages 1 and 3.
        let (_ram, vm) = donor(&[pages[0], pages[2]]);
        let h = Holdings::scan(&[vm], None);
        let (got, ps, pd) = through(stream.clone(), h).await;
        assert_eq!(got, stream);
        assert_eq!(Progress::get(&ps.referenced), 2);
        assert_eq!(Progress::get(&pd.referenced), 2);
        assert_eq!(Progress::get(&pd.resent), 0);
        let wire = Progress::get(&ps.wire_bytes);
        assert_eq!(
            Progress::get(&pd.link_in_bytes),
            wire,
            "what crossed, counted at both ends"
        );
        assert!(
            wire < stream.len() as u64 - 2 * PAGE as u64 + 200,
            "{wire} bytes on the wire for {}",
            stream.len()
        );
        assert_eq!(digest(&got), digest(&stream));
    }

    /// A migration with a multifd channel beside the main one, each on a link of its own:
    /// the multifd channel's pages are referenced with the filter the main link brought,
    /// and each channel arrives byte for byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_multifd_channel_is_referenced_with_the_main_channels_filter() {
        use tokio::io::AsyncReadExt as _;
        let pages = [[1u8; PAGE], [2u8; PAGE], [3u8; PAGE]];
        let streams = [
            stream::tests::sample(&pages),
            stream::tests::multifd_channel(0, &[&pages[..], &[]]),
        ];
        let (_ram, vm) = donor(&[pages[0], pages[2]]);
        let holdings = Arc::new(Holdings::scan(&[vm], None));
        let (ps, pd) = (Arc::new(Progress::default()), Arc::new(Progress::default()));
        let pace = Pace::new(None);
        let mut links = Vec::new();
        let mut tasks = Vec::new();
        let mut delivered = Vec::new();
        for (index, stream) in streams.iter().enumerate() {
            let (a, mut b) = tokio::io::duplex(1 << 16);
            let (src_qemu, mut qemu_out) = tokio::io::duplex(1 << 16);
            let (dst_qemu, mut qemu_in) = tokio::io::duplex(1 << 16);
            let (holdings, pd) = (holdings.clone(), pd.clone());
            tasks.push(tokio::spawn(async move {
                let channel = dest::accept(&mut b).await?;
                if channel.is_main() {
                    dest::offer(&mut b, &holdings, &pd).await?;
                }
                dest::serve(b, dst_qemu, channel, holdings, pd).await
            }));
            let stream = stream.clone();
            tokio::spawn(async move {
                qemu_out.write_all(&stream).await.unwrap();
                qemu_out.shutdown().await.unwrap();
                let mut sink = Vec::new();
                let _ = qemu_out.read_to_end(&mut sink).await;
            });
            delivered.push(tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = qemu_in.read_to_end(&mut got).await;
                got
            }));
            let index = u8::try_from(index).unwrap();
            links.push((index, a, src_qemu));
        }
        let mut filter = None;
        for (index, mut a, src_qemu) in links {
            let channel = link::Channel { index, multifd: 1 };
            if let Some(f) = source::open(&mut a, channel, &ps).await.unwrap() {
                filter = Some(f);
            }
            assert!(filter.is_some(), "the main channel brings the filter first");
            tasks.push(tokio::spawn(source::relay(
                src_qemu,
                a,
                filter.clone(),
                ps.clone(),
                pace.clone(),
            )));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for (d, stream) in delivered.into_iter().zip(&streams) {
            assert_eq!(&d.await.unwrap(), stream);
        }
        // Pages 1 and 3 on each channel.
        assert_eq!(Progress::get(&ps.referenced), 4);
        assert_eq!(Progress::get(&pd.referenced), 4);
        assert_eq!(Progress::get(&pd.channels), 2);
        assert_eq!(Progress::get(&ps.channels), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_donor_page_changed_after_the_filter_is_sent_again() {
        let pages = [[1u8; PAGE], [2u8; PAGE], [3u8; PAGE]];
        let stream = stream::tests::sample(&pages);
        let (mut ram, vm) = donor(&[pages[0], pages[2]]);
        let h = Holdings::scan(&[vm], None);
        // The donor guest changes its page after the destination indexed it.
        let off = ram.as_ptr().align_offset(PAGE);
        ram[off] = 42;
        let (got, ps, pd) = through(stream.clone(), h).await;
        assert_eq!(got, stream);
        assert_eq!(Progress::get(&pd.resent), 1);
        assert_eq!(Progress::get(&ps.resent), 1);
        assert_eq!(Progress::get(&pd.referenced), 1);
    }

    /// A destination whose every held page changed after it sent its filter: each
    /// reference is asked for again, so after the grace the source stops referencing and
    /// sends the rest whole (a stall per page otherwise); the stream still arrives byte
    /// for byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_destination_that_misses_most_references_gets_the_rest_whole() {
        let n = usize::try_from(8 * source::MISS_GRACE).unwrap();
        let pages: Vec<[u8; PAGE]> = (0..n)
            .map(|i| {
                let mut p = [0x5au8; PAGE];
                p[..8].copy_from_slice(&(i as u64).to_le_bytes());
                p
            })
            .collect();
        let stream = stream::ram_stream(&pages);
        let (mut ram, vm) = donor(&pages);
        let h = Holdings::scan(&[vm], None);
        assert_eq!(h.pages(), n);
        let off = ram.as_ptr().align_offset(PAGE);
        for i in 0..n {
            ram[off + i * PAGE + 100] ^= 1;
        }
        let (got, ps, pd) = through(stream.clone(), h).await;
        assert_eq!(got, stream);
        let (referenced, resent) = (Progress::get(&ps.referenced), Progress::get(&ps.resent));
        assert_eq!(resent, referenced, "every reference missed");
        assert!(
            (source::MISS_GRACE..4 * source::MISS_GRACE).contains(&referenced),
            "{referenced} of {n} pages referenced"
        );
        assert_eq!(Progress::get(&pd.referenced), 0);
    }

    #[test]
    fn the_writer_waits_only_when_ahead_of_the_bandwidth() {
        use std::time::Duration;
        let s = Duration::from_secs;
        assert_eq!(pace(1 << 30, s(0), None), s(0));
        // 10 MB at 1 MB/s: due at 10 s.
        assert_eq!(pace(10_000_000, s(4), Some(1_000_000)), s(6));
        assert_eq!(pace(10_000_000, s(12), Some(1_000_000)), s(0));
        assert_eq!(pace(5, s(0), Some(0)), s(0));
    }

    /// A donor VM that exits after the destination indexed it: every reference to its
    /// pages is asked for again, and the stream still arrives byte for byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_donor_vm_that_exits_mid_migration_costs_resends_not_bytes() {
        let pages = [[1u8; PAGE], [2u8; PAGE], [3u8; PAGE]];
        let stream = stream::tests::sample(&pages);
        let (_ram, mut vm) = donor(&[pages[0], pages[2]]);
        // The donor is a child process holding a copy of those pages at the same addresses.
        // SAFETY: the child only sleeps in pause() (async-signal-safe) until killed.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child == 0 {
            loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
            }
        }
        vm.pid = u32::try_from(child).unwrap();
        let h = Holdings::scan(&[vm], None);
        assert_eq!(h.pages(), 2, "the child's pages are indexed");
        // SAFETY: our own child, killed and reaped.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        let (got, ps, pd) = through(stream.clone(), h).await;
        assert_eq!(got, stream);
        assert_eq!(Progress::get(&pd.resent), 2);
        assert_eq!(Progress::get(&ps.resent), 2);
        assert_eq!(Progress::get(&pd.referenced), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_destination_that_gives_up_ends_the_source_without_hanging() {
        let (src_qemu, mut qemu_out) = tokio::io::duplex(1 << 16);
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let s = tokio::spawn(source::run(
            src_qemu,
            a,
            Arc::new(Progress::default()),
            None,
        ));
        // QEMU writes on and never closes.
        tokio::spawn(async move { while qemu_out.write_all(&[0u8; PAGE]).await.is_ok() {} });
        link::hello(&mut b).await.unwrap();
        let mut f = Vec::new();
        link::Up::Filter(holdings::Filter::build(Vec::new(), 0).encode()).encode(&mut f);
        link::Up::Abort("disk full".into()).encode(&mut f);
        b.write_all(&f).await.unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), s)
            .await
            .expect("the source hung")
            .unwrap();
        assert!(
            matches!(&r, Err(Failure::Peer(w)) if w.contains("disk full")),
            "{r:?}"
        );
    }
}
