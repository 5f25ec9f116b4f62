//! The sessions this node serves, followed from pass to pass: when each began (for status) and
//! which began or ended since the last pass — the audit trail of who connected when, told as a
//! JSON log line on every node and as an Event where there is an API.
//!
//! A session is seen when a pass reads the backend (after a change, and at every resync), so a
//! start or an end is told at most one resync late, and a session shorter than that may be
//! missed. A pass reads them before it changes anything and again after, so a session that a
//! revocation ends is told as begun and ended even when it began since the last pass. The
//! first reading after a start only sets the baseline: a restart does not tell every
//! live session again (their `since` is then the restart's time). A pass that could not read the
//! backend changes nothing here: an unknown answer is not a logout.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use crate::backend::Session;
use crate::desired::{ObjectKey, TargetConfig};

/// A session as the backend names it: target IQN, initiator IQN, initiator address ("" when the
/// backend does not say).
pub type SessionKey = (String, String, String);

/// A live session: when it was first seen, and the grant whose ACL admitted it then.
#[derive(Clone, Debug)]
struct Live {
    since: Timestamp,
    seen: Instant,
    grant: Option<ObjectKey>,
}

/// A session that began or ended since the previous reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionChange {
    pub target: String,
    pub initiator: String,
    pub address: String,
    /// The grant whose ACL admitted it (none for a target or ACL discus no longer declares).
    pub grant: Option<ObjectKey>,
    /// `None` when it began; when it ended, how long this node saw it: from the first reading
    /// that held it to the one that did not (it lasted at least that, and up to one resync more).
    pub ended_after: Option<Duration>,
}

/// The live sessions of the node, from one reading to the next.
#[derive(Debug, Default)]
pub struct SessionBook {
    live: BTreeMap<SessionKey, Live>,
    /// Whether a first reading set the baseline.
    started: bool,
}

impl SessionBook {
    /// Takes a reading of the backend's sessions on the targets in `scope` (all when `None`),
    /// with `targets` declared; returns what began and ended on them since the last reading
    /// (nothing at the first). Sessions on other targets are as last read.
    pub fn read(
        &mut self,
        sessions: &[Session],
        scope: Option<&BTreeSet<String>>,
        targets: &[TargetConfig],
        now: (Timestamp, Instant),
    ) -> Vec<SessionChange> {
        let in_scope = |target: &String| scope.is_none_or(|iqns| iqns.contains(target));
        let reading: BTreeSet<SessionKey> = (sessions.iter())
            .filter(|s| in_scope(&s.target))
            .map(key)
            .collect();
        let mut changes = Vec::new();
        self.live.retain(|key, live| {
            let stays = !in_scope(&key.0) || reading.contains(key);
            if !stays {
                changes.push(change(key, live.grant.clone(), Some(now.1 - live.seen)));
            }
            stays
        });
        for key in reading {
            if self.live.contains_key(&key) {
                continue;
            }
            let grant = grant_of(targets, &key.0, &key.1);
            if self.started {
                changes.push(change(&key, grant.clone(), None));
            }
            let (since, seen) = now;
            self.live.insert(key, Live { since, seen, grant });
        }
        self.started = true;
        changes
    }

    /// When each live session was first seen.
    pub fn since(&self) -> BTreeMap<SessionKey, Timestamp> {
        (self.live.iter())
            .map(|(key, live)| (key.clone(), live.since))
            .collect()
    }
}

fn key(session: &Session) -> SessionKey {
    (
        session.target.clone(),
        session.initiator.clone(),
        session.address.clone().unwrap_or_default(),
    )
}

fn change(
    key: &SessionKey,
    grant: Option<ObjectKey>,
    ended_after: Option<Duration>,
) -> SessionChange {
    SessionChange {
        target: key.0.clone(),
        initiator: key.1.clone(),
        address: key.2.clone(),
        grant,
        ended_after,
    }
}

/// The grant whose ACL on `target` names `initiator` exactly as the backend compares it.
fn grant_of(targets: &[TargetConfig], target: &str, initiator: &str) -> Option<ObjectKey> {
    let target = targets.iter().find(|t| t.iqn == target)?;
    let acl = target.acls.iter().find(|a| a.initiator == initiator)?;
    Some(acl.grant.clone())
}

