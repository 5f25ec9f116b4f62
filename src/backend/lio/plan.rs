//! The LIO planner (pure): desired targets and the configfs model → operations in the kernel's
//! order: tear down bottom-up (mappings, ACLs, LUNs, portals, TPG, target, storage), build
//! top-down (storage with its pre-export attributes, target, TPG, attributes, portals, LUNs, ACLs
//! with CHAP, mappings with write_protect) and enable the TPG last, so that nobody logs in to a
//! half-built target.
//!
//! discus marks what it makes: storage objects are named `discus-…`, and its TPGs carry the
//! alias `discus:<namespace>/<name>`. Anything unmarked is never changed, even with a wanted IQN.

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
}

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

/// Whether discus made this target.
pub fn owned(target: &LioTarget) -> bool {
    target
        .tpg()
        .is_some_and(|t| t.alias.starts_with(ALIAS_PREFIX))
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
            Some(found) if !owned(found) => plan.refused.push(Problem {
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
        if owned(target) && !wanted_iqns.contains(target.iqn.as_str()) {
            teardown(&mut plan, target);
        }
    }
    // 2. In the targets discus keeps, remove what is not wanted (or must be remade), bottom-up.
    for target in &wanted {
        if let Some(tpg) = observed.target(&target.iqn).and_then(LioTarget::tpg) {
            prune(&mut plan, target, tpg, &remade);
        }
    }
    // 3. Storage: delete discus's objects nothing wants or that must be remade, create the rest.
    for found in &observed.storage {
        let ours = found.name.starts_with(STORAGE_PREFIX);
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
        build(
            &mut plan,
            target,
            observed.target(&target.iqn).and_then(LioTarget::tpg),
            &remade,
        );
    }
    plan
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
    tpg: Option<&Tpg>,
    remade: &BTreeSet<&str>,
) {
    let iqn = target.iqn.clone();
    let empty = Tpg::default();
    let found = match tpg {
        Some(tpg) => tpg,
        None => {
            plan.ops.push(LioOp::CreateTarget { iqn: iqn.clone() });
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
        let linked = found.luns.iter().any(|l| {
            l.index == index
                && l.storage
                    .as_ref()
                    .is_some_and(|(hba, so)| hba == HBA && *so == storage)
        }) && !remade.contains(storage.as_str());
        if !linked {
            plan.ops.push(LioOp::AddLun {
                iqn: iqn.clone(),
                lun: index,
                storage,
            });
        }
    }
    for acl in &target.acls {
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
            let storage = storage_name(&target.iqn, mapped.lun);
            let current = existing
                .and_then(|e| e.mapped.iter().find(|m| m.index == index))
                .filter(|m| {
                    m.tpg_lun == Some(index)
                        && !remade.contains(storage.as_str())
                        && found.luns.iter().any(|l| {
                            l.index == index
                                && l.storage
                                    .as_ref()
                                    .is_some_and(|(hba, so)| hba == HBA && *so == storage)
                        })
                });
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
    if !found.enabled {
        plan.ops.push(LioOp::EnableTpg { iqn, enable: true });
    }
}
