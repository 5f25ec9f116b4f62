//! This node's entries — what it made of every object — go to the lease holder in the node's
//! reports (`reports`), a shard written only when an entry in it differs from what the reports
//! already say: at rest, nothing. The lease holder merges them into each object's status.
//!
//! The node alone writes its reports, so what it last wrote is what they say: a shard written
//! counts as in flight until the store shows it — for `IN_FLIGHT_FOR` at most. Past that, the
//! store is believed: a shard it never shows (the lease holder deleted the reports of a node it
//! thought gone while this node's watches were failing) is written again. Without that bound, the
//! API fault tests saw a status stay wrong for good after watches ended with 410 Gone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::{Api, Client, Resource, ResourceExt};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
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
use super::heartbeat::node_hash;
use super::reports::{self, REPORT_LABEL, Reported, ShardName, shard_count};
use super::stores::Stores;
use super::{bounded, status_body};

/// How many report writes are in flight at once.
const CONCURRENT_WRITES: usize = 4;

/// The field manager of a node's reports: a hash, because managers are limited to 128
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
    /// Where the reports live (the agents' namespace).
    namespace: String,
    manager: String,
    /// The shards as this node last wrote them (or read them, after a start).
    shards: Mutex<BTreeMap<ShardName, Shard>>,
    /// Entries that only report progress wait here for the next (see `coalesce`).
    coalescer: Mutex<Coalescer<(Kind, ObjectKey)>>,
    metrics: Arc<Metrics>,
}

/// How long a write counts as in flight. The store normally shows it within a second; one it
/// does not show by then (another writer changed it first, or the watch is failing) is
/// believed no more.
pub const IN_FLIGHT_FOR: Duration = Duration::from_secs(15);

/// What one object's entry says, as this node wants it or wrote it.
#[derive(Clone, Debug)]
struct Entry {
    reported: Reported,
    /// For when a change of it goes out (`coalesce`).
    standing: Standing,
    /// The generation of the spec it describes.
    generation: Option<i64>,
}

type Entries = BTreeMap<(Kind, ObjectKey), Entry>;

/// One shard of this node's report, as written.
#[derive(Debug)]
struct Shard {
    entries: Entries,
    /// The ConfigMap's resourceVersion right after the write.
    version: Option<String>,
    at: Instant,
}

