//! Daemon configuration: defaults, overridden by a TOML file (`--config`), overridden by
//! `MEMFABRIC_*` environment variables, overridden by flags (clap applies the last two).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use regex::Regex;
use serde::Deserialize;

/// Where the daemon listens unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9977";
/// Where the daemon keeps its journals unless told otherwise (`state_dir`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/memfabric";

/// Where the HTTP endpoints listen: a TCP address, or `unix:/path` for a unix socket
/// that only root can reach (mode 0600).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Listen {
    /// Whether only this host can connect (loopback, or a unix socket).
    pub fn is_local(&self) -> bool {
        match self {
            Listen::Tcp(a) => a.ip().is_loopback(),
            Listen::Unix(_) => true,
        }
    }
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("unix socket path must be absolute, got {path:?}"));
            }
            return Ok(Listen::Unix(path.into()));
        }
        s.parse()
            .map(Listen::Tcp)
            .map_err(|e| format!("{s:?} is neither HOST:PORT nor unix:/PATH ({e})"))
    }
}

impl TryFrom<String> for Listen {
    type Error = String;
    fn try_from(s: String) -> Result<Listen, String> {
        s.parse()
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "http://{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

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
    #[error(
        "the scan's quiet CPU budget must be above 0 and at most the scan's budget ({scan} %), \
         got {quiet}"
    )]
    ScanQuietCpu { quiet: f64, scan: f64 },
    #[error("ksmd CPU budget must be above 0 and at most 100 % of a core, got {0}")]
    KsmdCpu(f64),
    #[error(
        "unknown action {0:?}: memfabric can act on `ksmd` (steer its scan rate) and \
         `hints` (make VM ranges mergeable or not)"
    )]
    Act(String),
    #[error("[web]: tls_cert_file and tls_key_file go together (one is missing)")]
    TlsPair,
    #[error(
        "--act hints needs the page scanner: its ranking decides the hints (give \
         --scan-cpu above 0)"
    )]
    HintsWithoutScanner,
    #[error("[fabric]: {0}")]
    Fabric(String),
    #[error("vmm_users: no user {0:?} in /etc/passwd (give a user name or a numeric uid)")]
    VmmUser(String),
    #[error("[[domain]] {name:?}: {message}")]
    Domain { name: String, message: String },
}

/// What the daemon may change on the host (nothing unless told).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Act {
    /// Steer ksmd's scan rate (`run`, `pages_to_scan`, `sleep_millisecs`).
    Ksmd,
    /// Make VMs' ranges mergeable or unmergeable (madvise injected; see `[[domain]]`).
    Hints,
}

impl std::str::FromStr for Act {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Act, ConfigError> {
        match s {
            "ksmd" => Ok(Act::Ksmd),
            "hints" => Ok(Act::Hints),
            other => Err(ConfigError::Act(other.into())),
        }
    }
}

/// `[web]`: what exporters offer (node_exporter's web config): TLS and basic auth.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// PEM certificate chain and private key: serve HTTPS instead of HTTP.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// User name -> bcrypt hash (`htpasswd -nbB user pass`): every endpoint then asks
    /// for one of them.
    #[serde(default)]
    pub basic_auth_users: std::collections::BTreeMap<String, String>,
}

impl WebConfig {
    /// Whether clients must authenticate.
    pub fn authenticates(&self) -> bool {
        !self.basic_auth_users.is_empty()
    }
}

/// `[[domain]]`: a security domain. KSM merges across every mergeable mapping of the host,
/// so VMs that must not share memory with others (a tenant, a compliance zone) have their
/// guest RAM made unmergeable; only VMs of sharing domains are ever made mergeable.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub name: String,
    /// A regex over VM names.
    #[serde(default, rename = "match")]
    pub name_match: Option<String>,
    /// VM UUIDs.
    #[serde(default)]
    pub uuids: Vec<String>,
    pub share: bool,
}

