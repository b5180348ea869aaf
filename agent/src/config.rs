//! Daemon configuration: defaults, overridden by a TOML file (`--config`), overridden by
//! `MEMFABRIC_*` environment variables, overridden by flags (clap applies the last two).

use std::{net::SocketAddr, path::Path, time::Duration};

use regex::Regex;
use serde::Deserialize;

/// Where the daemon listens unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9977";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid --match pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },
    #[error("refresh interval must be between 100 ms and 1 h, got {0} ms")]
    Refresh(u64),
    #[error("scan CPU budget must be between 0 and 100 % of a core, got {0}")]
    ScanCpu(f64),
}

/// The TOML file. Every key is optional.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub pids: Vec<u32>,
    #[serde(default, rename = "match")]
    pub matches: Vec<String>,
    pub refresh_ms: Option<u64>,
    /// Percent of one core the page scanner may use (0 turns it off).
    pub scan_cpu_percent: Option<f64>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse { path: p, message })
    }

    pub fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// The effective configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub pids: Vec<u32>,
    pub matches: Vec<Regex>,
    pub refresh: Duration,
    /// Fraction of one core for the page scanner (0: off).
    pub scan_cpu: f64,
}

impl Config {
    /// Merges the file with what flags/environment set (`Some`/non-empty wins).
    pub fn merge(
        file: FileConfig,
        listen: Option<SocketAddr>,
        pids: Vec<u32>,
        matches: Vec<String>,
        refresh_ms: Option<u64>,
        scan_cpu_percent: Option<f64>,
    ) -> Result<Config, ConfigError> {
        let scan = scan_cpu_percent.or(file.scan_cpu_percent).unwrap_or(5.0);
        if !(0.0..=100.0).contains(&scan) {
            return Err(ConfigError::ScanCpu(scan));
        }
        let refresh_ms = refresh_ms.or(file.refresh_ms).unwrap_or(2000);
        if !(100..=3_600_000).contains(&refresh_ms) {
            return Err(ConfigError::Refresh(refresh_ms));
        }
        let pids = if pids.is_empty() { file.pids } else { pids };
        let patterns = if matches.is_empty() {
            file.matches
        } else {
            matches
        };
        let matches = patterns
            .iter()
            .map(|p| {
                Regex::new(p).map_err(|e| ConfigError::Pattern {
                    pattern: p.clone(),
                    message: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Config {
            listen: listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            pids,
            matches,
            refresh: Duration::from_millis(refresh_ms),
            scan_cpu: scan / 100.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let file = FileConfig::parse("listen = \"127.0.0.1:1234\"\npids = [7]\nrefresh_ms = 500\n")
            .unwrap();
        let c = Config::merge(file.clone(), None, vec![], vec![], None, None).unwrap();
        assert_eq!(c.listen.port(), 1234);
        assert_eq!(c.pids, vec![7]);
        assert_eq!(c.refresh, Duration::from_millis(500));
        let c = Config::merge(
            file,
            Some("127.0.0.1:99".parse().unwrap()),
            vec![8],
            vec![],
            Some(1000),
            Some(0.0),
        )
        .unwrap();
        assert_eq!(
            (c.listen.port(), c.pids, c.refresh.as_millis(), c.scan_cpu),
            (99, vec![8], 1000, 0.0)
        );
        let d = Config::merge(FileConfig::default(), None, vec![], vec![], None, None).unwrap();
        assert_eq!(d.listen.to_string(), DEFAULT_LISTEN);
        assert!(d.listen.ip().is_loopback());
    }

    #[test]
    fn bad_config_is_explained() {
        let e = FileConfig::parse("listen = 5\n").unwrap_err();
        assert!(e.contains("listen"), "{e}");
        let e = FileConfig::parse("bogus = 1\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::merge(
            FileConfig::default(),
            None,
            vec![],
            vec!["(".into()],
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("invalid --match pattern"), "{e}");
        let e =
            Config::merge(FileConfig::default(), None, vec![], vec![], Some(5), None).unwrap_err();
        assert!(e.to_string().contains("refresh interval"), "{e}");
        let e = Config::merge(
            FileConfig::default(),
            None,
            vec![],
            vec![],
            None,
            Some(150.0),
        )
        .unwrap_err();
        assert!(e.to_string().contains("scan CPU budget"), "{e}");
    }
}
