//! Which nodes' agents are alive, from their heartbeat Leases, as the lease holder sees them.
//!
//! Judged by when the holder saw a heartbeat change, on its own monotonic clock — never by
//! comparing another node's clock with its own — so clock skew between nodes cannot make a live
//! node look dead. A node silent for `lost_after` is lost: its entries are marked, not trusted.
//! Silent for `lost_after + prune_after`, it is gone: its entries are removed, so that a node that
//! left never holds a resource back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;

use crate::api::disc_image::{DiscImageNodeStatus, ImagePhase};
use crate::api::initiator_access::AccessNodeStatus;
use crate::api::iscsi_target::TargetNodeStatus;
use crate::reasons::Reason;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    Live,
    /// With the message its entries get.
    Lost(String),
    Gone,
}

#[derive(Debug)]
pub struct Tracker {
    started: Instant,
    lost_after: Duration,
    prune_after: Duration,
    /// Per node: the last renew time seen, and when the holder saw it change.
    seen: HashMap<String, (Option<String>, Instant)>,
    /// The nodes whose heartbeat the holder saw renewed: live for certain, not merely new to it.
    renewing: std::collections::HashSet<String>,
}

impl Tracker {
    pub fn new(now: Instant, lost_after: Duration, prune_after: Duration) -> Self {
        Self {
            started: now,
            lost_after,
            prune_after,
            seen: HashMap::new(),
            renewing: std::collections::HashSet::new(),
        }
    }

    /// Takes in the heartbeat Leases as they are now; returns whether a node that was not live
    /// (or not known) is live now.
    pub fn observe<'a>(
        &mut self,
        leases: impl IntoIterator<Item = &'a Lease>,
        now: Instant,
    ) -> bool {
        let mut revived = false;
        for lease in leases {
            let Some(spec) = &lease.spec else { continue };
            let Some(node) = &spec.holder_identity else {
                continue;
            };
            let renewed = spec.renew_time.as_ref().map(|t| t.0.to_string());
            let was_live = self.seen.contains_key(node) && self.of(node, now) == Liveness::Live;
            match self.seen.get_mut(node) {
                Some((last, at)) if *last != renewed => {
                    *last = renewed;
                    *at = now;
                    // Seen renewing for the first time: a lost mark it kept may go.
                    revived |= self.renewing.insert(node.clone());
                }
                Some(_) => {}
                None => {
                    self.seen.insert(node.clone(), (renewed, now));
                }
            }
            revived |= !was_live && self.of(node, now) == Liveness::Live;
        }
        revived
    }

    pub fn of(&self, node: &str, now: Instant) -> Liveness {
        // A node never seen has been silent since the holder started looking.
        let (renewed, at) = self
            .seen
            .get(node)
            .map_or((None, self.started), |(r, at)| (r.as_deref(), *at));
        let silent = now.saturating_duration_since(at);
        if silent < self.lost_after {
            Liveness::Live
        } else if silent < self.lost_after + self.prune_after {
            Liveness::Lost(match renewed {
                Some(time) => {
                    format!("the agent of node {node} stopped reporting (last heartbeat at {time})")
                }
                None => format!("the agent of node {node} is not reporting (no heartbeat)"),
            })
        } else {
            Liveness::Gone
        }
    }

    /// Forgets every heartbeat seen, as a holder taking the lease again must: what it saw while
    /// it held the lease before tells nothing of what happened since.
    pub fn restart(&mut self, now: Instant) {
        self.started = now;
        self.seen.clear();
        self.renewing.clear();
    }

    /// Whether the holder saw `node`'s heartbeat renewed, not only present: a holder new to the
    /// lease takes a node it has just seen for live until `lost_after`, even one long dead.
    pub fn seen_renewing(&self, node: &str) -> bool {
        self.renewing.contains(node)
    }

    /// The next moment a node's liveness changes, if any does.
    pub fn next_change<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) -> Option<Instant> {
        nodes
            .into_iter()
            .filter_map(|node| {
                let at = self.seen.get(node).map_or(self.started, |(_, at)| *at);
                [
                    at + self.lost_after,
                    at + self.lost_after + self.prune_after,
                ]
                .into_iter()
                .find(|t| *t > now)
            })
            .min()
    }
}

