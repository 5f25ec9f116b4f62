//! The tgt planner simulated against a model of tgtd (its quirks included) to convergence,
//! with failures, lost records and crashes at every step.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use super::*;
use crate::api::chap::{ChapAccount, ChapCredentials, Password};
use crate::api::iscsi_target::{DeviceType, Portal};
use crate::backend::Operation;
use crate::backend::tgt::model::{TgtLun, TgtSession, TgtTarget};
use crate::desired::{AclConfig, Backing, LunConfig, MappedLun, ObjectKey};
use crate::reasons::Reason;

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
