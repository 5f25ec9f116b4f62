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
//!
//! The plan is built in phases, each in its own file: what is wanted (wanted.rs), the accounts
//! (accounts.rs), the targets and their LUNs (targets.rs), who is admitted (acls.rs); `plan`
//! below orders them. Portals, which are the daemon's, are here.

mod accounts;
mod acls;
mod op;
mod placed;
mod targets;
mod wanted;

use std::collections::BTreeSet;

pub use super::owned::Owned;
pub use op::TgtOp;

use super::model::TgtState;
use crate::backend::Plan;
use crate::desired::TargetConfig;
use accounts::{Stage, account_changes, bind_accounts, create_account, unbind_accounts};
use acls::{admit, close_sessions, revoke, unbind_addresses};
use targets::{ensure_target, place, plan_luns, remove_unwanted_targets};
use wanted::wanted_targets;

/// tgt's LUN for an API LUN: its LUN 0 is the target's controller.
pub fn device_lun(lun: u32) -> u32 {
    lun + 1
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
    let found = observed.targets_by_name();
    let (wanted_targets, passwords) = wanted_targets(desired, &found, owned, &mut plan);
    let changes = account_changes(&passwords, observed, owned);
    let placed = place(&wanted_targets, observed, &found, &changes, &mut plan);

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

#[cfg(test)]
mod tests;
