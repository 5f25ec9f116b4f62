//! The tgt planner (pure): desired targets and what tgtd holds → ordered tgtadm operations, and
//! what tgt cannot do.
//!
//! tgt differs from the API in ways the planner makes explicit:
//! - LUN 0 of every tgt target is its controller, so API LUN n is tgt LUN n + 1.
//! - Portals and CHAP accounts are global to the daemon; a target has one outgoing (mutual)
//!   account at most.
//! - Every initiator a target admits sees every LUN, with one read-only flag per LUN.
//!
//! What cannot be honoured is refused for the grant concerned — never silently widened.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::show::{TgtLun, TgtState, TgtTarget};
use crate::api::chap::{ChapAccount, Password};
use crate::api::iscsi_target::DeviceType;
use crate::backend::{Operation, Plan};
use crate::desired::{AclConfig, Kind, LunConfig, Problem, Reason, TargetConfig};

/// tgt's LUN for an API LUN: its LUN 0 is the target's controller.
pub fn device_lun(lun: u32) -> u32 {
    lun + 1
}

/// What discus created in tgtd, remembered across restarts (tgtd has no place for a tag).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owned {
    pub targets: BTreeSet<String>,
    /// Account name → fingerprint of the password it was created with (tgtd never shows one).
    pub accounts: BTreeMap<String, String>,
    /// Random, per data directory, so that fingerprints say nothing about the passwords.
    pub salt: String,
}

impl Owned {
    pub fn fingerprint(&self, password: &Password) -> String {
        let mut hash = Sha256::new();
        hash.update(self.salt.as_bytes());
        hash.update([0]);
        hash.update(password.expose().as_bytes());
        hex::encode(hash.finalize())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TgtOp {
    AddPortal(String),
    RemovePortal(String),
    CreateTarget {
        tid: u32,
        iqn: String,
    },
    /// `ready` or `offline`: offline before a delete, so that no I/O is in flight.
    SetState {
        tid: u32,
        iqn: String,
        ready: bool,
    },
    DeleteTarget {
        tid: u32,
        iqn: String,
    },
    AddLun {
        tid: u32,
        iqn: String,
        lun: u32,
        path: PathBuf,
        block_size: Option<u32>,
        cdrom: bool,
    },
    /// Read-only flag and serial: only `--op update` takes them.
    UpdateLun {
        tid: u32,
        iqn: String,
        lun: u32,
        readonly: bool,
        serial: String,
    },
    DeleteLun {
        tid: u32,
        iqn: String,
        lun: u32,
    },
    CreateAccount {
        user: String,
        password: Password,
    },
    DeleteAccount {
        user: String,
    },
    BindAccount {
        tid: u32,
        iqn: String,
        user: String,
        outgoing: bool,
    },
    UnbindAccount {
        tid: u32,
        iqn: String,
        user: String,
        outgoing: bool,
    },
    BindInitiator {
        tid: u32,
        iqn: String,
        initiator: String,
    },
    UnbindInitiator {
        tid: u32,
        iqn: String,
        initiator: String,
    },
    /// Ends a session (tgt does not when its ACL goes).
    CloseSession {
        tid: u32,
        iqn: String,
        initiator: String,
        sid: u64,
        cid: u32,
    },
}

impl fmt::Display for TgtOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AddPortal(p) => write!(f, "add portal {p}"),
            Self::RemovePortal(p) => write!(f, "remove portal {p}"),
            Self::CreateTarget { tid, iqn } => write!(f, "create target {tid} {iqn}"),
            Self::SetState { iqn, ready, .. } => {
                write!(
                    f,
                    "set target {iqn} {}",
                    if *ready { "ready" } else { "offline" }
                )
            }
            Self::DeleteTarget { iqn, .. } => write!(f, "delete target {iqn}"),
            Self::AddLun { iqn, lun, path, .. } => {
                write!(f, "add LUN {lun} of {iqn} from {}", path.display())
            }
            Self::UpdateLun {
                iqn, lun, readonly, ..
            } => {
                write!(
                    f,
                    "set LUN {lun} of {iqn} {}",
                    if *readonly { "read-only" } else { "writable" }
                )
            }
            Self::DeleteLun { iqn, lun, .. } => write!(f, "delete LUN {lun} of {iqn}"),
            Self::CreateAccount { user, .. } => write!(f, "create account {user}"),
            Self::DeleteAccount { user } => write!(f, "delete account {user}"),
            Self::BindAccount {
                iqn,
                user,
                outgoing,
                ..
            } => {
                write!(
                    f,
                    "bind {}account {user} to {iqn}",
                    if *outgoing { "outgoing " } else { "" }
                )
            }
            Self::UnbindAccount {
                iqn,
                user,
                outgoing,
                ..
            } => {
                write!(
                    f,
                    "unbind {}account {user} from {iqn}",
                    if *outgoing { "outgoing " } else { "" }
                )
            }
            Self::BindInitiator { iqn, initiator, .. } => write!(f, "admit {initiator} to {iqn}"),
            Self::UnbindInitiator { iqn, initiator, .. } => {
                write!(f, "stop admitting {initiator} to {iqn}")
            }
            Self::CloseSession {
                iqn,
                initiator,
                sid,
                ..
            } => write!(f, "close session {sid} of {initiator} on {iqn}"),
        }
    }
}

