//! Write heat: how often the pages of a tracked process were written while write-protected
//! (the COW signature) and how many of those writes broke a KSM merge. The probes measure
//! it, the scan ranking and the controller read it; this leaf module is what they share.

/// tgid -> range start -> heat summed over the range's pages.
pub type RangeHeatMap = std::collections::HashMap<u32, std::collections::HashMap<u64, PageHeat>>;

/// Write heat of a page (or summed over a range): since tracking began, or over an
/// interval when two readings are subtracted. The LRU forgets the coldest pages when full.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct PageHeat {
    /// Writes to the page while it was present and write-protected (COW signature).
    pub write_protect_faults: u32,
    /// Of those, writes that broke a merge ksmd made.
    pub cow_breaks: u32,
    /// Summed over a range: its pages written while write-protected twice or more since
    /// the probes began tracking them (a page: 1 when it was). Over an interval with
    /// faults, the later reading's count, not a difference: it tells whether the
    /// interval's faults hit pages written so before (churn) or only once (a guest
    /// filling memory that was merged: see the ranking's `RankPolicy::classify`).
    #[serde(default)]
    pub rewritten_pages: u32,
}

impl PageHeat {
    /// What was added since `earlier` (zero where the LRU forgot pages meanwhile).
    pub fn since(self, earlier: PageHeat) -> PageHeat {
        PageHeat {
            write_protect_faults: self
                .write_protect_faults
                .saturating_sub(earlier.write_protect_faults),
            cow_breaks: self.cow_breaks.saturating_sub(earlier.cow_breaks),
            rewritten_pages: if self.write_protect_faults > earlier.write_protect_faults {
                self.rewritten_pages
            } else {
                0
            },
        }
    }
}
