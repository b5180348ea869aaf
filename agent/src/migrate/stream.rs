//! QEMU's migration stream, split into what may be replaced and what passes as it is.
//!
//! A precopy stream (QEMU 7.2 to 9.x, `migration/savevm.c` and `migration/ram.c`) is a
//! `QEVM` header, a configuration section, then sections: the `ram` section's setup (the
//! RAM size and its blocks), its iterations (page records: a big-endian `offset|flags`
//! word, a block name unless `CONTINUE`, then a fill byte for `ZERO` or a 4 KiB body for
//! `PAGE`, up to `EOS`), commands (`cmd`, `len`, `len` bytes), footers, and at the end the
//! devices' state, which has no length and cannot be skipped without QEMU's own
//! descriptions.
//!
//! With QEMU's `multifd` capability the guest's pages go on channels of their own, one
//! connection each beside the main one (`migration/multifd.c`): a 64-byte initial packet
//! (magic `0x11223344`, version 1, the source's UUID, the channel's id), then packets of a
//! 320-byte header (magic, version, flags, pages allocated, normal pages, the size of the
//! data that follows, the packet's number, the RAM block's name) with an offset word per
//! allocated page, followed by each normal page's 4 KiB. The splitter knows both kinds of
//! channel by their first bytes.
//!
//! The splitter finds the 4 KiB bodies of `PAGE` records and of multifd packets, the only
//! thing a proxy may replace. What it does not know (device state, compressed or XBZRLE pages, postcopy,
//! subsections, another QEMU's layout) ends parsing: the rest of the stream is opaque and
//! passes byte for byte. Correctness never rests on it: a body is only ever replaced by a
//! reference to the same 4,096 bytes, checked by a cryptographic hash where it is resolved,
//! so a wrong split costs savings, never data.

/// A guest page: QEMU's `TARGET_PAGE_SIZE` on x86 and the unit of a `PAGE` record.
pub const PAGE: usize = 4096;

const MAGIC: &[u8; 8] = b"QEVM\0\0\0\x03";

// Multifd channels (migration/multifd.h): their magic and version (big-endian), the
// initial packet's and a packet header's sizes, the flags QEMU 7.2 to 9.x set on packets
// of uncompressed pages (only SYNC; the compression methods and later kinds of packet use
// other bits and are not parsed).
const MULTIFD_MAGIC: [u8; 4] = 0x1122_3344u32.to_be_bytes();
const MULTIFD_VERSION: u32 = 1;
const MULTIFD_INIT: usize = 64;
const MULTIFD_HEADER: usize = 320;
const MULTIFD_FLAG_SYNC: u32 = 1;
/// The most pages a multifd packet may announce that the splitter follows: QEMU
/// allocates 128 (512 KiB of 4 KiB pages); more is a layout it does not know.
const MULTIFD_MAX_PAGES: u32 = 4096;

// Section types (migration/savevm.c).
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const SECTION_FOOTER: u8 = 0x7e;

// RAM record flags (migration/ram.c), in the low bits of the offset word.
const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAG_MULTIFD_FLUSH: u64 = 0x200;
const FLAGS: u64 = 0xfff;

/// What the next bytes of the stream are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// Bytes that pass as they are.
    Raw(usize),
    /// A 4 KiB guest page body ([`PAGE`] bytes) that may be replaced by a reference.
    Page,
}

impl Token {
    pub fn len(self) -> usize {
        match self {
            Token::Raw(n) => n,
            Token::Page => PAGE,
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Magic,
    Top,
    /// The `ram` section's setup: the size word, then blocks until their lengths add up.
    RamSize,
    RamBlocks {
        left: u64,
    },
    RamRecords,
    PageBody,
    /// A multifd channel: the next packet's header.
    MultifdPacket,
    /// A multifd packet's pages, `left` of them still to come.
    MultifdPages {
        left: u32,
    },
    /// Not understood from here on: everything passes.
    Opaque,
}

/// Why parsing stopped, for the proxy's log and stats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The devices' state began (a full section or the end marker): expected.
    Devices,
    /// Something this splitter does not know; the reason.
    Unknown(String),
}

/// Splits a migration stream as it arrives; see the module doc.
#[derive(Debug)]
pub struct Splitter {
    state: State,
    ram_section: Option<u32>,
    stop: Option<Stop>,
    pages: u64,
    zero_pages: u64,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter::new()
    }
}

