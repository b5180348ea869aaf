//! What a process is, as far as its command line tells: the VM name and UUID a VMM was
//! started with. (VM discovery and guest-RAM mappings come with the daemon.)

use std::fs;

/// Name and UUID from a QEMU-style command line (`-name N` or `-name guest=N,...`,
/// `-uuid U`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmIdentity {
    pub name: Option<String>,
    pub uuid: Option<String>,
}

/// Parses NUL-separated `/proc/PID/cmdline` bytes.
pub fn identity_from_cmdline(cmdline: &[u8]) -> VmIdentity {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let value = |flag: &str| {
        args.windows(2)
            .find(|w| w[0] == flag || w[0] == format!("-{flag}"))
            .map(|w| w[1].clone())
    };
    let name = value("-name").map(|v| {
        // libvirt: -name guest=NAME,debug-threads=on
        v.split(',')
            .find_map(|p| p.strip_prefix("guest="))
            .unwrap_or_else(|| v.split(',').next().unwrap_or(&v))
            .to_owned()
    });
    VmIdentity {
        name,
        uuid: value("-uuid"),
    }
}

/// The identity of a running process (empty if it exited or has no such flags).
pub fn identity(pid: u32) -> VmIdentity {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| identity_from_cmdline(&c))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_libvirt_names() {
        let plain = b"qemu-system-x86_64\0-name\0lab-1\0-uuid\0a-b\0";
        assert_eq!(
            identity_from_cmdline(plain),
            VmIdentity {
                name: Some("lab-1".into()),
                uuid: Some("a-b".into())
            }
        );
        let libvirt = b"/usr/bin/qemu-system-x86_64\0-name\0guest=web01,debug-threads=on\0";
        assert_eq!(
            identity_from_cmdline(libvirt).name.as_deref(),
            Some("web01")
        );
        assert_eq!(
            identity_from_cmdline(b"sleep\x0010\0"),
            VmIdentity::default()
        );
    }
}
