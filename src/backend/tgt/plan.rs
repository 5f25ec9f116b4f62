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
    /// Account name → fingerprint of the password tgtd holds for it (tgtd never shows one), or
    /// `None` while it is being changed: an account whose password discus does not know for
    /// certain is made again, never trusted.
    pub accounts: BTreeMap<String, Option<String>>,
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

    /// Records what `op` is about to change, and whether that changed the record: a target is
    /// owned before it exists, and an account's password is marked unknown before tgtd changes
    /// it (so that the record never claims a password tgtd does not hold).
    pub fn before(&mut self, op: &TgtOp) -> bool {
        match op {
            TgtOp::CreateTarget { iqn, .. } => self.targets.insert(iqn.clone()),
            TgtOp::CreateAccount { user, .. } | TgtOp::DeleteAccount { user } => {
                self.accounts.insert(user.clone(), None) != Some(None)
            }
            _ => false,
        }
    }

    /// Records what `op` changed once tgtd did it, and whether that changed the record.
    pub fn after(&mut self, op: &TgtOp) -> bool {
        match op {
            TgtOp::DeleteTarget { iqn, .. } => self.targets.remove(iqn),
            TgtOp::CreateAccount { user, password } => {
                let known = Some(self.fingerprint(password));
                self.accounts.insert(user.clone(), known.clone()) != Some(known)
            }
            TgtOp::DeleteAccount { user } => self.accounts.remove(user).is_some(),
            _ => false,
        }
    }

    /// Whether tgtd is known to hold `password` for `user`.
    pub fn matches(&self, user: &str, password: &Password) -> bool {
        self.accounts
            .get(user)
            .is_some_and(|known| known.as_deref() == Some(self.fingerprint(password).as_str()))
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
    /// An address ACL (`ALL`, a network): admits by address, never discus's doing.
    UnbindAddress {
        tid: u32,
        iqn: String,
        address: String,
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
            Self::UnbindAddress { iqn, address, .. } => {
                write!(f, "stop admitting address {address} to {iqn}")
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
            | Self::UnbindAddress { iqn, .. }
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

    fn shared(&self) -> Option<&str> {
        match self {
            Self::CreateAccount { user, .. }
            | Self::DeleteAccount { user }
            | Self::BindAccount { user, .. }
            | Self::UnbindAccount { user, .. } => Some(user),
            _ => None,
        }
    }

    /// Unbinding or deleting an account is not a revocation on tgt: a target left without
    /// accounts admits its initiators without CHAP.
    fn revokes(&self) -> bool {
        match self {
            Self::SetState { ready, .. } => !ready,
            Self::DeleteTarget { .. }
            | Self::DeleteLun { .. }
            | Self::UnbindInitiator { .. }
            | Self::UnbindAddress { .. }
            | Self::CloseSession { .. } => true,
            Self::AddPortal(_)
            | Self::RemovePortal(_)
            | Self::CreateTarget { .. }
            | Self::AddLun { .. }
            | Self::UpdateLun { .. }
            | Self::CreateAccount { .. }
            | Self::DeleteAccount { .. }
            | Self::BindAccount { .. }
            | Self::UnbindAccount { .. }
            | Self::BindInitiator { .. } => false,
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

/// How the daemon's CHAP accounts must change, decided once for every target.
#[derive(Default)]
struct AccountChanges {
    /// Wanted accounts that do not exist yet: created before anything binds them.
    fresh: BTreeSet<String>,
    /// Wanted accounts that exist with another (or an unknown) password: unbound everywhere,
    /// deleted and created again (tgt has no way to change a password in place).
    recreated: BTreeSet<String>,
    /// Accounts discus made that nothing wants any more.
    stale: BTreeSet<String>,
    /// Wanted accounts discus cannot use: made by someone else, or bound to a target discus did
    /// not make (so that discus cannot unbind it to change its password). Grant → why.
    unusable: BTreeMap<String, String>,
}

impl AccountChanges {
    fn usable(&self, user: &str) -> bool {
        !self.unusable.contains_key(user)
    }
}

fn account_changes(
    passwords: &BTreeMap<String, (&Password, &AclConfig)>,
    observed: &TgtState,
    owned: &Owned,
) -> AccountChanges {
    let exists: BTreeSet<&str> = observed.accounts.iter().map(String::as_str).collect();
    // Accounts bound to targets discus did not make: discus can neither unbind nor delete them.
    let pinned: BTreeMap<&str, &str> = observed
        .targets
        .iter()
        .filter(|t| !owned.targets.contains(&t.name))
        .flat_map(|t| {
            t.accounts
                .iter()
                .chain(&t.outgoing_account)
                .map(|a| (a.as_str(), t.name.as_str()))
        })
        .collect();
    let mut changes = AccountChanges::default();
    for (user, (password, _)) in passwords {
        if !exists.contains(user.as_str()) {
            changes.fresh.insert(user.clone());
        } else if !owned.accounts.contains_key(user) {
            changes.unusable.insert(
                user.clone(),
                format!("tgtd already has a CHAP account {user}, which discus did not create; use another username"),
            );
        } else if !owned.matches(user, password) {
            match pinned.get(user.as_str()) {
                Some(target) => {
                    changes.unusable.insert(
                        user.clone(),
                        format!(
                            "CHAP account {user} is bound to target {target}, which discus did not create, so discus \
                             cannot change its password; use another username"
                        ),
                    );
                }
                None => {
                    changes.recreated.insert(user.clone());
                }
            }
        }
    }
    changes.stale = owned
        .accounts
        .keys()
        .filter(|user| {
            !passwords.contains_key(*user)
                && exists.contains(user.as_str())
                && !pinned.contains_key(user.as_str())
        })
        .cloned()
        .collect();
    changes
}

/// One target's part of the plan: its id, what it holds now, and what it must hold.
struct Placed<'a> {
    tid: u32,
    found: Option<&'a TgtTarget>,
    wanted: &'a Wanted<'a>,
    /// The initiators it admits once the plan is applied.
    admitted: BTreeSet<&'a str>,
}

impl Placed<'_> {
    fn iqn(&self) -> String {
        self.wanted.target.iqn.clone()
    }

    fn found(&self) -> &TgtTarget {
        static EMPTY: TgtTarget = TgtTarget {
            tid: 0,
            name: String::new(),
            state: String::new(),
            sessions: Vec::new(),
            luns: Vec::new(),
            accounts: Vec::new(),
            outgoing_account: None,
            acls: Vec::new(),
            address_acls: Vec::new(),
        };
        self.found.unwrap_or(&EMPTY)
    }

    fn bound_in(&self, user: &str) -> bool {
        self.found().accounts.iter().any(|a| a == user)
    }

    /// Incoming accounts to bind that exist with the right password and are not bound yet.
    fn early_in<'b>(&'b self, changes: &'b AccountChanges) -> impl Iterator<Item = &'b String> {
        self.wanted
            .accounts
            .incoming
            .iter()
            .filter(|u| changes.usable(u) && !changes.recreated.contains(*u) && !self.bound_in(u))
    }

    /// The first of the bound incoming accounts (in tgt's slot order) that must go.
    fn first_gone(&self, changes: &AccountChanges) -> Option<usize> {
        self.found().accounts.iter().position(|u| {
            !self.wanted.accounts.incoming.contains(u) || changes.recreated.contains(u)
        })
    }

    /// The incoming accounts bound at every instant of the plan: those before the first that
    /// must go (the rest are unbound and bound again, see `unbind_accounts`).
    fn kept_throughout(&self, changes: &AccountChanges) -> &[String] {
        let accounts = &self.found().accounts;
        &accounts[..self.first_gone(changes).unwrap_or(accounts.len())]
    }

    /// Whether, while accounts change, the target could be left with no incoming account while
    /// initiators are admitted — in tgt, a target without accounts admits without CHAP. Its
    /// ACLs are then unbound first and bound again once the accounts are in place; their
    /// sessions go on.
    fn exposed(&self, changes: &AccountChanges) -> bool {
        self.wanted.target.chap_required && self.kept_throughout(changes).is_empty()
    }
}

/// Plans the operations that take tgtd from `observed` to `desired`.
///
/// The order keeps every prefix of the plan safe, so that a failure or a crash anywhere leaves
/// nobody with more access than before or after: revocations first; accounts created and bound
/// before old ones are unbound; a bound account is never deleted (tgtd crashes); and a target
/// that requires CHAP never admits an initiator while it has no account bound (tgt would let it
/// in without CHAP).
pub fn plan(desired: &[TargetConfig], observed: &TgtState, owned: &Owned) -> Plan<TgtOp> {
    let mut plan = Plan::default();
    let (wanted_targets, passwords) = wanted_targets(desired, observed, owned, &mut plan);
    let changes = account_changes(&passwords, observed, owned);
    let placed = place(&wanted_targets, observed, &changes, &mut plan);

    let wanted_portals: BTreeSet<String> = wanted_targets
        .iter()
        .flat_map(|w| w.target.portals.iter().map(ToString::to_string))
        .collect();
    for portal in wanted_portals.difference(&observed.portals.iter().cloned().collect()) {
        plan.ops.push(TgtOp::AddPortal(portal.clone()));
    }
    remove_unwanted_targets(&mut plan, &wanted_targets, observed, owned);
    for target in observed
        .targets
        .iter()
        .filter(|t| observed.kept.contains(&t.name))
    {
        // Kept over partial input: it serves nobody until its declaration is read again.
        unbind_addresses(&mut plan, target);
        for initiator in &target.acls {
            plan.ops.push(TgtOp::UnbindInitiator {
                tid: target.tid,
                iqn: target.name.clone(),
                initiator: initiator.clone(),
            });
        }
        close_sessions(&mut plan, target, &BTreeSet::new());
    }
    for target in &placed {
        revoke(&mut plan, target, &changes);
    }
    for user in &changes.fresh {
        create_account(&mut plan, user, &passwords);
    }
    for target in &placed {
        ensure_target(&mut plan, target);
    }
    // Credentials before LUNs, so that a LUN step that keeps failing never keeps an old secret
    // valid.
    for target in &placed {
        bind_accounts(&mut plan, target, &changes, Stage::Early);
    }
    for target in &placed {
        unbind_accounts(&mut plan, target, &changes);
    }
    for user in changes.recreated.iter().chain(&changes.stale) {
        plan.ops.push(TgtOp::DeleteAccount { user: user.clone() });
    }
    for user in &changes.recreated {
        create_account(&mut plan, user, &passwords);
    }
    for target in &placed {
        bind_accounts(&mut plan, target, &changes, Stage::Late);
    }
    for target in &placed {
        plan_luns(
            &mut plan,
            target.tid,
            &target.iqn(),
            &target.wanted.luns,
            &target.found().luns,
        );
    }
    for target in &placed {
        admit(&mut plan, target, &changes);
    }
    for portal in observed
        .portals
        .iter()
        .filter(|p| !wanted_portals.contains(*p))
    {
        // A portal is the daemon's: it goes only when no target discus keeps needs it and
        // tgtd serves no target discus did not make (whose initiators may use it).
        if observed
            .targets
            .iter()
            .all(|t| owned.targets.contains(&t.name))
        {
            plan.ops.push(TgtOp::RemovePortal(portal.clone()));
        }
    }
    plan
}

/// Which targets tgt can hold at all, and what of each; `passwords` collects every account's
/// password across the daemon.
fn wanted_targets<'a>(
    desired: &'a [TargetConfig],
    observed: &TgtState,
    owned: &Owned,
    plan: &mut Plan<TgtOp>,
) -> (
    Vec<Wanted<'a>>,
    BTreeMap<String, (&'a Password, &'a AclConfig)>,
) {
    let mut passwords = BTreeMap::new();
    let mut wanted_targets = Vec::new();
    for target in desired {
        if let Some(found) = observed.targets.iter().find(|t| t.name == target.iqn)
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
        wanted_targets.push(wanted(target, &mut passwords, plan));
    }
    (wanted_targets, passwords)
}

/// Gives every wanted target its tid and the initiators it will admit: grants whose accounts
/// discus cannot use are refused.
fn place<'a>(
    wanted_targets: &'a [Wanted<'a>],
    observed: &'a TgtState,
    changes: &AccountChanges,
    plan: &mut Plan<TgtOp>,
) -> Vec<Placed<'a>> {
    let mut next_tid = observed.targets.iter().map(|t| t.tid).max().unwrap_or(0) + 1;
    let mut placed = Vec::new();
    for wanted in wanted_targets {
        let found = observed
            .targets
            .iter()
            .find(|t| t.name == wanted.target.iqn);
        let tid = found.map_or_else(
            || {
                next_tid += 1;
                next_tid - 1
            },
            |f| f.tid,
        );
        let mut admitted = BTreeSet::new();
        for acl in &wanted.acls {
            let unusable = acl
                .chap
                .iter()
                .flat_map(|c| std::iter::once(&c.initiator).chain(c.mutual.as_ref()))
                .find_map(|a| changes.unusable.get(&a.username));
            match unusable {
                Some(why) => refuse(plan, acl, why.clone()),
                None => {
                    admitted.insert(acl.initiator.as_str());
                }
            }
        }
        placed.push(Placed {
            tid,
            found,
            wanted,
            admitted,
        });
    }
    placed
}

