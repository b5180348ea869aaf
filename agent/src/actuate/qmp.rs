//! QEMU's own switch for merging: a memory backend's `merge` property, changed at run time
//! over QMP (`qom-set /objects/<backend> merge true|false`; QEMU then madvises the
//! backend's RAM itself). Whole-backend granularity and no ptrace: the gentle way for
//! QEMU guests that have a QMP socket. A guest whose operator turned merging off
//! (`-machine mem-merge=off`, libvirt's `<nosharepages/>`) is reported as such and left
//! alone.
//!
//! The socket is a peer like any other: replies are read with a size bound and a timeout.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

/// The longest QMP reply line read.
const MAX_LINE: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QEMU (pid {0}) has no QMP socket on its command line (-qmp unix:PATH,server=on)")]
    NoSocket(u32),
    #[error("QEMU (pid {0}) runs with mem-merge=off: its operator turned merging off; left alone")]
    MergeOff(u32),
    #[error("QMP {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP {path}: {message}")]
    Protocol { path: PathBuf, message: String },
    #[error("QMP {path}: no memory backend under /objects")]
    NoBackend { path: PathBuf },
}

/// The QMP socket a QEMU command line sets up: `-qmp unix:PATH[,...]`, or
/// `-chardev socket,id=ID,path=PATH,...` with `-mon chardev=ID,mode=control`.
pub fn socket_from_cmdline(args: &[String]) -> Option<PathBuf> {
    let values = |flag: &str| -> Vec<&str> {
        args.windows(2)
            .filter(|w| w[0] == flag || w[0] == format!("-{flag}"))
            .map(|w| w[1].as_str())
            .collect()
    };
    for v in values("-qmp") {
        if let Some(rest) = v.strip_prefix("unix:") {
            let path = rest.split(',').next().unwrap_or(rest);
            if !path.is_empty() {
                return Some(path.into());
            }
        }
    }
    let opt = |v: &str, key: &str| {
        v.split(',')
            .find_map(|p| p.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
    };
    for mon in values("-mon") {
        if opt(mon, "mode").as_deref() != Some("control") {
            continue;
        }
        let Some(id) = opt(mon, "chardev") else {
            continue;
        };
        for c in values("-chardev") {
            if c.starts_with("socket") && opt(c, "id").as_deref() == Some(id.as_str()) {
                return opt(c, "path").map(PathBuf::from);
            }
        }
    }
    None
}

pub use crate::host::inventory::merge_off;

/// One QMP session.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<std::io::Take<UnixStream>>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let io = |source| QmpError::Io {
            path: path.into(),
            source,
        };
        let s = UnixStream::connect(path).map_err(io)?;
        s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
        let writer = s.try_clone().map_err(io)?;
        let mut q = Qmp {
            path: path.into(),
            reader: BufReader::new(std::io::Read::take(s, u64::MAX)),
            writer,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(q.protocol(format!("no QMP greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn protocol(&self, message: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            message,
        }
    }

    /// One JSON line, at most [`MAX_LINE`] bytes.
    fn read(&mut self) -> Result<serde_json::Value, QmpError> {
        let mut line = String::new();
        self.reader.get_mut().set_limit(MAX_LINE);
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(self.protocol("connection closed".into()));
        }
        if !line.ends_with('\n') {
            return Err(self.protocol(format!("reply longer than {MAX_LINE} bytes")));
        }
        serde_json::from_str(&line).map_err(|e| self.protocol(format!("bad JSON: {e}")))
    }

    /// Runs a command; its `return` value (events in between are skipped, at most 64).
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, QmpError> {
        let msg = serde_json::json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").map_err(|source| QmpError::Io {
            path: self.path.clone(),
            source,
        })?;
        for _ in 0..64 {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(self.protocol(format!("{command}: {e}")));
            }
        }
        Err(self.protocol(format!("{command}: no reply among 64 messages")))
    }

    /// The ids of the memory backends under /objects (`pc.ram` for `-m` alone on pc
    /// machines).
    pub fn memory_backends(&mut self) -> Result<Vec<String>, QmpError> {
        let list = self.execute("qom-list", serde_json::json!({ "path": "/objects" }))?;
        let ids: Vec<String> = list
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|o| {
                        o["type"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("child<memory-backend"))
                    })
                    .filter_map(|o| o["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if ids.is_empty() {
            return Err(QmpError::NoBackend {
                path: self.path.clone(),
            });
        }
        Ok(ids)
    }

    /// Sets `merge` on a backend and reads it back.
    pub fn set_merge(&mut self, backend: &str, on: bool) -> Result<bool, QmpError> {
        let path = format!("/objects/{backend}");
        self.execute(
            "qom-set",
            serde_json::json!({ "path": path, "property": "merge", "value": on }),
        )?;
        let now = self.execute(
            "qom-get",
            serde_json::json!({ "path": path, "property": "merge" }),
        )?;
        now.as_bool()
            .ok_or_else(|| self.protocol(format!("merge of {backend} reads {now}")))
    }
}

/// The command line of the QEMU `pid` (a last empty word after the final NUL).
pub fn cmdline(pid: u32) -> Result<Vec<String>, QmpError> {
    let path = format!("/proc/{pid}/cmdline");
    Ok(std::fs::read(&path)
        .map_err(|source| QmpError::Io {
            path: path.into(),
            source,
        })?
        .split(|b| *b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect())
}

/// The QMP socket of the QEMU `pid`, from its command line.
pub fn socket_of(pid: u32) -> Result<PathBuf, QmpError> {
    socket_from_cmdline(&cmdline(pid)?).ok_or(QmpError::NoSocket(pid))
}

/// Turns merging of every memory backend of the QEMU `pid` on or off over its QMP socket;
/// returns the backends changed.
pub fn set_guest_merge(pid: u32, on: bool) -> Result<Vec<String>, QmpError> {
    let args = cmdline(pid)?;
    if merge_off(&args) {
        return Err(QmpError::MergeOff(pid));
    }
    let socket = socket_from_cmdline(&args).ok_or(QmpError::NoSocket(pid))?;
    let mut q = Qmp::connect(&socket)?;
    let backends = q.memory_backends()?;
    for b in &backends {
        let now = q.set_merge(b, on)?;
        if now != on {
            return Err(QmpError::Protocol {
                path: socket.clone(),
                message: format!("{b}: merge reads {now} after setting {on}"),
            });
        }
    }
    Ok(backends)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn sockets_from_command_lines() {
        assert_eq!(
            socket_from_cmdline(&args("qemu -m 1G -qmp unix:/run/q.sock,server=on,wait=off")),
            Some("/run/q.sock".into())
        );
        // libvirt's way.
        assert_eq!(
            socket_from_cmdline(&args(
                "qemu -chardev socket,id=charmonitor,path=/var/lib/libvirt/qemu/d.monitor,server=on,wait=off \
                 -mon chardev=charmonitor,id=monitor,mode=control"
            )),
            Some("/var/lib/libvirt/qemu/d.monitor".into())
        );
        assert_eq!(
            socket_from_cmdline(&args("qemu -qmp tcp:127.0.0.1:4444")),
            None
        );
        assert_eq!(
            socket_from_cmdline(&args(
                "qemu -chardev socket,id=x,path=/p -mon chardev=x,mode=readline"
            )),
            None
        );
        assert_eq!(socket_from_cmdline(&args("qemu -qmp")), None);
    }
}
