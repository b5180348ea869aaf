//! `sched:sched_switch`, attached only while a tracked process's `mm` is unknown: a
//! process that neither faults nor enters KSM after it is tracked (a TCG guest whose RAM
//! is long populated) still gets scheduled, and the task switching out is `current`.
//! The agent detaches it once every tracked process is learnt, so it costs nothing then.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::state::{TRACKED, current_tgid, learn_mm, offsets};

#[tracepoint]
pub(crate) fn sched_switch(_ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if tgid == 0 {
        return 0;
    }
    if let Some(stats) = TRACKED.get_ptr_mut(tgid)
        // SAFETY: a pointer the map lookup above returned: the value lives for this
        // program's run (map values are freed after an RCU grace period).
        && unsafe { (*stats).mm } == 0
    {
        // SAFETY: `stats` is the TRACKED value of the current task's TGID, looked up above.
        unsafe { learn_mm(tgid, stats, &offsets()) };
    }
    0
}
