//! The destination proxy: frames from the source in, QEMU's stream out to the incoming
//! QEMU, byte for byte what the source QEMU wrote. A reference is resolved from this
//! host's own pages ([`Holdings`]); one it cannot resolve (changed, gone, a false
//! positive of the filter) is asked for again and the stream waits for it: a stall, never
//! a wrong byte. What the incoming QEMU writes back goes to the source.

use std::{collections::VecDeque, sync::Arc, sync::atomic::Ordering};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::mpsc,
};

use super::{
    Failure, Progress,
    holdings::Holdings,
    link::{self, Channel, Down, Frame as _, Sum, Tally, Up},
    stream::PAGE,
};

/// Frames held while a resent page is awaited: 256 MiB of stream at most.
const MAX_HELD_BYTES: usize = 256 << 20;
/// The link's read buffer and QEMU's write buffer.
const IO_BUFFER: usize = 256 << 10;
/// An acknowledgement every this many resolved references.
const ACK_EVERY: u64 = 512;

/// Runs the proxy of a migration without multifd (one channel) until the source's stream
/// ended and everything was handed to QEMU.
pub async fn run<L, Q>(
    mut link: L,
    qemu: Q,
    holdings: Arc<Holdings>,
    progress: Arc<Progress>,
) -> Result<Sum, Failure>
where
    L: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    Q: AsyncRead + AsyncWrite + Send + 'static,
{
    let channel = accept(&mut link).await?;
    if channel != Channel::ALONE {
        return Err(Failure::Peer(format!(
            "channel {} of a migration with {} multifd channels, here where one channel \
             is received",
            channel.index, channel.multifd
        )));
    }
    offer(&mut link, &holdings, &progress).await?;
    serve(link, qemu, channel, holdings, progress).await
}

/// Sends this host's filter on the main channel's link, as soon as it is accepted: the
/// source opens its other channels' links before it reads it.
pub async fn offer<L>(link: &mut L, holdings: &Holdings, progress: &Progress) -> Result<(), Failure>
where
    L: AsyncWrite + Unpin,
{
    let filter = holdings.filter().encode();
    progress
        .filter_bytes
        .store(filter.len() as u64, Ordering::Relaxed);
    link.write_all(&Up::Filter(filter).to_vec()).await?;
    link.flush().await?;
    Ok(())
}

/// A link's start: the protocol's hello and the channel the source says it carries.
pub async fn accept<L>(link: &mut L) -> Result<Channel, Failure>
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    link::hello(link).await?;
    Ok(Channel::read(link).await?)
}

