//! `sched:sched_process_exit`: a tracked process leaves the maps, and its final counters
//! reach userspace through the ring buffer (or the drop counter says they did not).
//!
//! ```text
//! field:char comm[16];     offset:8;  size:16; signed:0;
//! field:pid_t pid;         offset:24; size:4;  signed:1;
//! field:int prio;          offset:28; size:4;  signed:1;
//! field:bool group_dead;   offset:32; size:1;  signed:0;
//! ```

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use aya_log_ebpf::debug;
use memfabric_common::{Counter, Event, OFFSET_MISSING, event_kind};

use crate::state::{EVENTS, MM_OWNER, TRACKED, count, failed, offsets};

#[tracepoint]
pub(crate) fn sched_process_exit(ctx: TracePointContext) -> u32 {
    try_sched_process_exit(&ctx).unwrap_or_else(failed)
}

fn try_sched_process_exit(ctx: &TracePointContext) -> Result<u32, i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(stats) = TRACKED.get_ptr(tgid) else {
        return Ok(0);
    };
    let off = offsets();
    let whole_process = if off.exit_group_dead == OFFSET_MISSING {
        pid_tgid as u32 == tgid
    } else {
        // SAFETY: the offset is this tracepoint's field, from its format file at load time,
        // and the type is the field's; read_at copies it with bpf_probe_read_kernel (a bad
        // read is an error, never a fault).
        let group_dead: u8 = unsafe { ctx.read_at(off.exit_group_dead as usize)? };
        group_dead != 0
    };
    if !whole_process {
        return Ok(0);
    }
    // SAFETY: a pointer the map lookup above returned: the value lives for this program's
    // run (map values are freed after an RCU grace period).
    let stats = unsafe { *stats };
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event {
                kind: event_kind::EXIT,
                tgid,
                stats,
            });
            entry.submit(0);
        }
        None => count(Counter::EventsDropped),
    }
    let _ = TRACKED.remove(tgid);
    if stats.mm != 0 {
        let _ = MM_OWNER.remove(stats.mm);
    }
    debug!(ctx, "tracked process {} exited", tgid);
    Ok(0)
}
