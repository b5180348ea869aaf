//! The two proxies' protocol over the fabric's mutual-TLS channel: frames with a one-byte
//! tag, fixed or length-prefixed, every length bounded before anything is allocated.
//!
//! Source to destination ([`Down`]): bytes of QEMU's stream as they are, page references,
//! pages sent again on request, and the end with the stream's length and checksum.
//! Destination to source ([`Up`]): its filter (first), QEMU's return path, requests for
//! pages it could not resolve, acknowledgements (the source then drops its copies), and
//! the end with what it handed to QEMU.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    holdings::{Digest, MAX_FILTER_BYTES},
    stream::PAGE,
};

/// Sent first by both ends: the protocol and its version (5: the source names the
/// channel a link carries, [`Channel`], right after it; 4: references carry the
/// filter's seeded XXH3 key beside the digest, and the filter its seed; 3: the stream's
/// sum is XXH3-128; 2: BLAKE3, 1: SHA-256).
pub const HELLO: &[u8; 8] = b"MFMIG\0\0\x05";

/// The largest run of raw bytes in one frame.
pub const MAX_RAW: usize = 1 << 20;
const MAX_TEXT: usize = 4096;

/// A stream's length and XXH3-128 checksum: what each end counted, compared at the end.
///
/// A check of the proxies themselves, not of an adversary: every byte crosses the link
/// under TLS's authenticated encryption, and every page the destination puts in for a
/// reference is its own host's page whose BLAKE3 digest equals the one the source named.
/// What the sum can catch is a proxy that put bytes together wrongly (a bug), for which a
/// 128-bit checksum is as good as a cryptographic digest, at a quarter of BLAKE3's cost:
/// BLAKE3 of the whole stream at both ends was still the largest part of the proxies'
/// CPU (a perf profile of `bench migrate` on an unlimited link: BLAKE3 61 % of the
/// proxies' samples; by bytes hashed, the stream's sums about 40 % of that), and on an
/// unlimited link the
/// proxies' CPU, not the link, sets the migration's pace. (SHA-256 before BLAKE3 was
/// costlier still.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sum {
    pub bytes: u64,
    pub checksum: [u8; 16],
}

impl Sum {
    fn put(&self, out: &mut Vec<u8>, tag: u8) {
        out.push(tag);
        out.extend_from_slice(&self.bytes.to_be_bytes());
        out.extend_from_slice(&self.checksum);
    }

    async fn read<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> R<Sum> {
        let bytes = s.read_u64().await?;
        let mut checksum = [0u8; 16];
        s.read_exact(&mut checksum).await?;
        Ok(Sum { bytes, checksum })
    }
}

/// A [`Sum`] kept as the stream passes.
#[derive(Clone, Default)]
pub struct Tally {
    bytes: u64,
    hasher: xxhash_rust::xxh3::Xxh3Default,
}

impl Tally {
    pub fn update(&mut self, b: &[u8]) {
        self.hasher.update(b);
        self.bytes += b.len() as u64;
    }

    /// The sum so far.
    pub fn sum(&self) -> Sum {
        Sum {
            bytes: self.bytes,
            checksum: self.hasher.digest128().to_be_bytes(),
        }
    }
}

/// Source to destination.
#[derive(Debug, PartialEq, Eq)]
pub enum Down {
    Raw(Vec<u8>),
    /// A page the destination holds: its key in the destination's filter (which finds
    /// it) and its digest (which it must match); references are numbered from 0 in order.
    Ref {
        key: u64,
        digest: Digest,
    },
    /// The page of reference `index` (the destination asked for it).
    Again {
        index: u64,
        page: Box<[u8; PAGE]>,
    },
    /// QEMU's stream ended: its length and checksum.
    End(Sum),
    /// The source gave up; the reason.
    Abort(String),
}

