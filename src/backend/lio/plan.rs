//! The LIO planner (pure): desired targets and the configfs model → operations in the kernel's
//! order: tear down bottom-up (mappings, ACLs, LUNs, portals, TPG, target, storage), build
//! top-down (storage with its pre-export attributes, target, TPG, attributes, portals, LUNs, ACLs
//! with CHAP, mappings with write_protect) and enable the TPG last, so that nobody logs in to a
//! half-built target.
//!
//! discus marks what it makes: storage objects are named `discus-…`, and its TPGs carry the
//! alias `discus:<namespace>/<name>`. Anything unmarked is never changed, even with a wanted IQN —
//! except a target discus recorded, before making it, that it was about to make, and that a crash
//! left bare before its alias was written (nothing in it serves).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::model::{Acl, LioState, LioTarget, Tpg};
use crate::api::chap::Password;
use crate::backend::{Operation, Plan};
use crate::desired::{AclConfig, Kind, LunConfig, Problem, Reason, TargetConfig};

/// The HBA discus's storage objects live in.
pub const HBA: &str = "fileio_3260";
pub const STORAGE_PREFIX: &str = "discus-";
pub const ALIAS_PREFIX: &str = "discus:";

/// A fileio storage object as discus makes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageSpec {
    pub name: String,
    pub file: PathBuf,
    pub size: u64,
    /// Buffered (page cache, write-back) for read-only images: every initiator and every LUN that
    /// serves the same file share one cached copy, which is what a boot storm reads. Writable
    /// copies are written through (O_DSYNC), so an acknowledged write is on disk without relying
    /// on the initiator's cache flushes.
    pub buffered: bool,
    pub serial: String,
    pub block_size: u32,
}

/// One CHAP field of an ACL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthField {
    Userid,
    Password,
    UseridMutual,
    PasswordMutual,
}

impl AuthField {
    pub fn file(self) -> &'static str {
        match self {
            Self::Userid => "userid",
            Self::Password => "password",
            Self::UseridMutual => "userid_mutual",
            Self::PasswordMutual => "password_mutual",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LioOp {
    CreateHba,
    CreateStorage(StorageSpec),
    DeleteStorage {
        hba: String,
        name: String,
    },
    CreateTarget {
        iqn: String,
    },
    CreateTpg {
        iqn: String,
        alias: String,
    },
    SetAttribute {
        iqn: String,
        name: &'static str,
        value: &'static str,
    },
    EnableTpg {
        iqn: String,
        enable: bool,
    },
    AddPortal {
        iqn: String,
        portal: String,
    },
    RemovePortal {
        iqn: String,
        portal: String,
    },
    AddLun {
        iqn: String,
        lun: u64,
        storage: String,
    },
    RemoveLun {
        iqn: String,
        lun: u64,
    },
    CreateAcl {
        iqn: String,
        initiator: String,
    },
    DeleteAcl {
        iqn: String,
        initiator: String,
    },
    SetAuth {
        iqn: String,
        initiator: String,
        field: AuthField,
        value: Password,
    },
    MapLun {
        iqn: String,
        initiator: String,
        lun: u64,
        write_protect: bool,
    },
    UnmapLun {
        iqn: String,
        initiator: String,
        lun: u64,
    },
    SetWriteProtect {
        iqn: String,
        initiator: String,
        lun: u64,
        write_protect: bool,
    },
    DeleteTpg {
        iqn: String,
    },
    DeleteTarget {
        iqn: String,
    },
}

impl fmt::Display for LioOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateHba => write!(f, "create HBA {HBA}"),
            Self::CreateStorage(s) => write!(
                f,
                "create storage object {} from {}",
                s.name,
                s.file.display()
            ),
            Self::DeleteStorage { name, .. } => write!(f, "delete storage object {name}"),
            Self::CreateTarget { iqn } => write!(f, "create target {iqn}"),
            Self::CreateTpg { iqn, .. } => write!(f, "create TPG 1 of {iqn}"),
            Self::SetAttribute { iqn, name, value } => write!(f, "set {name}={value} on {iqn}"),
            Self::EnableTpg { iqn, enable } => {
                write!(f, "{} {iqn}", if *enable { "enable" } else { "disable" })
            }
            Self::AddPortal { iqn, portal } => write!(f, "add portal {portal} to {iqn}"),
            Self::RemovePortal { iqn, portal } => write!(f, "remove portal {portal} from {iqn}"),
            Self::AddLun { iqn, lun, storage } => {
                write!(f, "add LUN {lun} of {iqn} from {storage}")
            }
            Self::RemoveLun { iqn, lun } => write!(f, "remove LUN {lun} of {iqn}"),
            Self::CreateAcl { iqn, initiator } => write!(f, "create ACL {initiator} on {iqn}"),
            Self::DeleteAcl { iqn, initiator } => write!(f, "delete ACL {initiator} on {iqn}"),
            Self::SetAuth {
                iqn,
                initiator,
                field,
                ..
            } => {
                write!(f, "set CHAP {} of {initiator} on {iqn}", field.file())
            }
            Self::MapLun {
                iqn,
                initiator,
                lun,
                write_protect,
            } => write!(
                f,
                "map LUN {lun} of {iqn} for {initiator}{}",
                if *write_protect { " read-only" } else { "" }
            ),
            Self::UnmapLun {
                iqn,
                initiator,
                lun,
            } => write!(f, "unmap LUN {lun} of {iqn} for {initiator}"),
            Self::SetWriteProtect {
                iqn,
                initiator,
                lun,
                write_protect,
            } => {
                write!(
                    f,
                    "set write_protect={} on LUN {lun} of {iqn} for {initiator}",
                    u8::from(*write_protect)
                )
            }
            Self::DeleteTpg { iqn } => write!(f, "delete TPG 1 of {iqn}"),
            Self::DeleteTarget { iqn } => write!(f, "delete target {iqn}"),
        }
    }
}