/// Targets discus made that are no longer wanted: offline first, so no I/O is in flight.
fn remove_unwanted_targets(
    plan: &mut Plan<TgtOp>,
    wanted_targets: &[Wanted<'_>],
    observed: &TgtState,
    owned: &Owned,
) {
    let wanted_names: BTreeSet<&str> = wanted_targets
        .iter()
        .map(|w| w.target.iqn.as_str())
        .collect();
    for target in &observed.targets {
        if owned.targets.contains(&target.name) && !wanted_names.contains(target.name.as_str()) {
            let (tid, iqn) = (target.tid, target.name.clone());
            // Nobody admitted, then no account bound, before it goes: should deleting it fail
            // (I/O in flight, a timeout), its accounts are no longer bound when they are
            // deleted, and it admits nobody without CHAP.
            unbind_addresses(plan, target);
            for initiator in &target.acls {
                plan.ops.push(TgtOp::UnbindInitiator {
                    tid,
                    iqn: iqn.clone(),
                    initiator: initiator.clone(),
                });
            }
            for user in target.accounts.iter().rev() {
                plan.ops.push(TgtOp::UnbindAccount {
                    tid,
                    iqn: iqn.clone(),
                    user: user.clone(),
                    outgoing: false,
                });
            }
            if let Some(user) = &target.outgoing_account {
                plan.ops.push(TgtOp::UnbindAccount {
                    tid,
                    iqn: iqn.clone(),
                    user: user.clone(),
                    outgoing: true,
                });
            }
            plan.ops.push(TgtOp::SetState {
                tid,
                iqn: iqn.clone(),
                ready: false,
            });
            plan.ops.push(TgtOp::DeleteTarget { tid, iqn });
        }
    }
}

/// Takes access away first: ACLs of initiators no longer admitted (and their sessions), and every
/// ACL of a target whose accounts are about to be replaced with none bound in between (bound
/// again at the end; their sessions go on).
fn revoke(plan: &mut Plan<TgtOp>, target: &Placed<'_>, changes: &AccountChanges) {
    let (tid, found) = (target.tid, target.found());
    let exposed = target.exposed(changes);
    unbind_addresses(plan, found);
    for initiator in &found.acls {
        if exposed || !target.admitted.contains(initiator.as_str()) {
            plan.ops.push(TgtOp::UnbindInitiator {
                tid,
                iqn: target.iqn(),
                initiator: initiator.clone(),
            });
        }
    }
    close_sessions(plan, found, &target.admitted);
}

/// Address ACLs admit whoever comes from there, with no grant: discus binds none, and removes
/// any it finds on a target it owns.
fn unbind_addresses(plan: &mut Plan<TgtOp>, target: &TgtTarget) {
    for address in &target.address_acls {
        plan.ops.push(TgtOp::UnbindAddress {
            tid: target.tid,
            iqn: target.name.clone(),
            address: address.clone(),
        });
    }
}

/// Ends the sessions of the initiators a target no longer admits (tgt does not when their ACL
/// goes).
fn close_sessions(plan: &mut Plan<TgtOp>, target: &TgtTarget, admitted: &BTreeSet<&str>) {
    for session in &target.sessions {
        if !admitted.contains(session.initiator.as_str()) {
            for &cid in &session.connections {
                plan.ops.push(TgtOp::CloseSession {
                    tid: target.tid,
                    iqn: target.name.clone(),
                    initiator: session.initiator.clone(),
                    sid: session.sid,
                    cid,
                });
            }
        }
    }
}

fn create_account(
    plan: &mut Plan<TgtOp>,
    user: &str,
    passwords: &BTreeMap<String, (&Password, &AclConfig)>,
) {
    if let Some((password, _)) = passwords.get(user) {
        plan.ops.push(TgtOp::CreateAccount {
            user: user.to_owned(),
            password: (*password).clone(),
        });
    }
}

/// The target itself, ready.
fn ensure_target(plan: &mut Plan<TgtOp>, target: &Placed<'_>) {
    let (tid, iqn) = (target.tid, target.iqn());
    match target.found {
        Some(found) if found.state != "ready" => plan.ops.push(TgtOp::SetState {
            tid,
            iqn: iqn.clone(),
            ready: true,
        }),
        Some(_) => {}
        None => plan.ops.push(TgtOp::CreateTarget { tid, iqn }),
    }
}

/// Accounts that exist with the right password are bound early, before any is unbound; accounts
/// made again are bound late, once they exist again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Early,
    Late,
}

