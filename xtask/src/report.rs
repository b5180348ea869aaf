//! Benchmark report helpers shared by every `bench` (xtask's and the in-process driver's).

use std::{
    fs,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

/// Creates `out/NAME-UNIXTIME/` for one report and returns it.
pub fn dir(out: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let dir = out.join(format!("{name}-{secs}"));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The median (mean of the middle two for an even count; 0 for no samples).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