impl Operation for LioOp {
    fn target(&self) -> Option<&str> {
        match self {
            Self::CreateHba | Self::CreateStorage(_) | Self::DeleteStorage { .. } => None,
            Self::CreateTarget { iqn }
            | Self::CreateTpg { iqn, .. }
            | Self::SetAttribute { iqn, .. }
            | Self::EnableTpg { iqn, .. }
            | Self::AddPortal { iqn, .. }
            | Self::RemovePortal { iqn, .. }
            | Self::AddLun { iqn, .. }
            | Self::RemoveLun { iqn, .. }
            | Self::CreateAcl { iqn, .. }
            | Self::DeleteAcl { iqn, .. }
            | Self::SetAuth { iqn, .. }
            | Self::MapLun { iqn, .. }
            | Self::UnmapLun { iqn, .. }
            | Self::SetWriteProtect { iqn, .. }
            | Self::DeleteTpg { iqn }
            | Self::DeleteTarget { iqn } => Some(iqn),
        }
    }

    fn initiator(&self) -> Option<&str> {
        match self {
            Self::CreateAcl { initiator, .. }
            | Self::DeleteAcl { initiator, .. }
            | Self::SetAuth { initiator, .. }
            | Self::MapLun { initiator, .. }
            | Self::UnmapLun { initiator, .. }
            | Self::SetWriteProtect { initiator, .. } => Some(initiator),
            _ => None,
        }
    }

    fn revokes(&self) -> bool {
        match self {
            Self::EnableTpg { enable, .. } => !enable,
            Self::SetWriteProtect { write_protect, .. } => *write_protect,
            Self::SetAttribute { name, value, .. } => STRICT_ATTRIBUTES.contains(&(*name, *value)),
            // New credentials take the old ones away, and an ACL without them admits nobody
            // (`authentication=1`): a password rotation never waits on an unrelated step.
            Self::SetAuth { .. }
            | Self::DeleteAcl { .. }
            | Self::UnmapLun { .. }
            | Self::RemoveLun { .. }
            | Self::RemovePortal { .. }
            | Self::DeleteTpg { .. }
            | Self::DeleteTarget { .. } => true,
            Self::CreateHba
            | Self::CreateStorage(_)
            | Self::DeleteStorage { .. }
            | Self::CreateTarget { .. }
            | Self::CreateTpg { .. }
            | Self::AddPortal { .. }
            | Self::AddLun { .. }
            | Self::CreateAcl { .. }
            | Self::MapLun { .. } => false,
        }
    }
}

/// TPG attribute values that only ever narrow access: no demo mode, ACLs only, CHAP enforced,
/// read-only by default, hidden from initiators without an ACL.
const STRICT_ATTRIBUTES: [(&str, &str); 6] = [
    ("generate_node_acls", "0"),
    ("authentication", "1"),
    ("demo_mode_write_protect", "1"),
    ("prod_mode_write_protect", "1"),
    ("cache_dynamic_acls", "0"),
    ("demo_mode_discovery", "0"),
];

/// The storage object of one LUN of one target: named after both, so that every node serving the
/// target uses the same name.
pub fn storage_name(iqn: &str, lun: u32) -> String {
    let digest = Sha256::digest(format!("{iqn}\0{lun}"));
    format!("{STORAGE_PREFIX}{}", hex::encode(&digest[..10]))
}

fn storage_spec(iqn: &str, lun: &LunConfig) -> StorageSpec {
    StorageSpec {
        name: storage_name(iqn, lun.lun),
        file: lun.backing.path().to_owned(),
        size: lun.size_bytes,
        buffered: lun.read_only,
        serial: lun.serial.clone(),
        block_size: lun.block_size.unwrap_or(512),
    }
}

/// The TPG attributes of a discus target: no demo mode, ACLs only, CHAP enforced when asked,
/// read-only unless a mapping says otherwise, hidden from initiators without an ACL.
fn attributes(target: &TargetConfig) -> [(&'static str, &'static str); 6] {
    [
        ("generate_node_acls", "0"),
        (
            "authentication",
            if target.chap_required { "1" } else { "0" },
        ),
        ("demo_mode_write_protect", "1"),
        ("prod_mode_write_protect", "1"),
        ("cache_dynamic_acls", "0"),
        ("demo_mode_discovery", "0"),
    ]
}

fn alias(target: &TargetConfig) -> String {
    format!("{ALIAS_PREFIX}{}", target.owner)
}

/// Whether this target carries discus's mark: its TPG's alias.
pub fn marked(target: &LioTarget) -> bool {
    target
        .tpg()
        .is_some_and(|t| t.alias.starts_with(ALIAS_PREFIX))
}

/// Whether discus made this target: it is marked, or discus recorded that it was making or
/// removing it and it is bare — a crash came between its `mkdir` and its alias, or between the
/// `rmdir` of its TPG and its own (see unmarked.rs).
pub fn owned(observed: &LioState, target: &LioTarget) -> bool {
    let bare = |tpg: &Tpg| {
        !tpg.enabled && tpg.portals.is_empty() && tpg.luns.is_empty() && tpg.acls.is_empty()
    };
    marked(target) || (observed.unmarked.contains(&target.iqn) && target.tpgs.iter().all(bare))
}

