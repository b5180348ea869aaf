//! When a known VM is described again. A description ([`inventory::describe`]) reads
//! smaps, which walks the page tables of all its guest RAM; what it finds changes only
//! when the mappings change or merging is switched. So a known VM's cheap fingerprint
//! ([`inventory::layout_fingerprint`]) is checked now and then, and the VM described
//! again when it moved, and in any case every [`FULL`] refreshes (merging switched over a
//! whole mapping, which no fingerprint shows).
//!
//! [`inventory::describe`]: super::inventory::describe
//! [`inventory::layout_fingerprint`]: super::inventory::layout_fingerprint

/// Refreshes between two looks at a known VM's fingerprint (about 30 s at the default 2 s).
pub const CHECK: u32 = 15;
/// Refreshes between two descriptions of a VM whose fingerprint held (10 minutes at the
/// default 2 s, up to 30 on a quiet host): merging switched off over a whole mapping
/// (QEMU's `merge` property set at run time) shows no sooner. Every 60 refreshes, smaps
/// (a walk of every page table of every VM) was 55 % of a resting daemon's refresh CPU at
/// 16 GiB of guests, and what grew its cost with guest RAM (perf, bench scale); a hint
/// reads the pieces' flags again when it acts.
pub const FULL: u32 = 300;

/// What the daemon remembers of a VM's last description.
#[derive(Clone, Copy, Debug)]
pub struct Described {
    /// The process's start time: with the PID, its identity (PIDs are reused).
    pub start_time: Option<u64>,
    /// Refresh of the last fingerprint check and of the last description.
    checked: u32,
    described: u32,
    layout: Option<u64>,
}

impl Described {
    /// A VM described at refresh `now`, its fingerprint then `layout`.
    pub fn new(start_time: Option<u64>, now: u32, layout: Option<u64>) -> Described {
        Described {
            start_time,
            checked: now,
            described: now,
            layout,
        }
    }

    /// Whether the VM is to be described again at refresh `now`. `unsettled`: its RAM
    /// was not found yet (a VMM at its start), described every refresh until it is.
    /// `layout` is asked only when a check is due.
    pub fn due(&mut self, now: u32, unsettled: bool, layout: impl FnOnce() -> Option<u64>) -> bool {
        if unsettled || now.wrapping_sub(self.described) >= FULL {
            return true;
        }
        if now.wrapping_sub(self.checked) < CHECK {
            return false;
        }
        self.checked = now;
        let seen = layout();
        seen.is_none() || seen != self.layout
    }

    /// Described again at refresh `now`, its fingerprint then `layout`.
    pub fn renewed(&mut self, now: u32, layout: Option<u64>) {
        *self = Described::new(self.start_time, now, layout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_is_described_again_when_its_layout_moves_or_after_the_full_period() {
        let mut d = Described::new(Some(7), 0, Some(1));
        let mut asked = 0;
        let mut same = |_: u32| {
            asked += 1;
            Some(1)
        };
        // Between checks: nothing read.
        assert!(!d.due(CHECK - 1, false, || same(0)));
        // A check finds the layout unchanged: no description.
        assert!(!d.due(CHECK, false, || same(0)));
        assert!(!d.due(CHECK + 1, false, || same(0)));
        assert_eq!(asked, 1, "one fingerprint read per check period");
        // The layout moved (a mapping split, merging switched for the whole process).
        assert!(d.due(2 * CHECK, false, || Some(2)));
        d.renewed(2 * CHECK, Some(2));
        assert!(!d.due(3 * CHECK, false, || Some(2)));
        // A process whose maps cannot be read is described (and found gone) at once.
        assert!(d.due(4 * CHECK, false, || None));
        // Whatever the fingerprint, every FULL refreshes; at every refresh while unsettled.
        let mut d = Described::new(None, 0, Some(1));
        assert!(d.due(FULL, false, || Some(1)));
        assert!(d.due(1, true, || Some(1)));
        assert_eq!(d.start_time, None);
    }

    #[test]
    fn refresh_counters_wrap() {
        let mut d = Described::new(None, u32::MAX - 2, Some(1));
        assert!(
            !d.due(3, false, || Some(1)),
            "5 refreshes on, across the wrap"
        );
        assert!(d.due((u32::MAX - 2).wrapping_add(FULL), false, || Some(1)));
    }
}