/// A shard to write, or to delete (one of a count the node no longer has).
struct ShardWrite {
    name: ShardName,
    entries: Entries,
    delete: bool,
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
    pub fn new(
        client: Client,
        node: &str,
        namespace: &str,
        status_settle: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            node: node.to_owned(),
            namespace: namespace.to_owned(),
            manager: field_manager(node),
            shards: Mutex::default(),
            coalescer: Mutex::new(Coalescer::new(status_settle)),
            metrics,
        }
    }

    /// Brings this node's reports in line with the pass's report: the shards whose entries
    /// changed (and are due), then — once all of those are written — the shards of an old count.
    pub async fn publish(&self, stores: &Stores, report: &NodeReport) -> Published {
        let mut observed = Observed::default();
        let mut wanted = Wanted::default();
        collect(
            Kind::DiscImage,
            stores.images(),
            &mut wanted,
            &mut observed,
            |i| status::image_entry(i, report),
        );
        collect(
            Kind::IscsiTarget,
            stores.targets(),
            &mut wanted,
            &mut observed,
            |t| status::target_entry(t, report),
        );
        collect(
            Kind::InitiatorAccess,
            stores.grants(),
            &mut wanted,
            &mut observed,
            |g| status::grant_entry(g, report),
        );
        let (writes, held_until) = self.plan(stores, wanted, Instant::now());
        let (deletions, writes): (Vec<_>, Vec<_>) = writes.into_iter().partition(|w| w.delete);
        let (mut written, mut failed) = self.write_all(writes).await;
        if failed == 0 {
            let (deleted, not_deleted) = self.write_all(deletions).await;
            (written, failed) = (written + deleted, not_deleted);
        } else {
            failed += deletions.len();
        }
        Published {
            written,
            failed,
            observed,
            held_until,
        }
    }

    /// The shards to write now, and when the earliest held back falls due.
    fn plan(
        &self,
        stores: &Stores,
        mut wanted: Wanted,
        now: Instant,
    ) -> (Vec<ShardWrite>, Option<Instant>) {
        let mut shards = self.shards.lock();
        self.believe_the_store(&mut shards, stores, now);
        // Where each object's entry is now, whatever the count.
        let current: HashMap<&(Kind, ObjectKey), (&ShardName, &Entry)> = (shards.iter())
            .flat_map(|(name, shard)| shard.entries.iter().map(move |(k, e)| (k, (name, e))))
            .collect();
        // An entry that cannot be written stays as it is: not written is not "nothing to say".
        for key in &wanted.unwritable {
            if let Some((_, entry)) = current.get(key) {
                wanted.entries.insert(key.clone(), (*entry).clone());
            }
        }
        let count = shard_count(wanted.entries.len());
        let mut grouped: BTreeMap<ShardName, Entries> = BTreeMap::new();
        for (key, entry) in wanted.entries {
            let name = ShardName::of(key.0, &key.1, count);
            grouped.entry(name).or_default().insert(key, entry);
        }
        // Every shard of the count is written, even without entries: a node with reports is
        // one whose reports say what its entries are (see `leader`), none included.
        let names: BTreeSet<ShardName> = (0..count)
            .map(|shard| ShardName { shard, count })
            .chain(shards.keys().cloned())
            .collect();
        let mut coalescer = self.coalescer.lock();
        let (mut writes, mut held_until) = (Vec::new(), None);
        for name in names {
            let entries = grouped.remove(&name).unwrap_or_default();
            let delete = name.count != count;
            let due = match shards.get(&name) {
                _ if delete => Some(When::Now),
                None => Some(When::Now),
                Some(shard) => {
                    let written = Some(&shard.entries);
                    shard_due(&mut coalescer, &name, &entries, written, &current, now)
                }
            };
            match due {
                None => {}
                Some(When::At(at)) => held_until = earliest(held_until, Some(at)),
                Some(When::Now) => writes.push(ShardWrite {
                    name,
                    entries,
                    delete,
                }),
            }
        }
        coalescer.forget_stale(now);
        (writes, held_until)
    }

    /// Takes in what the store shows of this node's reports: a shard it shows as this node
    /// last wrote it, or that was written a moment ago, is as written; one changed by someone
    /// else is read back; one gone for a while is gone.
    fn believe_the_store(
        &self,
        shards: &mut BTreeMap<ShardName, Shard>,
        stores: &Stores,
        now: Instant,
    ) {
        let recent = |shard: &Shard| now.saturating_duration_since(shard.at) < IN_FLIGHT_FOR;
        let mut stored = BTreeSet::new();
        for config_map in stores.reports_of(&node_hash(&self.node)) {
            let read = reports::read(&config_map)
                .ok()
                .filter(|r| r.node == self.node);
            let Some(report) = read else { continue };
            stored.insert(report.name.clone());
            let version = config_map.resource_version();
            if let Some(shard) = shards.get(&report.name)
                && (shard.version == version || recent(shard))
            {
                continue;
            }
            let entries = (report.records.into_iter())
                .map(|(key, reported)| {
                    let (standing, generation) = describe(key.0, &reported.entry);
                    let entry = Entry {
                        reported,
                        standing,
                        generation,
                    };
                    (key, entry)
                })
                .collect();
            let shard = Shard {
                entries,
                version,
                at: now,
            };
            shards.insert(report.name, shard);
        }
        shards.retain(|name, shard| stored.contains(name) || recent(shard));
    }

    /// Makes the writes, a few at a time; how many went and how many failed. When the
    /// apiserver is unwell, the writes not made yet wait for the next round instead of adding
    /// to its load.
    async fn write_all(&self, writes: Vec<ShardWrite>) -> (usize, usize) {
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
                Outcome::Unwell => return (written, total - written),
            }
        }
        (written, failed)
    }

    async fn write(&self, write: ShardWrite) -> Outcome {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let name = write.name.config_map(&self.node);
        let result = if write.delete {
            match bounded(api.delete(&name, &DeleteParams::default())).await {
                Ok(_) => Ok(None),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
                Err(error) => Err(error),
            }
        } else {
            match self.body(&name, &write.entries) {
                Some(body) => {
                    let params = PatchParams::apply(&self.manager).force();
                    (bounded(api.patch(&name, &params, &Patch::Apply(body))).await)
                        .map(|written| written.resource_version())
                }
                None => return Outcome::Refused,
            }
        };
        self.metrics.status_written(result.is_ok());
        match result {
            Ok(version) => {
                let mut coalescer = self.coalescer.lock();
                // Out: the next change of each waits anew.
                (write.entries.keys()).for_each(|key| coalescer.settled(key));
                let mut shards = self.shards.lock();
                if write.delete {
                    shards.remove(&write.name);
                } else {
                    let shard = Shard {
                        entries: write.entries,
                        version,
                        at: Instant::now(),
                    };
                    shards.insert(write.name, shard);
                }
                Outcome::Written
            }
            Err(error) => {
                tracing::warn!(report = %name, %error, "cannot write this node's report");
                if apiserver_unwell(&error) {
                    Outcome::Unwell
                } else {
                    Outcome::Refused
                }
            }
        }
    }

    /// A shard's ConfigMap as applied; `None` (said in the log) when its entries cannot be
    /// encoded.
    fn body(&self, name: &str, entries: &Entries) -> Option<serde_json::Value> {
        let data = reports::data(&self.node, entries.iter().map(|(k, e)| (k, &e.reported)))
            .inspect_err(
                |error| tracing::error!(%error, "a report that cannot be encoded is not written"),
            )
            .ok()?;
        Some(serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {REPORT_LABEL: node_hash(&self.node)},
            },
            "data": data,
        }))
    }
}

