//! Who a target admits: revocations first (a removed grant's ACL and sessions, address ACLs
//! discus never binds), admission last, once the target's accounts are in place.

use std::collections::BTreeSet;

use super::TgtOp;
use super::placed::{AccountChanges, Placed};
use crate::backend::Plan;
use crate::backend::tgt::model::TgtTarget;

/// Takes access away first: ACLs of initiators no longer admitted (and their sessions), and every
/// ACL of a target whose accounts are about to be replaced with none bound in between (bound
/// again at the end; their sessions go on).
pub(super) fn revoke(plan: &mut Plan<TgtOp>, target: &Placed<'_>, changes: &AccountChanges) {
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
pub(super) fn unbind_addresses(plan: &mut Plan<TgtOp>, target: &TgtTarget) {
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
pub(super) fn close_sessions(
    plan: &mut Plan<TgtOp>,
    target: &TgtTarget,
    admitted: &BTreeSet<&str>,
) {
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

/// ACLs last: binding one makes the target visible, so everything else is in place first.
pub(super) fn admit(plan: &mut Plan<TgtOp>, target: &Placed<'_>, changes: &AccountChanges) {
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