/// A domain with its regex compiled.
#[derive(Clone, Debug)]
pub struct Domain {
    pub name: String,
    pub name_match: Option<Regex>,
    pub uuids: Vec<String>,
    pub share: bool,
}

impl Domain {
    /// Whether a VM with `name` and `uuid` belongs here.
    pub fn contains(&self, name: &str, uuid: Option<&str>) -> bool {
        self.name_match.as_ref().is_some_and(|r| r.is_match(name))
            || uuid.is_some_and(|u| self.uuids.iter().any(|x| x.eq_ignore_ascii_case(u)))
    }
}

/// The longest node or VM id on the fabric's wire (a summary refuses longer ones).
pub const MAX_ID: usize = 128;

/// The one rule for "may this VM share memory with others?", used by the merge hints and
/// the fabric alike: None when it is in no domain; otherwise it may only if none of the
/// domains it is in says `share = false` (a refusal wins over the order of the config).
pub fn may_share(domains: &[Domain], name: &str, uuid: Option<&str>) -> Option<bool> {
    let mut found = None;
    for d in domains.iter().filter(|d| d.contains(name, uuid)) {
        if !d.share {
            return Some(false);
        }
        found = Some(true);
    }
    found
}

/// `[fabric]`: peers on other hosts. Off unless `listen` is set; every channel is
/// authenticated, so the certificate files and the gossip key are then required.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FabricConfig {
    /// Address of the fabric's HTTPS listener (TCP) and of its gossip (UDP, same port).
    pub listen: Option<std::net::SocketAddr>,
    /// The address peers reach this host at (default: `listen`; it must not be
    /// unspecified then).
    pub advertise: Option<std::net::SocketAddr>,
    /// Gossip seeds (`host:port`).
    #[serde(default)]
    pub peers: Vec<String>,
    /// This host's name in the fabric (default: the hostname).
    pub node: Option<String>,
    /// Agents gossip only within one cluster id.
    pub cluster: Option<String>,
    /// PEM: the cluster CA that signs every agent's certificate; this agent's
    /// certificate (with its advertised address as a SAN) and key.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// At least 32 bytes of shared secret, mode 0600: the gossip HMAC key.
    pub gossip_key_file: Option<PathBuf>,
    /// Memory this host offers VMs (default: MemTotal).
    pub capacity_bytes: Option<u64>,
    /// Hashes in the host sketch (default 4096: 24 KiB).
    pub k: Option<usize>,
    pub gossip_interval_ms: Option<u64>,
    /// The QEMU this host runs for a migration a peer sends here (`memfabric migrate --to`):
    /// an absolute path to a root-owned executable. Unset (the default): this host refuses
    /// incoming migrations, since accepting them lets any holder of a cluster certificate
    /// start a QEMU here.
    pub incoming_qemu: Option<PathBuf>,
}

/// The effective fabric settings.
#[derive(Clone, Debug)]
pub struct Fabric {
    pub listen: std::net::SocketAddr,
    pub advertise: std::net::SocketAddr,
    pub peers: Vec<String>,
    pub node: String,
    pub cluster: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub gossip_key_file: PathBuf,
    pub capacity_bytes: Option<u64>,
    pub k: usize,
    pub gossip_interval: Duration,
    pub incoming_qemu: Option<PathBuf>,
}