/// The CHAP fields an ACL must hold (empty when the target has no CHAP).
fn wanted_auth(acl: &AclConfig) -> [(AuthField, String); 4] {
    let chap = acl.chap.as_ref();
    let mutual = chap.and_then(|c| c.mutual.as_ref());
    [
        (
            AuthField::Userid,
            chap.map(|c| c.initiator.username.clone())
                .unwrap_or_default(),
        ),
        (
            AuthField::Password,
            chap.map(|c| c.initiator.password.expose().to_owned())
                .unwrap_or_default(),
        ),
        (
            AuthField::UseridMutual,
            mutual.map(|m| m.username.clone()).unwrap_or_default(),
        ),
        (
            AuthField::PasswordMutual,
            mutual
                .map(|m| m.password.expose().to_owned())
                .unwrap_or_default(),
        ),
    ]
}

fn observed_auth(acl: &Acl) -> [String; 4] {
    let secret = |p: &Option<Password>| {
        p.as_ref()
            .map(|p| p.expose().to_owned())
            .unwrap_or_default()
    };
    [
        acl.userid.clone(),
        secret(&acl.password),
        acl.userid_mutual.clone(),
        secret(&acl.password_mutual),
    ]
}

/// Plans the operations that take configfs from `observed` to `desired`.
pub fn plan(desired: &[TargetConfig], observed: &LioState) -> Plan<LioOp> {
    let mut plan = Plan::default();
    let mut wanted: Vec<&TargetConfig> = Vec::new();
    for target in desired {
        match observed.target(&target.iqn) {
            Some(found) if !owned(observed, found) => plan.refused.push(Problem {
                kind: Kind::IscsiTarget,
                key: target.owner.clone(),
                reason: Reason::ForeignObject,
                message: format!(
                    "the kernel already has target {} (TPG alias {:?}), which discus did not create; discus leaves it alone",
                    target.iqn,
                    found.tpg().map(|t| t.alias.as_str()).unwrap_or("")
                ),
            }),
            _ => wanted.push(target),
        }
    }

    // Storage objects as wanted; those that exist but differ are made again.
    let specs: BTreeMap<String, StorageSpec> = wanted
        .iter()
        .flat_map(|t| t.luns.iter().map(|l| storage_spec(&t.iqn, l)))
        .map(|s| (s.name.clone(), s))
        .collect();
    let remade: BTreeSet<&str> = specs
        .values()
        .filter(|spec| {
            observed.storage_object(&spec.name).is_some_and(|found| {
                !(found.enabled
                    && found.hba == HBA
                    && found.file.as_deref() == spec.file.to_str()
                    && found.size == Some(spec.size)
                    && found.buffered == spec.buffered
                    && found.serial == spec.serial
                    && found.block_size == spec.block_size)
            })
        })
        .map(|s| s.name.as_str())
        .collect();

    // 1. Tear down what discus made and no longer wants, bottom-up.
    let wanted_iqns: BTreeSet<&str> = wanted.iter().map(|t| t.iqn.as_str()).collect();
    for target in &observed.targets {
        if owned(observed, target) && !wanted_iqns.contains(target.iqn.as_str()) {
            if observed.kept.contains(&target.iqn) {
                revoke_all(&mut plan, target);
            } else {
                teardown(&mut plan, target);
            }
        }
    }
    // 2. In the targets discus keeps, remove what is not wanted (or must be remade), bottom-up.
    for target in &wanted {
        if let Some(tpg) = observed.target(&target.iqn).and_then(LioTarget::tpg) {
            prune(&mut plan, target, tpg, &remade);
        }
    }
    // 3. Storage: delete discus's objects nothing wants or that must be remade, create the rest.
    // A storage object a target discus did not make links to stays: it is in use.
    let linked_by_others: BTreeSet<&str> = observed
        .targets
        .iter()
        .filter(|t| !owned(observed, t) || observed.kept.contains(&t.iqn))
        .flat_map(|t| &t.tpgs)
        .flat_map(|tpg| &tpg.luns)
        .filter_map(|lun| lun.storage.as_ref().map(|(_, name)| name.as_str()))
        .collect();
    for found in &observed.storage {
        let ours = found.name.starts_with(STORAGE_PREFIX)
            && !linked_by_others.contains(found.name.as_str());
        if ours && (!specs.contains_key(&found.name) || remade.contains(found.name.as_str())) {
            plan.ops.push(LioOp::DeleteStorage {
                hba: found.hba.clone(),
                name: found.name.clone(),
            });
        }
    }
    if !specs.is_empty() && !observed.hbas.iter().any(|h| h == HBA) {
        plan.ops.push(LioOp::CreateHba);
    }
    for spec in specs.values() {
        if observed.storage_object(&spec.name).is_none() || remade.contains(spec.name.as_str()) {
            plan.ops.push(LioOp::CreateStorage(spec.clone()));
        }
    }
    // 4. Build each target top-down and enable it last.
    for target in &wanted {
        build(&mut plan, target, observed.target(&target.iqn), &remade);
    }
    plan
}

/// Hides the targets discus made that `desired` does not name, and their storage objects, from
/// the planner.
pub fn keep_undeclared(observed: &mut LioState, desired: &[TargetConfig]) {
    let declared: BTreeSet<&str> = desired.iter().map(|t| t.iqn.as_str()).collect();
    observed.kept = observed
        .targets
        .iter()
        .filter(|t| owned(observed, t) && !declared.contains(t.iqn.as_str()))
        .map(|t| t.iqn.clone())
        .collect();
}