impl Operation for TgtOp {
    fn target(&self) -> Option<&str> {
        match self {
            Self::AddPortal(_)
            | Self::RemovePortal(_)
            | Self::CreateAccount { .. }
            | Self::DeleteAccount { .. } => None,
            Self::CreateTarget { iqn, .. }
            | Self::SetState { iqn, .. }
            | Self::DeleteTarget { iqn, .. }
            | Self::AddLun { iqn, .. }
            | Self::UpdateLun { iqn, .. }
            | Self::DeleteLun { iqn, .. }
            | Self::BindAccount { iqn, .. }
            | Self::UnbindAccount { iqn, .. }
            | Self::BindInitiator { iqn, .. }
            | Self::UnbindInitiator { iqn, .. }
            | Self::CloseSession { iqn, .. } => Some(iqn),
        }
    }

    fn initiator(&self) -> Option<&str> {
        match self {
            Self::BindInitiator { initiator, .. }
            | Self::UnbindInitiator { initiator, .. }
            | Self::CloseSession { initiator, .. } => Some(initiator),
            _ => None,
        }
    }
}

/// A LUN as tgt must hold it.
struct WantedLun<'a> {
    config: &'a LunConfig,
    readonly: bool,
}

/// The accounts a target binds.
#[derive(Default)]
struct WantedAccounts {
    incoming: BTreeSet<String>,
    outgoing: Option<String>,
}

/// A target as tgt can hold it, after the grants tgt cannot honour are refused.
struct Wanted<'a> {
    target: &'a TargetConfig,
    luns: Vec<WantedLun<'a>>,
    acls: Vec<&'a AclConfig>,
    accounts: WantedAccounts,
}

fn refuse(plan: &mut Plan<TgtOp>, acl: &AclConfig, message: String) {
    plan.refused.push(Problem {
        kind: Kind::InitiatorAccess,
        key: acl.grant.clone(),
        reason: Reason::BackendLimit,
        message,
    });
}