/// Destination to source.
#[derive(Debug, PartialEq, Eq)]
pub enum Up {
    Filter(Vec<u8>),
    /// Bytes the incoming QEMU wrote back (its return path).
    Back(Vec<u8>),
    /// Reference `index` could not be resolved: send its page.
    Need(u64),
    /// References below this index are resolved.
    Ack(u64),
    /// What the incoming QEMU was handed: its length and checksum.
    Done(Sum),
    Abort(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
}

type R<T> = Result<T, LinkError>;

fn bad<T>(what: impl Into<String>) -> R<T> {
    Err(LinkError::Protocol(what.into()))
}

pub async fn hello<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> R<()> {
    s.write_all(HELLO).await?;
    s.flush().await?;
    let mut theirs = [0u8; 8];
    s.read_exact(&mut theirs).await?;
    if &theirs != HELLO {
        return bad("not a memfabric migration peer of this version");
    }
    Ok(())
}

/// The most multifd channels a migration may have through the proxies (QEMU allows 255;
/// each is a connection and a TLS session of its own here).
pub const MAX_MULTIFD: u8 = 64;

/// Which of a migration's channels a link carries, sent by the source after [`HELLO`]:
/// QEMU's main channel (index 0) or one of its `multifd` channels (1 to `multifd`), in the
/// order the source QEMU opened them, which is the order the destination proxy connects
/// them to the incoming QEMU (QEMU 7.2 takes its first connection for the main channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channel {
    pub index: u8,
    /// How many multifd channels the migration has besides the main one.
    pub multifd: u8,
}

impl Channel {
    /// A migration without multifd: its one channel.
    pub const ALONE: Channel = Channel {
        index: 0,
        multifd: 0,
    };

    /// The main channel, which carries the filter, QEMU's return path and everything but
    /// the multifd channels' pages.
    pub fn is_main(self) -> bool {
        self.index == 0
    }

    pub async fn write<S: tokio::io::AsyncWrite + Unpin>(self, s: &mut S) -> R<()> {
        s.write_all(&[self.index, self.multifd]).await?;
        s.flush().await?;
        Ok(())
    }

    pub async fn read<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> R<Channel> {
        let (index, multifd) = (s.read_u8().await?, s.read_u8().await?);
        if multifd > MAX_MULTIFD || index > multifd {
            return bad(format!(
                "channel {index} of 1 + {multifd} (at most {MAX_MULTIFD} multifd channels)"
            ));
        }
        Ok(Channel { index, multifd })
    }
}

async fn read_len<S: tokio::io::AsyncRead + Unpin>(s: &mut S, max: usize) -> R<Vec<u8>> {
    let len = s.read_u32().await? as usize;
    if len > max {
        return bad(format!("a frame of {len} bytes (at most {max})"));
    }
    let mut v = vec![0u8; len];
    s.read_exact(&mut v).await?;
    Ok(v)
}

async fn read_text<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> R<String> {
    let v = read_len(s, MAX_TEXT).await?;
    Ok(String::from_utf8_lossy(&v).into_owned())
}

/// Appends a [`Down::Raw`] frame of `body`, straight from where the bytes are (the
/// source proxy's read buffer: no copy into a frame of their own first).
pub fn put_raw(out: &mut Vec<u8>, body: &[u8]) {
    put_len(out, 1, body);
}

fn put_len(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(body);
}

fn short(text: &str) -> &[u8] {
    let b = text.as_bytes();
    &b[..b.len().min(MAX_TEXT)]
}

/// A frame of either direction.
pub trait Frame {
    /// Appends its encoding to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Its encoding alone.
    fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

impl Frame for Down {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Down::Raw(b) => put_raw(out, b),
            Down::Ref { key, digest } => {
                out.push(2);
                out.extend_from_slice(&key.to_be_bytes());
                out.extend_from_slice(digest);
            }
            Down::Again { index, page } => {
                out.push(3);
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(&page[..]);
            }
            Down::End(sum) => sum.put(out, 4),
            Down::Abort(why) => put_len(out, 5, short(why)),
        }
    }
}