/// The entries a pass wants, and the objects whose entry could not be encoded.
#[derive(Default)]
struct Wanted {
    entries: Entries,
    unwritable: BTreeSet<(Kind, ObjectKey)>,
}

/// One kind's entries, and what they say (for events).
fn collect<K, E>(
    kind: Kind,
    objects: impl Iterator<Item = Arc<DeserializeGuard<K>>>,
    wanted: &mut Wanted,
    observed: &mut Observed,
    entry_of: impl Fn(&K) -> Option<E>,
) where
    K: Resource<DynamicType = ()>,
    E: Serialize + Summary + Coalesced,
{
    for guarded in objects {
        let Ok(object) = &guarded.0 else { continue };
        let Some(entry) = entry_of(object) else {
            continue;
        };
        observed.insert(kind, object, entry.state());
        let key = (kind, object_key(object.meta()));
        let Some(body) = status_body(&entry) else {
            wanted.unwritable.insert(key);
            continue;
        };
        let reported = Reported {
            uid: object.meta().uid.clone().unwrap_or_default(),
            entry: body,
        };
        let entry = Entry {
            reported,
            standing: entry.standing(),
            generation: entry.generation(),
        };
        wanted.entries.insert(key, entry);
    }
}

/// Whether a shard is to be written (`None`: it says what is wanted), now or later: at once
/// when an entry in it is due (see `coalesce`), moved in from a shard of another count, or
/// dropped; `written` is what it says now, `current` where each entry is now.
fn shard_due(
    coalescer: &mut Coalescer<(Kind, ObjectKey)>,
    name: &ShardName,
    wanted: &Entries,
    written: Option<&Entries>,
    current: &HashMap<&(Kind, ObjectKey), (&ShardName, &Entry)>,
    now: Instant,
) -> Option<When> {
    let mut due: Option<When> = None;
    let mut sooner = |when: When| {
        due = Some(match (due, when) {
            (Some(When::Now), _) | (_, When::Now) => When::Now,
            (Some(When::At(a)), When::At(b)) => When::At(a.min(b)),
            (None, at) => at,
        });
    };
    for (key, entry) in wanted {
        let (standing, now_standing) = match current.get(key) {
            Some((at, was)) if *at == name && was.reported == entry.reported => {
                coalescer.settled(key);
                continue;
            }
            Some((at, _)) if *at != name => {
                sooner(When::Now);
                continue;
            }
            Some((_, was)) => (standing_against(entry, was), Some(was.standing)),
            None => (entry.standing, None),
        };
        sooner(coalescer.due(key, standing, now_standing, None, now));
    }
    let dropped = written
        .into_iter()
        .flat_map(|w| w.keys())
        .any(|key| !wanted.contains_key(key));
    if dropped {
        sooner(When::Now);
    }
    due
}

