//! The sessions this node serves, followed from pass to pass: when each began (for status) and
//! which began or ended since the last pass — the audit trail of who connected when, told as a
//! log line on every node and as an Event where there is an API.
//!
//! A session is seen when a pass reads the backend (after a change, and at every resync), so a
//! start or an end is told when the next pass reads its target, and a session shorter than the
//! time between two readings may be missed. A pass reads them before it changes anything and
//! again after, so a session that a revocation ends is told as begun and ended even when it
//! began since the last pass. The first reading after a start only sets the baseline: a restart
//! does not tell every live session again (their `since` is then the restart's time). A pass
//! that could not read the backend changes nothing here: an unknown answer is not a logout.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use crate::backend::Session;
use crate::desired::{ObjectKey, TargetConfig};

/// A session as the backend names it: target IQN, initiator IQN, initiator address ("" when the
/// backend does not say).
pub type SessionKey = (String, String, String);

/// The key of a session the backend reports.
pub fn key(session: &Session) -> SessionKey {
    (
        session.target.clone(),
        session.initiator.clone(),
        session.address.clone().unwrap_or_default(),
    )
}

/// The grant whose ACL admitted a session: its key, and its UID (`kubectl describe` finds Events
/// by it, and it tells a grant from a later one of the same name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRef {
    pub key: ObjectKey,
    pub uid: Option<String>,
}

/// What admitted the sessions of a reading: the targets applied, and the UIDs of the grants.
pub struct Admitted<'a> {
    pub targets: &'a [TargetConfig],
    pub uids: &'a BTreeMap<ObjectKey, String>,
}

impl Admitted<'_> {
    /// The grant whose ACL on `target` names `initiator` exactly as the backend compares it.
    fn grant(&self, target: &str, initiator: &str) -> Option<GrantRef> {
        let target = self.targets.iter().find(|t| t.iqn == target)?;
        let acl = target.acls.iter().find(|a| a.initiator == initiator)?;
        Some(GrantRef {
            key: acl.grant.clone(),
            uid: self.uids.get(&acl.grant).cloned(),
        })
    }
}

/// When a reading was made: the wall clock for status, the monotonic one for durations.
#[derive(Clone, Copy, Debug)]
pub struct ReadAt {
    pub time: Timestamp,
    pub instant: Instant,
}

impl ReadAt {
    pub fn now() -> Self {
        Self {
            time: Timestamp::now(),
            instant: Instant::now(),
        }
    }
}

/// A live session: when it was first seen and last held, and the grant whose ACL admitted it.
#[derive(Clone, Debug)]
struct Live {
    since: Timestamp,
    first_held: Instant,
    last_held: Instant,
    grant: Option<GrantRef>,
}

