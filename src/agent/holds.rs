//! Grants held by heartbeat: when this node last saw each grant's Lease renewed, on its own
//! monotonic clock, and whether the grant is held now.
//!
//! A holder (`discus hold`, `discus connect --hold`) renews a Lease named after its grant, in the
//! grant's namespace and labelled `discus.dev/grant-heartbeat`. A node never compares the
//! holder's clock with its own; it dates a renewal by when it saw it, and fails closed wherever
//! that could overstate how recent the renewal is:
//! - a Lease first seen (at the agent's start, or created) is not a renewal;
//! - a renewal is dated by the renewal seen before it plus the time between the two on the
//!   holder's clock, never later than when it was seen: one learnt late (the watch was cut off,
//!   then listed again or resumed) counts from when it was made;
//! - a renewal after one this node could not date (the first after a start, or after a Lease
//!   without renew time) is dated when seen only if the time this node saw pass between the two
//!   matches the holder's (within half and twice, and 2 s): a burst of stale renewals delivered
//!   at once, or one learnt after a long silence, is not taken for a live one. The next renewal
//!   is then dated;
//! - a Lease deleted, released (no renew time) or no longer labelled holds nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher;

use super::stores::{Relevance, Wakers};
use crate::api::initiator_access::GRANT_HEARTBEAT_LABEL;
use crate::api::rules::MIN_GRACE_SECONDS;
use crate::desired::{Hold, ObjectKey, object_key};

/// One Lease as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Sighting {
    renewed: Option<Timestamp>,
    holder: Option<String>,
    /// When this node first saw `renewed`.
    seen: Instant,
    /// When the renewal was made, on this node's clock; `None` while it cannot be dated.
    at: Option<Instant>,
}

/// The holder and last renewal of a grant's Lease, for its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renewal {
    pub holder: Option<String>,
    pub renewed: Option<Timestamp>,
}

#[derive(Debug, Default)]
pub struct HoldTracker {
    seen: HashMap<ObjectKey, Sighting>,
}

impl HoldTracker {
    /// Takes in a Lease as the watch delivered it; returns whether a pass must run: a grant may
    /// be held now that was not, or was released. Never for a renewal of a grant that stayed
    /// held.
    pub fn observe(&mut self, lease: &Lease, now: Instant) -> bool {
        let spec = lease.spec.as_ref();
        let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
        let holder = spec.and_then(|s| s.holder_identity.clone());
        let key = object_key(&lease.metadata);
        let previous = self.seen.get(&key);
        let (at, seen) = match previous {
            None => (None, now),
            Some(before) if before.renewed == renewed => (before.at, before.seen),
            Some(before) => (renewal_time(before, renewed, now), now),
        };
        // Every grace is at least MIN_GRACE_SECONDS: a renewal sooner than that after the one
        // before kept the grant held throughout.
        let before = previous.and_then(|p| p.at);
        let renewed_after_a_lapse = at.is_some()
            && at != before
            && before.is_none_or(|b| now.saturating_duration_since(b) >= min_grace());
        // Released (`discus hold` stopped): access ends now.
        let released = at.is_none() && before.is_some();
        let may_turn = renewed_after_a_lapse || released;
        self.seen.insert(
            key,
            Sighting {
                renewed,
                holder,
                seen,
                at,
            },
        );
        may_turn
    }

    pub fn forget(&mut self, key: &ObjectKey) {
        self.seen.remove(key);
    }

    /// Keeps, of the Leases in `namespace` (all when `None`), only those listed (after a watch
    /// listed them again: the others are gone). Other namespaces' watches keep theirs.
    pub fn retain(&mut self, namespace: Option<&str>, listed: &HashSet<ObjectKey>) {
        self.seen
            .retain(|key, _| namespace.is_some_and(|n| key.namespace != n) || listed.contains(key));
    }

