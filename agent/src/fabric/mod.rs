//! The fabric: agents on different hosts exchange compact summaries of their VMs' stable
//! pages and find where memory would be shared. This session: the summaries themselves
//! ([`sketch`]); peers, candidates and the consolidation plan are not built yet.

pub mod sketch;
