//! The incoming QEMU's command line, made from the source QEMU's: the same machine (QEMU
//! refuses a stream from a guest whose devices, RAM or machine type differ), with the
//! host-side plumbing of the destination: its own QMP socket, serial log, pidfile and
//! `-incoming` socket in a private directory, daemonized, paused (`-S`) until the source
//! says to start it.
//!
//! The arguments come from a peer: whatever holds a cluster certificate can send them, so
//! options that run host programs or read host files beyond the guest's own images are
//! refused (bridge helpers, network scripts, plugins, config files, inherited file
//! descriptors), and the sizes are bounded. Options whose host side is per-host (QMP,
//! monitor, serial, pidfile, a previous `-incoming`) are replaced, so that a guest
//! migrated here before can move on again.

use std::path::Path;

/// The most arguments, and bytes of them, a request may carry.
pub const MAX_ARGS: usize = 1024;
pub const MAX_ARG_BYTES: usize = 128 << 10;

/// Options taking a value that are dropped (the destination sets its own).
const REPLACED_WITH_VALUE: &[&str] = &["-pidfile", "-incoming", "-qmp", "-monitor", "-D"];
/// Options without a value that are dropped.
const REPLACED: &[&str] = &["-daemonize", "-S"];
/// Options refused: they run host programs, read host configuration or descriptors, or
/// wire chardevs the destination cannot recreate (libvirt's QMP is a `-chardev` + `-mon`).
const REFUSED: &[&str] = &[
    "-chardev",
    "-mon",
    "-qmp-pretty",
    "-readconfig",
    "-writeconfig",
    "-plugin",
    "-add-fd",
    "-gdb",
    "-s",
    "-loadvm",
    "-nographic",
    "-curses",
];
/// Suboptions that name a host program to run.
const PROGRAM_SUBOPTIONS: &[&str] = &["script=", "downscript=", "helper=", "exec:"];

/// The incoming QEMU's arguments (without the program) from the source's (`args`, without
/// its program), its host-side files in `dir`. An error says which argument and why.
pub fn incoming_args(args: &[String], dir: &Path) -> Result<Vec<String>, String> {
    if args.len() > MAX_ARGS {
        return Err(format!("{} arguments (at most {MAX_ARGS})", args.len()));
    }
    let bytes: usize = args.iter().map(String::len).sum();
    if bytes > MAX_ARG_BYTES {
        return Err(format!(
            "{bytes} bytes of arguments (at most {MAX_ARG_BYTES})"
        ));
    }
    let mut out = Vec::with_capacity(args.len() + 12);
    let mut serials = 0usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a.contains('\0') {
            return Err("an argument holds a NUL byte".into());
        }
        // QEMU takes `--opt` for `-opt`.
        let opt = match a.strip_prefix("--") {
            Some(rest) if !rest.is_empty() => format!("-{rest}"),
            _ => a.clone(),
        };
        if REFUSED.contains(&opt.as_str()) {
            return Err(format!(
                "{opt}: not accepted on an incoming migration (it runs host programs, reads \
                 host files, or wires host devices the destination cannot recreate)"
            ));
        }
        if REPLACED.contains(&opt.as_str()) {
            continue;
        }
        if REPLACED_WITH_VALUE.contains(&opt.as_str()) {
            it.next();
            continue;
        }
        if opt == "-serial" {
            let value = it
                .next()
                .ok_or_else(|| "-serial without a value".to_string())?;
            out.push("-serial".into());
            if matches!(value.as_str(), "none" | "null") {
                out.push(value.clone());
            } else {
                out.push(format!(
                    "file:{}",
                    dir.join(format!("serial{serials}.log")).display()
                ));
                serials += 1;
            }
            continue;
        }
        if let Some(bad) = PROGRAM_SUBOPTIONS
            .iter()
            .find(|p| runs_a_program(a, p))
            .copied()
        {
            return Err(format!(
                "{a:?}: {bad} runs a host program: not accepted on an incoming migration"
            ));
        }
        out.push(a.clone());
    }
    out.extend([
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()),
        "-pidfile".into(),
        dir.join("qemu.pid").display().to_string(),
        "-daemonize".into(),
        "-incoming".into(),
        format!("unix:{}", dir.join("incoming.sock").display()),
        "-S".into(),
    ]);
    Ok(out)
}

/// Whether `arg` holds the suboption `sub` with a program (`script=no` and an empty value
/// run none).
fn runs_a_program(arg: &str, sub: &str) -> bool {
    if sub.ends_with(':') {
        return arg.starts_with(sub) || arg.contains(&format!(",{sub}"));
    }
    arg.split(',').any(|part| {
        part.strip_prefix(sub)
            .is_some_and(|v| !v.is_empty() && v != "no")
    })
}

