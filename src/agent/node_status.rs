//! Each agent's own entry in every resource's `status.nodes`: applied with a field manager that
//! belongs to its node alone, holding that one entry and nothing else, and only when it differs
//! from what the resource already says — so agents never take each other's entries and, at rest,
//! write nothing.
//!
//! A write made counts as in flight, and is not made again, until the store shows it — for
//! `IN_FLIGHT_FOR` at most. Without that bound, an entry that someone else changed before this
//! node's store showed the write (the lease holder pruning a node it thought lost while the
//! watches were failing) was never written again: the API fault tests saw a grant's status stay
//! wrong for good after watches ended with 410 Gone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::core::DeserializeGuard;
use kube::{Client, Resource};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::api::disc_image::{DiscImageNodeStatus, ImagePhase};
use crate::api::initiator_access::AccessNodeStatus;
use crate::api::iscsi_target::TargetNodeStatus;
use crate::desired::{Kind, ObjectKey, object_key};
use crate::metrics::Metrics;
use crate::status;
use crate::sync::NodeReport;

use super::coalesce::{Coalescer, Standing, When, earliest};
use super::events::{Observed, State, Summary};
use super::stores::Stores;
use super::{StatusBody, apply_status, status_body};

/// How many status writes are in flight at once.
const CONCURRENT_WRITES: usize = 16;

/// The field manager of a node's entries: a hash, because managers are limited to 128
/// characters and node names are not.
pub fn field_manager(node: &str) -> String {
    format!(
        "discus-node-{}",
        &hex::encode(Sha256::digest(node.as_bytes()))[..16]
    )
}

pub struct NodeStatusWriter {
    client: Client,
    node: String,
    manager: String,
    /// Entries written and not yet seen in the stores, so that a pass right after a write does
    /// not write the same again.
    in_flight: Mutex<HashMap<(Kind, ObjectKey), InFlight>>,
    /// Entries that only report progress wait here for the next (see `coalesce`).
    coalescer: Mutex<Coalescer<(Kind, ObjectKey)>>,
    metrics: Arc<Metrics>,
}

/// How long a write counts as in flight. The store normally shows it within a second; one it
/// does not show by then (another writer changed the entry first, or the watch is failing) is
/// written again, at most once a pass.
pub const IN_FLIGHT_FOR: Duration = Duration::from_secs(15);

/// A write made (`None`: an entry removed), until the store shows it or `IN_FLIGHT_FOR` passed.
#[derive(Clone, Debug)]
pub struct InFlight {
    body: Option<StatusBody>,
    /// The object's resourceVersion right after the write.
    version: Option<String>,
    /// What it said, for when the next write goes out (`coalesce`).
    standing: Standing,
    at: Instant,
}

impl InFlight {
    pub fn new(body: Option<StatusBody>, standing: Standing, version: Option<String>) -> Self {
        Self {
            body,
            version,
            standing,
            at: Instant::now(),
        }
    }

    pub fn standing(&self) -> Standing {
        self.standing
    }

    /// Whether writing `body` now would repeat this write while it may still land.
    pub fn repeats(&self, body: Option<&RawValue>, now: Instant) -> bool {
        self.body.as_deref().map(RawValue::get) == body.map(RawValue::get)
            && now.saturating_duration_since(self.at) < IN_FLIGHT_FOR
    }

    pub fn body(&self) -> Option<&RawValue> {
        self.body.as_deref()
    }

    /// Whether the object is still as this write left it (`version`: its resourceVersion now).
    pub fn unchanged_at(&self, version: Option<&str>) -> bool {
        self.version.is_some() && self.version.as_deref() == version
    }
}

/// What one publication did, and what the node's entries say (for events).
#[derive(Debug, Default)]
pub struct Published {
    pub written: usize,
    pub failed: usize,
    pub observed: Observed,
    /// When the earliest entry held back falls due: publish again then.
    pub held_until: Option<Instant>,
}

