//! The source proxy: QEMU's outgoing stream in, frames to the destination out. Page
//! bodies the destination's filter says it holds go as references; a copy of each is kept
//! until the destination acknowledges it (at most [`WINDOW`] pages: the proxy stops
//! reading from QEMU when the window is full), so that a page the destination could not
//! resolve is sent again. The destination's return-path bytes are handed to QEMU.
//!
//! Each resend stalls the destination's stream for a round trip. Its copies may change
//! or go (a donor VM rewriting or leaving), and the filter answers "maybe" for a page in
//! 65,536 it does not hold; when more than one reference in [`MAX_MISS_SHARE`] is asked
//! for again (after [`MISS_GRACE`] references), referencing stops and the rest is sent
//! whole: a destination whose holdings melt away costs a plain migration, not a stall
//! per page.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::{Notify, mpsc},
};

use super::{
    Failure, Pace, Progress,
    holdings::{Filter, digest},
    link::{self, Channel, Down, Frame as _, MAX_RAW, Sum, Tally, Up},
    stream::{PAGE, Splitter, Token},
};

/// The most read from QEMU's socket at once.
const READ: usize = 256 << 10;
/// Referenced pages kept for resending: 64 MiB.
pub const WINDOW: usize = 16_384;
/// Batches of frames (each at most one read of QEMU's stream, 256 KiB) queued for the
/// link's writer. Few: QEMU's downtime ends once it has written its last bytes into this
/// proxy, and everything queued ahead of them crosses the link first (16 batches: up to
/// 4 MiB, a third of a second at 100 Mbit/s); two keep reading and writing overlapped.
const QUEUED_BATCHES: usize = 2;
/// How long the destination may take to send its filter (it indexes its VMs first).
pub const FILTER_TIMEOUT: Duration = Duration::from_secs(300);
/// References sent before the share of misses is judged.
pub const MISS_GRACE: u64 = 1024;
/// Referencing stops when more than one reference in this many was asked for again.
pub const MAX_MISS_SHARE: u64 = 8;

/// Whether references still pay: few enough of them were asked for again.
fn references_pay(referenced: u64, resent: u64) -> bool {
    referenced < MISS_GRACE || resent.saturating_mul(MAX_MISS_SHARE) <= referenced
}

/// Referenced pages not yet acknowledged, oldest first: (index, page).
#[derive(Default)]
struct Kept {
    pages: Mutex<VecDeque<(u64, Box<[u8; PAGE]>)>>,
    freed: Notify,
}

/// Runs the proxy of a migration without multifd (one channel) until the destination
/// confirmed what it handed to its QEMU, which must be exactly what this QEMU wrote.
/// At most `bandwidth` bytes per second go on the link (none: as fast as it takes them).
pub async fn run<Q, L>(
    qemu: Q,
    mut link: L,
    progress: Arc<Progress>,
    bandwidth: Option<u64>,
) -> Result<Sum, Failure>
where
    Q: AsyncRead + AsyncWrite + Send + 'static,
    L: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let filter = open(&mut link, Channel::ALONE, &progress).await?;
    relay(qemu, link, filter, progress, Pace::new(bandwidth)).await
}

/// Opens a link for `channel`: the protocol's hello, the channel, and on the main
/// channel the destination's filter (the other channels of the migration share it:
/// `None` for them).
pub async fn open<L>(
    link: &mut L,
    channel: Channel,
    progress: &Progress,
) -> Result<Option<Arc<Filter>>, Failure>
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    link::hello(link).await?;
    channel.write(link).await?;
    if !channel.is_main() {
        return Ok(None);
    }
    match tokio::time::timeout(FILTER_TIMEOUT, Up::read(link)).await {
        Err(_) => Err(Failure::Peer(
            "no filter from the destination in time".into(),
        )),
        Ok(r) => match r? {
            Up::Filter(b) => {
                progress
                    .filter_bytes
                    .store(b.len() as u64, Ordering::Relaxed);
                Ok(Some(Arc::new(Filter::decode(&b).map_err(Failure::Peer)?)))
            }
            Up::Abort(why) => Err(Failure::Peer(why)),
            other => Err(Failure::Peer(format!("{other:?} before the filter"))),
        },
    }
}