fn bind_accounts(
    plan: &mut Plan<TgtOp>,
    target: &Placed<'_>,
    changes: &AccountChanges,
    stage: Stage,
) {
    let late = |user: &String| changes.recreated.contains(user);
    match stage {
        // Appended after the bound accounts, unless some of those go (`unbind_accounts` binds
        // the new ones after them then).
        Stage::Early if target.first_gone(changes).is_none() => {
            let early: Vec<&String> = target.early_in(changes).collect();
            for user in early {
                plan.ops.push(bind(target, user, false));
            }
        }
        Stage::Early => {}
        Stage::Late => {
            let incoming = target.wanted.accounts.incoming.iter();
            for user in incoming.filter(|u| changes.usable(u) && late(u)) {
                plan.ops.push(bind(target, user, false));
            }
        }
    }
    if let Some(user) = target
        .wanted
        .accounts
        .outgoing
        .as_ref()
        .filter(|u| changes.usable(u))
    {
        let current = target.found().outgoing_account.as_ref();
        let bound = current == Some(user);
        // One outgoing account per target: another one is unbound before this one is bound.
        let rebound = late(user) || current.is_some_and(|c| c != user);
        let wanted_now = match stage {
            Stage::Early => !bound && !rebound,
            Stage::Late => rebound,
        };
        if wanted_now {
            plan.ops.push(bind(target, user, true));
        }
    }
}

