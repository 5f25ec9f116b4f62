//! Grants held by heartbeat: when this node last saw each grant's Lease renewed, on its own
//! monotonic clock, and whether the grant is held now.
//!
//! A holder (`discus hold`, `discus connect --hold`) renews a Lease named after its grant, in the
//! grant's namespace and labelled `discus.dev/grant-heartbeat`. A node never compares the
//! holder's clock with its own. It fails closed everywhere:
//! - a Lease first seen (at the agent's start, or created) is not a renewal: the grant is held
//!   from the first renewal this node sees;
//! - a renewal learnt late (the watch was cut off, then listed again) counts from when it was
//!   made, reckoned on the holder's clock as the time since the renewal seen before it: a holder
//!   that stopped while the node was cut off is not held again for a grace;
//! - a Lease deleted, or no longer labelled, holds nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

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
    /// When the last renewal this node knows of was made, on this node's clock; `None` until
    /// this node sees one.
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
        let at = match previous {
            None => None,
            Some(before) if before.renewed == renewed => before.at,
            Some(before) => renewal_time(before, renewed, now),
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
                at,
            },
        );
        may_turn
    }

    pub fn forget(&mut self, key: &ObjectKey) {
        self.seen.remove(key);
    }

    /// Keeps only these Leases (after the watch listed again: the others are gone).
    pub fn retain(&mut self, listed: &HashSet<ObjectKey>) {
        self.seen.retain(|key, _| listed.contains(key));
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
                "Lease {key} not renewed since this node began watching it: access comes with \
                 the next renewal"
            ));
        };
        let until = at + grace;
        if until > now {
            Hold::Held { until }
        } else {
            Hold::Lapsed(format!(
                "Lease {key} last renewed {}s ago as this node saw it; spec.heartbeat.graceSeconds \
                 is {}",
                now.saturating_duration_since(at).as_secs(),
                grace.as_secs()
            ))
        }
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

/// When a renewal first seen `now` was made, on this node's clock: the renewal seen before it,
/// plus the time between the two on the holder's clock, and never later than now. Without a
/// renewal before it to reckon from, now. A holder's clock that went back counts nothing.
fn renewal_time(before: &Sighting, renewed: Option<Timestamp>, now: Instant) -> Option<Instant> {
    let renewed = renewed?;
    let (Some(earlier), Some(seen)) = (before.renewed, before.at) else {
        return Some(now);
    };
    let gap = Duration::try_from(renewed.duration_since(earlier)).unwrap_or(Duration::ZERO);
    Some(seen.checked_add(gap).map_or(now, |at| at.min(now)))
}

/// Feeds the tracker from the watch of grant Leases, and wakes the sync when a grant may be
/// held again.
pub struct GrantLeases {
    pub tracker: Arc<Mutex<HoldTracker>>,
    /// The Leases listed so far while the watch lists again.
    relisted: Option<HashSet<ObjectKey>>,
}

impl GrantLeases {
    pub fn new(tracker: Arc<Mutex<HoldTracker>>) -> Self {
        Self {
            tracker,
            relisted: None,
        }
    }
}

impl Relevance<Lease> for GrantLeases {
    fn wake(&mut self, event: &watcher::Event<Lease>, wakers: &Wakers) {
        let now = Instant::now();
        let mut tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
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
                    tracker.retain(&listed);
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

    #[test]
    fn a_lease_first_seen_holds_nothing_until_this_node_sees_it_renewed() {
        let start = Instant::now();
        let mut tracker = HoldTracker::default();
        assert!(
            matches!(tracker.judge(&key(), GRACE, start), Hold::Lapsed(why) if why.contains("no Lease lab/held"))
        );
        assert!(!tracker.observe(&lease(Some("2026-12-02T10:00:00Z")), start));
        assert!(
            matches!(tracker.judge(&key(), GRACE, start), Hold::Lapsed(why) if why.contains("not renewed since"))
        );
        // Seen again unchanged (a watch that listed again): still nothing.
        assert!(!tracker.observe(&lease(Some("2026-12-02T10:00:00Z")), start + GRACE));
        let renewal = start + Duration::from_secs(40);
        assert!(tracker.observe(&lease(Some("2026-12-02T10:00:10Z")), renewal));
        assert_eq!(
            held_until(tracker.judge(&key(), GRACE, renewal)),
            renewal + GRACE
        );
        assert_eq!(
            tracker.renewal(&key()),
            Some(Renewal {
                holder: Some("client-1".into()),
                renewed: Some("2026-12-02T10:00:10Z".parse().expect("timestamp")),
            })
        );
    }

    #[test]
    fn renewals_hold_the_grant_and_silence_ends_it_after_the_grace() {
        let start = Instant::now();
        let mut tracker = HoldTracker::default();
        tracker.observe(&lease(Some("2026-12-02T10:00:00Z")), start);
        assert!(tracker.observe(&lease(Some("2026-12-02T10:00:10Z")), start));
        // A renewal sooner than any grace after the last one changes nothing a pass must see.
        let later = start + Duration::from_secs(9);
        assert!(!tracker.observe(&lease(Some("2026-12-02T10:00:19Z")), later));
        assert_eq!(
            held_until(tracker.judge(&key(), GRACE, later)),
            later + GRACE
        );
        let silent = later + GRACE;
        match tracker.judge(&key(), GRACE, silent) {
            Hold::Lapsed(why) => assert!(why.contains("last renewed 30s ago"), "{why}"),
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
        let mut tracker = HoldTracker::default();
        tracker.observe(&lease(Some("2026-12-02T10:00:00Z")), start);
        tracker.observe(&lease(Some("2026-12-02T10:00:10Z")), start);
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
    fn a_lease_without_renew_time_holds_nothing() {
        let start = Instant::now();
        let mut tracker = HoldTracker::default();
        tracker.observe(&lease(Some("2026-12-02T10:00:00Z")), start);
        tracker.observe(&lease(Some("2026-12-02T10:00:10Z")), start);
        assert!(
            tracker.observe(&lease(None), start),
            "a release ends access now"
        );
        assert!(matches!(
            tracker.judge(&key(), GRACE, start),
            Hold::Lapsed(_)
        ));
    }
}
