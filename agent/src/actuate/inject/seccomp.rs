//! Whether a seccomp-filtered thread may run the `madvise` memfabric would inject into it.
//!
//! VMMs sandbox themselves: Firecracker's VMM thread filter traps `madvise` with any advice
//! but `MADV_DONTNEED` (SIGSYS, and the VMM exits). An injected call runs under the
//! target thread's filters like any of its own, so memfabric reads them
//! (`PTRACE_SECCOMP_GET_FILTER`, the thread stopped under ptrace) and runs them here, on
//! the exact call it would make, before it changes a register. Only a call every filter
//! allows (`SECCOMP_RET_ALLOW` or `SECCOMP_RET_LOG`) is injected; anything else, a filter
//! that cannot be read or an instruction this evaluator does not know included, is refused
//! with the reason.

use nix::{errno::Errno, unistd::Pid};

/// `PTRACE_SECCOMP_GET_FILTER` (linux/ptrace.h).
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
/// `AUDIT_ARCH_X86_64`: what `seccomp_data.arch` holds for a 64-bit syscall.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// The kernel's bound on one filter's length (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;
/// Filters read at most: the kernel bounds the total (32768 instructions over the stack).
const MAX_FILTERS: usize = 256;
const SECCOMP_RET_ACTION_FULL: u32 = 0xffff_0000;

/// The `seccomp` mode of a process's main thread, from `Seccomp:` in /proc/PID/status:
/// 0 none, 1 strict, 2 filter. None when the field is missing (a kernel without seccomp).
pub fn mode(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:")?.trim().parse().ok())
}

/// The `seccomp_data` the kernel builds for one system call.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    pub nr: u32,
    /// The address after the `syscall` instruction (the kernel's `regs->ip` at entry).
    pub ip: u64,
    pub args: [u64; 6],
}

impl Call {
    /// The 64 bytes of `struct seccomp_data` (little endian, as the filter loads them).
    fn data(&self) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[0..4].copy_from_slice(&self.nr.to_le_bytes());
        d[4..8].copy_from_slice(&AUDIT_ARCH_X86_64.to_le_bytes());
        d[8..16].copy_from_slice(&self.ip.to_le_bytes());
        for (i, a) in self.args.iter().enumerate() {
            d[16 + i * 8..24 + i * 8].copy_from_slice(&a.to_le_bytes());
        }
        d
    }
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// What a filter returned, by its action.
pub fn action_name(ret: u32) -> &'static str {
    match ret & SECCOMP_RET_ACTION_FULL {
        0x8000_0000 => "KILL_PROCESS",
        0x0000_0000 => "KILL_THREAD",
        0x0003_0000 => "TRAP (SIGSYS)",
        0x0005_0000 => "ERRNO",
        0x7fc0_0000 => "USER_NOTIF",
        0x7ff0_0000 => "TRACE",
        0x7ffc_0000 => "LOG",
        0x7fff_0000 => "ALLOW",
        _ => "an unknown action",
    }
}