fn bind(target: &Placed<'_>, user: &str, outgoing: bool) -> TgtOp {
    TgtOp::BindAccount {
        tid: target.tid,
        iqn: target.iqn(),
        user: user.to_owned(),
        outgoing,
    }
}

/// Unbinds accounts the target no longer wants and those about to be made again.
///
/// tgt keeps a target's incoming accounts in an array and lists and searches only its first
/// `count` slots: unbinding any but the last leaves a hole there, which makes the next `show`
/// crash tgtd (a NULL dereference) and hides the last account from logins. So from the first
/// account that goes, every account is unbound from the last one back, and those that stay are
/// bound again after, with the new ones.
fn unbind_accounts(plan: &mut Plan<TgtOp>, target: &Placed<'_>, changes: &AccountChanges) {
    let found = target.found();
    let wanted = &target.wanted.accounts;
    let unbind = |user: &String, outgoing: bool| TgtOp::UnbindAccount {
        tid: target.tid,
        iqn: target.iqn(),
        user: user.clone(),
        outgoing,
    };
    if let Some(first) = target.first_gone(changes) {
        let tail = &found.accounts[first..];
        for user in tail.iter().rev() {
            plan.ops.push(unbind(user, false));
        }
        let staying = tail.iter().filter(|u| {
            wanted.incoming.contains(*u) && !changes.recreated.contains(*u) && changes.usable(u)
        });
        let again: Vec<&String> = staying.chain(target.early_in(changes)).collect();
        for user in again {
            plan.ops.push(bind(target, user, false));
        }
    }
    if let Some(user) = &found.outgoing_account
        && (wanted.outgoing.as_ref() != Some(user) || changes.recreated.contains(user))
    {
        plan.ops.push(unbind(user, true));
    }
}