/// Decides which grants of a target tgt can honour, the read-only flag of each LUN, and the
/// accounts; `passwords` collects every account's password across the daemon.
fn wanted<'a>(
    target: &'a TargetConfig,
    passwords: &mut BTreeMap<String, (&'a Password, &'a AclConfig)>,
    plan: &mut Plan<TgtOp>,
) -> Wanted<'a> {
    let all_luns: Vec<u32> = target.luns.iter().map(|l| l.lun).collect();
    let mut acls: Vec<&AclConfig> = Vec::new();
    for acl in &target.acls {
        let granted: Vec<u32> = acl.luns.iter().map(|m| m.lun).collect();
        if granted != all_luns {
            refuse(
                plan,
                acl,
                format!(
                    "tgt shows every LUN of a target to every initiator it admits; this grant names LUNs {granted:?} of \
                     {all_luns:?}: grant all of them, or serve this target with LIO"
                ),
            );
        } else {
            acls.push(acl);
        }
    }
    // One read-only flag per LUN: read-only when the LUN or any admitted grant says so.
    let readonly = |lun: &LunConfig, acls: &[&AclConfig]| {
        lun.read_only
            || acls
                .iter()
                .any(|a| a.luns.iter().any(|m| m.lun == lun.lun && m.read_only))
    };
    let mut honoured = Vec::new();
    for acl in acls.iter().copied() {
        let wants_write = acl.luns.iter().find(|m| {
            !m.read_only
                && target
                    .luns
                    .iter()
                    .any(|l| l.lun == m.lun && readonly(l, &acls))
        });
        match wants_write {
            Some(m) => refuse(
                plan,
                acl,
                format!(
                    "tgt has one read-only flag per LUN and another grant reads LUN {} only: make every grant on \
                     this target writable, or serve it with LIO",
                    m.lun
                ),
            ),
            None => honoured.push(acl),
        }
    }
    let luns = target
        .luns
        .iter()
        .map(|config| WantedLun {
            config,
            readonly: readonly(config, &honoured),
        })
        .collect();

    let mut accounts = WantedAccounts::default();
    let mut admitted = Vec::new();
    'acls: for acl in honoured {
        if let Some(chap) = &acl.chap {
            let mut claims: Vec<(&ChapAccount, bool)> = vec![(&chap.initiator, false)];
            if let Some(mutual) = &chap.mutual {
                claims.push((mutual, true));
            }
            for (account, outgoing) in &claims {
                if let Some((password, owner)) = passwords.get(&account.username)
                    && **password != account.password
                {
                    refuse(
                        plan,
                        acl,
                        format!(
                            "tgt keeps one password per CHAP user across all targets, and user {} already has another \
                             (InitiatorAccess {}): give this grant its own username",
                            account.username, owner.grant.name
                        ),
                    );
                    continue 'acls;
                }
                if *outgoing
                    && let Some(existing) = &accounts.outgoing
                    && *existing != account.username
                {
                    refuse(
                        plan,
                        acl,
                        format!(
                            "tgt allows one mutual CHAP identity per target, and this target already uses {existing}: \
                             use the same mutualUsername and mutualPassword in every grant of this target"
                        ),
                    );
                    continue 'acls;
                }
            }
            for (account, outgoing) in claims {
                passwords
                    .entry(account.username.clone())
                    .or_insert((&account.password, acl));
                if outgoing {
                    accounts.outgoing = Some(account.username.clone());
                } else {
                    accounts.incoming.insert(account.username.clone());
                }
            }
        }
        admitted.push(acl);
    }
    Wanted {
        target,
        luns,
        acls: admitted,
        accounts,
    }
}