/// Runs one filter on `call`; Err for an instruction seccomp would not have accepted or
/// this evaluator does not know.
pub fn run(prog: &[Insn], call: &Call) -> Result<u32, String> {
    let data = call.data();
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    // cBPF only jumps forward: at most one step per instruction.
    for _ in 0..=prog.len() {
        let Some(&Insn { code, jt, jf, k }) = prog.get(pc) else {
            return Err(format!("falls off the end at instruction {pc}"));
        };
        pc += 1;
        let bad = || {
            Err(format!(
                "instruction {} (code {code:#06x}, k {k:#x})",
                pc - 1
            ))
        };
        let src = if code & 0x08 != 0 { x } else { k };
        match code & 0x07 {
            // BPF_LD
            0x00 => match code & 0xf8 {
                0x20 if k % 4 == 0 && (k as usize) < data.len() => {
                    let i = k as usize;
                    a = u32::from_le_bytes(data[i..i + 4].try_into().expect("4 bytes"));
                }
                0x80 => a = crate::util::convert::u32_saturating(data.len()),
                0x00 => a = k,
                0x60 if k < 16 => a = mem[k as usize],
                _ => return bad(),
            },
            // BPF_LDX
            0x01 => match code & 0xf8 {
                0x80 => x = crate::util::convert::u32_saturating(data.len()),
                0x00 => x = k,
                0x60 if k < 16 => x = mem[k as usize],
                _ => return bad(),
            },
            // BPF_ST, BPF_STX
            0x02 if k < 16 => mem[k as usize] = a,
            0x03 if k < 16 => mem[k as usize] = x,
            // BPF_ALU
            0x04 => {
                a = match code & 0xf0 {
                    0x00 => a.wrapping_add(src),
                    0x10 => a.wrapping_sub(src),
                    0x20 => a.wrapping_mul(src),
                    0x30 if src != 0 => a / src,
                    0x30 => return Ok(0), // division by zero: the kernel returns 0 (KILL)
                    0x40 => a | src,
                    0x50 => a & src,
                    0x60 => a.checked_shl(src).unwrap_or(0),
                    0x70 => a.checked_shr(src).unwrap_or(0),
                    0x80 => a.wrapping_neg(),
                    0x90 if src != 0 => a % src,
                    0x90 => return Ok(0),
                    0xa0 => a ^ src,
                    _ => return bad(),
                }
            }
            // BPF_JMP
            0x05 => {
                let offset = match code & 0xf0 {
                    0x00 => k as usize,
                    0x10 => usize::from(if a == src { jt } else { jf }),
                    0x20 => usize::from(if a > src { jt } else { jf }),
                    0x30 => usize::from(if a >= src { jt } else { jf }),
                    0x40 => usize::from(if a & src != 0 { jt } else { jf }),
                    _ => return bad(),
                };
                pc = pc
                    .checked_add(offset)
                    .ok_or_else(|| "jump overflow".to_owned())?;
            }
            // BPF_RET
            0x06 => {
                return match code & 0x18 {
                    0x00 => Ok(k),
                    0x10 => Ok(a),
                    _ => bad(),
                };
            }
            // BPF_MISC: TAX, TXA
            0x07 => match code & 0xf8 {
                0x00 => x = a,
                0x80 => a = x,
                _ => return bad(),
            },
            _ => return bad(),
        }
    }
    Err("does not return".into())
}

/// The combined action of a stack of filters, as the kernel picks it: the most
/// restrictive (the lowest action read as a signed number) wins.
pub fn combine(rets: impl IntoIterator<Item = u32>) -> u32 {
    rets.into_iter()
        .min_by_key(|r| (r & SECCOMP_RET_ACTION_FULL) as i32)
        .unwrap_or(libc::SECCOMP_RET_ALLOW)
}

/// Whether the combined action lets the call run.
pub fn allows(ret: u32) -> bool {
    matches!(ret & SECCOMP_RET_ACTION_FULL, 0x7fff_0000 | 0x7ffc_0000)
}

/// Reads every filter of the ptrace-stopped thread `tid` (index 0 is the newest).
fn filters(tid: Pid) -> Result<Vec<Vec<Insn>>, String> {
    let mut out = Vec::new();
    for index in 0..MAX_FILTERS {
        // SAFETY: PTRACE_SECCOMP_GET_FILTER with a null buffer only returns the length.
        let n = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid.as_raw(),
                index,
                std::ptr::null_mut::<Insn>(),
            )
        };
        if n < 0 {
            let e = Errno::last();
            if e == Errno::ENOENT && index > 0 {
                return Ok(out);
            }
            return Err(match e {
                Errno::EINVAL => "its filters cannot be read: the kernel needs \
                                  CONFIG_CHECKPOINT_RESTORE for PTRACE_SECCOMP_GET_FILTER"
                    .into(),
                Errno::EACCES => "its filters cannot be read (PTRACE_SECCOMP_GET_FILTER needs \
                                  CAP_SYS_ADMIN and a tracer not under seccomp)"
                    .into(),
                e => format!("reading its filter {index}: {e}"),
            });
        }
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n == 0 || n > MAX_INSNS {
            return Err(format!("its filter {index} has {n} instructions"));
        }
        let mut prog = vec![Insn::default(); n];
        // SAFETY: the buffer holds n sock_filter entries, as the kernel just said.
        let got = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid.as_raw(),
                index,
                prog.as_mut_ptr(),
            )
        };
        if usize::try_from(got).ok() != Some(n) {
            return Err(format!(
                "reading its filter {index}: {}",
                std::io::Error::last_os_error()
            ));
        }
        out.push(prog);
    }
    Err(format!("more than {MAX_FILTERS} filters"))
}