impl NodeStatusWriter {
    pub fn new(client: Client, node: &str, status_settle: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            node: node.to_owned(),
            manager: field_manager(node),
            in_flight: Mutex::default(),
            coalescer: Mutex::new(Coalescer::new(status_settle)),
            metrics,
        }
    }

    /// Brings this node's entry of every resource in line with the report.
    pub async fn publish(&self, stores: &Stores, report: &NodeReport) -> Published {
        let mut writes = Vec::new();
        let mut observed = Observed::default();
        let mut held_until = None;
        let mut out = Collected {
            writes: &mut writes,
            observed: &mut observed,
            held_until: &mut held_until,
            now: Instant::now(),
        };
        self.collect(Kind::DiscImage, stores.images(), &mut out, |image| {
            (
                status::image_entry(image, report),
                image
                    .status
                    .iter()
                    .flat_map(|s| &s.nodes)
                    .find(|e| e.node == self.node)
                    .cloned(),
            )
        });
        self.collect(Kind::IscsiTarget, stores.targets(), &mut out, |target| {
            (
                status::target_entry(target, report),
                target
                    .status
                    .iter()
                    .flat_map(|s| &s.nodes)
                    .find(|e| e.node == self.node)
                    .cloned(),
            )
        });
        self.collect(Kind::InitiatorAccess, stores.grants(), &mut out, |grant| {
            (
                status::grant_entry(grant, report),
                grant
                    .status
                    .iter()
                    .flat_map(|s| &s.nodes)
                    .find(|e| e.node == self.node)
                    .cloned(),
            )
        });
        self.coalescer.lock().forget_stale(Instant::now());
        // What was written for objects deleted since is of no use any more.
        let present = stores.keys();
        self.in_flight.lock().retain(|key, _| present.contains(key));
        let total = writes.len();
        let mut results = std::pin::pin!(
            futures::stream::iter(writes)
                .map(|write| self.write(write))
                .buffer_unordered(CONCURRENT_WRITES)
        );
        let (mut written, mut failed) = (0, 0);
        while let Some(outcome) = results.next().await {
            match outcome {
                Outcome::Written => written += 1,
                Outcome::Refused => failed += 1,
                // The apiserver is unwell: the writes not done yet wait for the next round
                // instead of adding to its load (those in flight are dropped; each is whole).
                Outcome::Unwell => {
                    failed = total - written;
                    break;
                }
            }
        }
        Published {
            written,
            failed,
            observed,
            held_until,
        }
    }

    /// The writes one kind needs: where the wanted entry differs from the object's and from
    /// what is in flight, and is due (see `coalesce`).
    fn collect<K, E>(
        &self,
        kind: Kind,
        objects: impl Iterator<Item = Arc<DeserializeGuard<K>>>,
        out: &mut Collected<'_>,
        entries: impl Fn(&K) -> (Option<E>, Option<E>),
    ) where
        K: Resource<DynamicType = ()>,
        E: Serialize + PartialEq + Summary + Coalesced,
    {
        let mut in_flight = self.in_flight.lock();
        let mut coalescer = self.coalescer.lock();
        for guarded in objects {
            let Ok(object) = &guarded.0 else {
                continue;
            };
            let (wanted, current) = entries(object);
            if let Some(entry) = &wanted {
                out.observed.insert(kind, object, entry.state());
            }
            let key = (kind, object_key(object.meta()));
            if wanted == current {
                in_flight.remove(&key);
                coalescer.settled(&key);
                continue;
            }
            let standing = match (&wanted, &current) {
                // A new spec applied goes out at once: the lease holder holds Ready back until
                // every node's entry says it applied it. (An entry written before entries had
                // generations gets one like any other change of detail: an upgrade is no burst.)
                (Some(w), Some(c)) if c.generation().is_some_and(|g| w.generation() != Some(g)) => {
                    Standing::Final
                }
                (Some(w), _) => w.standing(),
                (None, _) => Standing::Final,
            };
            let entry = match wanted.as_ref().map(status_body) {
                Some(None) => continue,
                entry => entry.flatten(),
            };
            let written = in_flight.get(&key);
            if written.is_some_and(|f| f.repeats(entry.as_deref(), out.now)) {
                continue;
            }
            let current = current.as_ref().map(Coalesced::standing);
            let written = written.map(InFlight::standing);
            if let When::At(at) = coalescer.due(&key, standing, current, written, out.now) {
                *out.held_until = earliest(*out.held_until, Some(at));
                continue;
            }
            out.writes.push(Write {
                kind: key.0,
                key: key.1,
                entry,
                standing,
            });
        }
    }

    async fn write(&self, write: Write) -> Outcome {
        // Without the entry, the apply drops it: this manager owned it alone.
        let status = (write.entry.as_deref()).map(|entry| NodeEntries { nodes: [entry] });
        let result =
            apply_status(&self.client, write.kind, &write.key, &self.manager, status).await;
        self.metrics
            .status_written(!matches!(&result, Err(e) if !is_not_found(e)));
        match result {
            Ok(version) => {
                let written = InFlight::new(write.entry, write.standing, version);
                let key = (write.kind, write.key);
                // Out: the next change waits anew. (One that failed is not settled: it is
                // tried again as the publisher's backoff says, not held once more.)
                self.coalescer.lock().settled(&key);
                self.in_flight.lock().insert(key, written);
                Outcome::Written
            }
            // Deleted meanwhile: nothing to report on.
            Err(kube::Error::Api(status)) if status.code == 404 => Outcome::Written,
            Err(error) => {
                tracing::warn!(kind = write.kind.as_str(), object = %write.key, %error, "cannot write this node's status entry");
                if apiserver_unwell(&error) {
                    Outcome::Unwell
                } else {
                    Outcome::Refused
                }
            }
        }
    }
}