/// The audit line of a change, on every node (the log is the record where there is no API).
pub fn log(node: &str, change: &SessionChange) {
    let grant = change
        .grant
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    match change.ended_after {
        None => tracing::info!(
            target: "discus::audit",
            %node,
            %grant,
            target_iqn = %change.target,
            initiator = %change.initiator,
            address = %change.address,
            "session started"
        ),
        Some(lasted) => tracing::info!(
            target: "discus::audit",
            %node,
            %grant,
            target_iqn = %change.target,
            initiator = %change.initiator,
            address = %change.address,
            seen_seconds = lasted.as_secs(),
            "session ended"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::AclConfig;

    fn session(target: &str, initiator: &str, address: &str) -> Session {
        Session {
            target: target.into(),
            initiator: initiator.into(),
            address: Some(address.into()),
        }
    }

    fn targets() -> Vec<TargetConfig> {
        let acl = |initiator: &str, grant: &str| AclConfig {
            initiator: initiator.into(),
            grant: ObjectKey::new("lab", grant),
            chap: None,
            luns: Vec::new(),
        };
        vec![TargetConfig {
            iqn: "iqn.t:a".into(),
            owner: ObjectKey::new("lab", "a"),
            portals: Vec::new(),
            chap_required: false,
            luns: Vec::new(),
            acls: vec![acl("iqn.i:one", "one"), acl("iqn.i:two", "two")],
        }]
    }

    #[test]
    fn the_first_reading_tells_nothing_and_later_ones_tell_each_start_and_end_once() {
        let mut book = SessionBook::default();
        let t0 = (Timestamp::UNIX_EPOCH, Instant::now());
        let later = |s: u64| {
            (
                t0.0 + k8s_openapi::jiff::SignedDuration::from_secs(s as i64),
                t0.1 + Duration::from_secs(s),
            )
        };
        let one = session("iqn.t:a", "iqn.i:one", "10.0.0.1:5000");
        let two = session("iqn.t:a", "iqn.i:two", "10.0.0.2:5000");
        assert!(
            book.read(std::slice::from_ref(&one), None, &targets(), t0)
                .is_empty()
        );

        let changes = book.read(&[one.clone(), two.clone()], None, &targets(), later(10));
        assert_eq!(
            changes,
            vec![SessionChange {
                target: "iqn.t:a".into(),
                initiator: "iqn.i:two".into(),
                address: "10.0.0.2:5000".into(),
                grant: Some(ObjectKey::new("lab", "two")),
                ended_after: None,
            }]
        );
        assert!(
            book.read(&[one.clone(), two.clone()], None, &targets(), later(20))
                .is_empty()
        );

        // The grant is gone from what is declared when its session ends: the end still names it.
        let changes = book.read(std::slice::from_ref(&one), None, &[], later(70));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].grant, Some(ObjectKey::new("lab", "two")));
        assert_eq!(changes[0].ended_after, Some(Duration::from_secs(60)));
        assert_eq!(
            book.since().into_keys().collect::<Vec<_>>(),
            vec![key(&one)]
        );
        assert_eq!(book.since()[&key(&one)], t0.0);
    }

    #[test]
    fn a_scoped_reading_leaves_the_sessions_of_other_targets_alone() {
        let mut book = SessionBook::default();
        let now = (Timestamp::UNIX_EPOCH, Instant::now());
        let elsewhere = session("iqn.t:b", "iqn.i:one", "10.0.0.1:1");
        book.read(std::slice::from_ref(&elsewhere), None, &targets(), now);
        let scope: BTreeSet<String> = ["iqn.t:a".to_owned()].into();
        let here = session("iqn.t:a", "iqn.i:one", "10.0.0.1:2");
        let changes = book.read(std::slice::from_ref(&here), Some(&scope), &targets(), now);
        assert_eq!(changes.len(), 1, "only the new session on the target read");
        assert!(book.read(&[here], Some(&scope), &targets(), now).is_empty());
        assert!(book.since().contains_key(&key(&elsewhere)));
    }

    #[test]
    fn a_session_no_acl_names_is_told_without_a_grant() {
        let mut book = SessionBook::default();
        let now = (Timestamp::UNIX_EPOCH, Instant::now());
        book.read(&[], None, &targets(), now);
        let changes = book.read(
            &[session("iqn.t:a", "IQN.I:ONE", "10.0.0.1:1")],
            None,
            &targets(),
            now,
        );
        assert_eq!(
            changes[0].grant, None,
            "tgt and LIO compare names as written"
        );
    }

    #[test]
    fn the_same_initiator_from_two_addresses_is_two_sessions() {
        let mut book = SessionBook::default();
        let now = (Timestamp::UNIX_EPOCH, Instant::now());
        book.read(&[], None, &targets(), now);
        let changes = book.read(
            &[
                session("iqn.t:a", "iqn.i:one", "10.0.0.1:1"),
                session("iqn.t:a", "iqn.i:one", "10.0.1.1:1"),
            ],
            None,
            &targets(),
            now,
        );
        assert_eq!(changes.len(), 2);
    }
}