impl Down {
    pub async fn read<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> R<Down> {
        Ok(match s.read_u8().await? {
            1 => Down::Raw(read_len(s, MAX_RAW).await?),
            2 => {
                let key = s.read_u64().await?;
                let mut digest = [0u8; 32];
                s.read_exact(&mut digest).await?;
                Down::Ref { key, digest }
            }
            3 => {
                let index = s.read_u64().await?;
                let mut page = Box::new([0u8; PAGE]);
                s.read_exact(&mut page[..]).await?;
                Down::Again { index, page }
            }
            4 => Down::End(Sum::read(s).await?),
            5 => Down::Abort(read_text(s).await?),
            t => return bad(format!("frame type {t}")),
        })
    }
}

impl Frame for Up {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Up::Filter(b) => put_len(out, 1, b),
            Up::Back(b) => put_len(out, 2, b),
            Up::Need(i) => {
                out.push(3);
                out.extend_from_slice(&i.to_be_bytes());
            }
            Up::Ack(i) => {
                out.push(4);
                out.extend_from_slice(&i.to_be_bytes());
            }
            Up::Done(sum) => sum.put(out, 5),
            Up::Abort(why) => put_len(out, 6, short(why)),
        }
    }
}

impl Up {
    pub async fn read<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> R<Up> {
        Ok(match s.read_u8().await? {
            1 => Up::Filter(read_len(s, MAX_FILTER_BYTES).await?),
            2 => Up::Back(read_len(s, MAX_RAW).await?),
            3 => Up::Need(s.read_u64().await?),
            4 => Up::Ack(s.read_u64().await?),
            5 => Up::Done(Sum::read(s).await?),
            6 => Up::Abort(read_text(s).await?),
            t => return bad(format!("frame type {t}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_read_back_as_written() {
        let downs = vec![
            Down::Raw(vec![1, 2, 3]),
            Down::Ref {
                key: 0x0102_0304_0506_0708,
                digest: [7u8; 32],
            },
            Down::Again {
                index: 9,
                page: Box::new([5u8; PAGE]),
            },
            Down::End(Sum {
                bytes: 77,
                checksum: [1u8; 16],
            }),
            Down::Abort("why".into()),
        ];
        let mut b = Vec::new();
        downs.iter().for_each(|d| d.encode(&mut b));
        let mut r = &b[..];
        for d in &downs {
            assert_eq!(&Down::read(&mut r).await.unwrap(), d);
        }
        let ups = vec![
            Up::Filter(vec![0; 30]),
            Up::Back(vec![4; 10]),
            Up::Need(3),
            Up::Ack(4),
            Up::Done(Sum {
                bytes: 1,
                checksum: [2u8; 16],
            }),
            Up::Abort("no".into()),
        ];
        let mut b = Vec::new();
        ups.iter().for_each(|u| u.encode(&mut b));
        let mut r = &b[..];
        for u in &ups {
            assert_eq!(&Up::read(&mut r).await.unwrap(), u);
        }
    }

    #[tokio::test]
    async fn channels_read_back_and_impossible_ones_are_refused() {
        let c = Channel {
            index: 2,
            multifd: 4,
        };
        let mut b = Vec::new();
        c.write(&mut b).await.unwrap();
        assert_eq!(Channel::read(&mut &b[..]).await.unwrap(), c);
        for bytes in [[5u8, 4], [0, MAX_MULTIFD + 1]] {
            assert!(matches!(
                Channel::read(&mut &bytes[..]).await,
                Err(LinkError::Protocol(_))
            ));
        }
    }

    #[tokio::test]
    async fn hostile_frames_are_errors_without_allocating() {
        // A raw frame claiming 4 GiB, an unknown tag, a truncated page.
        let mut r = &[1u8, 0xff, 0xff, 0xff, 0xff][..];
        assert!(matches!(
            Down::read(&mut r).await,
            Err(LinkError::Protocol(_))
        ));
        let mut r = &[42u8][..];
        assert!(matches!(
            Up::read(&mut r).await,
            Err(LinkError::Protocol(_))
        ));
        let mut r = &[3u8, 0, 0, 0, 0, 0, 0, 0, 1, 9, 9][..];
        assert!(matches!(Down::read(&mut r).await, Err(LinkError::Io(_))));
    }
}