/// How soon a changed entry goes out: a new spec applied at once (the lease holder holds Ready
/// back until every node's entry says it applied it); otherwise as it says. (An entry written
/// before entries had generations gets one like any other change of detail: an upgrade is no
/// burst.)
fn standing_against(wanted: &Entry, was: &Entry) -> Standing {
    match was.generation {
        Some(generation) if wanted.generation != Some(generation) => Standing::Final,
        _ => wanted.standing,
    }
}

/// What a stored entry says, as far as writing goes; an entry that does not decode is on its
/// way (it is rewritten with the next change).
fn describe(kind: Kind, entry: &RawValue) -> (Standing, Option<i64>) {
    fn of<E: Coalesced + DeserializeOwned>(entry: &RawValue) -> (Standing, Option<i64>) {
        match serde_json::from_str::<E>(entry.get()) {
            Ok(entry) => (entry.standing(), entry.generation()),
            Err(_) => (Standing::Passing, None),
        }
    }
    match kind {
        Kind::DiscImage => of::<DiscImageNodeStatus>(entry),
        Kind::IscsiTarget => of::<TargetNodeStatus>(entry),
        Kind::InitiatorAccess => of::<AccessNodeStatus>(entry),
    }
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

/// Whether an error says the apiserver cannot take requests now, whatever the object: too many
/// requests, a server error, or no answer at all.
fn apiserver_unwell(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    /// A target's entry as a pass wants it (or wrote it).
    fn entry(uid: &str, ready: bool, standing: Standing, generation: i64) -> Entry {
        let body = json!({"node": "a", "observedGeneration": generation, "ready": ready});
        Entry {
            reported: Reported {
                uid: uid.to_owned(),
                entry: status_body(&body).expect("an entry"),
            },
            standing,
            generation: Some(generation),
        }
    }

    #[test]
    fn a_shard_goes_out_when_an_entry_in_it_is_due_and_only_then() {
        let key = |name: &str| (Kind::IscsiTarget, ObjectKey::new("lab", name));
        let here = ShardName { shard: 0, count: 1 };
        let elsewhere = ShardName { shard: 1, count: 2 };
        let written: Entries = BTreeMap::from([
            (key("t"), entry("u", false, Standing::Passing, 1)),
            (key("u"), entry("u", true, Standing::Ready, 1)),
        ]);
        let mut coalescer = Coalescer::new(Duration::from_secs(2));
        let now = Instant::now();
        let mut due = |wanted: &Entries, elsewhere_too: Option<&Entries>| {
            let mut current: HashMap<&(Kind, ObjectKey), (&ShardName, &Entry)> =
                written.iter().map(|(k, e)| (k, (&here, e))).collect();
            for (k, e) in elsewhere_too.into_iter().flatten() {
                current.insert(k, (&elsewhere, e));
            }
            shard_due(&mut coalescer, &here, wanted, Some(&written), &current, now)
        };
        assert_eq!(due(&written, None), None, "as written: nothing");
        let mut progress = written.clone();
        progress.insert(key("t"), entry("u", false, Standing::Passing, 1));
        let Some(Entry { reported, .. }) = progress.get_mut(&key("t")) else {
            panic!("t");
        };
        reported.entry =
            status_body(&json!({"node": "a", "observedGeneration": 1, "message": "on its way"}))
                .expect("an entry");
        assert!(
            matches!(due(&progress, None), Some(When::At(_))),
            "progress waits"
        );
        let mut ready = written.clone();
        ready.insert(key("t"), entry("u", true, Standing::Ready, 1));
        assert_eq!(due(&ready, None), Some(When::Now), "Ready reached: at once");
        let mut applied = written.clone();
        applied.insert(key("u"), entry("u", false, Standing::Passing, 2));
        assert_eq!(
            due(&applied, None),
            Some(When::Now),
            "a new spec applied: at once"
        );
        let mut dropped = written.clone();
        dropped.remove(&key("u"));
        assert_eq!(
            due(&dropped, None),
            Some(When::Now),
            "an entry dropped: at once"
        );
        let mut moved_in = written.clone();
        let moved = BTreeMap::from([(key("v"), entry("v", false, Standing::Passing, 1))]);
        moved_in.extend(moved.clone());
        assert_eq!(
            due(&moved_in, Some(&moved)),
            Some(When::Now),
            "moved from another count: at once"
        );
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