/// A target kept over partial input serves nobody until its declaration is read again: its
/// ACLs go (which ends their sessions); its LUNs and storage stay.
fn revoke_all(plan: &mut Plan<LioOp>, target: &LioTarget) {
    let Some(tpg) = target.tpg() else {
        return;
    };
    for acl in &tpg.acls {
        for mapped in &acl.mapped {
            plan.ops.push(LioOp::UnmapLun {
                iqn: target.iqn.clone(),
                initiator: acl.initiator.clone(),
                lun: mapped.index,
            });
        }
        plan.ops.push(LioOp::DeleteAcl {
            iqn: target.iqn.clone(),
            initiator: acl.initiator.clone(),
        });
    }
}

fn teardown(plan: &mut Plan<LioOp>, target: &LioTarget) {
    let iqn = target.iqn.clone();
    if let Some(tpg) = target.tpg() {
        // Disabling ends every session, so nothing is in flight while the rest goes.
        if tpg.enabled {
            plan.ops.push(LioOp::EnableTpg {
                iqn: iqn.clone(),
                enable: false,
            });
        }
        for acl in &tpg.acls {
            for mapped in &acl.mapped {
                plan.ops.push(LioOp::UnmapLun {
                    iqn: iqn.clone(),
                    initiator: acl.initiator.clone(),
                    lun: mapped.index,
                });
            }
            plan.ops.push(LioOp::DeleteAcl {
                iqn: iqn.clone(),
                initiator: acl.initiator.clone(),
            });
        }
        for lun in &tpg.luns {
            plan.ops.push(LioOp::RemoveLun {
                iqn: iqn.clone(),
                lun: lun.index,
            });
        }
        for portal in &tpg.portals {
            plan.ops.push(LioOp::RemovePortal {
                iqn: iqn.clone(),
                portal: portal.clone(),
            });
        }
        plan.ops.push(LioOp::DeleteTpg { iqn: iqn.clone() });
    }
    plan.ops.push(LioOp::DeleteTarget { iqn });
}

fn prune(plan: &mut Plan<LioOp>, target: &TargetConfig, tpg: &Tpg, remade: &BTreeSet<&str>) {
    let iqn = target.iqn.clone();
    let wanted_luns: BTreeMap<u64, String> = target
        .luns
        .iter()
        .map(|l| (u64::from(l.lun), storage_name(&target.iqn, l.lun)))
        .collect();
    // A TPG LUN goes when it is not wanted, points elsewhere, or its storage is remade.
    let stale_luns: BTreeSet<u64> = tpg
        .luns
        .iter()
        .filter(|lun| match wanted_luns.get(&lun.index) {
            None => true,
            Some(name) => {
                lun.storage
                    .as_ref()
                    .is_none_or(|(hba, so)| hba != HBA || so != name)
                    || remade.contains(name.as_str())
            }
        })
        .map(|lun| lun.index)
        .collect();
    for acl in &tpg.acls {
        let wanted = target.acls.iter().find(|a| a.initiator == acl.initiator);
        // CHAP fields cannot be unset in place: an ACL that must lose its mutual CHAP is made again.
        let must_clear = wanted.is_some_and(|w| {
            wanted_auth(w)
                .iter()
                .zip(observed_auth(acl))
                .any(|((_, want), have)| want.is_empty() && !have.is_empty())
        });
        let Some(wanted) = wanted.filter(|_| !must_clear) else {
            for mapped in &acl.mapped {
                plan.ops.push(LioOp::UnmapLun {
                    iqn: iqn.clone(),
                    initiator: acl.initiator.clone(),
                    lun: mapped.index,
                });
            }
            // Removing the ACL ends its sessions.
            plan.ops.push(LioOp::DeleteAcl {
                iqn: iqn.clone(),
                initiator: acl.initiator.clone(),
            });
            continue;
        };
        for mapped in &acl.mapped {
            let keep = wanted.luns.iter().any(|m| u64::from(m.lun) == mapped.index)
                && mapped.tpg_lun == Some(mapped.index)
                && !stale_luns.contains(&mapped.index);
            if !keep {
                plan.ops.push(LioOp::UnmapLun {
                    iqn: iqn.clone(),
                    initiator: acl.initiator.clone(),
                    lun: mapped.index,
                });
            }
        }
    }
    for lun in &stale_luns {
        plan.ops.push(LioOp::RemoveLun {
            iqn: iqn.clone(),
            lun: *lun,
        });
    }
    let portals: BTreeSet<String> = target.portals.iter().map(ToString::to_string).collect();
    for portal in &tpg.portals {
        if !portals.contains(portal) {
            plan.ops.push(LioOp::RemovePortal {
                iqn: iqn.clone(),
                portal: portal.clone(),
            });
        }
    }
}

fn build(
    plan: &mut Plan<LioOp>,
    target: &TargetConfig,
    existing: Option<&LioTarget>,
    remade: &BTreeSet<&str>,
) {
    let iqn = target.iqn.clone();
    let empty = Tpg::default();
    if existing.is_none() {
        plan.ops.push(LioOp::CreateTarget { iqn: iqn.clone() });
    }
    let found = match existing.and_then(LioTarget::tpg) {
        Some(tpg) if tpg.alias == alias(target) => tpg,
        // Made up to its TPG before a crash, or another IscsiTarget's until now: marked again.
        Some(tpg) => {
            plan.ops.push(LioOp::CreateTpg {
                iqn: iqn.clone(),
                alias: alias(target),
            });
            tpg
        }
        None => {
            plan.ops.push(LioOp::CreateTpg {
                iqn: iqn.clone(),
                alias: alias(target),
            });
            &empty
        }
    };
    for (name, value) in attributes(target) {
        let current = found
            .attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str());
        if current != Some(value) {
            plan.ops.push(LioOp::SetAttribute {
                iqn: iqn.clone(),
                name,
                value,
            });
        }
    }
    for portal in &target.portals {
        let portal = portal.to_string();
        if !found.portals.contains(&portal) {
            plan.ops.push(LioOp::AddPortal {
                iqn: iqn.clone(),
                portal,
            });
        }
    }
    for lun in &target.luns {
        let index = u64::from(lun.lun);
        let storage = storage_name(&target.iqn, lun.lun);
        if !linked(found, index, &storage, remade) {
            plan.ops.push(LioOp::AddLun {
                iqn: iqn.clone(),
                lun: index,
                storage,
            });
        }
    }
    for acl in &target.acls {
        build_acl(plan, target, acl, found, remade);
    }
    if !found.enabled {
        plan.ops.push(LioOp::EnableTpg { iqn, enable: true });
    }
}