/// Whether every seccomp filter of the stopped thread `tid` allows `call`; Err says why
/// not (the caller refuses the injection).
pub fn check(tid: Pid, call: &Call) -> Result<(), String> {
    let progs = filters(tid)?;
    let mut rets = Vec::with_capacity(progs.len());
    for (i, p) in progs.iter().enumerate() {
        rets.push(run(p, call).map_err(|e| format!("its filter {i}: {e}"))?);
    }
    let ret = combine(rets);
    if allows(ret) {
        Ok(())
    } else {
        Err(format!(
            "its seccomp filter answers {} to madvise(advice {}): the injected call would \
             be refused or kill it",
            action_name(ret),
            call.args[2]
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `madvise` on x86-64.
    const MADVISE: u32 = 28;

    const fn stmt(code: u16, k: u32) -> Insn {
        Insn {
            code,
            jt: 0,
            jf: 0,
            k,
        }
    }
    const fn jeq(k: u32, jt: u8, jf: u8) -> Insn {
        Insn {
            code: 0x15,
            jt,
            jf,
            k,
        }
    }
    const LD_ABS: u16 = 0x20;
    const RET: u16 = 0x06;
    const ALLOW: u32 = 0x7fff_0000;
    const TRAP: u32 = 0x0003_0000;

    /// Firecracker's shape: madvise traps unless its advice is MADV_DONTNEED.
    fn firecracker_like() -> Vec<Insn> {
        vec![
            stmt(LD_ABS, 4),
            jeq(AUDIT_ARCH_X86_64, 1, 0),
            stmt(RET, 0),
            stmt(LD_ABS, 0),
            jeq(MADVISE, 0, 2),
            stmt(LD_ABS, 32),
            jeq(libc::MADV_DONTNEED as u32, 0, 1),
            stmt(RET, ALLOW),
            stmt(RET, TRAP),
        ]
    }

    fn madvise(advice: i32) -> Call {
        Call {
            nr: MADVISE,
            ip: 0x1000,
            args: [0x7f00_0000_0000, 4096, advice as u64, 0, 0, 0],
        }
    }

    #[test]
    fn a_filter_that_traps_other_advice_refuses_ksm_advice() {
        let p = firecracker_like();
        assert_eq!(run(&p, &madvise(libc::MADV_DONTNEED)), Ok(ALLOW));
        assert_eq!(run(&p, &madvise(libc::MADV_MERGEABLE)), Ok(TRAP));
        assert_eq!(run(&p, &madvise(libc::MADV_UNMERGEABLE)), Ok(TRAP));
        let mut other = madvise(libc::MADV_MERGEABLE);
        other.nr = 0; // read(2) on x86-64
        assert_eq!(run(&p, &other), Ok(ALLOW));
        assert!(!allows(TRAP) && allows(ALLOW) && allows(0x7ffc_0000));
    }

    #[test]
    fn the_most_restrictive_filter_wins() {
        assert_eq!(combine([ALLOW, TRAP]), TRAP);
        assert_eq!(combine([ALLOW, 0x8000_0000, TRAP]), 0x8000_0000);
        assert_eq!(combine([0x7ffc_0000, ALLOW]), 0x7ffc_0000);
        assert_eq!(combine([0x0005_0001, TRAP]), TRAP);
        assert_eq!(combine([]), ALLOW);
    }

    #[test]
    fn unknown_or_malformed_programs_are_refused_not_guessed() {
        // A load beyond seccomp_data, an unaligned load, a packet load, no return.
        for bad in [
            vec![stmt(LD_ABS, 64), stmt(RET, ALLOW)],
            vec![stmt(LD_ABS, 2), stmt(RET, ALLOW)],
            vec![stmt(0x28, 0), stmt(RET, ALLOW)],
            vec![stmt(LD_ABS, 0)],
            vec![Insn {
                code: 0x05,
                jt: 0,
                jf: 0,
                k: u32::MAX,
            }],
        ] {
            assert!(run(&bad, &madvise(12)).is_err(), "{bad:?}");
        }
        // Arithmetic, scratch memory and X as the filters generated by libseccomp use them.
        let prog = vec![
            stmt(LD_ABS, 32), // advice
            stmt(0x02, 3),    // ST M[3]
            stmt(0x01, 10),   // LDX #10
            stmt(0x0c, 0),    // ADD X
            stmt(0x61, 3),    // LDX M[3]
            stmt(0x87, 0),    // TXA
            Insn {
                code: 0x15,
                jt: 0,
                jf: 1,
                k: 12,
            },
            stmt(RET, ALLOW),
            stmt(RET, TRAP),
        ];
        assert_eq!(run(&prog, &madvise(12)), Ok(ALLOW));
        assert_eq!(run(&prog, &madvise(13)), Ok(TRAP));
    }

    #[test]
    fn the_status_field_gives_the_mode() {
        assert_eq!(
            mode("Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n"),
            Some(2)
        );
        assert_eq!(mode("Seccomp:\t0\n"), Some(0));
        assert_eq!(mode("Name:\tx\n"), None);
    }
}