/// Runs the proxy of one channel on a link [`open`]ed for it, with the main channel's
/// filter, until the destination confirmed what it handed to its QEMU on this channel;
/// within `pace`, which the migration's channels share.
pub async fn relay<Q, L>(
    qemu: Q,
    link: L,
    filter: Option<Arc<Filter>>,
    progress: Arc<Progress>,
    pace: Arc<Pace>,
) -> Result<Sum, Failure>
where
    Q: AsyncRead + AsyncWrite + Send + 'static,
    L: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let filter = filter.unwrap_or_else(|| Arc::new(Filter::build(Vec::new(), 0)));
    progress.channels.fetch_add(1, Ordering::Relaxed);
    let (mut link_rx, link_tx) = tokio::io::split(link);
    let (qemu_rx, mut qemu_tx) = tokio::io::split(qemu);
    let kept = Arc::new(Kept::default());
    let (tx, rx) = mpsc::channel::<Vec<u8>>(QUEUED_BATCHES);
    let writer = tokio::spawn(super::write_frames(link_tx, rx, progress.clone(), pace));
    let forward = {
        let (tx, kept, progress) = (tx.clone(), kept.clone(), progress.clone());
        tokio::spawn(async move {
            let r = forward(qemu_rx, tx.clone(), filter, kept, progress).await;
            if let Err(e) = &r {
                // Tell the destination, which then closes the link: the loop below, which
                // waits for its frames, ends too.
                let _ = tx.send(Down::Abort(e.to_string()).to_vec()).await;
            }
            r
        })
    };
    let result = async {
        loop {
            match Up::read(&mut link_rx).await? {
                Up::Back(b) => qemu_tx.write_all(&b).await.map_err(Failure::Qemu)?,
                Up::Need(index) => {
                    let frame = {
                        let pages = kept.pages.lock().unwrap_or_else(|e| e.into_inner());
                        let Some((_, page)) = pages.iter().find(|(i, _)| *i == index) else {
                            return Err(Failure::Peer(format!(
                                "asked for reference {index}, not kept"
                            )));
                        };
                        Down::Again {
                            index,
                            page: page.clone(),
                        }
                        .to_vec()
                    };
                    progress.resent.fetch_add(1, Ordering::Relaxed);
                    tx.send(frame).await.map_err(|_| Failure::closed())?;
                }
                Up::Ack(upto) => {
                    let mut pages = kept.pages.lock().unwrap_or_else(|e| e.into_inner());
                    while pages.front().is_some_and(|(i, _)| *i < upto) {
                        pages.pop_front();
                    }
                    kept.freed.notify_one();
                }
                Up::Done(sum) => return Ok(sum),
                Up::Abort(why) => return Err(Failure::Peer(why)),
                Up::Filter(_) => return Err(Failure::Peer("a second filter".into())),
            }
        }
    }
    .await;
    let confirmed = match result {
        Ok(c) => c,
        Err(e) => {
            // The forwarding task may wait for window room or the link: stop both.
            forward.abort();
            writer.abort();
            return Err(e);
        }
    };
    let sent = forward.await;
    drop(tx);
    let _ = writer.await;
    let ours = match sent {
        Ok(Ok(ours)) => ours,
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(Failure::Peer(format!("the forwarding task: {e}"))),
    };
    if confirmed != ours {
        return Err(Failure::Mismatch {
            sent: ours.bytes,
            delivered: confirmed.bytes,
        });
    }
    Ok(confirmed)
}

