//! The targets discus is making or removing whose TPG alias — the mark that makes them discus's —
//! is not (or no longer) there: recorded durably before the step that opens the window
//! (`mkdir` of the target, `rmdir` of its TPG) and dropped after the step that closes it (the
//! alias written, the target gone). A target a crash left in between is still discus's when it
//! is in this record and bare (see `plan::owned`).

use std::collections::BTreeSet;

use super::model::LioState;
use super::plan::{LioOp, marked};

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Unmarked {
    pub targets: BTreeSet<String>,
}

impl Unmarked {
    /// Before `op`, and whether that changed the record.
    pub fn before(&mut self, op: &LioOp) -> bool {
        match op {
            LioOp::CreateTarget { iqn } | LioOp::DeleteTpg { iqn } => {
                self.targets.insert(iqn.clone())
            }
            _ => false,
        }
    }

    /// After `op` succeeded, and whether that changed the record.
    pub fn after(&mut self, op: &LioOp) -> bool {
        match op {
            LioOp::CreateTpg { iqn, .. } | LioOp::DeleteTarget { iqn } => self.targets.remove(iqn),
            _ => false,
        }
    }

    /// After `op` found its object there already: a target discus did not make is not its own
    /// (its `mkdir` is planned only where configfs showed none).
    pub fn failed(&mut self, op: &LioOp) -> bool {
        match op {
            LioOp::CreateTarget { iqn } => self.targets.remove(iqn),
            _ => false,
        }
    }

    /// Drops what `state` shows needs no record: targets absent from it, and targets marked as
    /// discus's. `read` says which IQNs the state covers (`None`: all).
    pub fn settle(&mut self, state: &LioState, read: Option<&BTreeSet<String>>) -> bool {
        let before = self.targets.len();
        self.targets.retain(|iqn| {
            let covered = read.is_none_or(|read| read.contains(iqn));
            !covered || state.target(iqn).is_some_and(|t| !marked(t))
        });
        self.targets.len() != before
    }
}