    /// Whether the grant `key`, held with `grace`, is held at `now`.
    pub fn judge(&self, key: &ObjectKey, grace: Duration, now: Instant) -> Hold {
        let Some(sighting) = self.seen.get(key) else {
            return Hold::Lapsed(format!(
                "no Lease {key} labelled {GRANT_HEARTBEAT_LABEL} found: its holder renews it \
                 (`discus hold`)"
            ));
        };
        let Some(at) = sighting.at else {
            return Hold::Lapsed(format!(
                "Lease {key}: no renewal this node could date since it began watching it (the \
                 holder renews it: `discus hold`); access comes with the next renewal"
            ));
        };
        let until = at + grace;
        if until > now {
            return Hold::Held { until };
        }
        let last = (sighting.renewed).map_or_else(|| "never".to_owned(), |t| t.to_string());
        Hold::Lapsed(format!(
            "Lease {key} not renewed within spec.heartbeat.graceSeconds ({}) as this node saw it; \
             last renewal {last} (on the holder's clock)",
            grace.as_secs()
        ))
    }

    pub fn renewal(&self, key: &ObjectKey) -> Option<Renewal> {
        self.seen.get(key).map(|s| Renewal {
            holder: s.holder.clone(),
            renewed: s.renewed,
        })
    }
}

fn min_grace() -> Duration {
    Duration::from_secs(u64::from(MIN_GRACE_SECONDS))
}

/// How far the time a node sees pass between two renewals may stray from the holder's, beyond
/// half and twice, for the later one to count as seen when made.
const JITTER: Duration = Duration::from_secs(2);

/// When a renewal first seen `now` was made, on this node's clock, if that can be told (see the
/// module's header). A holder's clock that went back counts nothing.
fn renewal_time(before: &Sighting, renewed: Option<Timestamp>, now: Instant) -> Option<Instant> {
    let (renewed, earlier) = (renewed?, before.renewed?);
    let gap = Duration::try_from(renewed.duration_since(earlier)).unwrap_or(Duration::ZERO);
    match before.at {
        Some(at) => Some(at.checked_add(gap).map_or(now, |t| t.min(now))),
        None => {
            let seen_gap = now.saturating_duration_since(before.seen);
            let live = seen_gap >= gap / 2 && seen_gap <= gap.saturating_mul(2) + JITTER;
            live.then_some(now)
        }
    }
}

/// Feeds the tracker from the watch of grant Leases, and wakes the sync when a grant may be
/// held again.
pub struct GrantLeases {
    pub tracker: Arc<Mutex<HoldTracker>>,
    /// The namespace the watch covers; all when `None`.
    namespace: Option<String>,
    /// The Leases listed so far while the watch lists again.
    relisted: Option<HashSet<ObjectKey>>,
}

impl GrantLeases {
    pub fn new(tracker: Arc<Mutex<HoldTracker>>, namespace: Option<String>) -> Self {
        Self {
            tracker,
            namespace,
            relisted: None,
        }
    }
}