impl FabricConfig {
    fn resolve(
        self,
        listen: Option<std::net::SocketAddr>,
        peers: Vec<String>,
    ) -> Result<Option<Fabric>, ConfigError> {
        let Some(listen) = listen.or(self.listen) else {
            if !peers.is_empty() || !self.peers.is_empty() {
                return Err(ConfigError::Fabric(
                    "peers are given but no `listen` (--fabric-listen) address: the fabric is off"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let need = |v: Option<PathBuf>, what: &str| {
            v.ok_or_else(|| {
                ConfigError::Fabric(format!(
                    "`{what}` is required: every fabric channel is authenticated (mutual TLS with the cluster CA, HMAC on gossip)"
                ))
            })
        };
        let advertise = self.advertise.unwrap_or(listen);
        if advertise.ip().is_unspecified() {
            return Err(ConfigError::Fabric(format!(
                "listening on {listen}: set `advertise` to the address peers reach this host at"
            )));
        }
        let k = self.k.unwrap_or(crate::sketch::DEFAULT_K);
        if !(64..=crate::sketch::MAX_K).contains(&k) {
            return Err(ConfigError::Fabric(format!("k = {k} outside 64..=65536")));
        }
        let gossip_ms = self.gossip_interval_ms.unwrap_or(1000);
        if !(100..=60_000).contains(&gossip_ms) {
            return Err(ConfigError::Fabric(format!(
                "gossip_interval_ms = {gossip_ms} outside 100..=60000"
            )));
        }
        let node = match self.node {
            Some(n) => n,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| advertise.to_string()),
        };
        if node.is_empty() || node.len() > MAX_ID || node.chars().any(char::is_control) {
            return Err(ConfigError::Fabric(format!(
                "node name {node:?}: 1 to 128 printable characters"
            )));
        }
        // Peers check that the certificate serving this node's summary names it.
        if rustls::pki_types::ServerName::try_from(node.as_str()).is_err() {
            return Err(ConfigError::Fabric(format!(
                "node name {node:?}: must be a DNS name or an IP address, the one its \
                 fabric certificate carries as a subject alternative name"
            )));
        }
        Ok(Some(Fabric {
            listen,
            advertise,
            peers: if peers.is_empty() { self.peers } else { peers },
            node,
            cluster: self.cluster.unwrap_or_else(|| "memfabric".into()),
            ca_file: need(self.ca_file, "ca_file")?,
            cert_file: need(self.cert_file, "cert_file")?,
            key_file: need(self.key_file, "key_file")?,
            gossip_key_file: need(self.gossip_key_file, "gossip_key_file")?,
            capacity_bytes: self.capacity_bytes,
            k,
            gossip_interval: Duration::from_millis(gossip_ms),
            incoming_qemu: match self.incoming_qemu {
                Some(q) => Some(trusted_executable(q)?),
                None => None,
            },
        }))
    }
}

/// `incoming_qemu` as given, if it is an absolute path to a regular file root owns and
/// only root can write (the daemon runs it as root on a peer's request).
fn trusted_executable(path: PathBuf) -> Result<PathBuf, ConfigError> {
    use std::os::unix::fs::MetadataExt as _;
    let bad =
        |why: String| ConfigError::Fabric(format!("incoming_qemu = {:?}: {why}", path.display()));
    if !path.is_absolute() {
        return Err(bad("not an absolute path".into()));
    }
    let meta = std::fs::metadata(&path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() || meta.mode() & 0o111 == 0 {
        return Err(bad("not an executable file".into()));
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(bad(format!(
            "owned by uid {} with mode {:04o}: it must be root's and writable by root only",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(path)
}

/// The TOML file. Every key is optional.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<Listen>,
    /// Serve guest-RAM virtual addresses in /v1/status and /v1/ranges (default false:
    /// they defeat every VMM's address-space randomisation for whoever reads them).
    #[serde(default)]
    pub expose_addresses: bool,
    #[serde(default)]
    pub pids: Vec<u32>,
    #[serde(default, rename = "match")]
    pub matches: Vec<String>,
    /// Milliseconds between the daemon's ticks while anything happens (default 2000); a
    /// host where nothing happened for three ticks is looked at three times less often.
    pub refresh_ms: Option<u64>,
    /// Percent of one core the page scanner may use (0 turns it off).
    pub scan_cpu_percent: Option<f64>,
    /// Percent of one core the page scanner uses while nothing changes (default: a
    /// hundredth of `scan_cpu_percent`, 0.05 at its default; equal to it: the scan never
    /// rests).
    pub scan_quiet_cpu_percent: Option<f64>,
    /// What the daemon may change (`["ksmd"]`); nothing by default.
    #[serde(default)]
    pub act: Vec<Act>,
    /// Percent of one core ksmd may use while memfabric steers it.
    pub ksmd_cpu_percent: Option<f64>,
    /// Where the journal of changed settings and the daemon's lock live.
    pub state_dir: Option<PathBuf>,
    /// Take processes named like a VMM for VMs even when their executable is not
    /// root-owned or is writable by others (default false: anyone can name a copy of
    /// `sleep` `qemu-system-x86_64`).
    #[serde(default)]
    pub untrusted_vmm_executables: bool,
    /// Users (names or numeric uids) VMMs may run as besides root, e.g. libvirt's
    /// `libvirt-qemu`: a process named like a VMM that runs as anyone else is not taken
    /// for a VM (any user can run the real QEMU with another VM's `-name`).
    #[serde(default)]
    pub vmm_users: Vec<String>,
    /// TLS and basic auth for the endpoints.
    #[serde(default)]
    pub web: WebConfig,
    /// Security domains (merge hints act only on VMs in one).
    #[serde(default, rename = "domain")]
    pub domains: Vec<DomainConfig>,
    /// Leave merge hints in place when the daemon stops.
    #[serde(default)]
    pub keep_hints: bool,
    /// Peers on other hosts (off by default).
    #[serde(default)]
    pub fabric: FabricConfig,
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
    pub listen: Listen,
    /// See [`FileConfig::expose_addresses`].
    pub expose_addresses: bool,
    pub pids: Vec<u32>,
    pub matches: Vec<Regex>,
    pub refresh: Duration,
    /// Fraction of one core for the page scanner (0: off).
    pub scan_cpu: f64,
    /// Fraction of one core for the page scanner while every VM is quiet.
    pub scan_quiet_cpu: f64,
    /// What the daemon changes on the host (empty: it only observes and recommends).
    pub act: Vec<Act>,
    /// Fraction of one core ksmd may use.
    pub ksmd_cpu: f64,
    pub state_dir: PathBuf,
    /// See [`FileConfig::untrusted_vmm_executables`].
    pub untrusted_vmm_executables: bool,
    /// [`FileConfig::vmm_users`] as uids (root always included).
    pub vmm_uids: Vec<u32>,
    pub web: WebConfig,
    pub domains: Vec<Domain>,
    /// `--keep-hints`: hinted ranges stay as memfabric left them at exit.
    pub keep_hints: bool,
    /// Peers on other hosts (None: off).
    pub fabric: Option<Fabric>,
}

/// What flags and the environment set; `None`/empty leaves the file's value.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<Listen>,
    /// `--expose-addresses` (it can only turn the file's setting on).
    pub expose_addresses: bool,
    /// `--keep-hints` (likewise).
    pub keep_hints: bool,
    pub pids: Vec<u32>,
    pub matches: Vec<String>,
    pub refresh_ms: Option<u64>,
    pub scan_cpu_percent: Option<f64>,
    pub scan_quiet_cpu_percent: Option<f64>,
    pub act: Vec<Act>,
    pub ksmd_cpu_percent: Option<f64>,
    pub state_dir: Option<PathBuf>,
    /// `--fabric-listen`, `--peer`.
    pub fabric_listen: Option<std::net::SocketAddr>,
    pub peers: Vec<String>,
}

/// The scan's quiet budget unless configured: its budget over this (0.05 % of a core at
/// the default 5 %). Stock ksmd's constant scan cost 0.41 % of a core on three quiet lab
/// guests, and memfabric is to cost half of that there, ksmd and the agent together; at
/// a 25th of the budget (0.2 %) the quiet scan alone was half of it. What the quiet scan
/// buys is finding content rewritten in place, which no fault reveals: at this share a
/// quiet VM of 256 MiB is read again about every five minutes.
pub const QUIET_SHARE: f64 = 100.0;

/// ksmd's CPU budget unless configured: 10 % of a core while it has work that pays.
pub const DEFAULT_KSMD_CPU_PERCENT: f64 = 10.0;

impl Config {
    /// Merges the file with what flags/environment set (`Some`/non-empty wins).
    pub fn merge(file: FileConfig, o: Overrides) -> Result<Config, ConfigError> {
        let Overrides {
            listen,
            expose_addresses,
            keep_hints,
            pids,
            matches,
            refresh_ms,
            scan_cpu_percent,
            scan_quiet_cpu_percent,
            act,
            ksmd_cpu_percent,
            state_dir,
            fabric_listen,
            peers,
        } = o;
        let fabric = file.fabric.clone().resolve(fabric_listen, peers)?;
        let scan = scan_cpu_percent.or(file.scan_cpu_percent).unwrap_or(5.0);
        if !(0.0..=100.0).contains(&scan) {
            return Err(ConfigError::ScanCpu(scan));
        }
        let quiet = scan_quiet_cpu_percent
            .or(file.scan_quiet_cpu_percent)
            .unwrap_or(scan / QUIET_SHARE);
        if !(quiet.is_finite() && (quiet > 0.0 || scan == 0.0) && quiet <= scan) {
            return Err(ConfigError::ScanQuietCpu { quiet, scan });
        }
        let ksmd = ksmd_cpu_percent
            .or(file.ksmd_cpu_percent)
            .unwrap_or(DEFAULT_KSMD_CPU_PERCENT);
        // At least 0.1 %: below that ksmd could not visit one page a second.
        if !(ksmd.is_finite() && (0.1..=100.0).contains(&ksmd)) {
            return Err(ConfigError::KsmdCpu(ksmd));
        }
        if file.web.tls_cert_file.is_some() != file.web.tls_key_file.is_some() {
            return Err(ConfigError::TlsPair);
        }
        let domains = file
            .domains
            .iter()
            .map(|d| {
                let bad = |message: String| ConfigError::Domain {
                    name: d.name.clone(),
                    message,
                };
                if d.name.is_empty() {
                    return Err(bad("a domain needs a name".into()));
                }
                if d.name_match.is_none() && d.uuids.is_empty() {
                    return Err(bad("give `match` (a VM name regex) or `uuids`".into()));
                }
                Ok(Domain {
                    name: d.name.clone(),
                    name_match: d
                        .name_match
                        .as_deref()
                        .map(Regex::new)
                        .transpose()
                        .map_err(|e| bad(e.to_string()))?,
                    uuids: d.uuids.clone(),
                    share: d.share,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut act = if act.is_empty() { file.act } else { act };
        act.dedup();
        if act.contains(&Act::Hints) && scan == 0.0 {
            return Err(ConfigError::HintsWithoutScanner);
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
            expose_addresses: expose_addresses || file.expose_addresses,
            pids,
            matches,
            refresh: Duration::from_millis(refresh_ms),
            scan_cpu: scan / 100.0,
            scan_quiet_cpu: quiet / 100.0,
            act,
            ksmd_cpu: ksmd / 100.0,
            state_dir: state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            untrusted_vmm_executables: file.untrusted_vmm_executables,
            vmm_uids: vmm_uids(&file.vmm_users)?,
            web: file.web,
            domains,
            keep_hints: keep_hints || file.keep_hints,
            fabric,
        })
    }
}

/// The uids VMMs may run as: root, and each of `users` (a name from /etc/passwd or a
/// number).
fn vmm_uids(users: &[String]) -> Result<Vec<u32>, ConfigError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let mut uids = vec![0];
    for u in users {
        let uid = match u.parse::<u32>() {
            Ok(n) => n,
            Err(_) => passwd
                .lines()
                .find_map(|l| {
                    let mut f = l.split(':');
                    (f.next()? == u).then(|| f.nth(1)?.parse().ok())?
                })
                .ok_or_else(|| ConfigError::VmmUser(u.clone()))?,
        };
        uids.push(uid);
    }
    Ok(uids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_that_does_not_share_wins_whatever_the_order() {
        let d = |name: &str, re: &str, share| Domain {
            name: name.into(),
            name_match: Some(Regex::new(re).unwrap()),
            uuids: vec!["5F1C2A3E-0000-4000-8000-00000000ABCD".into()],
            share,
        };
        let open_first = [d("all", ".*", true), d("vault", "^v-", false)];
        let closed_first = [d("vault", "^v-", false), d("all", ".*", true)];
        for domains in [&open_first[..], &closed_first[..]] {
            assert_eq!(may_share(domains, "v-1", None), Some(false));
            assert_eq!(may_share(domains, "web-1", None), Some(true));
        }
        assert_eq!(may_share(&[d("vault", "^v-", false)], "web-1", None), None);
        let by_uuid = [d("vault", "^$", false)];
        let uuid = Some("5f1c2a3e-0000-4000-8000-00000000abcd");
        assert_eq!(may_share(&by_uuid, "web-1", uuid), Some(false));
        assert_eq!(may_share(&[], "web-1", None), None);
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let file = FileConfig::parse("listen = \"127.0.0.1:1234\"\npids = [7]\nrefresh_ms = 500\n")
            .unwrap();
        let c = Config::merge(file.clone(), Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:1234".parse().unwrap());
        assert_eq!(c.pids, vec![7]);
        assert_eq!(c.refresh, Duration::from_millis(500));
        let c = Config::merge(
            file,
            Overrides {
                listen: Some("127.0.0.1:99".parse().unwrap()),
                pids: vec![8],
                refresh_ms: Some(1000),
                scan_cpu_percent: Some(0.0),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(
            (c.listen, c.pids, c.refresh.as_millis(), c.scan_cpu),
            ("127.0.0.1:99".parse().unwrap(), vec![8], 1000, 0.0)
        );
        let d = Config::merge(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(d.listen.to_string(), format!("http://{DEFAULT_LISTEN}"));
        assert!(d.listen.is_local());
        // Addresses stay private unless asked for.
        assert!(!d.expose_addresses);
        let u = FileConfig::parse("listen = \"unix:/run/m.sock\"\n").unwrap();
        assert_eq!(u.listen, Some(Listen::Unix("/run/m.sock".into())));
        assert!(FileConfig::parse("listen = \"unix:rel.sock\"\n").is_err());
        // Observe only unless told to act.
        assert!(d.act.is_empty());
        assert_eq!(d.ksmd_cpu, 0.10);
        assert_eq!(d.state_dir, PathBuf::from("/var/lib/memfabric"));
        let f =
            FileConfig::parse("act = [\"ksmd\"]\nksmd_cpu_percent = 3\nstate_dir = \"/tmp/x\"\n")
                .unwrap();
        let c = Config::merge(f, Overrides::default()).unwrap();
        assert_eq!(
            (c.act, c.ksmd_cpu, c.state_dir),
            (vec![Act::Ksmd], 0.03, "/tmp/x".into())
        );
    }

    #[test]
    fn bad_config_is_explained() {
        let e = FileConfig::parse("listen = 5\n").unwrap_err();
        assert!(e.contains("listen"), "{e}");
        let e = FileConfig::parse("bogus = 1\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let bad = |o: Overrides| {
            Config::merge(FileConfig::default(), o)
                .unwrap_err()
                .to_string()
        };
        let e = bad(Overrides {
            matches: vec!["(".into()],
            ..Overrides::default()
        });
        assert!(e.contains("invalid --match pattern"), "{e}");
        let e = bad(Overrides {
            refresh_ms: Some(5),
            ..Overrides::default()
        });
        assert!(e.contains("refresh interval"), "{e}");
        let e = bad(Overrides {
            scan_cpu_percent: Some(2.0),
            scan_quiet_cpu_percent: Some(3.0),
            ..Overrides::default()
        });
        assert!(e.contains("quiet CPU budget") && e.contains("(2 %)"), "{e}");
        let quiet = |scan: Option<f64>| {
            Config::merge(
                FileConfig::default(),
                Overrides {
                    scan_cpu_percent: scan,
                    ..Overrides::default()
                },
            )
            .unwrap()
            .scan_quiet_cpu
        };
        assert!((quiet(None) - 0.0005).abs() < 1e-12, "a 100th of 5 %");
        assert_eq!(quiet(Some(0.0)), 0.0, "no scan, no quiet budget");
        let e = bad(Overrides {
            scan_cpu_percent: Some(150.0),
            ..Overrides::default()
        });
        assert!(e.contains("scan CPU budget"), "{e}");
        for ksmd in [0.0, 250.0, -1.0, f64::NAN] {
            let e = bad(Overrides {
                ksmd_cpu_percent: Some(ksmd),
                ..Overrides::default()
            });
            assert!(e.contains("ksmd CPU budget"), "{ksmd}: {e}");
        }
        assert!("ksmd".parse::<Act>().is_ok());
        assert!("hints".parse::<Act>().is_ok());
        let e = "everything".parse::<Act>().unwrap_err().to_string();
        assert!(e.contains("unknown action"), "{e}");
        let e = bad(Overrides {
            act: vec![Act::Hints],
            scan_cpu_percent: Some(0.0),
            ..Overrides::default()
        });
        assert!(e.contains("page scanner"), "{e}");
        let e = FileConfig::parse("[[domain]]\nname = \"x\"\nshare = true\n").unwrap();
        let e = Config::merge(e, Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("match"), "{e}");
        let e = bad(Overrides {
            peers: vec!["10.0.0.2:7947".into()],
            ..Overrides::default()
        });
        assert!(e.contains("no `listen`"), "{e}");
        let e = bad(Overrides {
            fabric_listen: Some("10.0.0.1:7947".parse().unwrap()),
            ..Overrides::default()
        });
        assert!(e.contains("`ca_file` is required"), "{e}");
        let f = FileConfig::parse(
            "[fabric]\nlisten = \"0.0.0.0:7947\"\nca_file = \"a\"\ncert_file = \"b\"\nkey_file = \"c\"\ngossip_key_file = \"d\"\n",
        )
        .unwrap();
        let e = Config::merge(f.clone(), Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("advertise"), "{e}");
        let mut ok = f;
        ok.fabric.advertise = Some("10.0.0.1:7947".parse().unwrap());
        let c = Config::merge(ok, Overrides::default()).unwrap();
        let fab = c.fabric.expect("on");
        assert_eq!((fab.k, fab.cluster.as_str()), (4096, "memfabric"));
        assert!(
            Config::merge(FileConfig::default(), Overrides::default())
                .unwrap()
                .fabric
                .is_none()
        );
        let e = FileConfig::parse("act = [\"everything\"]\n").unwrap_err();
        assert!(e.contains("everything"), "{e}");
    }

    /// The QEMU a peer's request starts must be root's own executable, named absolutely.
    #[test]
    fn incoming_qemu_must_be_an_absolute_root_owned_executable() {
        use std::os::unix::fs::PermissionsExt as _;
        assert!(trusted_executable("qemu-system-x86_64".into()).is_err());
        assert!(trusted_executable("/nonexistent/qemu".into()).is_err());
        // A directory, and (when run as root) a file others can write.
        assert!(trusted_executable("/usr/bin".into()).is_err());
        let f = std::env::temp_dir().join(format!("mf-qemu-{}", std::process::id()));
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = trusted_executable(f.clone()).unwrap_err().to_string();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let r = trusted_executable(f.clone());
        let _ = std::fs::remove_file(&f);
        assert!(e.contains("writable by root only"), "{e}");
        // Root's own 0755 file is trusted; anyone else's is not.
        assert_eq!(r.is_ok(), root, "{r:?}");
        assert!(trusted_executable("/bin/sh".into()).is_ok());
    }
}