/// A node's entry in a resource's status, as the lease holder marks it when the node is lost.
pub trait NodeEntry: Clone {
    fn node(&self) -> &str;
    fn mark_lost(&mut self, message: &str);
    fn is_marked_lost(&self) -> bool;
}

impl NodeEntry for DiscImageNodeStatus {
    fn node(&self) -> &str {
        &self.node
    }
    fn mark_lost(&mut self, message: &str) {
        self.phase = ImagePhase::Unknown;
        self.reason = Some(Reason::NodeLost.to_string());
        self.message = Some(message.into());
    }
    fn is_marked_lost(&self) -> bool {
        self.reason.as_deref() == Some(Reason::NodeLost.as_str())
    }
}

impl NodeEntry for TargetNodeStatus {
    fn node(&self) -> &str {
        &self.node
    }
    fn mark_lost(&mut self, message: &str) {
        self.ready = false;
        self.reason = Some(Reason::NodeLost.to_string());
        self.message = Some(message.into());
    }
    fn is_marked_lost(&self) -> bool {
        self.reason.as_deref() == Some(Reason::NodeLost.as_str())
    }
}

impl NodeEntry for AccessNodeStatus {
    fn node(&self) -> &str {
        &self.node
    }
    fn mark_lost(&mut self, message: &str) {
        self.applied = false;
        self.reason = Some(Reason::NodeLost.to_string());
        self.message = Some(message.into());
    }
    fn is_marked_lost(&self) -> bool {
        self.reason.as_deref() == Some(Reason::NodeLost.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(node: &str, renewed: &str) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(node.into()),
                renew_time: Some(MicroTime(renewed.parse().expect("time"))),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn silence_is_measured_on_the_holders_clock() {
        let start = Instant::now();
        let s = Duration::from_secs;
        let mut tracker = Tracker::new(start, s(40), s(300));
        // a's clock is an hour behind: only whether its heartbeat changes counts.
        tracker.observe(
            &[
                lease("a", "2026-11-21T11:00:00Z"),
                lease("b", "2026-11-21T12:00:00Z"),
            ],
            start,
        );
        tracker.observe(
            &[
                lease("a", "2026-11-21T11:00:10Z"),
                lease("b", "2026-11-21T12:00:00Z"),
            ],
            start + s(30),
        );

        assert_eq!(tracker.of("a", start + s(60)), Liveness::Live);
        assert_eq!(
            tracker.of("b", start + s(60)),
            Liveness::Lost(
                "the agent of node b stopped reporting (last heartbeat at 2026-11-21T12:00:00Z)"
                    .into()
            )
        );
        assert_eq!(tracker.of("b", start + s(340)), Liveness::Gone);
        assert!(matches!(
            tracker.of("never-seen", start + s(41)),
            Liveness::Lost(_)
        ));
        assert_eq!(tracker.of("never-seen", start + s(39)), Liveness::Live);

        assert_eq!(
            tracker.next_change(["a", "b"], start + s(60)),
            Some(start + s(70))
        );
        assert_eq!(
            tracker.next_change(["b"], start + s(60)),
            Some(start + s(340))
        );
        assert_eq!(tracker.next_change(["b"], start + s(400)), None);
    }

    #[test]
    fn only_a_node_coming_back_or_appearing_is_news() {
        let start = Instant::now();
        let s = Duration::from_secs;
        let mut tracker = Tracker::new(start, s(40), s(300));
        assert!(
            tracker.observe(&[lease("a", "2026-11-21T12:00:00Z")], start),
            "a new node"
        );
        assert!(
            tracker.observe(&[lease("a", "2026-11-21T12:00:10Z")], start + s(10)),
            "its first renewal seen: a lost mark kept for it may go"
        );
        assert!(
            !tracker.observe(&[lease("a", "2026-11-21T12:00:20Z")], start + s(20)),
            "a renewal of a live node"
        );
        // Silent past lost_after, then renewed: back.
        assert!(tracker.observe(&[lease("a", "2026-11-21T12:05:00Z")], start + s(100)));
    }
}
