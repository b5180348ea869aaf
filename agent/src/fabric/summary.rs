//! What a host tells its peers: its capacity, the sketch of the stable pages of the VMs it
//! may share (their union), and per VM a small sketch and its size, keyed by the VM's
//! stable identity (UUID, else name; never the host-local PID).
//!
//! The wire form is versioned and bounded; a decoder believes nothing it has not checked:
//!
//! ```text
//! "MFSU" | version u8 | capacity u64 | used u64 | host id (u8 len + UTF-8)
//!        | host sketch (u32 len + sketch) | VM count u16
//!        | per VM: id (u8 len + UTF-8) | bytes u64 | sketch (u32 len + sketch)
//!        | xxh3-64 of everything before
//! ```

use xxhash_rust::xxh3::xxh3_64;

use crate::sketch::{DecodeError, Sketch};

const MAGIC: &[u8; 4] = b"MFSU";
const VERSION: u8 = 1;
/// VMs in one summary at most.
pub const MAX_VMS: usize = 1024;
/// Bytes of a VM or host identity at most (the config checks node names against it).
pub use crate::config::MAX_ID;
/// The largest summary a peer may send (a 64 KiB host sketch plus 1,024 VMs' small
/// sketches fit well inside).
pub const MAX_SUMMARY: usize = 4 << 20;
/// k of each VM's published sketch: enough to rank hosts for the plan, small on the wire
/// (0.4 KiB; at 1,000 hosts every byte of a summary is fetched 999 times). Containment of
/// a local VM uses its full local sketch instead.
pub const VM_K: usize = 256;

#[derive(Clone, Debug, PartialEq)]
pub struct VmSummary {
    pub id: String,
    /// Resident guest RAM.
    pub bytes: u64,
    pub sketch: Sketch,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub host: String,
    /// Memory the host offers VMs.
    pub capacity_bytes: u64,
    /// Memory its VMs hold now.
    pub used_bytes: u64,
    pub sketch: Sketch,
    pub vms: Vec<VmSummary>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SummaryError {
    #[error("summary of {0} bytes exceeds {MAX_SUMMARY}")]
    TooLarge(usize),
    #[error("summary cut short at byte {0}")]
    Truncated(usize),
    #[error("not a memfabric summary (bad magic)")]
    Magic,
    #[error("summary version {0}; this memfabric reads {VERSION}")]
    Version(u8),
    #[error("an identity that is not UTF-8 or is empty")]
    Id,
    #[error("{0} VMs (at most {MAX_VMS})")]
    Vms(usize),
    #[error("sketch: {0}")]
    Sketch(#[from] DecodeError),
    #[error("checksum mismatch")]
    Checksum,
    #[error("{0} bytes after the last VM")]
    Trailing(usize),
}

/// Keeps an identity printable and bounded (VM names come from process command lines).
pub fn clean_id(id: &str) -> String {
    let mut out: String = id
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    while out.len() > MAX_ID {
        out.pop();
    }
    out
}

fn put_id(out: &mut Vec<u8>, id: &str) {
    let id = clean_id(id);
    // clean_id keeps at most MAX_ID (128) bytes: the length fits its byte.
    out.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(id.as_bytes());
}

fn put_sketch(out: &mut Vec<u8>, s: &Sketch) {
    let b = s.encode();
    out.extend_from_slice(&crate::util::convert::u32_saturating(b.len()).to_le_bytes());
    out.extend_from_slice(&b);
}

impl Summary {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.capacity_bytes.to_le_bytes());
        out.extend_from_slice(&self.used_bytes.to_le_bytes());
        put_id(&mut out, &self.host);
        put_sketch(&mut out, &self.sketch);
        let vms = &self.vms[..self.vms.len().min(MAX_VMS)];
        // At most MAX_VMS (1,024) entries: the count fits its two bytes.
        out.extend_from_slice(&u16::try_from(vms.len()).unwrap_or(u16::MAX).to_le_bytes());
        for vm in vms {
            put_id(&mut out, &vm.id);
            out.extend_from_slice(&vm.bytes.to_le_bytes());
            put_sketch(&mut out, &vm.sketch);
        }
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Summary, SummaryError> {
        if bytes.len() > MAX_SUMMARY {
            return Err(SummaryError::TooLarge(bytes.len()));
        }
        if bytes.len() < 8 {
            return Err(SummaryError::Truncated(bytes.len()));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        let mut r = Reader { b: body, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(SummaryError::Magic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(SummaryError::Version(version));
        }
        if xxh3_64(body) != u64::from_le_bytes(sum.try_into().expect("8 bytes")) {
            return Err(SummaryError::Checksum);
        }
        let capacity_bytes = r.u64()?;
        let used_bytes = r.u64()?;
        let host = r.id()?;
        let sketch = r.sketch()?;
        let n = usize::from(r.u16()?);
        if n > MAX_VMS {
            return Err(SummaryError::Vms(n));
        }
        let mut vms = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.id()?;
            let bytes = r.u64()?;
            let sketch = r.sketch()?;
            vms.push(VmSummary { id, bytes, sketch });
        }
        if r.at != body.len() {
            return Err(SummaryError::Trailing(body.len() - r.at));
        }
        Ok(Summary {
            host,
            capacity_bytes,
            used_bytes,
            sketch,
            vms,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SummaryError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or(SummaryError::Truncated(self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, SummaryError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SummaryError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, SummaryError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, SummaryError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn id(&mut self) -> Result<String, SummaryError> {
        let n = usize::from(self.u8()?);
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| SummaryError::Id)?;
        if s.is_empty() || s.len() > MAX_ID || s.chars().any(char::is_control) {
            return Err(SummaryError::Id);
        }
        Ok(s.to_owned())
    }
    fn sketch(&mut self) -> Result<Sketch, SummaryError> {
        let n = self.u32()? as usize;
        Ok(Sketch::decode(self.take(n)?)?)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> Summary {
        let host = Sketch::of_ids(64, 0..500);
        let vm = Sketch::of_ids(VM_K, 0..100);
        Summary {
            host: "host-a".into(),
            capacity_bytes: 64 << 30,
            used_bytes: 10 << 30,
            sketch: host,
            vms: vec![VmSummary {
                id: "d04fd9d4-e457-437f-9bf9-741a4593bb77".into(),
                bytes: 1 << 30,
                sketch: vm,
            }],
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let s = sample();
        let wire = s.encode();
        assert_eq!(Summary::decode(&wire).unwrap(), s);
        for cut in [0, 7, 20, wire.len() - 1] {
            assert!(Summary::decode(&wire[..cut]).is_err(), "cut at {cut}");
        }
        let mut t = wire.clone();
        t[30] ^= 4;
        assert_eq!(Summary::decode(&t), Err(SummaryError::Checksum));
        assert_eq!(
            Summary::decode(&vec![0; MAX_SUMMARY + 1]),
            Err(SummaryError::TooLarge(MAX_SUMMARY + 1))
        );
        // Control characters in a VM name are not carried.
        assert_eq!(clean_id("a\nb\x1b[31m"), "a?b?[31m");
        assert_eq!(clean_id(&"x".repeat(500)).len(), MAX_ID);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn the_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..800), at in 0usize..800) {
            let _ = Summary::decode(&bytes);
            // Valid frames with a byte changed and the checksum fixed: every field is checked.
            let mut w = sample().encode();
            let n = w.len() - 8;
            if at < n {
                w[at] = bytes.first().copied().unwrap_or(0xff);
                let sum = xxh3_64(&w[..n]);
                w[n..].copy_from_slice(&sum.to_le_bytes());
            }
            let _ = Summary::decode(&w);
        }
    }
}