/// Whether a TPG's LUN is linked to the storage object it should be, and that object stays.
fn linked(tpg: &Tpg, index: u64, storage: &str, remade: &BTreeSet<&str>) -> bool {
    !remade.contains(storage)
        && tpg.luns.iter().any(|l| {
            l.index == index
                && l.storage
                    .as_ref()
                    .is_some_and(|(hba, so)| hba == HBA && so == storage)
        })
}

/// One grant's ACL: made (again, when a credential must go away), its CHAP credentials set, its
/// LUNs mapped with the write protection the grant gives.
fn build_acl(
    plan: &mut Plan<LioOp>,
    target: &TargetConfig,
    acl: &AclConfig,
    found: &Tpg,
    remade: &BTreeSet<&str>,
) {
    let iqn = &target.iqn;
    let existing = found.acls.iter().find(|a| a.initiator == acl.initiator);
    let recreated = existing.is_some_and(|e| {
        wanted_auth(acl)
            .iter()
            .zip(observed_auth(e))
            .any(|((_, want), have)| want.is_empty() && !have.is_empty())
    });
    let existing = existing.filter(|_| !recreated);
    if existing.is_none() {
        plan.ops.push(LioOp::CreateAcl {
            iqn: iqn.clone(),
            initiator: acl.initiator.clone(),
        });
    }
    let have = existing.map(observed_auth).unwrap_or_default();
    for ((field, want), have) in wanted_auth(acl).into_iter().zip(have) {
        if want != have && !want.is_empty() {
            plan.ops.push(LioOp::SetAuth {
                iqn: iqn.clone(),
                initiator: acl.initiator.clone(),
                field,
                value: Password::new(want),
            });
        }
    }
    for mapped in &acl.luns {
        let index = u64::from(mapped.lun);
        let storage = storage_name(iqn, mapped.lun);
        let current = existing
            .and_then(|e| e.mapped.iter().find(|m| m.index == index))
            .filter(|m| m.tpg_lun == Some(index) && linked(found, index, &storage, remade));
        match current {
            None => plan.ops.push(LioOp::MapLun {
                iqn: iqn.clone(),
                initiator: acl.initiator.clone(),
                lun: index,
                write_protect: mapped.read_only,
            }),
            Some(m) if m.write_protect != mapped.read_only => {
                plan.ops.push(LioOp::SetWriteProtect {
                    iqn: iqn.clone(),
                    initiator: acl.initiator.clone(),
                    lun: index,
                    write_protect: mapped.read_only,
                })
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::super::model::{MappedLun, StorageObject, TpgLun};
    use super::super::unmarked::Unmarked;
    use super::*;
    use crate::api::chap::{ChapAccount, ChapCredentials};
    use crate::api::iscsi_target::{DeviceType, Portal};
    use crate::desired::{Backing, MappedLun as Mapping, ObjectKey};

    const IQN: &str = "iqn.2026-11.dev.discus:lab.boot";

    fn lun(n: u32) -> LunConfig {
        LunConfig {
            lun: n,
            image: ObjectKey::new("lab", "img"),
            backing: Backing::Image(PathBuf::from(format!("/data/images/{n}.raw"))),
            size_bytes: 1 << 20,
            serial: format!("{n:032x}"),
            read_only: true,
            block_size: None,
            device_type: DeviceType::Disk,
        }
    }

    fn acl(initiator: &str, grant: &str, luns: &[u32], mutual: bool) -> AclConfig {
        let account = |u: &str, p: &str| ChapAccount {
            username: u.into(),
            password: Password::new(p.into()),
        };
        AclConfig {
            initiator: initiator.into(),
            grant: ObjectKey::new("lab", grant),
            chap: Some(ChapCredentials {
                initiator: account(grant, "secret-secret"),
                mutual: mutual.then(|| account("target", "other-secret")),
            }),
            luns: luns
                .iter()
                .map(|&lun| Mapping {
                    lun,
                    read_only: true,
                })
                .collect(),
        }
    }

    fn target(luns: Vec<LunConfig>, acls: Vec<AclConfig>) -> TargetConfig {
        TargetConfig {
            iqn: IQN.into(),
            owner: ObjectKey::new("lab", "boot"),
            portals: vec![Portal {
                address: IpAddr::from([0, 0, 0, 0]),
                port: 3260,
            }],
            chap_required: true,
            luns,
            acls,
        }
    }

    /// configfs as a model, for the planner's unit tests (the kernel is tested in tests/lio.rs).
    fn simulate(state: &mut LioState, ops: &[LioOp]) {
        fn tpg<'a>(state: &'a mut LioState, iqn: &str) -> &'a mut Tpg {
            let target = state
                .targets
                .iter_mut()
                .find(|t| t.iqn == iqn)
                .expect("target");
            target.tpgs.iter_mut().find(|t| t.tag == 1).expect("tpg")
        }
        fn acl<'a>(state: &'a mut LioState, iqn: &str, initiator: &str) -> &'a mut Acl {
            tpg(state, iqn)
                .acls
                .iter_mut()
                .find(|a| a.initiator == initiator)
                .expect("acl")
        }
        for op in ops {
            match op.clone() {
                LioOp::CreateHba => state.hbas.push(HBA.into()),
                LioOp::CreateStorage(s) => state.storage.push(StorageObject {
                    hba: HBA.into(),
                    name: s.name,
                    enabled: true,
                    file: Some(s.file.display().to_string()),
                    size: Some(s.size),
                    buffered: s.buffered,
                    serial: s.serial,
                    block_size: s.block_size,
                }),
                LioOp::DeleteStorage { name, .. } => {
                    let used = state
                        .targets
                        .iter()
                        .flat_map(|t| &t.tpgs)
                        .flat_map(|t| &t.luns)
                        .any(|l| l.storage.as_ref().is_some_and(|(_, so)| *so == name));
                    assert!(!used, "EBUSY: {name} is still linked");
                    state.storage.retain(|s| s.name != name);
                }
                // A target is made only where there was none (write.rs: EEXIST fails).
                LioOp::CreateTarget { iqn } => {
                    assert!(state.target(&iqn).is_none(), "EEXIST: {iqn}");
                    state.targets.push(LioTarget {
                        iqn,
                        tpgs: Vec::new(),
                    });
                }
                LioOp::CreateTpg { iqn, alias } => {
                    let target = state
                        .targets
                        .iter_mut()
                        .find(|t| t.iqn == iqn)
                        .expect("target");
                    if target.tpg().is_none() {
                        target.tpgs.push(Tpg {
                            tag: 1,
                            ..Tpg::default()
                        });
                    }
                    tpg(state, &iqn).alias = alias;
                }
                LioOp::SetAttribute { iqn, name, value } => {
                    let tpg = tpg(state, &iqn);
                    tpg.attributes.retain(|(n, _)| n != name);
                    tpg.attributes.push((name.into(), value.into()));
                }
                LioOp::EnableTpg { iqn, enable } => tpg(state, &iqn).enabled = enable,
                LioOp::AddPortal { iqn, portal } => tpg(state, &iqn).portals.push(portal),
                LioOp::RemovePortal { iqn, portal } => {
                    tpg(state, &iqn).portals.retain(|p| *p != portal)
                }
                LioOp::AddLun { iqn, lun, storage } => {
                    assert!(
                        state.storage.iter().any(|s| s.name == storage),
                        "ENODEV: {storage} missing"
                    );
                    tpg(state, &iqn).luns.push(TpgLun {
                        index: lun,
                        storage: Some((HBA.into(), storage)),
                    });
                }
                LioOp::RemoveLun { iqn, lun } => {
                    let tpg = tpg(state, &iqn);
                    assert!(
                        !tpg.acls
                            .iter()
                            .any(|a| a.mapped.iter().any(|m| m.tpg_lun == Some(lun))),
                        "EBUSY: LUN {lun} mapped"
                    );
                    tpg.luns.retain(|l| l.index != lun);
                }
                LioOp::CreateAcl { iqn, initiator } => tpg(state, &iqn).acls.push(Acl {
                    initiator,
                    ..Acl::default()
                }),
                LioOp::DeleteAcl { iqn, initiator } => {
                    let tpg = tpg(state, &iqn);
                    assert!(
                        tpg.acls
                            .iter()
                            .find(|a| a.initiator == initiator)
                            .is_some_and(|a| a.mapped.is_empty()),
                        "ENOTEMPTY"
                    );
                    tpg.acls.retain(|a| a.initiator != initiator);
                }
                LioOp::SetAuth {
                    iqn,
                    initiator,
                    field,
                    value,
                } => {
                    let acl = acl(state, &iqn, &initiator);
                    match field {
                        AuthField::Userid => acl.userid = value.expose().into(),
                        AuthField::Password => acl.password = Some(value),
                        AuthField::UseridMutual => acl.userid_mutual = value.expose().into(),
                        AuthField::PasswordMutual => acl.password_mutual = Some(value),
                    }
                }
                LioOp::MapLun {
                    iqn,
                    initiator,
                    lun,
                    write_protect,
                } => {
                    assert!(
                        tpg(state, &iqn).luns.iter().any(|l| l.index == lun),
                        "EINVAL: no LUN {lun}"
                    );
                    acl(state, &iqn, &initiator).mapped.push(MappedLun {
                        index: lun,
                        tpg_lun: Some(lun),
                        write_protect,
                    });
                }
                LioOp::UnmapLun {
                    iqn,
                    initiator,
                    lun,
                } => acl(state, &iqn, &initiator)
                    .mapped
                    .retain(|m| m.index != lun),
                LioOp::SetWriteProtect {
                    iqn,
                    initiator,
                    lun,
                    write_protect,
                } => {
                    let acl = acl(state, &iqn, &initiator);
                    acl.mapped
                        .iter_mut()
                        .find(|m| m.index == lun)
                        .expect("mapping")
                        .write_protect = write_protect;
                }
                LioOp::DeleteTpg { iqn } => {
                    let tpg = tpg(state, &iqn);
                    assert!(
                        tpg.luns.is_empty() && tpg.acls.is_empty() && tpg.portals.is_empty(),
                        "ENOTEMPTY"
                    );
                    let target = state
                        .targets
                        .iter_mut()
                        .find(|t| t.iqn == iqn)
                        .expect("target");
                    target.tpgs.clear();
                }
                LioOp::DeleteTarget { iqn } => state.targets.retain(|t| t.iqn != iqn),
            }
        }
    }

    fn converge(desired: &[TargetConfig], state: &mut LioState) -> Vec<String> {
        let first = plan(desired, state);
        simulate(state, &first.ops);
        let again = plan(desired, state);
        assert!(again.ops.is_empty(), "not converged: {:?}", again.ops);
        first.ops.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_target_is_built_top_down_and_enabled_last() {
        let mut state = LioState::default();
        let ops = converge(
            &[target(
                vec![lun(0)],
                vec![acl("iqn.1993-08.org.debian:01:a", "a", &[0], false)],
            )],
            &mut state,
        );
        let position = |prefix: &str| {
            ops.iter()
                .position(|o| o.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix} in {ops:#?}"))
        };
        assert!(position("create HBA") < position("create storage object"));
        assert!(position("create storage object") < position("add LUN"));
        assert!(position("create target") < position("create TPG"));
        assert!(position("set generate_node_acls=0") < position("enable"));
        assert!(position("add LUN") < position("map LUN"));
        assert!(position("create ACL") < position("set CHAP userid"));
        assert_eq!(
            ops.last().map(String::as_str),
            Some(format!("enable {IQN}").as_str())
        );
        let tpg = state.targets[0].tpg().expect("tpg");
        assert_eq!(tpg.alias, "discus:lab/boot");
        assert!(
            tpg.attributes
                .contains(&("authentication".into(), "1".into()))
        );
        assert!(
            tpg.acls[0].mapped[0].write_protect,
            "read-only mappings are write-protected"
        );
        assert!(
            state.storage[0].buffered,
            "read-only images are served through the page cache"
        );
    }

    #[test]
    fn removing_a_target_tears_it_down_bottom_up_disabling_first() {
        let mut state = LioState::default();
        converge(
            &[target(
                vec![lun(0), lun(1)],
                vec![acl("iqn.1993-08.org.debian:01:a", "a", &[0, 1], true)],
            )],
            &mut state,
        );
        let ops = converge(&[], &mut state);
        assert_eq!(ops[0], format!("disable {IQN}"));
        let storage_deleted = ops
            .iter()
            .rposition(|o| !o.starts_with("delete storage object"))
            .map(|i| ops.len() - i - 1);
        assert_eq!(storage_deleted, Some(2), "storage goes last: {ops:#?}");
        assert_eq!(ops[ops.len() - 3], format!("delete target {IQN}"));
        assert!(state.targets.is_empty() && state.storage.is_empty());
    }

    #[test]
    fn a_target_kept_over_partial_input_keeps_its_luns_and_admits_nobody() {
        let mut state = LioState::default();
        converge(
            &[target(
                vec![lun(0)],
                vec![acl("iqn.1993-08.org.debian:01:a", "a", &[0], false)],
            )],
            &mut state,
        );
        // The pass cannot read what declares the target: it keeps it, and revokes every ACL.
        keep_undeclared(&mut state, &[]);
        let ops: Vec<String> = plan(&[], &state)
            .ops
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            ops,
            [
                format!("unmap LUN 0 of {IQN} for iqn.1993-08.org.debian:01:a"),
                format!("delete ACL iqn.1993-08.org.debian:01:a on {IQN}"),
            ]
        );
    }

    #[test]
    fn one_grant_changed_touches_that_grant_only() {
        let a = acl("iqn.1993-08.org.debian:01:a", "a", &[0], false);
        let b = acl("iqn.1993-08.org.debian:01:b", "b", &[0], false);
        let mut state = LioState::default();
        converge(&[target(vec![lun(0)], vec![a.clone(), b])], &mut state);
        let c = acl("iqn.1993-08.org.debian:01:c", "c", &[0], false);
        let ops = converge(&[target(vec![lun(0)], vec![a, c])], &mut state);
        assert!(
            ops.iter().all(|o| o.contains(":b") || o.contains(":c")),
            "{ops:#?}"
        );
        assert_eq!(
            ops.len(),
            2 + 1 + 2 + 1,
            "unmap+delete b, create c, userid+password, map: {ops:#?}"
        );
    }

    #[test]
    fn a_changed_image_remakes_its_storage_object_without_touching_the_acl() {
        let a = acl("iqn.1993-08.org.debian:01:a", "a", &[0], false);
        let mut state = LioState::default();
        converge(&[target(vec![lun(0)], vec![a.clone()])], &mut state);
        let mut changed = lun(0);
        changed.backing = Backing::Image(PathBuf::from("/data/images/other.raw"));
        changed.serial = "f".repeat(32);
        let ops = converge(&[target(vec![changed], vec![a])], &mut state);
        assert_eq!(
            ops.iter()
                .map(|o| o.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>(),
            [
                "unmap LUN",
                "remove LUN",
                "delete storage",
                "create storage",
                "add LUN",
                "map LUN"
            ]
        );
    }

    #[test]
    fn drift_is_repaired_and_unmarked_targets_are_refused_not_touched() {
        let a = acl("iqn.1993-08.org.debian:01:a", "a", &[0], false);
        let mut state = LioState::default();
        converge(&[target(vec![lun(0)], vec![a.clone()])], &mut state);
        state.targets[0].tpgs[0].acls[0].mapped.clear();
        state.targets[0].tpgs[0]
            .attributes
            .retain(|(n, _)| n != "demo_mode_write_protect");
        let ops = converge(&[target(vec![lun(0)], vec![a.clone()])], &mut state);
        assert_eq!(ops.len(), 2, "{ops:#?}");

        let mut foreign = LioState::default();
        foreign.targets.push(LioTarget {
            iqn: IQN.into(),
            tpgs: vec![Tpg {
                tag: 1,
                alias: "LIO Target".into(),
                ..Tpg::default()
            }],
        });
        let plan = plan(&[target(vec![lun(0)], vec![a])], &foreign);
        assert!(
            plan.ops.iter().all(|o| o.target().is_none()),
            "{:?}",
            plan.ops
        );
        assert_eq!(plan.refused[0].reason, Reason::ForeignObject);
    }

    /// configfs after a crash that came once `done` had run (the last of them possibly without
    /// its record updated after it), as the backend observes it: with its record, settled.
    fn crashed(before: &LioState, done: &[LioOp], last_recorded: bool) -> LioState {
        let mut record = Unmarked {
            targets: before.unmarked.clone(),
        };
        for (i, op) in done.iter().enumerate() {
            record.before(op);
            if last_recorded || i + 1 < done.len() {
                record.after(op);
            }
        }
        let mut state = before.clone();
        simulate(&mut state, done);
        record.settle(&state, None);
        state.unmarked = record.targets;
        state
    }

    /// Every state a crash can leave while `ops` run from `state`.
    fn crashes(state: &LioState, ops: &[LioOp]) -> Vec<LioState> {
        (0..=ops.len())
            .flat_map(|done| [true, false].map(|last| crashed(state, &ops[..done], last)))
            .collect()
    }

    #[test]
    fn a_crash_anywhere_while_making_a_target_leaves_one_discus_finishes() {
        let desired = [target(
            vec![lun(0)],
            vec![acl("iqn.1993-08.org.debian:01:a", "a", &[0], false)],
        )];
        let empty = LioState::default();
        let full = plan(&desired, &empty).ops;
        let made = 1
            + (full.iter())
                .position(|o| matches!(o, LioOp::CreateTarget { .. }))
                .expect("the target is made");
        // Also inside `create TPG`: made, its alias not written (the kernel's default).
        let mut inside = crashed(&empty, &full[..made], true);
        inside.targets[0].tpgs.push(Tpg {
            tag: 1,
            alias: "LIO Target".into(),
            ..Tpg::default()
        });
        let mut states = crashes(&empty, &full);
        states.push(inside.clone());
        for mut state in states {
            let refused = plan(&desired, &state).refused;
            assert!(refused.is_empty(), "{refused:?} after a crash in {state:?}");
            converge(&desired, &mut state);
            assert_eq!(state.targets[0].tpgs[0].alias, "discus:lab/boot");
            assert!(
                crashed(&state, &[], true).unmarked.is_empty(),
                "settled once marked"
            );
        }

        // Without discus's record, or once something else was put in it, it is not discus's.
        let mut unrecorded = inside.clone();
        unrecorded.unmarked.clear();
        let mut used = inside;
        used.targets[0].tpgs[0].portals.push("0.0.0.0:3260".into());
        for state in [unrecorded, used] {
            let plan = plan(&desired, &state);
            assert_eq!(plan.refused[0].reason, Reason::ForeignObject);
            assert!(plan.ops.iter().all(|o| o.target().is_none()), "{plan:?}");
            let removal = super::plan(&[], &state).ops;
            assert!(
                removal.iter().all(|o| o.target().is_none()),
                "not discus's to remove: {removal:?}"
            );
        }
    }

    #[test]
    fn a_crash_anywhere_while_removing_a_target_leaves_one_discus_removes() {
        let desired = [target(
            vec![lun(0)],
            vec![acl("iqn.1993-08.org.debian:01:a", "a", &[0], false)],
        )];
        let mut built = LioState::default();
        converge(&desired, &mut built);
        let removal = plan(&[], &built).ops;
        for state in crashes(&built, &removal) {
            let mut removed = state.clone();
            converge(&[], &mut removed);
            assert!(removed.targets.is_empty(), "{state:?}");
            // Or declared again before the next pass: finished, never refused.
            let mut again = state;
            assert!(plan(&desired, &again).refused.is_empty(), "{again:?}");
            converge(&desired, &mut again);
        }
        // Between the TPG's removal and the target's: bare, recorded, still discus's.
        let tpg_gone = 1
            + (removal.iter())
                .position(|o| matches!(o, LioOp::DeleteTpg { .. }))
                .expect("the TPG goes");
        let state = crashed(&built, &removal[..tpg_gone], true);
        assert!(state.targets[0].tpgs.is_empty() && state.unmarked.contains(IQN));
        assert!(plan(&desired, &state).refused.is_empty());
    }

    #[test]
    fn a_record_of_a_target_that_is_gone_claims_nothing_made_later() {
        let desired = [target(vec![lun(0)], vec![])];
        // A target discus failed to make, or made before a reboot: the record outlived it.
        let stale = LioState {
            unmarked: [IQN.to_owned()].into(),
            ..LioState::default()
        };
        let settled = crashed(&stale, &[], true);
        assert!(settled.unmarked.is_empty());
        // Someone else's target, made step by step after that observation, found bare.
        let mut foreign = settled;
        foreign.targets.push(LioTarget {
            iqn: IQN.into(),
            tpgs: vec![Tpg {
                tag: 1,
                ..Tpg::default()
            }],
        });
        assert!(plan(&[], &foreign).ops.is_empty());
        assert_eq!(
            plan(&desired, &foreign).refused[0].reason,
            Reason::ForeignObject
        );
    }

    #[test]
    fn secrets_do_not_show_in_operations() {
        let plan = plan(
            &[target(
                vec![lun(0)],
                vec![acl("iqn.1993-08.org.debian:01:a", "a", &[0], true)],
            )],
            &LioState::default(),
        );
        let shown = format!(
            "{:?} {}",
            plan.ops,
            plan.ops.iter().map(ToString::to_string).collect::<String>()
        );
        assert!(
            !shown.contains("secret-secret") && !shown.contains("other-secret"),
            "{shown}"
        );
    }
}
