//! From run folders to what a reader sees: tables ([`tables`]), figures ([`figures`]) and the
//! report with its claims ledger ([`report`]).

pub mod figures;
pub mod report;
pub mod tables;