fn be16(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl Splitter {
    pub fn new() -> Splitter {
        Splitter {
            state: State::Magic,
            ram_section: None,
            stop: None,
            pages: 0,
            zero_pages: 0,
        }
    }

    /// Why parsing stopped, once it has.
    pub fn stopped(&self) -> Option<&Stop> {
        self.stop.as_ref()
    }

    /// `PAGE` and `ZERO` records seen.
    pub fn records(&self) -> (u64, u64) {
        (self.pages, self.zero_pages)
    }

    fn give_up(&mut self, stop: Stop, n: usize) -> Option<Token> {
        self.state = State::Opaque;
        self.stop.get_or_insert(stop);
        Some(Token::Raw(n))
    }

    /// The next token at the front of `buf` (the bytes not yet consumed), or None when
    /// more bytes are needed to tell. The caller consumes exactly `token.len()` bytes.
    pub fn next(&mut self, buf: &[u8]) -> Option<Token> {
        match self.state {
            State::Opaque => (!buf.is_empty()).then_some(Token::Raw(buf.len())),
            State::Magic if buf.get(..4)? == MULTIFD_MAGIC => {
                let init = buf.get(..MULTIFD_INIT)?;
                if be32(&init[4..]) != MULTIFD_VERSION {
                    return self.give_up(
                        Stop::Unknown("a multifd channel of another version".into()),
                        MULTIFD_INIT,
                    );
                }
                self.state = State::MultifdPacket;
                Some(Token::Raw(MULTIFD_INIT))
            }
            State::Magic => {
                let head = buf.get(..8)?;
                if head == MAGIC {
                    self.state = State::Top;
                    Some(Token::Raw(8))
                } else {
                    self.give_up(Stop::Unknown("not a QEVM version 3 stream".into()), 8)
                }
            }
            State::Top => self.section(buf),
            State::RamSize => {
                let v = be64(buf.get(..8)?);
                if v & FLAGS != FLAG_MEM_SIZE {
                    return self.give_up(Stop::Unknown(format!("ram setup word {v:#x}")), 8);
                }
                self.state = State::RamBlocks { left: v & !FLAGS };
                Some(Token::Raw(8))
            }
            State::RamBlocks { left } => {
                if left == 0 {
                    self.state = State::RamRecords;
                    return self.next(buf);
                }
                let len = usize::from(*buf.first()?);
                let used = be64(buf.get(1 + len..1 + len + 8)?);
                let n = 1 + len + 8;
                if used > left || used == 0 {
                    return self.give_up(Stop::Unknown("ram block lengths".into()), n);
                }
                self.state = State::RamBlocks { left: left - used };
                Some(Token::Raw(n))
            }
            State::RamRecords => self.record(buf),
            State::PageBody => {
                buf.get(..PAGE)?;
                self.state = State::RamRecords;
                self.pages += 1;
                Some(Token::Page)
            }
            State::MultifdPacket => self.multifd_packet(buf),
            State::MultifdPages { left } => {
                buf.get(..PAGE)?;
                self.state = match left - 1 {
                    0 => State::MultifdPacket,
                    left => State::MultifdPages { left },
                };
                self.pages += 1;
                Some(Token::Page)
            }
        }
    }

    /// A multifd packet's header and offsets; its pages follow.
    fn multifd_packet(&mut self, buf: &[u8]) -> Option<Token> {
        let head = buf.get(..MULTIFD_HEADER)?;
        let (version, flags) = (be32(&head[4..]), be32(&head[8..]));
        let (alloc, normal, data) = (be32(&head[12..]), be32(&head[16..]), be32(&head[20..]));
        let why = if head[..4] != MULTIFD_MAGIC || version != MULTIFD_VERSION {
            "a multifd packet's magic or version"
        } else if flags & !MULTIFD_FLAG_SYNC != 0 {
            // Compressed pages, device state or a kind of packet not known here.
            "multifd packet flags"
        } else if alloc > MULTIFD_MAX_PAGES || normal > alloc {
            "a multifd packet's page counts"
        } else if normal > 0 && u64::from(data) != u64::from(normal) * PAGE as u64 {
            // Pages of another size than 4 KiB. (A packet without pages may carry the
            // last one's size: QEMU 7.2 does not reset it.)
            "a multifd packet's data size"
        } else {
            let n = MULTIFD_HEADER + 8 * alloc as usize;
            buf.get(..n)?;
            if normal > 0 {
                self.state = State::MultifdPages { left: normal };
            }
            return Some(Token::Raw(n));
        };
        self.give_up(Stop::Unknown(why.into()), MULTIFD_HEADER)
    }

    /// The stream ended with `buf` not yet consumed (a record cut short): it passes as it
    /// is.
    pub fn finish(&mut self, buf: &[u8]) -> Option<Token> {
        if buf.is_empty() {
            return None;
        }
        if self.state != State::Opaque {
            self.give_up(Stop::Unknown("the stream ended inside a record".into()), 0);
        }
        Some(Token::Raw(buf.len()))
    }

    /// A section header at the top level.
    fn section(&mut self, buf: &[u8]) -> Option<Token> {
        let kind = *buf.first()?;
        match kind {
            CONFIGURATION => {
                let len = be32(buf.get(1..5)?) as usize;
                if len > 256 {
                    return self.give_up(Stop::Unknown("machine name length".into()), 5);
                }
                buf.get(..5 + len)?;
                Some(Token::Raw(5 + len))
            }
            SECTION_START | SECTION_FULL => {
                let id = be32(buf.get(1..5)?);
                let len = usize::from(*buf.get(5)?);
                let n = 6 + len + 8;
                let name = buf.get(6..6 + len)?;
                buf.get(..n)?;
                if kind == SECTION_START && name == b"ram" && self.ram_section.is_none() {
                    self.ram_section = Some(id);
                    self.state = State::RamSize;
                    Some(Token::Raw(n))
                } else if kind == SECTION_FULL {
                    self.give_up(Stop::Devices, n)
                } else {
                    let name = String::from_utf8_lossy(name).into_owned();
                    self.give_up(Stop::Unknown(format!("iterable section {name:?}")), n)
                }
            }
            SECTION_PART | SECTION_END => {
                let id = be32(buf.get(1..5)?);
                if Some(id) == self.ram_section {
                    self.state = State::RamRecords;
                    Some(Token::Raw(5))
                } else {
                    self.give_up(Stop::Unknown(format!("section {id} is not ram")), 5)
                }
            }
            COMMAND => {
                let len = be16(buf.get(3..5)?);
                buf.get(..5 + len)?;
                Some(Token::Raw(5 + len))
            }
            SECTION_FOOTER => {
                buf.get(..5)?;
                Some(Token::Raw(5))
            }
            0x00 => self.give_up(Stop::Devices, 1),
            other => self.give_up(Stop::Unknown(format!("section type {other:#x}")), 1),
        }
    }

    /// One RAM record's header (and a zero page's fill byte).
    fn record(&mut self, buf: &[u8]) -> Option<Token> {
        let word = be64(buf.get(..8)?);
        let flags = word & FLAGS;
        if flags == FLAG_EOS {
            self.state = State::Top;
            return Some(Token::Raw(8));
        }
        if flags == FLAG_MULTIFD_FLUSH {
            return Some(Token::Raw(8));
        }
        let mut n = 8;
        if flags & FLAG_CONTINUE == 0 {
            let len = usize::from(*buf.get(8)?);
            if len == 0 {
                return self.give_up(Stop::Unknown("ram record without a block".into()), 9);
            }
            n += 1 + len;
        }
        match flags & !FLAG_CONTINUE {
            FLAG_ZERO => {
                buf.get(..n + 1)?;
                self.zero_pages += 1;
                Some(Token::Raw(n + 1))
            }
            FLAG_PAGE => {
                buf.get(..n)?;
                self.state = State::PageBody;
                Some(Token::Raw(n))
            }
            other => self.give_up(Stop::Unknown(format!("ram record flags {other:#x}")), n),
        }
    }
}

/// A stream as QEMU writes it for a guest whose RAM is `pages` (one block, `pc.ram`, every
/// page sent once in one iteration, then the end section and the end marker): what
/// `bench proxy` pushes through the proxies without a QEMU.
pub fn ram_stream(pages: &[[u8; PAGE]]) -> Vec<u8> {
    let mut s = ram_setup(&[("pc.ram", (pages.len().max(1) * PAGE) as u64)]);
    s.push(SECTION_PART);
    s.extend(2u32.to_be_bytes());
    for (i, page) in pages.iter().enumerate() {
        let at = (i * PAGE) as u64;
        if i == 0 {
            s.extend((at | FLAG_PAGE).to_be_bytes());
            s.push(6);
            s.extend(b"pc.ram");
        } else {
            s.extend((at | FLAG_PAGE | FLAG_CONTINUE).to_be_bytes());
        }
        s.extend(page);
    }
    s.extend(FLAG_EOS.to_be_bytes());
    s.extend([SECTION_FOOTER, 0, 0, 0, 2]);
    s.push(SECTION_END);
    s.extend(2u32.to_be_bytes());
    s.extend(FLAG_EOS.to_be_bytes());
    s.extend([SECTION_FOOTER, 0, 0, 0, 2]);
    s.push(0);
    s
}

/// How a stream begins: QEMU's header and configuration section, then the `ram`
/// section's setup of `blocks` (name, bytes) up to its footer.
fn ram_setup(blocks: &[(&str, u64)]) -> Vec<u8> {
    let mut s = MAGIC.to_vec();
    s.push(CONFIGURATION);
    s.extend(13u32.to_be_bytes());
    s.extend(b"pc-i440fx-7.2");
    s.push(SECTION_START);
    s.extend(2u32.to_be_bytes());
    s.push(3);
    s.extend(b"ram");
    s.extend(0u32.to_be_bytes());
    s.extend(4u32.to_be_bytes());
    let total: u64 = blocks.iter().map(|(_, len)| len).sum();
    s.extend((total | FLAG_MEM_SIZE).to_be_bytes());
    for (name, len) in blocks {
        s.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
        s.extend(name.as_bytes());
        s.extend(len.to_be_bytes());
    }
    s.extend(FLAG_EOS.to_be_bytes());
    s.extend([SECTION_FOOTER, 0, 0, 0, 2]);
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_generated_ram_stream_splits_into_its_pages() {
        let pages: Vec<[u8; PAGE]> = (1..=5u8).map(|b| [b; PAGE]).collect();
        let s = super::ram_stream(&pages);
        let mut split = Splitter::new();
        let (mut at, mut found) = (0, Vec::new());
        while let Some(t) = split.next(&s[at..]).or_else(|| split.finish(&s[at..])) {
            if t == Token::Page {
                found.push(s[at..at + PAGE].to_vec());
            }
            at += t.len();
            if at == s.len() {
                break;
            }
        }
        assert_eq!(at, s.len());
        assert_eq!(found, pages.iter().map(|p| p.to_vec()).collect::<Vec<_>>());
        assert_eq!(split.records(), (5, 0));
    }

    /// A stream as QEMU 7.2 writes it: header, configuration, ram setup with two blocks,
    /// one iteration with a page, a zero page and a page continuing the block, the end
    /// section with one more page, then a device section and the end marker.
    pub(crate) fn sample(pages: &[[u8; PAGE]; 3]) -> Vec<u8> {
        let mut s = ram_setup(&[("pc.ram", 0x0200_0000), ("pc.bios", 0x0100_0000)]);
        s.push(SECTION_PART);
        s.extend(2u32.to_be_bytes());
        s.extend(FLAG_PAGE.to_be_bytes());
        s.push(6);
        s.extend(b"pc.ram");
        s.extend(pages[0]);
        s.extend((0x1000 | FLAG_ZERO | FLAG_CONTINUE).to_be_bytes());
        s.push(0);
        s.extend((0x2000 | FLAG_PAGE | FLAG_CONTINUE).to_be_bytes());
        s.extend(pages[1]);
        s.extend(FLAG_EOS.to_be_bytes());
        s.extend([SECTION_FOOTER, 0, 0, 0, 2]);
        s.extend([COMMAND, 0, 3, 0, 4, 0, 0, 0, 1]);
        s.push(SECTION_END);
        s.extend(2u32.to_be_bytes());
        s.extend((0x3000 | FLAG_PAGE | FLAG_CONTINUE).to_be_bytes());
        s.extend(pages[2]);
        s.extend(FLAG_EOS.to_be_bytes());
        s.extend([SECTION_FOOTER, 0, 0, 0, 2]);
        s.push(SECTION_FULL);
        s.extend(3u32.to_be_bytes());
        s.push(6);
        s.extend(b"timer\0");
        s.extend([0u8; 8]);
        // Device state: anything, including what looks like a page record.
        s.extend(FLAG_PAGE.to_be_bytes());
        s.extend([0u8; 5000]);
        s.push(0);
        s
    }

    fn pages() -> [[u8; PAGE]; 3] {
        [[1u8; PAGE], [2u8; PAGE], [3u8; PAGE]]
    }

    /// Tokens of `stream` fed in pieces of `chunk` bytes; their lengths must cover it.
    fn split(stream: &[u8], chunk: usize) -> (Vec<(usize, Token)>, Splitter) {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        let (mut at, mut avail) = (0, 0);
        while at < stream.len() {
            avail = (avail + chunk).min(stream.len()).max(at);
            while let Some(t) = s.next(&stream[at..avail]) {
                assert!(!t.is_empty() && at + t.len() <= avail, "{t:?} at {at}");
                out.push((at, t));
                at += t.len();
            }
            if avail == stream.len()
                && let Some(t) = s.finish(&stream[at..])
            {
                out.push((at, t));
                at += t.len();
            }
        }
        (out, s)
    }

    /// The page bodies `tokens` found in `stream`.
    fn bodies<'a>(stream: &'a [u8], tokens: &[(usize, Token)]) -> Vec<&'a [u8]> {
        tokens
            .iter()
            .filter(|(_, t)| *t == Token::Page)
            .map(|&(at, _)| &stream[at..at + PAGE])
            .collect()
    }

    #[test]
    fn finds_every_page_body_and_nothing_else_in_any_chunking() {
        let p = pages();
        let stream = sample(&p);
        for chunk in [1, 3, 7, 100, 4096, 1 << 20] {
            let (tokens, s) = split(&stream, chunk);
            let bodies = bodies(&stream, &tokens);
            assert_eq!(bodies, [&p[0][..], &p[1][..], &p[2][..]], "chunk {chunk}");
            assert_eq!(s.records(), (3, 1));
            assert_eq!(s.stopped(), Some(&Stop::Devices));
        }
    }

    #[test]
    fn what_it_does_not_know_passes_whole() {
        let p = pages();
        // Compressed pages (a flag it does not parse) end parsing at that record.
        let mut stream = sample(&p);
        let at = stream
            .windows(8)
            .position(|w| w == (0x2000 | FLAG_PAGE | FLAG_CONTINUE).to_be_bytes())
            .unwrap();
        stream[at + 6] = 0x01; // COMPRESS_PAGE (0x100)
        stream[at + 7] = 0x20; // CONTINUE
        let (tokens, s) = split(&stream, 64);
        assert_eq!(tokens.iter().filter(|(_, t)| *t == Token::Page).count(), 1);
        assert!(matches!(s.stopped(), Some(Stop::Unknown(_))), "{s:?}");
        // Not a migration stream at all.
        let (tokens, s) = split(&[7u8; 10_000], 999);
        assert!(tokens.iter().all(|(_, t)| *t != Token::Page));
        assert!(matches!(s.stopped(), Some(Stop::Unknown(_))));
    }

    /// A multifd channel as QEMU 7.2 writes it: the initial packet of channel `id`, then
    /// one packet per entry of `packets` (its pages; an empty one is a SYNC packet), as
    /// captured from QEMU 7.2 (`multifd-channels` 2, a 64 MiB guest).
    pub(crate) fn multifd_channel(id: u8, packets: &[&[[u8; PAGE]]]) -> Vec<u8> {
        let mut s = MULTIFD_MAGIC.to_vec();
        s.extend(MULTIFD_VERSION.to_be_bytes());
        s.extend([0x5a; 16]);
        s.push(id);
        s.resize(MULTIFD_INIT, 0);
        let mut size = 0u32;
        for (n, pages) in packets.iter().enumerate() {
            let alloc = 128u32;
            s.extend(MULTIFD_MAGIC);
            s.extend(MULTIFD_VERSION.to_be_bytes());
            let flags = if pages.is_empty() {
                MULTIFD_FLAG_SYNC
            } else {
                0
            };
            s.extend(flags.to_be_bytes());
            s.extend(alloc.to_be_bytes());
            let normal = u32::try_from(pages.len()).expect("a test's packet");
            s.extend(normal.to_be_bytes());
            // QEMU 7.2 leaves the last packet's data size in a packet without pages.
            if !pages.is_empty() {
                size = normal * 4096;
            }
            s.extend(size.to_be_bytes());
            s.extend((n as u64).to_be_bytes());
            s.extend([0u8; 32]);
            let mut block = [0u8; 256];
            block[..6].copy_from_slice(b"pc.ram");
            s.extend(block);
            for i in 0..alloc as usize {
                let at = if i < pages.len() {
                    (i * PAGE) as u64
                } else {
                    0
                };
                s.extend(at.to_be_bytes());
            }
            for p in *pages {
                s.extend(p);
            }
        }
        s
    }

    #[test]
    fn finds_the_pages_of_a_multifd_channel_in_any_chunking() {
        let p = pages();
        let stream = multifd_channel(1, &[&p[..2], &[], &p[2..]]);
        for chunk in [1, 5, 63, 64, 321, 4096, 1 << 20] {
            let (tokens, s) = split(&stream, chunk);
            let bodies = bodies(&stream, &tokens);
            assert_eq!(bodies, [&p[0][..], &p[1][..], &p[2][..]], "chunk {chunk}");
            assert_eq!(s.records(), (3, 0));
            assert_eq!(s.stopped(), None);
        }
    }

    #[test]
    fn a_multifd_channel_it_does_not_know_passes_whole() {
        let p = pages();
        let first_flags = MULTIFD_INIT + 8;
        // zlib-compressed pages (compression bits in the flags).
        let mut zlib = multifd_channel(0, &[&p[..1], &p[1..]]);
        zlib[first_flags + 3] = 1 << 1;
        // Another version of the initial packet, and pages of another size.
        let mut version = multifd_channel(0, &[&p[..1]]);
        version[7] = 2;
        let mut size = multifd_channel(0, &[&p[..1]]);
        size[MULTIFD_INIT + 21] ^= 0x40;
        for stream in [zlib, version, size] {
            let (tokens, s) = split(&stream, 100);
            assert!(tokens.iter().all(|(_, t)| *t != Token::Page), "{s:?}");
            assert!(matches!(s.stopped(), Some(Stop::Unknown(_))), "{s:?}");
        }
    }

    #[test]
    fn hostile_lengths_never_panic() {
        let p = pages();
        let base = sample(&p);
        let multifd = multifd_channel(3, &[&p[..2], &[]]);
        // Every single-byte corruption of the headers: tokens still tile the stream.
        for (base, at) in [
            (&base, 0..200),
            (&multifd, 0..MULTIFD_INIT + MULTIFD_HEADER + 16),
        ] {
            for i in at {
                for v in [0u8, 0x7f, 0xff] {
                    let mut s = base.clone();
                    s[i] = v;
                    let (tokens, _) = split(&s, 513);
                    let covered: usize = tokens.iter().map(|(_, t)| t.len()).sum();
                    assert_eq!(covered, s.len());
                }
            }
        }
    }
}
