//! Phase one: what the declared targets ask of tgt, and what tgt cannot honour — refused per
//! grant (`BackendLimit`), never widened.

use std::collections::{BTreeMap, BTreeSet};

use super::{Owned, TgtOp};
use crate::api::chap::{ChapAccount, Password};
use crate::backend::Plan;
use crate::backend::tgt::model::TgtTarget;
use crate::desired::{AclConfig, Kind, LunConfig, Problem, Reason, TargetConfig};

/// A LUN as tgt must hold it.
pub(super) struct WantedLun<'a> {
    pub(super) config: &'a LunConfig,
    pub(super) readonly: bool,
}

/// The accounts a target binds.
#[derive(Default)]
pub(super) struct WantedAccounts {
    pub(super) incoming: BTreeSet<String>,
    pub(super) outgoing: Option<String>,
}

/// A target as tgt can hold it, after the grants tgt cannot honour are refused.
pub(super) struct Wanted<'a> {
    pub(super) target: &'a TargetConfig,
    pub(super) luns: Vec<WantedLun<'a>>,
    pub(super) acls: Vec<&'a AclConfig>,
    pub(super) accounts: WantedAccounts,
}

pub(super) fn refuse(plan: &mut Plan<TgtOp>, acl: &AclConfig, message: String) {
    plan.refused.push(Problem {
        kind: Kind::InitiatorAccess,
        key: acl.grant.clone(),
        reason: Reason::BackendLimit,
        message,
    });
}

/// Decides which grants of a target tgt can honour, the read-only flag of each LUN, and the
/// accounts; `passwords` collects every account's password across the daemon.
pub(super) fn wanted<'a>(
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

/// Which targets tgt can hold at all, and what of each; `passwords` collects every account's
/// password across the daemon.
pub(super) fn wanted_targets<'a>(
    desired: &'a [TargetConfig],
    found: &BTreeMap<&str, &TgtTarget>,
    owned: &Owned,
    plan: &mut Plan<TgtOp>,
) -> (
    Vec<Wanted<'a>>,
    BTreeMap<String, (&'a Password, &'a AclConfig)>,
) {
    let mut passwords = BTreeMap::new();
    let mut wanted_targets = Vec::new();
    for target in desired {
        if let Some(found) = found.get(target.iqn.as_str())
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