/// QEMU's stream to frames; returns its length and checksum once QEMU closed it.
async fn forward<Q: AsyncRead>(
    qemu: Q,
    tx: mpsc::Sender<Vec<u8>>,
    filter: Arc<Filter>,
    kept: Arc<Kept>,
    progress: Arc<Progress>,
) -> Result<Sum, Failure> {
    tokio::pin!(qemu);
    let mut split = Splitter::new();
    let mut tally = Tally::default();
    let mut buf: Vec<u8> = Vec::with_capacity(2 * MAX_RAW);
    let mut next_ref = 0u64;
    // Bytes of `buf` that pass as they are, not framed yet: framed straight from `buf`
    // when a reference or the end of what was read interrupts them (a copy each byte
    // saved over gathering them first).
    let mut run: Option<(usize, usize)> = None;
    let mut frames: Vec<u8> = Vec::new();
    let mut referencing = !filter.is_empty();
    loop {
        // Read straight into the buffer's spare room (no zeroing, no second copy), at most
        // READ at once: a batch for the link is what one read brought.
        let old = buf.len();
        buf.reserve(READ);
        let n = (&mut qemu)
            .take(READ as u64)
            .read_buf(&mut buf)
            .await
            .map_err(Failure::Qemu)?;
        let eof = n == 0;
        tally.update(&buf[old..]);
        progress.qemu_bytes.fetch_add(n as u64, Ordering::Relaxed);
        let mut at = 0;
        loop {
            let token = match split.next(&buf[at..]) {
                Some(t) => t,
                None if eof => match split.finish(&buf[at..]) {
                    Some(t) => t,
                    None => break,
                },
                None => break,
            };
            let begin = at;
            at += token.len();
            let bytes = &buf[begin..at];
            if token == Token::Page {
                progress.pages.fetch_add(1, Ordering::Relaxed);
                if referencing
                    && !references_pay(
                        progress.referenced.load(Ordering::Relaxed),
                        progress.resent.load(Ordering::Relaxed),
                    )
                {
                    referencing = false;
                    tracing::warn!(
                        "the destination asked for more than one reference in \
                         {MAX_MISS_SHARE} again: the rest of the migration is sent whole"
                    );
                }
                // A destination that holds nothing: no page is hashed for it; the digest
                // only for a page its filter says it holds.
                let k = referencing.then(|| filter.key(bytes));
                if let Some(key) = k.filter(|k| filter.contains(*k)) {
                    if let Some((from, to)) = run.take() {
                        link::put_raw(&mut frames, &buf[from..to]);
                    }
                    Down::Ref {
                        key,
                        digest: digest(bytes),
                    }
                    .encode(&mut frames);
                    let mut page = Box::new([0u8; PAGE]);
                    page.copy_from_slice(bytes);
                    loop {
                        let freed = kept.freed.notified();
                        {
                            let mut pages = kept.pages.lock().unwrap_or_else(|e| e.into_inner());
                            if pages.len() < WINDOW {
                                pages.push_back((next_ref, page));
                                break;
                            }
                        }
                        // Full: send what is encoded so the destination can catch up.
                        if !frames.is_empty() {
                            tx.send(std::mem::take(&mut frames))
                                .await
                                .map_err(|_| Failure::closed())?;
                        }
                        freed.await;
                    }
                    next_ref += 1;
                    progress.referenced.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            let from = run.map_or(begin, |(from, _)| from);
            run = Some((from, at));
            if at - from >= MAX_RAW {
                link::put_raw(&mut frames, &buf[from..at]);
                run = None;
            }
        }
        if let Some((from, to)) = run.take() {
            link::put_raw(&mut frames, &buf[from..to]);
        }
        buf.drain(..at);
        if eof {
            let sum = tally.sum();
            Down::End(sum.clone()).encode(&mut frames);
            tx.send(frames).await.map_err(|_| Failure::closed())?;
            if let Some(stop) = split.stopped() {
                tracing::info!(?stop, "migration stream: parsing stopped");
            }
            return Ok(sum);
        }
        if !frames.is_empty() {
            tx.send(std::mem::take(&mut frames))
                .await
                .map_err(|_| Failure::closed())?;
        }
    }
}