/// Runs the proxy of one [`accept`]ed channel (the main one [`offer`]ed the filter) into
/// its connection to the incoming QEMU until the source's stream on it ended and
/// everything was handed to QEMU.
pub async fn serve<L, Q>(
    link: L,
    qemu: Q,
    channel: Channel,
    holdings: Arc<Holdings>,
    progress: Arc<Progress>,
) -> Result<Sum, Failure>
where
    L: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    Q: AsyncRead + AsyncWrite + Send + 'static,
{
    tracing::debug!(channel = channel.index, "receiving a migration channel");
    progress.channels.fetch_add(1, Ordering::Relaxed);
    let (link_rx, link_tx) = tokio::io::split(link);
    // What crossed the link to this host: `link_in_bytes`.
    let counted = progress.clone();
    let link_rx = crate::util::counted::CountedReads::new(link_rx, move |n| {
        counted.link_in_bytes.fetch_add(n as u64, Ordering::Relaxed);
    });
    let (qemu_rx, qemu_tx) = tokio::io::split(qemu);
    // Frames are read from a buffer and QEMU's bytes written through one (a page at a time
    // cost a read and a write call each); what is written is flushed before any wait for
    // the link, so QEMU never waits for bytes held here.
    let mut link_rx = tokio::io::BufReader::with_capacity(IO_BUFFER, link_rx);
    let mut qemu_tx = tokio::io::BufWriter::with_capacity(IO_BUFFER, qemu_tx);
    let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
    let writer = tokio::spawn(super::write_frames(
        link_tx,
        rx,
        progress.clone(),
        super::Pace::new(None),
    ));
    let back = tokio::spawn(back(qemu_rx, tx.clone()));
    let mut tally = Tally::default();
    let mut next_ref = 0u64;
    let mut held: VecDeque<Down> = VecDeque::new();
    let mut held_bytes = 0usize;
    let mut page = Box::new([0u8; PAGE]);
    let result = async {
        loop {
            let frame = match held.pop_front() {
                Some(f) => {
                    held_bytes -= frame_len(&f);
                    f
                }
                None => {
                    flush_before_waiting(&link_rx, &mut qemu_tx).await?;
                    Down::read(&mut link_rx).await?
                }
            };
            let bytes: &[u8] = match &frame {
                Down::Raw(b) => b,
                Down::Ref { key, digest } => {
                    let index = next_ref;
                    next_ref += 1;
                    if holdings.resolve(*key, digest, &mut page) {
                        progress.referenced.fetch_add(1, Ordering::Relaxed);
                    } else {
                        progress.resent.fetch_add(1, Ordering::Relaxed);
                        tx.send(Up::Need(index).to_vec())
                            .await
                            .map_err(|_| Failure::closed())?;
                        // Read on (the source keeps streaming) until the page comes.
                        loop {
                            flush_before_waiting(&link_rx, &mut qemu_tx).await?;
                            match Down::read(&mut link_rx).await? {
                                Down::Again { index: i, page: p } if i == index => {
                                    page = p;
                                    break;
                                }
                                Down::Again { index: i, .. } => {
                                    return Err(Failure::Peer(format!(
                                        "page {i} sent again, {index} awaited"
                                    )));
                                }
                                Down::Abort(why) => return Err(Failure::Peer(why)),
                                other => {
                                    held_bytes += frame_len(&other);
                                    if held_bytes > MAX_HELD_BYTES {
                                        return Err(Failure::Peer(format!(
                                            "page {index} not sent again within {MAX_HELD_BYTES} bytes"
                                        )));
                                    }
                                    held.push_back(other);
                                }
                            }
                        }
                    }
                    if next_ref.is_multiple_of(ACK_EVERY) {
                        tx.send(Up::Ack(next_ref).to_vec())
                            .await
                            .map_err(|_| Failure::closed())?;
                    }
                    &page[..]
                }
                Down::End(theirs) => {
                    qemu_tx.flush().await.map_err(Failure::Qemu)?;
                    let ours = tally.sum();
                    tx.send(Up::Done(ours.clone()).to_vec())
                        .await
                        .map_err(|_| Failure::closed())?;
                    if *theirs != ours {
                        return Err(Failure::Mismatch {
                            sent: theirs.bytes,
                            delivered: ours.bytes,
                        });
                    }
                    return Ok(ours);
                }
                Down::Abort(why) => return Err(Failure::Peer(why.clone())),
                Down::Again { index, .. } => {
                    return Err(Failure::Peer(format!("page {index} sent unasked")));
                }
            };
            qemu_tx.write_all(bytes).await.map_err(Failure::Qemu)?;
            tally.update(bytes);
            progress.qemu_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
    }
    .await;
    // The stream is over (or failed): the return path has nothing more to carry.
    back.abort();
    drop(tx);
    let _ = writer.await;
    result
}

/// Flushes what QEMU has not been handed yet when no frame is buffered (reading one may
/// wait for the source).
async fn flush_before_waiting<R, W>(
    link: &tokio::io::BufReader<R>,
    qemu: &mut tokio::io::BufWriter<W>,
) -> Result<(), Failure>
where
    R: AsyncRead,
    W: AsyncWrite + Unpin,
{
    if link.buffer().is_empty() {
        qemu.flush().await.map_err(Failure::Qemu)?;
    }
    Ok(())
}

fn frame_len(f: &Down) -> usize {
    match f {
        Down::Raw(b) => b.len(),
        _ => PAGE,
    }
}

/// The incoming QEMU's return path to the source, until QEMU closes it.
async fn back<Q: AsyncRead>(qemu: Q, tx: mpsc::Sender<Vec<u8>>) {
    tokio::pin!(qemu);
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = qemu.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if tx.send(Up::Back(buf[..n].to_vec()).to_vec()).await.is_err() {
            break;
        }
    }
}
