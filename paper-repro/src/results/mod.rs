//! From run folders to what a reader sees: the runs' data ([`runs`]), statistics ([`stats`]),
//! tables ([`tables`]), figures ([`figures`]), the ledger's verdict rules ([`verdicts`]), the
//! official runs set beside ours ([`official`]) and the report ([`report`]).

pub mod figures;
pub mod official;
pub mod report;
pub mod runs;
pub mod stats;
pub mod tables;
pub mod verdicts;