/// Plans the operations that take tgtd from `observed` to `desired`.
pub fn plan(desired: &[TargetConfig], observed: &TgtState, owned: &Owned) -> Plan<TgtOp> {
    let mut plan = Plan::default();
    let by_name: BTreeMap<&str, &TgtTarget> = observed
        .targets
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();

    // Which targets tgt can hold at all, and what of each.
    let mut passwords = BTreeMap::new();
    let mut wanted_targets = Vec::new();
    for target in desired {
        if let Some(found) = by_name.get(target.iqn.as_str())
            && !owned.targets.contains(&target.iqn)
        {
            plan.refused.push(Problem {
                kind: Kind::IscsiTarget,
                key: target.owner.clone(),
                reason: Reason::ForeignObject,
                message: format!(
                    "tgtd already holds target {} (tid {}), which discus did not create; discus leaves it alone",
                    target.iqn, found.tid
                ),
            });
            continue;
        }
        wanted_targets.push(wanted(target, &mut passwords, &mut plan));
    }

    // Portals are the daemon's, shared by every target.
    let wanted_portals: BTreeSet<String> = wanted_targets
        .iter()
        .flat_map(|w| w.target.portals.iter().map(ToString::to_string))
        .collect();
    let observed_portals: BTreeSet<String> = observed.portals.iter().cloned().collect();
    for portal in wanted_portals.difference(&observed_portals) {
        plan.ops.push(TgtOp::AddPortal(portal.clone()));
    }

    // Targets discus made that are no longer wanted: offline first, so no I/O is in flight.
    let wanted_names: BTreeSet<&str> = wanted_targets
        .iter()
        .map(|w| w.target.iqn.as_str())
        .collect();
    for target in &observed.targets {
        if owned.targets.contains(&target.name) && !wanted_names.contains(target.name.as_str()) {
            let (tid, iqn) = (target.tid, target.name.clone());
            plan.ops.push(TgtOp::SetState {
                tid,
                iqn: iqn.clone(),
                ready: false,
            });
            plan.ops.push(TgtOp::DeleteTarget { tid, iqn });
        }
    }

    // Accounts: created before anything binds them; a changed password means a new account.
    let observed_accounts: BTreeSet<&str> = observed.accounts.iter().map(String::as_str).collect();
    let mut recreated = BTreeSet::new();
    let mut foreign_accounts = BTreeSet::new();
    for (user, (password, _)) in &passwords {
        let exists = observed_accounts.contains(user.as_str());
        match owned.accounts.get(user) {
            Some(fingerprint) if exists && *fingerprint == owned.fingerprint(password) => {}
            Some(_) if exists => {
                plan.ops.push(TgtOp::DeleteAccount { user: user.clone() });
                plan.ops.push(TgtOp::CreateAccount {
                    user: user.clone(),
                    password: (*password).clone(),
                });
                recreated.insert(user.clone());
            }
            None if exists => {
                foreign_accounts.insert(user.as_str());
            }
            _ => plan.ops.push(TgtOp::CreateAccount {
                user: user.clone(),
                password: (*password).clone(),
            }),
        }
    }

    let mut next_tid = observed.targets.iter().map(|t| t.tid).max().unwrap_or(0) + 1;
    for wanted in &wanted_targets {
        let iqn = wanted.target.iqn.clone();
        let found = by_name.get(iqn.as_str()).copied();
        let tid = match found {
            Some(found) => {
                if found.state != "ready" {
                    plan.ops.push(TgtOp::SetState {
                        tid: found.tid,
                        iqn: iqn.clone(),
                        ready: true,
                    });
                }
                found.tid
            }
            None => {
                let tid = next_tid;
                next_tid += 1;
                plan.ops.push(TgtOp::CreateTarget {
                    tid,
                    iqn: iqn.clone(),
                });
                tid
            }
        };
        let empty = TgtTarget::default();
        let found = found.unwrap_or(&empty);
        plan_luns(&mut plan, tid, &iqn, &wanted.luns, &found.luns);

        // Accounts bound to the target; a recreated account lost its bindings.
        let bound =
            |user: &str| found.accounts.iter().any(|a| a == user) && !recreated.contains(user);
        for user in &found.accounts {
            if !wanted.accounts.incoming.contains(user) {
                plan.ops.push(TgtOp::UnbindAccount {
                    tid,
                    iqn: iqn.clone(),
                    user: user.clone(),
                    outgoing: false,
                });
            }
        }
        if let Some(user) = &found.outgoing_account
            && wanted.accounts.outgoing.as_ref() != Some(user)
        {
            plan.ops.push(TgtOp::UnbindAccount {
                tid,
                iqn: iqn.clone(),
                user: user.clone(),
                outgoing: true,
            });
        }
        for user in &wanted.accounts.incoming {
            if !bound(user) && !foreign_accounts.contains(user.as_str()) {
                plan.ops.push(TgtOp::BindAccount {
                    tid,
                    iqn: iqn.clone(),
                    user: user.clone(),
                    outgoing: false,
                });
            }
        }
        if let Some(user) = &wanted.accounts.outgoing {
            let bound_out =
                found.outgoing_account.as_ref() == Some(user) && !recreated.contains(user);
            if !bound_out && !foreign_accounts.contains(user.as_str()) {
                plan.ops.push(TgtOp::BindAccount {
                    tid,
                    iqn: iqn.clone(),
                    user: user.clone(),
                    outgoing: true,
                });
            }
        }

        // ACLs last: binding one makes the target visible, so everything else is in place first.
        let mut admitted = BTreeSet::new();
        for acl in &wanted.acls {
            let users = acl
                .chap
                .iter()
                .flat_map(|c| std::iter::once(&c.initiator).chain(c.mutual.as_ref()));
            let foreign: Vec<&str> = users
                .map(|a| a.username.as_str())
                .filter(|u| foreign_accounts.contains(u))
                .collect();
            if let Some(user) = foreign.first() {
                refuse(
                    &mut plan,
                    acl,
                    format!(
                        "tgtd already has a CHAP account {user}, which discus did not create; use another username"
                    ),
                );
            } else {
                admitted.insert(acl.initiator.as_str());
            }
        }
        for initiator in &found.acls {
            if !admitted.contains(initiator.as_str()) {
                plan.ops.push(TgtOp::UnbindInitiator {
                    tid,
                    iqn: iqn.clone(),
                    initiator: initiator.clone(),
                });
            }
        }
        for session in &found.sessions {
            if !admitted.contains(session.initiator.as_str()) {
                for &cid in &session.connections {
                    plan.ops.push(TgtOp::CloseSession {
                        tid,
                        iqn: iqn.clone(),
                        initiator: session.initiator.clone(),
                        sid: session.sid,
                        cid,
                    });
                }
            }
        }
        for initiator in admitted {
            if !found.acls.iter().any(|a| a == initiator) {
                plan.ops.push(TgtOp::BindInitiator {
                    tid,
                    iqn: iqn.clone(),
                    initiator: initiator.to_owned(),
                });
            }
        }
    }

    // Accounts discus made that nothing needs any more (deleting one unbinds it everywhere).
    for user in owned.accounts.keys() {
        if !passwords.contains_key(user) && observed_accounts.contains(user.as_str()) {
            plan.ops.push(TgtOp::DeleteAccount { user: user.clone() });
        }
    }
    for portal in observed_portals.difference(&wanted_portals) {
        plan.ops.push(TgtOp::RemovePortal(portal.clone()));
    }
    plan
}

