//! Numeric conversions that may lose range, each written once with why it is sound, so
//! the rest of the code has no bare narrowing `as` (`clippy::cast_possible_truncation`
//! is denied in the library).

use std::time::Duration;

// memfabric runs on 64-bit Linux hosts (its probes are x86-64 tracepoints): usize holds
// every u64.
const _: () = assert!(usize::BITS >= 64, "memfabric builds for 64-bit hosts only");

/// A u64 (a byte or page count, an offset) as usize: lossless on the 64-bit hosts
/// memfabric builds for (asserted at compile time above).
#[expect(
    clippy::cast_possible_truncation,
    reason = "usize is at least 64 bits (asserted above)"
)]
pub const fn usize_of(v: u64) -> usize {
    v as usize
}

/// A count as u32, saturating (counts in documents and map keys never get near it).
pub fn u32_saturating(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// A non-negative quantity (rounded or not) as u64: `as` saturates at the bounds and maps
/// NaN to 0, which is what a count computed in floating point wants.
#[expect(
    clippy::cast_possible_truncation,
    reason = "float-to-int `as` saturates (and NaN is 0): the wanted behaviour"
)]
pub fn u64_of_f64(v: f64) -> u64 {
    v as u64
}

/// The same into u32 (a knob's value from a controller's arithmetic).
#[expect(
    clippy::cast_possible_truncation,
    reason = "float-to-int `as` saturates (and NaN is 0): the wanted behaviour"
)]
pub fn u32_of_f64(v: f64) -> u32 {
    v as u32
}

/// Milliseconds of a duration, saturating (584 million years fit).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_saturate_instead_of_wrapping() {
        assert_eq!(usize_of(u64::MAX), usize::MAX);
        assert_eq!(u32_saturating(usize::MAX), u32::MAX);
        assert_eq!(u64_of_f64(-1.0), 0);
        assert_eq!(u64_of_f64(f64::NAN), 0);
        assert_eq!(u64_of_f64(1e30), u64::MAX);
        assert_eq!(u32_of_f64(4.7e9), u32::MAX);
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
    }
}
