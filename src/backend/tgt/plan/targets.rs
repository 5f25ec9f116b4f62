//! Targets: which of tgtd's are discus's and wanted (placed), which go (offline first, ACLs
//! and accounts unbound before deletion), and each wanted target's LUNs.

use std::collections::{BTreeMap, BTreeSet};

use super::acls::unbind_addresses;
use super::device_lun;
use super::placed::{AccountChanges, Placed};
use super::wanted::{Wanted, WantedLun, refuse};
use super::{Owned, TgtOp};
use crate::api::iscsi_target::DeviceType;
use crate::backend::Plan;
use crate::backend::tgt::model::{TgtLun, TgtState, TgtTarget};

/// Gives every wanted target its tid and the initiators it will admit: grants whose accounts
/// discus cannot use are refused.
pub(super) fn place<'a>(
    wanted_targets: &'a [Wanted<'a>],
    observed: &'a TgtState,
    found_by_name: &BTreeMap<&str, &'a TgtTarget>,
    changes: &AccountChanges,
    plan: &mut Plan<TgtOp>,
) -> Vec<Placed<'a>> {
    let mut next_tid = observed.targets.iter().map(|t| t.tid).max().unwrap_or(0) + 1;
    let mut placed = Vec::new();
    for wanted in wanted_targets {
        let found = found_by_name.get(wanted.target.iqn.as_str()).copied();
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
pub(super) fn remove_unwanted_targets(
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

/// The target itself, ready.
pub(super) fn ensure_target(plan: &mut Plan<TgtOp>, target: &Placed<'_>) {
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

pub(super) fn plan_luns(
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