/// What `collect` gathers over the kinds of one publication.
struct Collected<'a> {
    writes: &'a mut Vec<Write>,
    observed: &'a mut Observed,
    held_until: &'a mut Option<Instant>,
    now: Instant,
}

/// How soon an entry is written (see `coalesce`): a failure, an expiry or anything only a
/// person can fix at once, even beside a Ready (a grant applied whose boot LUN is missing).
trait Coalesced {
    fn standing(&self) -> Standing;
    /// The generation of the spec the entry describes.
    fn generation(&self) -> Option<i64>;
}

fn standing_of(state: State, reason: Option<&str>) -> Standing {
    match state {
        _ if reason.is_some_and(status::is_stalling) => Standing::Final,
        State::Good => Standing::Ready,
        State::Pending => Standing::Passing,
        State::Expired | State::Stalled { .. } => Standing::Final,
    }
}

impl Coalesced for TargetNodeStatus {
    fn standing(&self) -> Standing {
        standing_of(self.state(), self.reason.as_deref())
    }
    fn generation(&self) -> Option<i64> {
        self.observed_generation
    }
}

impl Coalesced for AccessNodeStatus {
    fn standing(&self) -> Standing {
        standing_of(self.state(), self.reason.as_deref())
    }
    fn generation(&self) -> Option<i64> {
        self.observed_generation
    }
}

impl Coalesced for DiscImageNodeStatus {
    fn standing(&self) -> Standing {
        match self.phase {
            // Failed even without a reason: the lease holder makes it Stalled.
            ImagePhase::Failed => Standing::Final,
            _ => standing_of(self.state(), self.reason.as_deref()),
        }
    }
    fn generation(&self) -> Option<i64> {
        self.observed_generation
    }
}

/// How one write went.
enum Outcome {
    /// Written, or nothing left to write.
    Written,
    /// Refused for this object (a conflict, an invalid entry): the others go on.
    Refused,
    /// The apiserver is unwell: too many requests, a server error, no answer.
    Unwell,
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// Whether an error says the apiserver cannot take requests now, whatever the object: too many
/// requests, a server error, or no answer at all.
fn apiserver_unwell(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        _ => true,
    }
}

struct Write {
    kind: Kind,
    key: ObjectKey,
    entry: Option<StatusBody>,
    standing: Standing,
}

/// The status a node applies: its one entry.
#[derive(Debug, Serialize)]
struct NodeEntries<'a> {
    nodes: [&'a RawValue; 1],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_wait_for_nothing_even_beside_a_ready() {
        let image = |phase, reason: Option<&str>| DiscImageNodeStatus {
            phase,
            reason: reason.map(str::to_owned),
            ..DiscImageNodeStatus::default()
        };
        // A failed import says no reason on the node: still a failure.
        assert_eq!(image(ImagePhase::Failed, None).standing(), Standing::Final);
        assert_eq!(
            image(ImagePhase::Downloading, None).standing(),
            Standing::Passing
        );
        assert_eq!(image(ImagePhase::Ready, None).standing(), Standing::Ready);
        // Applied, but its boot LUN is missing: a person must act.
        let grant = AccessNodeStatus {
            applied: true,
            reason: Some("BootLunNotFound".to_owned()),
            ..AccessNodeStatus::default()
        };
        assert_eq!(grant.standing(), Standing::Final);
        let expired = AccessNodeStatus {
            reason: Some("Expired".to_owned()),
            ..AccessNodeStatus::default()
        };
        assert_eq!(expired.standing(), Standing::Final);
        let waiting = TargetNodeStatus {
            reason: Some("ImageNotReady".to_owned()),
            ..TargetNodeStatus::default()
        };
        assert_eq!(waiting.standing(), Standing::Passing);
    }

    #[test]
    fn a_write_the_store_never_shows_is_made_again_after_a_while() {
        let body =
            |applied| status_body(&serde_json::json!({"node": "node-a", "applied": applied}));
        let entry = body(true);
        let written = InFlight::new(entry.clone(), Standing::Ready, None);
        let now = Instant::now();
        assert!(
            written.repeats(entry.as_deref(), now),
            "just written: in flight"
        );
        let other = body(false);
        assert!(
            !written.repeats(other.as_deref(), now),
            "another entry is another write"
        );
        assert!(!written.repeats(None, now), "removing it is another write");
        // Pruned by the lease holder before this node's store showed it: written again.
        let later = now + IN_FLIGHT_FOR;
        assert!(!written.repeats(entry.as_deref(), later));
    }

    #[test]
    fn only_errors_of_the_apiserver_itself_stop_a_round_of_writes() {
        let answer = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        for code in [429, 500, 503, 504] {
            assert!(apiserver_unwell(&answer(code)), "{code}");
        }
        for code in [400, 403, 409, 422] {
            assert!(!apiserver_unwell(&answer(code)), "{code}");
        }
        let lost = kube::Error::Service("no answer from the apiserver".into());
        assert!(apiserver_unwell(&lost));
    }
}