/// The guest RAM `-m` asks for, in bytes (`-m 512`, `-m 4G`, `-m size=4G,maxmem=8G`;
/// QEMU's default unit is MiB): none when the command line does not say.
pub fn guest_ram(args: &[String]) -> Option<u64> {
    let value = args
        .windows(2)
        .rev()
        .find(|w| w[0] == "-m" || w[0] == "--m")
        .map(|w| w[1].as_str())?;
    let size = value
        .split(',')
        .find_map(|p| p.strip_prefix("size="))
        .or_else(|| value.split(',').next().filter(|p| !p.contains('=')))?;
    let (num, unit) = match size.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&size[..i], c.to_ascii_uppercase()),
        _ => (size, 'M'),
    };
    let scale: u64 = match unit {
        'K' => 1 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        _ => return None,
    };
    let n: f64 = num.parse().ok()?;
    (n.is_finite() && n > 0.0).then_some(crate::util::convert::u64_of_f64(n * scale as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn the_lab_guests_line_gets_this_hosts_plumbing() {
        let src = words(
            "-accel tcg -smp 1 -nodefaults -no-reboot -display none -monitor none -m 256 \
             -name lab-1 -uuid 1b4e28ba-2fa1-11d2-883f-0016d3cca427 -serial file:/var/lab/lab-1.log \
             -kernel /k/vmlinuz -initrd /k/init.cpio -append console=ttyS0 \
             -pidfile /var/lab/lab-1.pid -qmp unix:/var/lab/lab-1.qmp,server=on,wait=off -daemonize",
        );
        let got = incoming_args(&src, Path::new("/run/in/x")).unwrap();
        let line = got.join(" ");
        assert_eq!(
            line,
            "-accel tcg -smp 1 -nodefaults -no-reboot -display none -m 256 -name lab-1 \
             -uuid 1b4e28ba-2fa1-11d2-883f-0016d3cca427 -serial file:/run/in/x/serial0.log \
             -kernel /k/vmlinuz -initrd /k/init.cpio -append console=ttyS0 \
             -qmp unix:/run/in/x/qmp.sock,server=on,wait=off -pidfile /run/in/x/qemu.pid \
             -daemonize -incoming unix:/run/in/x/incoming.sock -S"
        );
        // A guest migrated here before moves on: its own incoming plumbing is replaced.
        let again = incoming_args(&got, Path::new("/run/in/y")).unwrap();
        assert_eq!(again.join(" "), line.replace("/run/in/x", "/run/in/y"));
    }

    #[test]
    fn options_that_run_host_programs_or_read_host_files_are_refused() {
        let dir = Path::new("/d");
        for bad in [
            "-netdev tap,id=n0,script=/tmp/evil.sh",
            "-netdev tap,id=n0,script=no,downscript=/tmp/x",
            "-netdev bridge,id=n0,helper=/tmp/x",
            "-readconfig /etc/shadow",
            "--plugin /tmp/p.so",
            "-chardev socket,id=m,path=/x -mon chardev=m,mode=control",
            "-add-fd fd=3,set=1",
            "-nographic",
        ] {
            assert!(incoming_args(&words(bad), dir).is_err(), "{bad}");
        }
        for good in [
            "-netdev tap,id=n0,script=no,downscript=no",
            "-netdev user,id=n0",
            "-serial none",
        ] {
            assert!(incoming_args(&words(good), dir).is_ok(), "{good}");
        }
        let many = vec!["-S".to_string(); MAX_ARGS + 1];
        assert!(incoming_args(&many, dir).unwrap_err().contains("arguments"));
        let long = vec!["a".repeat(MAX_ARG_BYTES + 1)];
        assert!(incoming_args(&long, dir).unwrap_err().contains("bytes"));
        assert!(incoming_args(&["a\0b".to_string()], dir).is_err());
        assert!(incoming_args(&words("-serial"), dir).is_err());
    }

    #[test]
    fn guest_ram_reads_qemus_size_forms() {
        let m = |s: &str| guest_ram(&words(s));
        assert_eq!(m("-m 256"), Some(256 << 20));
        assert_eq!(m("-m 4G"), Some(4 << 30));
        assert_eq!(m("-m 1.5g"), Some(3 << 29));
        assert_eq!(m("-m size=2G,slots=4,maxmem=8G"), Some(2 << 30));
        assert_eq!(m("-smp 1"), None);
        assert_eq!(m("-m lots"), None);
        assert_eq!(m("-m -1"), None);
    }
}