/// A session that began or ended since the previous reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionChange {
    pub target: String,
    pub initiator: String,
    pub address: String,
    /// The grant whose ACL admitted it (none for a target or ACL discus does not declare).
    pub grant: Option<GrantRef>,
    /// `None` when it began; when it ended, how long this node saw it: from the first reading
    /// that held it to the last (it lasted at least that long).
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
    /// with what admitted them; returns what began and ended on them since the last reading
    /// (nothing at the first). Sessions on other targets are as last read.
    pub fn read(
        &mut self,
        sessions: &[Session],
        scope: Option<&BTreeSet<String>>,
        admitted: &Admitted<'_>,
        at: ReadAt,
    ) -> Vec<SessionChange> {
        let in_scope = |target: &String| scope.is_none_or(|iqns| iqns.contains(target));
        let reading: BTreeSet<SessionKey> = (sessions.iter())
            .filter(|s| in_scope(&s.target))
            .map(key)
            .collect();
        let mut changes = Vec::new();
        self.live.retain(|key, live| {
            if !in_scope(&key.0) {
                return true;
            }
            let held = reading.contains(key);
            if held {
                live.last_held = at.instant;
            } else {
                let seen = live.last_held - live.first_held;
                changes.push(change(key, live.grant.clone(), Some(seen)));
            }
            held
        });
        for key in reading {
            if self.live.contains_key(&key) {
                continue;
            }
            let grant = admitted.grant(&key.0, &key.1);
            if self.started {
                changes.push(change(&key, grant.clone(), None));
            }
            let live = Live {
                since: at.time,
                first_held: at.instant,
                last_held: at.instant,
                grant,
            };
            self.live.insert(key, live);
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

fn change(
    key: &SessionKey,
    grant: Option<GrantRef>,
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

/// The audit line of a change, on every node (the log is the record where there is no API).
pub fn log(node: &str, change: &SessionChange) {
    let grant = (change.grant.as_ref())
        .map(|grant| grant.key.to_string())
        .unwrap_or_default();
    let (target, initiator, address) = (&change.target, &change.initiator, &change.address);
    match change.ended_after {
        None => tracing::info!(
            target: "discus::audit",
            %node, %grant, iqn = %target, %initiator, %address,
            "session started"
        ),
        Some(seen) => tracing::info!(
            target: "discus::audit",
            %node, %grant, iqn = %target, %initiator, %address,
            seen_seconds = seen.as_secs(),
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

    fn uids() -> BTreeMap<ObjectKey, String> {
        [(ObjectKey::new("lab", "two"), "uid-two".to_owned())].into()
    }

    /// The target and grants of these tests, as declared.
    struct Declared {
        targets: Vec<TargetConfig>,
        uids: BTreeMap<ObjectKey, String>,
    }

    impl Declared {
        fn new() -> Self {
            Self {
                targets: targets(),
                uids: uids(),
            }
        }

        fn admitted(&self) -> Admitted<'_> {
            Admitted {
                targets: &self.targets,
                uids: &self.uids,
            }
        }
    }

    /// A reading `s` seconds after the first.
    fn at(start: ReadAt, s: u64) -> ReadAt {
        ReadAt {
            time: start.time + k8s_openapi::jiff::SignedDuration::from_secs(s as i64),
            instant: start.instant + Duration::from_secs(s),
        }
    }

    #[test]
    fn the_first_reading_tells_nothing_and_later_ones_tell_each_start_and_end_once() {
        let declared = Declared::new();
        let admitted = declared.admitted();
        let mut book = SessionBook::default();
        let t0 = ReadAt::now();
        let one = session("iqn.t:a", "iqn.i:one", "10.0.0.1:5000");
        let two = session("iqn.t:a", "iqn.i:two", "10.0.0.2:5000");
        assert!(
            book.read(std::slice::from_ref(&one), None, &admitted, t0)
                .is_empty()
        );

        let both = [one.clone(), two.clone()];
        let two_by = GrantRef {
            key: ObjectKey::new("lab", "two"),
            uid: Some("uid-two".into()),
        };
        assert_eq!(
            book.read(&both, None, &admitted, at(t0, 10)),
            vec![SessionChange {
                target: "iqn.t:a".into(),
                initiator: "iqn.i:two".into(),
                address: "10.0.0.2:5000".into(),
                grant: Some(two_by.clone()),
                ended_after: None,
            }]
        );
        assert!(book.read(&both, None, &admitted, at(t0, 20)).is_empty());

        // Gone at 70 s, last held at 20 s: seen for 10 s. The grant is no longer declared: the
        // end still names the one that admitted it.
        let gone = Admitted {
            targets: &[],
            uids: &declared.uids,
        };
        let changes = book.read(std::slice::from_ref(&one), None, &gone, at(t0, 70));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].grant, Some(two_by));
        assert_eq!(changes[0].ended_after, Some(Duration::from_secs(10)));
        assert_eq!(
            book.since().into_keys().collect::<Vec<_>>(),
            vec![key(&one)]
        );
        assert_eq!(book.since()[&key(&one)], t0.time);
    }

    #[test]
    fn a_session_held_at_one_reading_only_is_seen_for_no_time() {
        let declared = Declared::new();
        let admitted = declared.admitted();
        let mut book = SessionBook::default();
        let t0 = ReadAt::now();
        book.read(&[], None, &admitted, t0);
        let one = session("iqn.t:a", "iqn.i:one", "10.0.0.1:1");
        book.read(std::slice::from_ref(&one), None, &admitted, at(t0, 1));
        let changes = book.read(&[], None, &admitted, at(t0, 31));
        assert_eq!(changes[0].ended_after, Some(Duration::ZERO));
        assert_eq!(changes[0].grant.as_ref().map(|g| g.uid.clone()), Some(None));
    }

    #[test]
    fn a_scoped_reading_leaves_the_sessions_of_other_targets_alone() {
        let declared = Declared::new();
        let admitted = declared.admitted();
        let mut book = SessionBook::default();
        let now = ReadAt::now();
        let elsewhere = session("iqn.t:b", "iqn.i:one", "10.0.0.1:1");
        book.read(std::slice::from_ref(&elsewhere), None, &admitted, now);
        let scope: BTreeSet<String> = ["iqn.t:a".to_owned()].into();
        let here = session("iqn.t:a", "iqn.i:one", "10.0.0.1:2");
        let changes = book.read(std::slice::from_ref(&here), Some(&scope), &admitted, now);
        assert_eq!(changes.len(), 1, "only the new session on the target read");
        assert!(book.read(&[here], Some(&scope), &admitted, now).is_empty());
        assert!(book.since().contains_key(&key(&elsewhere)));
    }

    #[test]
    fn a_session_no_acl_names_is_told_without_a_grant() {
        let declared = Declared::new();
        let admitted = declared.admitted();
        let mut book = SessionBook::default();
        let now = ReadAt::now();
        book.read(&[], None, &admitted, now);
        let upper = session("iqn.t:a", "IQN.I:ONE", "10.0.0.1:1");
        let changes = book.read(&[upper], None, &admitted, now);
        assert_eq!(
            changes[0].grant, None,
            "tgt and LIO compare names as written"
        );
    }

    #[test]
    fn the_same_initiator_from_two_addresses_is_two_sessions() {
        let declared = Declared::new();
        let admitted = declared.admitted();
        let mut book = SessionBook::default();
        let now = ReadAt::now();
        book.read(&[], None, &admitted, now);
        let two = [
            session("iqn.t:a", "iqn.i:one", "10.0.0.1:1"),
            session("iqn.t:a", "iqn.i:one", "10.0.1.1:1"),
        ];
        assert_eq!(book.read(&two, None, &admitted, now).len(), 2);
    }
}
