//! Target backends: what the target software holds now, the difference to the desired target
//! set, and applying it — LIO through configfs, or the userspace target tgt.
//!
//! Every backend follows the same cycle, driven by the sync loop: `observe` reads the current
//! state into a typed model; `plan` (pure) turns desired and observed into an ordered, minimal
//! list of operations plus what the backend cannot do; `apply` carries out one operation. After
//! applying, the loop observes again: what is still planned has not converged.

pub mod lio;
mod record;
pub mod tgt;

use std::fmt;
use std::future::Future;

use crate::desired::{Problem, TargetConfig};

/// What a backend can present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// LUNs as CD/DVD drives.
    pub cdrom: bool,
}

/// An initiator logged in to a target.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Session {
    pub target: String,
    pub initiator: String,
    /// The initiator's address, when the backend knows it.
    pub address: Option<String>,
}

/// Operations in order, and what cannot be realised on this backend (reported as problems of the
/// resources concerned; the rest is applied regardless).
#[derive(Debug)]
pub struct Plan<Op> {
    pub ops: Vec<Op>,
    pub refused: Vec<Problem>,
}

impl<Op> Default for Plan<Op> {
    fn default() -> Self {
        Self {
            ops: Vec::new(),
            refused: Vec::new(),
        }
    }
}

/// What an operation is about, so that failures and unfinished work land on the right resource.
pub trait Operation: fmt::Display + fmt::Debug + Send + Sync {
    /// The target's IQN, for operations on one target.
    fn target(&self) -> Option<&str>;
    /// The initiator, for operations on one grant.
    fn initiator(&self) -> Option<&str>;
    /// An object the target software shares between targets that the operation makes, removes or
    /// binds (tgt's CHAP accounts): a failure on it stops the operations that build on it.
    fn shared(&self) -> Option<&str> {
        None
    }
    /// Whether the operation only takes access away (an ACL removed, a session ended, a target
    /// taken offline). Such operations run even after an earlier step failed: a failure must
    /// never keep a revoked initiator in.
    fn revokes(&self) -> bool;
}

/// What failed so far in one application of a plan, and so which later operations must not run.
///
/// A plan is ordered so that every prefix of it is safe; after a failure, the operations that
/// build on the failed one (the rest of its target, everything binding its shared object) are
/// skipped — and they count as failed in turn, so their own dependents are skipped too — while
/// operations that only revoke access always run.
#[derive(Debug, Default)]
pub struct Failures {
    targets: std::collections::BTreeSet<String>,
    shared: std::collections::BTreeSet<String>,
}

impl Failures {
    /// Whether `op` may run after what failed so far. An operation that may not is recorded as
    /// failed.
    pub fn admit(&mut self, op: &impl Operation) -> bool {
        let blocked = op.target().is_some_and(|t| self.targets.contains(t))
            || op.shared().is_some_and(|s| self.shared.contains(s));
        if blocked && !op.revokes() {
            self.record(op);
            return false;
        }
        true
    }

    /// `op` failed: what builds on it must not run.
    pub fn record(&mut self, op: &impl Operation) {
        if let Some(target) = op.target() {
            self.targets.insert(target.to_owned());
        }
        if let Some(shared) = op.shared() {
            self.shared.insert(shared.to_owned());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{operation}: {message}")]
    Failed { operation: String, message: String },
    /// What the operation was to make is there already, made by someone else meanwhile.
    #[error("{operation}: {message}")]
    Exists { operation: String, message: String },
    #[error("the target software is unreachable: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub trait Backend: Send + Sync {
    type Observed: Send + Sync;
    type Op: Operation;

    fn name(&self) -> &'static str;
    fn capabilities(&self) -> Capabilities;
    /// The LUN number initiators see for an API LUN number.
    fn device_lun(&self, lun: u32) -> u32;
    fn observe(&self) -> impl Future<Output = Result<Self::Observed, BackendError>> + Send;
    /// Whether `observe_scoped` reads less than everything. A backend whose objects are shared
    /// between targets (tgt: its accounts and portals) cannot plan from a part of its state.
    fn scoped(&self) -> bool {
        false
    }
    /// Reads what the targets `iqns` use — everything those of them in `desired` will use
    /// included — and nothing else, so that a change to a few targets costs the same with ten
    /// targets as with a thousand. The plan of a scoped observation touches those targets only.
    fn observe_scoped(
        &self,
        desired: &[TargetConfig],
        iqns: &std::collections::BTreeSet<String>,
    ) -> impl Future<Output = Result<Self::Observed, BackendError>> + Send {
        let _ = (desired, iqns);
        self.observe()
    }
    /// Makes the targets discus made that `desired` does not name invisible to the planner, with
    /// everything they use: a pass over partial input (a manifest that cannot be read) must not
    /// remove what that input may still declare.
    fn keep_undeclared(&self, observed: &mut Self::Observed, desired: &[TargetConfig]);
    /// Pure: the same inputs give the same plan.
    fn plan(&self, desired: &[TargetConfig], observed: &Self::Observed) -> Plan<Self::Op>;
    fn apply(&self, op: &Self::Op) -> impl Future<Output = Result<(), BackendError>> + Send;
    fn sessions(&self, observed: &Self::Observed) -> Vec<Session>;
    /// The files the observed LUNs read from.
    fn backing_files(&self, observed: &Self::Observed) -> Vec<std::path::PathBuf>;
}