/// ACLs last: binding one makes the target visible, so everything else is in place first.
fn admit(plan: &mut Plan<TgtOp>, target: &Placed<'_>, changes: &AccountChanges) {
    let exposed = target.exposed(changes);
    for initiator in &target.admitted {
        if exposed || !target.found().acls.iter().any(|a| a == initiator) {
            plan.ops.push(TgtOp::BindInitiator {
                tid: target.tid,
                iqn: target.iqn(),
                initiator: (*initiator).to_owned(),
            });
        }
    }
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

    /// tgtd as a model, for the planner's unit tests (the real one is tested in
    /// tests/serve_tgt.rs): one operation, refused where tgtd refuses it. Deleting a bound
    /// account crashes tgt 1.0.85; here it fails the test.
    fn tgtd(state: &mut TgtState, op: &TgtOp) -> Result<(), String> {
        let target = |state: &mut TgtState, tid: u32| -> Result<usize, String> {
            state
                .targets
                .iter()
                .position(|t| t.tid == tid)
                .ok_or_else(|| format!("can't find the target {tid}"))
        };
        match op.clone() {
            TgtOp::AddPortal(p) => state.portals.push(p),
            TgtOp::RemovePortal(p) => state.portals.retain(|x| *x != p),
            TgtOp::CreateTarget { tid, iqn } => {
                if state.targets.iter().any(|t| t.tid == tid || t.name == iqn) {
                    return Err("this target already exists".into());
                }
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
                let i = target(state, tid)?;
                state.targets[i].state = if ready { "ready" } else { "offline" }.into();
            }
            TgtOp::DeleteTarget { tid, .. } => {
                target(state, tid)?;
                state.targets.retain(|t| t.tid != tid);
            }
            TgtOp::AddLun {
                tid,
                lun,
                path,
                block_size,
                cdrom,
                ..
            } => {
                let i = target(state, tid)?;
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
                let i = target(state, tid)?;
                let l = state.targets[i]
                    .luns
                    .iter_mut()
                    .find(|l| l.lun == lun)
                    .ok_or("can't find the logical unit")?;
                l.readonly = readonly;
                l.scsi_sn = serial.clone();
                l.scsi_id = serial;
            }
            TgtOp::DeleteLun { tid, lun, .. } => {
                let i = target(state, tid)?;
                state.targets[i].luns.retain(|l| l.lun != lun);
            }
            TgtOp::CreateAccount { user, .. } => {
                if state.accounts.contains(&user) {
                    return Err("this account already exists".into());
                }
                state.accounts.push(user);
            }
            TgtOp::DeleteAccount { user } => {
                // tgt unbinds it from every target as `unbind` would (holes included) …
                let bound = state.targets.iter().any(|t| t.accounts.contains(&user));
                assert!(
                    !bound,
                    "account {user} deleted while bound: it leaves holes"
                );
                if !state.accounts.contains(&user) {
                    return Err("can't find the account".into());
                }
                state.accounts.retain(|a| *a != user);
                // … and where it is a target's outgoing account, that binding.
                for target in &mut state.targets {
                    if target.outgoing_account.as_ref() == Some(&user) {
                        target.outgoing_account = None;
                    }
                }
            }
            TgtOp::BindAccount {
                tid,
                user,
                outgoing,
                ..
            } => {
                if !state.accounts.contains(&user) {
                    return Err("can't find the account".into());
                }
                let i = target(state, tid)?;
                let t = &mut state.targets[i];
                if outgoing {
                    if t.outgoing_account.is_some() {
                        return Err("this target already has an outgoing account".into());
                    }
                    t.outgoing_account = Some(user);
                } else if t.accounts.contains(&user) {
                    return Err("this account already exists".into());
                } else {
                    // The first free slot, which is the end: there are never holes.
                    t.accounts.push(user);
                }
            }
            TgtOp::UnbindAccount {
                tid,
                user,
                outgoing,
                ..
            } => {
                let i = target(state, tid)?;
                let t = &mut state.targets[i];
                if outgoing {
                    t.outgoing_account = None;
                } else if let Some(slot) = t.accounts.iter().position(|a| *a == user) {
                    // tgt lists and searches the first `count` slots only.
                    assert_eq!(
                        slot,
                        t.accounts.len() - 1,
                        "unbinding {user} from slot {slot} of {:?} leaves a hole: tgtd crashes at the next show",
                        t.accounts
                    );
                    t.accounts.pop();
                } else {
                    return Err("can't find the account".into());
                }
            }
            TgtOp::BindInitiator { tid, initiator, .. } => {
                let i = target(state, tid)?;
                state.targets[i].acls.push(initiator);
            }
            TgtOp::UnbindInitiator { tid, initiator, .. } => {
                let i = target(state, tid)?;
                state.targets[i].acls.retain(|a| *a != initiator);
            }
            TgtOp::UnbindAddress { tid, address, .. } => {
                let i = target(state, tid)?;
                state.targets[i].address_acls.retain(|a| *a != address);
            }
            TgtOp::CloseSession { tid, sid, .. } => {
                let i = target(state, tid)?;
                state.targets[i].sessions.retain(|s| s.sid != sid);
            }
        }
        Ok(())
    }

    /// What `TgtBackend::apply` remembers around an operation: `saved` says whether the record
    /// after it reached the disk (`false`: a crash or a full disk right after tgtadm).
    fn remember(owned: &mut Owned, op: &TgtOp, applied: bool, saved: bool) {
        owned.before(op);
        if applied && saved {
            owned.after(op);
        }
    }

    /// In tgt, a target with initiators admitted and no incoming account lets them in without
    /// CHAP: no step of any plan may ever leave a CHAP target like that.
    fn assert_chap_holds(state: &TgtState, chap_targets: &BTreeSet<String>, after: &TgtOp) {
        for target in &state.targets {
            assert!(
                !(chap_targets.contains(&target.name)
                    && !target.acls.is_empty()
                    && target.accounts.is_empty()),
                "after `{after}`, {} admits {:?} without CHAP",
                target.name,
                target.acls
            );
        }
    }

    /// The CHAP targets that admit nobody without CHAP now: a target declared without CHAP until
    /// now admits without it until its own revocations run.
    fn guarded(state: &TgtState, chap_targets: &BTreeSet<String>) -> BTreeSet<String> {
        let open: BTreeSet<&String> = state
            .targets
            .iter()
            .filter(|t| !t.acls.is_empty() && t.accounts.is_empty())
            .map(|t| &t.name)
            .collect();
        chap_targets
            .iter()
            .filter(|iqn| !open.contains(iqn))
            .cloned()
            .collect()
    }

    /// Applies a plan to the model the way the sync loop does (skipping what builds on a
    /// failure), checking after every operation that CHAP holds.
    fn apply(
        plan: &Plan<TgtOp>,
        state: &mut TgtState,
        owned: &mut Owned,
        chap_targets: &BTreeSet<String>,
    ) -> usize {
        let chap_targets = &guarded(state, chap_targets);
        let mut failures = crate::backend::Failures::default();
        let mut failed = 0;
        for op in &plan.ops {
            if !failures.admit(op) {
                continue;
            }
            let applied = tgtd(state, op);
            remember(owned, op, applied.is_ok(), true);
            if applied.is_err() {
                failures.record(op);
                failed += 1;
            }
            assert_chap_holds(state, chap_targets, op);
        }
        failed
    }

    /// The IQNs of the desired targets that require CHAP.
    fn chap_targets(desired: &[TargetConfig]) -> BTreeSet<String> {
        desired
            .iter()
            .filter(|t| t.chap_required)
            .map(|t| t.iqn.clone())
            .collect()
    }

    /// Plans, applies to the model, and checks that a second plan has nothing left to do.
    fn converge(desired: &[TargetConfig], state: &mut TgtState, owned: &mut Owned) -> Plan<TgtOp> {
        let first = plan(desired, state, owned);
        let failed = apply(&first, state, owned, &chap_targets(desired));
        assert_eq!(failed, 0, "tgtd refused some of {:?}", shown(&first.ops));
        let again = plan(desired, state, owned);
        assert!(
            again.ops.is_empty(),
            "not converged after one round: {:?}",
            shown(&again.ops)
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
                format!("bind account a to {IQN}").as_str(),
                format!("add LUN 1 of {IQN} from /data/images/0.raw").as_str(),
                format!("set LUN 1 of {IQN} read-only").as_str(),
                format!("add LUN 2 of {IQN} from /data/images/1.raw").as_str(),
                format!("set LUN 2 of {IQN} read-only").as_str(),
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
        // Revoked first; the account unbound before it is deleted (tgtd crashes otherwise).
        assert_eq!(
            shown(&plan.ops),
            [
                format!("stop admitting iqn.1993-08.org.debian:01:b to {IQN}").as_str(),
                format!("close session 7 of iqn.1993-08.org.debian:01:b on {IQN}").as_str(),
                format!("close session 7 of iqn.1993-08.org.debian:01:b on {IQN}").as_str(),
                format!("unbind account b from {IQN}").as_str(),
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
        // tgt cannot change a password in place, and a target without accounts admits without
        // CHAP: the initiator is not admitted while its account is made again.
        assert_eq!(
            shown(&plan.ops),
            [
                format!("stop admitting iqn.1993-08.org.debian:01:a to {IQN}").as_str(),
                format!("unbind account a from {IQN}").as_str(),
                "delete account a",
                "create account a",
                format!("bind account a to {IQN}").as_str(),
                format!("admit iqn.1993-08.org.debian:01:a to {IQN}").as_str(),
            ]
        );
    }

    #[test]
    fn a_new_username_replaces_the_old_one_while_the_initiator_is_not_admitted() {
        let grant = |user: &str| {
            acl(
                "iqn.1993-08.org.debian:01:a",
                "a",
                &[(0, true)],
                Some((user, "secret-secret")),
            )
        };
        let (mut state, mut owned) = (TgtState::default(), owned());
        converge(
            &[target(vec![lun(0, true)], vec![grant("a")])],
            &mut state,
            &mut owned,
        );
        let plan = converge(
            &[target(vec![lun(0, true)], vec![grant("a2")])],
            &mut state,
            &mut owned,
        );
        // The only account goes: in between, the target has none, so nobody is admitted.
        assert_eq!(
            shown(&plan.ops),
            [
                format!("stop admitting iqn.1993-08.org.debian:01:a to {IQN}").as_str(),
                "create account a2",
                format!("unbind account a from {IQN}").as_str(),
                format!("bind account a2 to {IQN}").as_str(),
                "delete account a",
                format!("admit iqn.1993-08.org.debian:01:a to {IQN}").as_str(),
            ]
        );
        assert_eq!(state.accounts, ["a2"], "the old account is gone");
    }

    #[test]
    fn an_account_that_stays_keeps_chap_on_while_the_first_one_goes() {
        let grant = |initiator: &str, user: &str| {
            acl(
                &format!("iqn.1993-08.org.debian:01:{initiator}"),
                initiator,
                &[(0, true)],
                Some((user, "secret-secret")),
            )
        };
        let (mut state, mut owned) = (TgtState::default(), owned());
        converge(
            &[target(
                vec![lun(0, true)],
                vec![grant("a", "a"), grant("b", "b"), grant("c", "c")],
            )],
            &mut state,
            &mut owned,
        );
        // b is in the middle of tgt's slots: c is unbound and bound again, never leaving a hole;
        // a stays bound throughout, so a and c stay admitted.
        let plan = converge(
            &[target(
                vec![lun(0, true)],
                vec![grant("a", "a"), grant("c", "c")],
            )],
            &mut state,
            &mut owned,
        );
        assert_eq!(
            shown(&plan.ops),
            [
                format!("stop admitting iqn.1993-08.org.debian:01:b to {IQN}").as_str(),
                format!("unbind account c from {IQN}").as_str(),
                format!("unbind account b from {IQN}").as_str(),
                format!("bind account c to {IQN}").as_str(),
                "delete account b",
            ]
        );
    }

    #[test]
    fn a_target_that_cannot_be_deleted_admits_nobody_and_binds_no_account() {
        let grant = |i: &str| {
            acl(
                &format!("iqn.1993-08.org.debian:01:{i}"),
                i,
                &[(0, true)],
                Some((i, "secret-secret")),
            )
        };
        let (mut state, mut owned) = (TgtState::default(), owned());
        converge(
            &[target(vec![lun(0, true)], vec![grant("a"), grant("b")])],
            &mut state,
            &mut owned,
        );
        // No longer declared, and tgtd refuses to take it offline or delete it (I/O in flight).
        let plan = plan(&[], &state, &owned);
        let mut failures = crate::backend::Failures::default();
        for op in &plan.ops {
            if !failures.admit(op) {
                continue;
            }
            if matches!(op, TgtOp::SetState { .. } | TgtOp::DeleteTarget { .. }) {
                failures.record(op);
                continue;
            }
            // The model fails the test if an account is deleted while bound.
            tgtd(&mut state, op).expect("tgtd accepts it");
        }
        let target = &state.targets[0];
        assert!(
            target.acls.is_empty() && target.accounts.is_empty(),
            "{target:?}"
        );
        assert!(state.accounts.is_empty(), "its accounts are gone");
    }

    #[test]
    fn a_portal_is_kept_while_a_target_discus_did_not_make_is_served() {
        let (mut state, mut owned) = (TgtState::default(), owned());
        converge(
            &[target(vec![lun(0, true)], Vec::new())],
            &mut state,
            &mut owned,
        );
        // Someone else's target in discus's tgtd answers on the daemon's portals too.
        state.targets.push(TgtTarget {
            tid: 9,
            name: "iqn.2001-04.com.example:other".into(),
            ..TgtTarget::default()
        });
        let plan = plan(&[], &state, &owned);
        assert!(
            !shown(&plan.ops)
                .iter()
                .any(|op| op.starts_with("remove portal")),
            "{:?}",
            shown(&plan.ops)
        );
    }

    #[test]
    fn an_account_whose_password_discus_is_unsure_of_is_made_again() {
        let a = acl(
            "iqn.1993-08.org.debian:01:a",
            "a",
            &[(0, true)],
            Some(("a", "secret-secret")),
        );
        let desired = [target(vec![lun(0, true)], vec![a])];
        let (mut state, mut owned) = (TgtState::default(), owned());
        converge(&desired, &mut state, &mut owned);
        // A crash (or a full disk) between tgtadm and the record of the new password.
        owned.accounts.insert("a".into(), None);
        let plan = converge(&desired, &mut state, &mut owned);
        assert!(shown(&plan.ops).contains(&"create account a".to_owned()));
    }

    #[test]
    fn an_account_bound_to_a_foreign_target_is_never_unbound_or_deleted() {
        let a = acl(
            "iqn.1993-08.org.debian:01:a",
            "a",
            &[(0, true)],
            Some(("a", "secret-secret")),
        );
        let (mut state, mut owned) = (TgtState::default(), owned());
        converge(
            &[target(vec![lun(0, true)], vec![a])],
            &mut state,
            &mut owned,
        );
        state.targets.push(TgtTarget {
            tid: 9,
            name: "iqn.2001-04.com.example:other".into(),
            accounts: vec!["a".into()],
            ..TgtTarget::default()
        });
        let rotated = acl(
            "iqn.1993-08.org.debian:01:a",
            "a",
            &[(0, true)],
            Some(("a", "new-secret-12")),
        );
        let plan = plan(&[target(vec![lun(0, true)], vec![rotated])], &state, &owned);
        assert!(
            plan.ops.iter().all(|op| op.shared().is_none()),
            "{:?}",
            shown(&plan.ops)
        );
        assert_eq!(plan.refused.len(), 1);
        assert!(
            plan.refused[0]
                .message
                .contains("cannot change its password")
        );
        assert_eq!(
            shown(&plan.ops),
            [format!(
                "stop admitting iqn.1993-08.org.debian:01:a to {IQN}"
            )]
        );
    }

    #[test]
    fn a_failed_step_stops_what_builds_on_it_but_never_a_revocation() {
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
            &[target(vec![lun(0, true)], vec![a.clone()])],
            &mut state,
            &mut owned,
        );
        // b is granted and a revoked at once; creating b's account fails (say, a full disk).
        let desired = [target(vec![lun(0, true)], vec![b])];
        let plan = plan(&desired, &state, &owned);
        let mut failures = crate::backend::Failures::default();
        let mut ran = Vec::new();
        for op in &plan.ops {
            if !failures.admit(op) {
                continue;
            }
            if matches!(op, TgtOp::CreateAccount { .. }) {
                failures.record(op);
                continue;
            }
            tgtd(&mut state, op).expect("tgtd accepts it");
            ran.push(op.to_string());
        }
        assert!(ran.contains(&format!("stop admitting {} to {IQN}", a.initiator)));
        assert!(state.targets[0].acls.is_empty(), "nobody admitted: {ran:?}");
        assert!(!ran.iter().any(|op| op.starts_with("admit")), "{ran:?}");
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
        // Without CHAP (`authentication: none`), so that only the LUN rules decide.
        let mut no_chap = target(
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
        );
        no_chap.chap_required = false;
        let desired = [no_chap];
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

    /// One grant in a generated desired state: (target, initiator, user, password, mutual).
    type GeneratedGrant = (usize, usize, usize, usize, Option<(usize, usize)>);

    /// The two targets' modes in a generated step: 0 absent (removed), 1 CHAP, 2 no CHAP.
    fn generated_state(grants: &[GeneratedGrant], modes: [u8; 2]) -> Vec<TargetConfig> {
        const PASSWORDS: [&str; 3] = ["pass-aaaaaaaa", "pass-bbbbbbbb", "pass-cccccccc"];
        (0..2)
            .filter(|t| modes[*t] != 0)
            .map(|t| {
                let chap = modes[t] == 1;
                let mut acls: Vec<AclConfig> = Vec::new();
                for &(target, initiator, user, password, mutual) in grants {
                    let name = format!("iqn.1993-08.org.debian:01:i{initiator}");
                    if target != t || acls.iter().any(|a| a.initiator == name) {
                        continue;
                    }
                    let credentials = (format!("u{user}"), PASSWORDS[password]);
                    let mut grant = acl(
                        &name,
                        &format!("g{t}{initiator}"),
                        &[(0, true)],
                        chap.then_some((credentials.0.as_str(), credentials.1)),
                    );
                    if let (Some(chap), Some((m, p))) = (grant.chap.as_mut(), mutual) {
                        chap.mutual = Some(account(&format!("m{m}"), PASSWORDS[p]));
                    }
                    acls.push(grant);
                }
                acls.sort_by(|a, b| a.initiator.cmp(&b.initiator));
                let mut config = target(vec![lun(0, true)], acls);
                config.chap_required = chap;
                config.iqn = format!("{IQN}{t}");
                config.owner = ObjectKey::new("lab", format!("t{t}"));
                config
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// Any sequence of changes — rotated passwords, new usernames, grants added and
        /// removed, mutual CHAP on and off — applied with tgtd refusing steps, crashes between
        /// tgtadm and the ownership record, and discus starting again in the middle: at no
        /// instant does a CHAP target admit anyone without an account, no bound account is ever
        /// deleted, and each change converges once the faults stop.
        #[test]
        fn chap_holds_through_any_change_failure_and_crash(
            steps in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        (0usize..2, 0usize..3, 0usize..4, 0usize..3, proptest::option::of((0usize..2, 0usize..3))),
                        0..5,
                    ),
                    proptest::array::uniform2(proptest::prop_oneof![3 => proptest::strategy::Just(1u8), 1 => 0u8..3]),
                ),
                1..6,
            ),
            faults in proptest::collection::vec(0u8..20, 64),
        ) {
            let (mut state, mut owned) = (TgtState::default(), owned());
            let mut fault = faults.iter().cycle();
            let mut before: Vec<TargetConfig> = Vec::new();
            for (grants, modes) in &steps {
                let desired = generated_state(grants, *modes);
                // CHAP must hold on the targets that require it now, and on those that did and
                // are going away.
                let mut chap = chap_targets(&desired);
                chap.extend(
                    chap_targets(&before)
                        .into_iter()
                        .filter(|iqn| !desired.iter().any(|t| t.iqn == *iqn)),
                );
                // A faulty round: some steps refused, records lost, or a crash part-way.
                let faulty = plan(&desired, &state, &owned);
                let round_chap = guarded(&state, &chap);
                let mut failures = crate::backend::Failures::default();
                for op in &faulty.ops {
                    if !failures.admit(op) {
                        continue;
                    }
                    let roll = *fault.next().unwrap_or(&0);
                    if roll == 0 {
                        break; // discus killed: the next round plans from what is there
                    }
                    let applied = if roll == 1 { Err("refused".into()) } else { tgtd(&mut state, op) };
                    remember(&mut owned, op, applied.is_ok(), roll != 2);
                    if applied.is_err() {
                        failures.record(op);
                    }
                    assert_chap_holds(&state, &round_chap, op);
                }
                // Then rounds without faults converge.
                for _ in 0..3 {
                    let round = plan(&desired, &state, &owned);
                    if round.ops.is_empty() {
                        break;
                    }
                    apply(&round, &mut state, &mut owned, &chap);
                }
                let left = plan(&desired, &state, &owned);
                proptest::prop_assert!(left.ops.is_empty(), "not converged: {:?}", shown(&left.ops));
                if let Some(last) = faulty.ops.last() {
                    assert_chap_holds(&state, &chap_targets(&desired), last);
                }
                before = desired;
            }
        }
    }
}