impl Relevance<Lease> for GrantLeases {
    fn wake(&mut self, event: &watcher::Event<Lease>, wakers: &Wakers) {
        let now = Instant::now();
        let mut tracker = self.tracker.lock();
        let wake = match event {
            watcher::Event::Init => {
                self.relisted = Some(HashSet::new());
                false
            }
            watcher::Event::InitApply(lease) => {
                if let Some(listed) = &mut self.relisted {
                    listed.insert(object_key(&lease.metadata));
                }
                tracker.observe(lease, now)
            }
            watcher::Event::Apply(lease) => tracker.observe(lease, now),
            watcher::Event::Delete(lease) => {
                tracker.forget(&object_key(&lease.metadata));
                true
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.relisted.take() {
                    tracker.retain(self.namespace.as_deref(), &listed);
                }
                true
            }
        };
        if wake {
            wakers.sync.notify_one();
            wakers.aggregate.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    fn lease(renewed: Option<&str>) -> Lease {
        Lease {
            metadata: kube::api::ObjectMeta {
                name: Some("held".into()),
                namespace: Some("lab".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("client-1".into()),
                renew_time: renewed.map(|t| MicroTime(t.parse().expect("timestamp"))),
                ..Default::default()
            }),
        }
    }

    fn key() -> ObjectKey {
        ObjectKey::new("lab", "held")
    }

    fn held_until(hold: Hold) -> Instant {
        match hold {
            Hold::Held { until } => until,
            Hold::Lapsed(why) => panic!("lapsed: {why}"),
        }
    }

    /// A tracker that has seen `lease` renewed at 10:00:00 and, live, at 10:00:10 (`start`).
    fn held_since(start: Instant) -> HoldTracker {
        let mut tracker = HoldTracker::default();
        tracker.observe(
            &lease(Some("2026-12-02T10:00:00Z")),
            start - Duration::from_secs(10),
        );
        assert!(tracker.observe(&lease(Some("2026-12-02T10:00:10Z")), start));
        tracker
    }

    #[test]
    fn a_lease_first_seen_holds_nothing_until_a_renewal_seen_live() {
        let start = Instant::now();
        let mut tracker = HoldTracker::default();
        let lapsed = |t: &HoldTracker, at| matches!(t.judge(&key(), GRACE, at), Hold::Lapsed(_));
        assert!(
            matches!(tracker.judge(&key(), GRACE, start), Hold::Lapsed(why) if why.contains("no Lease lab/held"))
        );
        assert!(!tracker.observe(&lease(Some("2026-12-02T10:00:00Z")), start));
        assert!(lapsed(&tracker, start));
        // Seen again unchanged (a watch that listed again): still nothing.
        assert!(!tracker.observe(&lease(Some("2026-12-02T10:00:00Z")), start + GRACE));
        assert!(lapsed(&tracker, start + GRACE));
        // Renewed 10 s later on the holder's clock, seen 11 s later: live.
        let renewal = start + Duration::from_secs(11);
        let mut live = HoldTracker::default();
        live.observe(&lease(Some("2026-12-02T10:00:00Z")), start);
        assert!(live.observe(&lease(Some("2026-12-02T10:00:10Z")), renewal));
        assert_eq!(
            held_until(live.judge(&key(), GRACE, renewal)),
            renewal + GRACE
        );
        assert_eq!(
            live.renewal(&key()),
            Some(Renewal {
                holder: Some("client-1".into()),
                renewed: Some("2026-12-02T10:00:10Z".parse().expect("timestamp")),
            })
        );
    }

    #[test]
    fn stale_renewals_delivered_at_once_or_after_a_silence_are_not_taken_for_live_ones() {
        let start = Instant::now();
        // The agent started, saw the Lease, was cut off for an hour; listed again, it finds
        // a renewal the holder made 20 s after the one it saw, long ago.
        let mut tracker = HoldTracker::default();
        tracker.observe(&lease(Some("2026-12-02T10:00:00Z")), start);
        let back = start + Duration::from_secs(3600);
        assert!(!tracker.observe(&lease(Some("2026-12-02T10:00:20Z")), back));
        assert!(matches!(
            tracker.judge(&key(), GRACE, back),
            Hold::Lapsed(_)
        ));
        // A resumed watch replays renewals 10 s apart within milliseconds: none is live.
        let burst = back + Duration::from_millis(5);
        assert!(!tracker.observe(&lease(Some("2026-12-02T10:00:30Z")), burst));
        assert!(matches!(
            tracker.judge(&key(), GRACE, burst),
            Hold::Lapsed(_)
        ));
        // The holder is alive: its next renewal, 10 s later on both clocks, is.
        let live = burst + Duration::from_secs(10);
        assert!(tracker.observe(&lease(Some("2026-12-02T10:00:40Z")), live));
        assert_eq!(held_until(tracker.judge(&key(), GRACE, live)), live + GRACE);
    }

    #[test]
    fn renewals_hold_the_grant_and_silence_ends_it_after_the_grace() {
        let start = Instant::now();
        let mut tracker = held_since(start);
        // A renewal sooner than any grace after the last one changes nothing a pass must see.
        let later = start + Duration::from_secs(9);
        assert!(!tracker.observe(&lease(Some("2026-12-02T10:00:19Z")), later));
        assert_eq!(
            held_until(tracker.judge(&key(), GRACE, later)),
            later + GRACE
        );
        let silent = later + GRACE;
        match tracker.judge(&key(), GRACE, silent) {
            Hold::Lapsed(why) => assert!(
                why.contains("not renewed within spec.heartbeat.graceSeconds (30)")
                    && why.contains("last renewal 2026-12-02T10:00:19Z"),
                "{why}"
            ),
            held => panic!("{held:?}"),
        }
        // A renewal after the lapse may hold it again: a pass must run.
        assert!(tracker.observe(&lease(Some("2026-12-02T10:01:00Z")), silent));
        // Deleted: nothing holds it.
        tracker.forget(&key());
        assert!(matches!(
            tracker.judge(&key(), GRACE, silent),
            Hold::Lapsed(_)
        ));
    }

    #[test]
    fn a_renewal_learnt_late_counts_from_when_the_holder_made_it() {
        let start = Instant::now();
        let mut tracker = held_since(start);
        // Cut off for five minutes; the holder renewed 20 s after the last renewal seen, then
        // stopped. Learnt now, that renewal is five minutes old: not held.
        let back = start + Duration::from_secs(300);
        tracker.observe(&lease(Some("2026-12-02T10:00:30Z")), back);
        assert!(matches!(
            tracker.judge(&key(), GRACE, back),
            Hold::Lapsed(_)
        ));
        // A holder clock gone back counts nothing; one gone far ahead counts no later than now.
        tracker.observe(&lease(Some("2026-12-02T09:00:00Z")), back);
        assert!(matches!(
            tracker.judge(&key(), GRACE, back),
            Hold::Lapsed(_)
        ));
        tracker.observe(&lease(Some("2027-01-01T00:00:00Z")), back);
        assert_eq!(held_until(tracker.judge(&key(), GRACE, back)), back + GRACE);
    }

    #[test]
    fn a_release_ends_the_hold_at_once_and_a_renewal_after_it_is_dated_by_the_next() {
        let start = Instant::now();
        let mut tracker = held_since(start);
        assert!(
            tracker.observe(&lease(None), start),
            "a release ends access now"
        );
        assert!(matches!(
            tracker.judge(&key(), GRACE, start),
            Hold::Lapsed(_)
        ));
        let again = start + Duration::from_secs(60);
        tracker.observe(&lease(Some("2026-12-02T10:01:10Z")), again);
        assert!(matches!(
            tracker.judge(&key(), GRACE, again),
            Hold::Lapsed(_)
        ));
        let next = again + Duration::from_secs(4);
        assert!(tracker.observe(&lease(Some("2026-12-02T10:01:14Z")), next));
        assert_eq!(held_until(tracker.judge(&key(), GRACE, next)), next + GRACE);
    }

    #[test]
    fn a_watch_that_lists_again_forgets_only_its_own_namespace_s_leases() {
        let start = Instant::now();
        let mut tracker = held_since(start);
        tracker.retain(Some("other"), &HashSet::new());
        assert!(matches!(
            tracker.judge(&key(), GRACE, start),
            Hold::Held { .. }
        ));
        tracker.retain(Some("lab"), &HashSet::new());
        assert!(matches!(
            tracker.judge(&key(), GRACE, start),
            Hold::Lapsed(_)
        ));
    }

    #[test]
    fn a_renewal_sooner_than_the_shortest_grace_wakes_nothing_because_the_grant_stayed_held() {
        let start = Instant::now();
        let mut tracker = held_since(start);
        let shortest = min_grace();
        let just_before = start + shortest - Duration::from_millis(1);
        // Held throughout, even with the shortest grace allowed…
        assert!(matches!(
            tracker.judge(&key(), shortest, just_before),
            Hold::Held { .. }
        ));
        assert_eq!(
            crate::api::rules::grace_seconds(MIN_GRACE_SECONDS).ok(),
            Some(shortest)
        );
        // …so its renewal then needs no pass; one at the shortest grace does.
        assert!(!tracker.observe(&lease(Some("2026-12-02T10:00:19Z")), just_before));
        let mut tracker = held_since(start);
        assert!(tracker.observe(&lease(Some("2026-12-02T10:00:20Z")), start + shortest));
    }
}