fn plan_luns(
    plan: &mut Plan<TgtOp>,
    tid: u32,
    iqn: &str,
    wanted: &[WantedLun<'_>],
    observed: &[TgtLun],
) {
    let wanted_numbers: BTreeSet<u32> = wanted.iter().map(|w| device_lun(w.config.lun)).collect();
    for lun in observed {
        if lun.lun != 0 && !wanted_numbers.contains(&lun.lun) {
            plan.ops.push(TgtOp::DeleteLun {
                tid,
                iqn: iqn.to_owned(),
                lun: lun.lun,
            });
        }
    }
    for want in wanted {
        let config = want.config;
        let number = device_lun(config.lun);
        let cdrom = config.device_type == DeviceType::Cdrom;
        let path = config.backing.path().to_owned();
        let found = observed.iter().find(|l| l.lun == number);
        let same_device = found.is_some_and(|l| {
            l.backing_path.as_deref() == path.to_str()
                && (l.kind == "cd/dvd") == cdrom
                // tgt shows a CD's block size as 1; its blocks are 2048 bytes regardless.
                && (cdrom || l.block_size == config.block_size.unwrap_or(512))
        });
        if !same_device {
            if found.is_some() {
                plan.ops.push(TgtOp::DeleteLun {
                    tid,
                    iqn: iqn.to_owned(),
                    lun: number,
                });
            }
            plan.ops.push(TgtOp::AddLun {
                tid,
                iqn: iqn.to_owned(),
                lun: number,
                path,
                block_size: if cdrom { None } else { config.block_size },
                cdrom,
            });
        }
        let settled = same_device
            && found.is_some_and(|l| {
                l.readonly == want.readonly
                    && l.scsi_sn == config.serial
                    && l.scsi_id == config.serial
            });
        if !settled {
            plan.ops.push(TgtOp::UpdateLun {
                tid,
                iqn: iqn.to_owned(),
                lun: number,
                readonly: want.readonly,
                serial: config.serial.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::api::chap::ChapCredentials;
    use crate::api::iscsi_target::Portal;
    use crate::backend::tgt::show::TgtSession;
    use crate::desired::{Backing, MappedLun, ObjectKey};

    const IQN: &str = "iqn.2026-11.dev.discus:lab.boot";

    fn owned() -> Owned {
        Owned {
            salt: "salt".into(),
            ..Owned::default()
        }
    }

    fn lun(n: u32, read_only: bool) -> LunConfig {
        LunConfig {
            lun: n,
            image: ObjectKey::new("lab", "img"),
            backing: Backing::Image(PathBuf::from(format!("/data/images/{n}.raw"))),
            size_bytes: 1 << 20,
            serial: format!("{n:032x}"),
            read_only,
            block_size: None,
            device_type: DeviceType::Disk,
        }
    }

    fn account(user: &str, password: &str) -> ChapAccount {
        ChapAccount {
            username: user.into(),
            password: Password::new(password.into()),
        }
    }

    fn acl(
        initiator: &str,
        grant: &str,
        luns: &[(u32, bool)],
        user: Option<(&str, &str)>,
    ) -> AclConfig {
        AclConfig {
            initiator: initiator.into(),
            grant: ObjectKey::new("lab", grant),
            chap: user.map(|(u, p)| ChapCredentials {
                initiator: account(u, p),
                mutual: None,
            }),
            luns: luns
                .iter()
                .map(|&(lun, read_only)| MappedLun { lun, read_only })
                .collect(),
        }
    }

    fn target(luns: Vec<LunConfig>, acls: Vec<AclConfig>) -> TargetConfig {
        TargetConfig {
            iqn: IQN.into(),
            owner: ObjectKey::new("lab", "boot"),
            portals: vec![Portal {
                address: IpAddr::from([127, 0, 0, 1]),
                port: 3260,
            }],
            chap_required: true,
            luns,
            acls,
        }
    }

    /// tgtd as a model, for the planner's unit tests (the real one is tested in tests/tgt.rs).
    fn simulate(state: &mut TgtState, owned: &mut Owned, ops: &[TgtOp]) {
        let find = |state: &mut TgtState, tid: u32| -> usize {
            state
                .targets
                .iter()
                .position(|t| t.tid == tid)
                .expect("target exists")
        };
        for op in ops {
            match op.clone() {
                TgtOp::AddPortal(p) => state.portals.push(p),
                TgtOp::RemovePortal(p) => state.portals.retain(|x| *x != p),
                TgtOp::CreateTarget { tid, iqn } => {
                    owned.targets.insert(iqn.clone());
                    state.targets.push(TgtTarget {
                        tid,
                        name: iqn,
                        state: "ready".into(),
                        luns: vec![TgtLun {
                            lun: 0,
                            kind: "controller".into(),
                            block_size: 1,
                            ..TgtLun::default()
                        }],
                        ..TgtTarget::default()
                    });
                }
                TgtOp::SetState { tid, ready, .. } => {
                    let i = find(state, tid);
                    state.targets[i].state = if ready { "ready" } else { "offline" }.into();
                }
                TgtOp::DeleteTarget { tid, iqn } => {
                    state.targets.retain(|t| t.tid != tid);
                    owned.targets.remove(&iqn);
                }
                TgtOp::AddLun {
                    tid,
                    lun,
                    path,
                    block_size,
                    cdrom,
                    ..
                } => {
                    let i = find(state, tid);
                    state.targets[i].luns.push(TgtLun {
                        lun,
                        kind: if cdrom { "cd/dvd" } else { "disk" }.into(),
                        block_size: if cdrom { 1 } else { block_size.unwrap_or(512) },
                        backing_path: Some(path.display().to_string()),
                        ..TgtLun::default()
                    });
                }
                TgtOp::UpdateLun {
                    tid,
                    lun,
                    readonly,
                    serial,
                    ..
                } => {
                    let i = find(state, tid);
                    let l = state.targets[i]
                        .luns
                        .iter_mut()
                        .find(|l| l.lun == lun)
                        .expect("lun");
                    l.readonly = readonly;
                    l.scsi_sn = serial.clone();
                    l.scsi_id = serial;
                }
                TgtOp::DeleteLun { tid, lun, .. } => {
                    let i = find(state, tid);
                    state.targets[i].luns.retain(|l| l.lun != lun);
                }
                TgtOp::CreateAccount { user, password } => {
                    owned
                        .accounts
                        .insert(user.clone(), owned.fingerprint(&password));
                    state.accounts.push(user);
                }
                TgtOp::DeleteAccount { user } => {
                    owned.accounts.remove(&user);
                    state.accounts.retain(|a| *a != user);
                    for t in &mut state.targets {
                        t.accounts.retain(|a| *a != user);
                        if t.outgoing_account.as_ref() == Some(&user) {
                            t.outgoing_account = None;
                        }
                    }
                }
                TgtOp::BindAccount {
                    tid,
                    user,
                    outgoing,
                    ..
                } => {
                    let i = find(state, tid);
                    if outgoing {
                        state.targets[i].outgoing_account = Some(user);
                    } else {
                        state.targets[i].accounts.push(user);
                    }
                }
                TgtOp::UnbindAccount {
                    tid,
                    user,
                    outgoing,
                    ..
                } => {
                    let i = find(state, tid);
                    if outgoing {
                        state.targets[i].outgoing_account = None;
                    } else {
                        state.targets[i].accounts.retain(|a| *a != user);
                    }
                }
                TgtOp::BindInitiator { tid, initiator, .. } => {
                    let i = find(state, tid);
                    state.targets[i].acls.push(initiator);
                }
                TgtOp::UnbindInitiator { tid, initiator, .. } => {
                    let i = find(state, tid);
                    state.targets[i].acls.retain(|a| *a != initiator);
                }
                TgtOp::CloseSession { tid, sid, .. } => {
                    let i = find(state, tid);
                    state.targets[i].sessions.retain(|s| s.sid != sid);
                }
            }
        }
    }

    /// Plans, applies to the model, and checks that a second plan has nothing left to do.
    fn converge(desired: &[TargetConfig], state: &mut TgtState, owned: &mut Owned) -> Plan<TgtOp> {
        let first = plan(desired, state, owned);
        simulate(state, owned, &first.ops);
        let again = plan(desired, state, owned);
        assert!(
            again.ops.is_empty(),
            "not converged after one round: {:?}",
            again.ops
        );
        first
    }

    fn shown(ops: &[TgtOp]) -> Vec<String> {
        ops.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_new_target_is_built_luns_first_and_admitted_last() {
        let desired = [target(
            vec![lun(0, true), lun(1, true)],
            vec![acl(
                "iqn.1993-08.org.debian:01:a",
                "a",
                &[(0, true), (1, true)],
                Some(("a", "secret-secret")),
            )],
        )];
        let (mut state, mut owned) = (TgtState::default(), owned());
        state.portals.push("127.0.0.1:41234".into());
        let plan = converge(&desired, &mut state, &mut owned);
        assert_eq!(
            shown(&plan.ops),
            [
                "add portal 127.0.0.1:3260",
                "create account a",
                format!("create target 1 {IQN}").as_str(),
                format!("add LUN 1 of {IQN} from /data/images/0.raw").as_str(),
                format!("set LUN 1 of {IQN} read-only").as_str(),
                format!("add LUN 2 of {IQN} from /data/images/1.raw").as_str(),
                format!("set LUN 2 of {IQN} read-only").as_str(),
                format!("bind account a to {IQN}").as_str(),
                format!("admit iqn.1993-08.org.debian:01:a to {IQN}").as_str(),
                "remove portal 127.0.0.1:41234",
            ]
        );
        assert!(plan.refused.is_empty());
        assert!(owned.targets.contains(IQN));
    }

    #[test]
    fn removing_one_grant_touches_that_grant_only_and_ends_its_sessions() {
        let a = acl(
            "iqn.1993-08.org.debian:01:a",
            "a",
            &[(0, true)],
            Some(("a", "secret-secret")),
        );
        let b = acl(
            "iqn.1993-08.org.debian:01:b",
            "b",
            &[(0, true)],
            Some(("b", "other-secret")),
        );
        let (mut state, mut owned) = (TgtState::default(), owned());
        converge(
            &[target(vec![lun(0, true)], vec![a.clone(), b.clone()])],
            &mut state,
            &mut owned,
        );
        state.targets[0].sessions.push(TgtSession {
            sid: 7,
            initiator: b.initiator.clone(),
            connections: vec![0, 1],
            address: None,
        });
        let plan = converge(
            &[target(vec![lun(0, true)], vec![a])],
            &mut state,
            &mut owned,
        );
        assert_eq!(
            shown(&plan.ops),
            [
                format!("unbind account b from {IQN}").as_str(),
                format!("stop admitting iqn.1993-08.org.debian:01:b to {IQN}").as_str(),
                format!("close session 7 of iqn.1993-08.org.debian:01:b on {IQN}").as_str(),
                format!("close session 7 of iqn.1993-08.org.debian:01:b on {IQN}").as_str(),
                "delete account b",
            ]
        );
    }

    #[test]
    fn drift_is_repaired_and_a_rotated_password_makes_a_new_account() {
        let a = acl(
            "iqn.1993-08.org.debian:01:a",
            "a",
            &[(0, true)],
            Some(("a", "secret-secret")),
        );
        let (mut state, mut owned) = (TgtState::default(), owned());
        converge(
            &[target(vec![lun(0, true)], vec![a.clone()])],
            &mut state,
            &mut owned,
        );
        // Someone deleted the LUN and the ACL behind discus's back.
        state.targets[0].luns.retain(|l| l.lun == 0);
        state.targets[0].acls.clear();
        let plan = converge(
            &[target(vec![lun(0, true)], vec![a])],
            &mut state,
            &mut owned,
        );
        assert_eq!(plan.ops.len(), 3, "{:?}", shown(&plan.ops));

        let rotated = acl(
            "iqn.1993-08.org.debian:01:a",
            "a",
            &[(0, true)],
            Some(("a", "new-secret-12")),
        );
        let plan = converge(
            &[target(vec![lun(0, true)], vec![rotated])],
            &mut state,
            &mut owned,
        );
        assert_eq!(
            shown(&plan.ops),
            [
                "delete account a",
                "create account a",
                format!("bind account a to {IQN}").as_str()
            ]
        );
    }

    #[test]
    fn a_target_discus_did_not_create_is_never_touched() {
        let mut state = TgtState::default();
        state.targets.push(TgtTarget {
            tid: 1,
            name: IQN.into(),
            state: "ready".into(),
            ..TgtTarget::default()
        });
        state.targets.push(TgtTarget {
            tid: 2,
            name: "iqn.2001-04.com.example:other".into(),
            ..TgtTarget::default()
        });
        let plan = plan(&[target(vec![lun(0, true)], Vec::new())], &state, &owned());
        assert!(
            plan.ops.iter().all(|op| op.target().is_none()),
            "{:?}",
            shown(&plan.ops)
        );
        assert_eq!(plan.refused.len(), 1);
        assert_eq!(plan.refused[0].reason, Reason::ForeignObject);
    }

    #[test]
    fn what_tgt_cannot_do_is_refused_per_grant() {
        let luns = vec![lun(0, true), lun(1, false)];
        let desired = [target(
            luns,
            vec![
                // Sees LUN 0 only: tgt cannot hide LUN 1 from it.
                acl("iqn.1993-08.org.debian:01:a", "subset", &[(0, true)], None),
                // Reads LUN 1 only, so LUN 1 is read-only for everyone…
                acl(
                    "iqn.1993-08.org.debian:01:b",
                    "reader",
                    &[(0, true), (1, true)],
                    None,
                ),
                // …and this one, which wants to write it, is refused.
                acl(
                    "iqn.1993-08.org.debian:01:c",
                    "writer",
                    &[(0, true), (1, false)],
                    None,
                ),
            ],
        )];
        let (mut state, mut owned) = (TgtState::default(), owned());
        let plan = converge(&desired, &mut state, &mut owned);
        let refused: Vec<&str> = plan.refused.iter().map(|p| p.key.name.as_str()).collect();
        assert_eq!(refused, ["subset", "writer"]);
        assert!(
            plan.refused
                .iter()
                .all(|p| p.reason == Reason::BackendLimit)
        );
        assert_eq!(state.targets[0].acls, ["iqn.1993-08.org.debian:01:b"]);
        assert!(
            state.targets[0]
                .luns
                .iter()
                .filter(|l| l.lun > 0)
                .all(|l| l.readonly)
        );
    }

    #[test]
    fn one_password_per_user_and_one_mutual_identity_per_target() {
        let mut a = acl(
            "iqn.1993-08.org.debian:01:a",
            "a",
            &[(0, true)],
            Some(("shared", "secret-secret")),
        );
        let b = acl(
            "iqn.1993-08.org.debian:01:b",
            "b",
            &[(0, true)],
            Some(("shared", "other-secret")),
        );
        let mut c = acl(
            "iqn.1993-08.org.debian:01:c",
            "c",
            &[(0, true)],
            Some(("c", "c-secret-1234")),
        );
        if let Some(chap) = a.chap.as_mut() {
            chap.mutual = Some(account("target-a", "mutual-secret"));
        }
        if let Some(chap) = c.chap.as_mut() {
            chap.mutual = Some(account("target-c", "mutual-secret"));
        }
        let plan = plan(
            &[target(vec![lun(0, true)], vec![a, b, c])],
            &TgtState::default(),
            &owned(),
        );
        let refused: Vec<&str> = plan.refused.iter().map(|p| p.key.name.as_str()).collect();
        assert_eq!(refused, ["b", "c"]);
        assert!(
            plan.refused[0]
                .message
                .contains("one password per CHAP user")
        );
        assert!(
            plan.refused[1]
                .message
                .contains("one mutual CHAP identity per target")
        );
    }

    #[test]
    fn a_changed_device_is_replaced_and_a_removed_target_goes_offline_first() {
        let (mut state, mut owned) = (TgtState::default(), owned());
        converge(
            &[target(vec![lun(0, true)], Vec::new())],
            &mut state,
            &mut owned,
        );
        let mut cd = lun(0, true);
        cd.device_type = DeviceType::Cdrom;
        let plan = converge(&[target(vec![cd], Vec::new())], &mut state, &mut owned);
        assert_eq!(
            shown(&plan.ops),
            [
                format!("delete LUN 1 of {IQN}").as_str(),
                format!("add LUN 1 of {IQN} from /data/images/0.raw").as_str(),
                format!("set LUN 1 of {IQN} read-only").as_str(),
            ]
        );
        let plan = converge(&[], &mut state, &mut owned);
        assert_eq!(
            shown(&plan.ops),
            [
                format!("set target {IQN} offline").as_str(),
                format!("delete target {IQN}").as_str(),
                "remove portal 127.0.0.1:3260"
            ]
        );
        assert!(owned.targets.is_empty());
    }
}
