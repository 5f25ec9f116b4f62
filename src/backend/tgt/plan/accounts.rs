//! CHAP accounts, which are the daemon's: which are made fresh, which made again (a new
//! password), which go; and binding them to targets in two stages around the unbinding, so that
//! a target that requires CHAP always has an account bound while it admits anyone.

use std::collections::{BTreeMap, BTreeSet};

use super::placed::{AccountChanges, Placed};
use super::{Owned, TgtOp};
use crate::api::chap::Password;
use crate::backend::Plan;
use crate::backend::tgt::model::TgtState;
use crate::desired::AclConfig;

pub(super) fn account_changes(
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

pub(super) fn create_account(
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

/// Accounts that exist with the right password are bound early, before any is unbound; accounts
/// made again are bound late, once they exist again.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    Early,
    Late,
}

pub(super) fn bind_accounts(
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

pub(super) fn bind(target: &Placed<'_>, user: &str, outgoing: bool) -> TgtOp {
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
pub(super) fn unbind_accounts(
    plan: &mut Plan<TgtOp>,
    target: &Placed<'_>,
    changes: &AccountChanges,
) {
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
