//! What tgtd holds, as discus reads it (read.rs) and plans against it (plan.rs).

use std::collections::{BTreeMap, BTreeSet};

/// Everything tgtd holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TgtState {
    pub targets: Vec<TgtTarget>,
    /// Every account (`--mode account --op show`).
    pub accounts: Vec<String>,
    /// Listening portals, `address:port` as tgtd prints them (`[v6]:port` for IPv6).
    pub portals: Vec<String>,
    /// Targets discus made that a pass over partial input keeps (see `keep_undeclared`): not
    /// read from tgtd.
    pub kept: BTreeSet<String>,
}

impl TgtState {
    /// Its targets by IQN: a planner that looks each desired target up stays linear in them.
    pub fn targets_by_name(&self) -> BTreeMap<&str, &TgtTarget> {
        (self.targets.iter())
            .map(|t| (t.name.as_str(), t))
            .collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TgtTarget {
    pub tid: u32,
    pub name: String,
    /// `ready` or `offline`.
    pub state: String,
    pub sessions: Vec<TgtSession>,
    pub luns: Vec<TgtLun>,
    /// Incoming account names.
    pub accounts: Vec<String>,
    pub outgoing_account: Option<String>,
    /// Initiator names and addresses allowed to log in.
    pub acls: Vec<String>,
    /// Addresses allowed to log in (`ALL`, `192.168.1.0/24`): discus never binds one, and
    /// removes any it finds on its targets.
    pub address_acls: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TgtSession {
    /// The I_T nexus id, which `--mode conn --op delete` calls `--sid`.
    pub sid: u64,
    pub initiator: String,
    pub connections: Vec<u32>,
    pub address: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TgtLun {
    pub lun: u32,
    /// `disk`, `cd/dvd`, `controller`, …
    pub kind: String,
    pub scsi_id: String,
    pub scsi_sn: String,
    pub block_size: u32,
    pub readonly: bool,
    pub backing_path: Option<String>,
}
