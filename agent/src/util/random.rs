//! Random bits from the system's generator.

/// 64 random bits; if the generator fails (it does not once the kernel's pool is ready),
/// the clock and the PID instead: unique on this host, but guessable, so callers use this
/// only where a guessed value costs no secret (a name, a hash seed whose results are
/// checked).
pub fn u64_or_clock() -> u64 {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_ok() {
        return u64::from_le_bytes(b);
    }
    let t = super::clock::since_epoch();
    t.as_secs() << 30 ^ u64::from(t.subsec_nanos()) ^ u64::from(std::process::id())
}
