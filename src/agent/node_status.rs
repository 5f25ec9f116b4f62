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
use k8s_openapi::jiff::Timestamp;
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
use crate::metrics::{Metrics, StatusWrite};
use crate::status;
use crate::sync::NodeReport;

use super::coalesce::{Coalescer, Standing, When, earliest};
use super::events::{Observed, State, Summary};
use super::heartbeat::node_hash;
use super::reports::{self, REPORT_LABEL, Reported, SHARD_BYTES_AT_MOST, ShardName};
use super::stores::Stores;
use super::{bounded, status_body};

/// How many report writes are in flight at once.
const CONCURRENT_WRITES: usize = 4;

/// The field manager of a node's reports: a hash, because managers are limited to 128
/// characters and node names are not.
pub fn field_manager(node: &str) -> String {
    format!("discus-node-{}", node_hash(node))
}

pub struct NodeStatusWriter {
    client: Client,
    node: String,
    /// Where the reports live (the agents' namespace).
    namespace: String,
    manager: String,
    /// The reports as this node last wrote them (or read them, after a start).
    written: Mutex<Written>,
    /// Entries that only report progress wait here for the next (see `coalesce`).
    coalescer: Mutex<Coalescer<(Kind, ObjectKey)>>,
    metrics: Arc<Metrics>,
}

/// How long a write counts as in flight. The store normally shows it within a second; one it
/// does not show by then (another writer changed it first, or the watch is failing) is
/// believed no more.
pub const IN_FLIGHT_FOR: Duration = Duration::from_secs(15);

/// One object's entry as this node wants it.
#[derive(Clone, Debug)]
struct Entry {
    reported: Reported,
    stamp: Stamp,
}

/// What an entry says, in short: all a node keeps of the entries it wrote (thousands of them).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stamp {
    /// The object's uid and the entry, hashed.
    digest: [u8; 32],
    /// For when a change of it goes out (`coalesce`).
    standing: Standing,
    /// The generation of the spec it describes.
    generation: Option<i64>,
}

impl Stamp {
    fn of(reported: &Reported, standing: Standing, generation: Option<i64>) -> Self {
        let mut hash = Sha256::new();
        hash.update(reported.uid.as_bytes());
        hash.update([0]);
        hash.update(reported.entry.get().as_bytes());
        Self {
            digest: hash.finalize().into(),
            standing,
            generation,
        }
    }
}

type Entries = BTreeMap<(Kind, ObjectKey), Entry>;
type Stamps = BTreeMap<(Kind, ObjectKey), Stamp>;

/// This node's reports as written.
#[derive(Debug, Default)]
struct Written {
    shards: BTreeMap<ShardName, Shard>,
    /// The count of shards written now, and since when (see `reports`).
    set: Option<(u32, Timestamp)>,
    /// Shards deleted, and when: not taken for present while the store still shows them.
    deleted: HashMap<ShardName, Instant>,
}

/// One shard of this node's report, as written.
#[derive(Debug)]
struct Shard {
    stamps: Stamps,
    set: Timestamp,
    /// The ConfigMap's resourceVersion right after the write.
    version: Option<String>,
    at: Instant,
}

/// A shard to write with its entries, or one of a count the node no longer has, to delete.
enum ShardWrite {
    Put {
        name: ShardName,
        set: Timestamp,
        entries: Entries,
    },
    Delete(ShardName),
}

impl ShardWrite {
    fn name(&self) -> &ShardName {
        match self {
            Self::Put { name, .. } | Self::Delete(name) => name,
        }
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
    /// This node's reports were not listed yet, so nothing was planned: publish again once they
    /// are. Not a failure of the apiserver's, so no reason to back off.
    pub unlisted: bool,
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
            written: Mutex::default(),
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
        let Some(own) = stores.own_reports() else {
            // What the reports say now is not known yet: tried again shortly.
            tracing::debug!("this node's reports are not listed yet");
            return Published {
                unlisted: true,
                observed,
                ..Published::default()
            };
        };
        let (writes, held_until, held) = self.plan(&own, wanted, Instant::now());
        let (deletions, writes): (Vec<_>, Vec<_>) = writes
            .into_iter()
            .partition(|w| matches!(w, ShardWrite::Delete(_)));
        let (mut written, mut failed) = self.write_all(writes).await;
        // A shard held back is one not written: the old set stays until the new one is whole.
        failed += held;
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
            unlisted: false,
        }
    }

    /// The shards to write now, when the earliest held back falls due, and how many shards hold
    /// an entry that cannot be encoded.
    fn plan(
        &self,
        own: &[Arc<ConfigMap>],
        wanted: Wanted,
        now: Instant,
    ) -> (Vec<ShardWrite>, Option<Instant>, usize) {
        let mut written = self.written.lock();
        self.believe_the_store(&mut written, own, now);
        let current = written.count();
        let count = count_for(&wanted, current);
        let set = written.set_for(count);
        // A shard with an entry that cannot be encoded is not written: not written is not
        // "nothing to say" (said in the log).
        let held: BTreeSet<ShardName> = (wanted.unwritable.iter())
            .map(|(kind, key)| ShardName::of(*kind, key, count))
            .collect();
        let mut grouped = group(wanted.entries, count);
        // Every shard of the count is written, even without entries: a node with reports is
        // one whose reports say what its entries are (see `leader`), none included.
        let names: BTreeSet<ShardName> = (0..count)
            .map(|shard| ShardName { shard, count })
            .chain(written.shards.keys().cloned())
            .collect();
        let mut coalescer = self.coalescer.lock();
        let (mut writes, mut held_until) = (Vec::new(), None);
        for name in names {
            if name.count != count {
                writes.push(ShardWrite::Delete(name));
                continue;
            }
            let entries = grouped.remove(&name).unwrap_or_default();
            let due = match written.shards.get(&name) {
                _ if held.contains(&name) => None,
                Some(shard) if shard.set == set => {
                    shard_due(&mut coalescer, &entries, &shard.stamps, now)
                }
                // Not written yet, or of an older set of the same count.
                _ => Some(When::Now),
            };
            match due {
                None => {}
                Some(When::At(at)) => held_until = earliest(held_until, Some(at)),
                Some(When::Now) => writes.push(ShardWrite::Put { name, set, entries }),
            }
        }
        coalescer.forget_stale(now);
        (writes, held_until, held.len())
    }

    /// Takes in what the store shows of this node's reports: a shard it shows as this node
    /// last wrote it, or that was written a moment ago, is as written; one changed by someone
    /// else is read back; one gone for a while is gone; one deleted a moment ago stays gone.
    fn believe_the_store(&self, written: &mut Written, own: &[Arc<ConfigMap>], now: Instant) {
        let recent = |at: Instant| now.saturating_duration_since(at) < IN_FLIGHT_FOR;
        written.deleted.retain(|_, at| recent(*at));
        let mut stored = BTreeSet::new();
        for config_map in own {
            let read = reports::read(config_map)
                .ok()
                .filter(|r| r.node == self.node);
            let Some(report) = read else { continue };
            if written.deleted.contains_key(&report.name) {
                continue;
            }
            stored.insert(report.name.clone());
            let version = config_map.resource_version();
            if let Some(shard) = written.shards.get(&report.name)
                && (shard.version == version || recent(shard.at))
            {
                continue;
            }
            let stamps = (report.records.into_iter())
                .map(|(key, reported)| {
                    let (standing, generation) = describe(key.0, &reported.entry);
                    (key, Stamp::of(&reported, standing, generation))
                })
                .collect();
            let shard = Shard {
                stamps,
                set: report.set,
                version,
                at: now,
            };
            written.shards.insert(report.name, shard);
        }
        (written.shards).retain(|name, shard| stored.contains(name) || recent(shard.at));
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
        let name = write.name().config_map(&self.node);
        let result = match &write {
            ShardWrite::Delete(_) => {
                match bounded(api.delete(&name, &DeleteParams::default())).await {
                    Ok(_) => Ok(None),
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
                    Err(error) => Err(error),
                }
            }
            ShardWrite::Put { set, entries, .. } => match self.body(&name, *set, entries) {
                Some(body) => {
                    let params = PatchParams::apply(&self.manager).force();
                    (bounded(api.patch(&name, &params, &Patch::Apply(body))).await)
                        .map(|written| written.resource_version())
                }
                None => return Outcome::Refused,
            },
        };
        (self.metrics).status_written(StatusWrite::Report, result.is_ok());
        match result {
            Ok(version) => {
                let keys: Vec<(Kind, ObjectKey)> = match &write {
                    ShardWrite::Put { entries, .. } => entries.keys().cloned().collect(),
                    ShardWrite::Delete(_) => Vec::new(),
                };
                self.written.lock().took(write, version);
                // Out: the next change of each waits anew.
                let mut coalescer = self.coalescer.lock();
                keys.iter().for_each(|key| coalescer.settled(key));
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
    fn body(&self, name: &str, set: Timestamp, entries: &Entries) -> Option<serde_json::Value> {
        let records = entries.iter().map(|(k, e)| (k, &e.reported));
        let data = reports::data(&self.node, set, records)
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
        let stamp = Stamp::of(&reported, entry.standing(), entry.generation());
        wanted.entries.insert(key, Entry { reported, stamp });
    }
}

/// Whether a shard is to be written (`None`: it says what is wanted), now or later: at once when
/// an entry in it is due (see `coalesce`) or dropped; `written` is what it says now.
fn shard_due(
    coalescer: &mut Coalescer<(Kind, ObjectKey)>,
    wanted: &Entries,
    written: &Stamps,
    now: Instant,
) -> Option<When> {
    let mut due: Option<When> = None;
    for (key, entry) in wanted {
        let (standing, now_standing) = match written.get(key) {
            Some(was) if was.digest == entry.stamp.digest => {
                coalescer.settled(key);
                continue;
            }
            Some(was) => (standing_against(entry, was), Some(was.standing)),
            None => (entry.stamp.standing, None),
        };
        let when = coalescer.due(key, standing, now_standing, None, now);
        due = Some(match (due, when) {
            (Some(When::Now), _) | (_, When::Now) => When::Now,
            (Some(When::At(a)), When::At(b)) => When::At(a.min(b)),
            (None, at) => at,
        });
    }
    if written.keys().any(|key| !wanted.contains_key(key)) {
        due = Some(When::Now);
    }
    due
}

/// The count of shards for `wanted`, writing `current` now: by the number of entries, then
/// doubled while a shard would be too large.
fn count_for(wanted: &Wanted, current: Option<u32>) -> u32 {
    let entries = wanted.entries.len() + wanted.unwritable.len();
    let largest = |count| largest_shard(&wanted.entries, count);
    let mut count = reports::shard_count(entries, current);
    // Doubled while the largest shard is too large and holds more than one entry: an entry too
    // large on its own is left in a shard of its own, not chased through ever more shards.
    while count < reports::SHARDS_AT_MOST && {
        let (bytes, held) = largest(count);
        bytes > SHARD_BYTES_AT_MOST && held > 1
    } {
        count *= 2;
    }
    // Fewer shards than now only with room to spare, lest a size near the bound change the set
    // at every crossing.
    match current {
        Some(current) if current > count && largest(count).0 > SHARD_BYTES_AT_MOST / 2 => current,
        _ => count,
    }
}

/// How many bytes of entries the largest of `count` shards would hold, and how many entries.
fn largest_shard(entries: &Entries, count: u32) -> (usize, usize) {
    let mut shards: HashMap<u32, (usize, usize)> = HashMap::new();
    for ((kind, key), entry) in entries {
        let size = entry.reported.entry.get().len() + key.namespace.len() + key.name.len() + 64;
        let shard = shards
            .entry(reports::shard_of(*kind, key, count))
            .or_default();
        *shard = (shard.0 + size, shard.1 + 1);
    }
    shards.into_values().max().unwrap_or((0, 0))
}

/// The entries of each shard of `count`.
fn group(entries: Entries, count: u32) -> BTreeMap<ShardName, Entries> {
    let mut grouped: BTreeMap<ShardName, Entries> = BTreeMap::new();
    for (key, entry) in entries {
        let name = ShardName::of(key.0, &key.1, count);
        grouped.entry(name).or_default().insert(key, entry);
    }
    grouped
}

impl Written {
    /// Since when the node writes `count` shards: as before if it did; else, after a start,
    /// as the stored shards of that count say if they all say the same; else from now.
    fn set_for(&mut self, count: u32) -> Timestamp {
        if let Some((current, since)) = self.set
            && current == count
        {
            return since;
        }
        // The stored shards of that count, when they are a whole set of one stamp (after a
        // start, or back to a count whose set was not deleted yet): rewritten in place, that set
        // stays whole throughout, where a new stamp would leave no whole set until all were.
        let stored: BTreeMap<u32, Timestamp> = (self.shards.iter())
            .filter(|(name, _)| name.count == count)
            .map(|(name, shard)| (name.shard, shard.set))
            .collect();
        let stamps: BTreeSet<&Timestamp> = stored.values().collect();
        let since = match stamps.first() {
            Some(since) if stamps.len() == 1 && stored.len() == count as usize => **since,
            _ => Timestamp::now(),
        };
        self.set = Some((count, since));
        since
    }

    /// The count written now; after a start, that of the newest stored set.
    fn count(&self) -> Option<u32> {
        let newest = self.shards.iter().max_by_key(|(_, shard)| shard.set);
        (self.set.map(|(count, _)| count)).or(newest.map(|(name, _)| name.count))
    }

    /// A write made: the shard says what it wrote, or is gone.
    fn took(&mut self, write: ShardWrite, version: Option<String>) {
        let (name, set, entries) = match write {
            ShardWrite::Delete(name) => {
                self.shards.remove(&name);
                self.deleted.insert(name, Instant::now());
                return;
            }
            ShardWrite::Put { name, set, entries } => (name, set, entries),
        };
        let stamps = (entries.into_iter())
            .map(|(key, entry)| (key, entry.stamp))
            .collect();
        let shard = Shard {
            stamps,
            set,
            version,
            at: Instant::now(),
        };
        self.shards.insert(name, shard);
    }
}

/// How soon a changed entry goes out: a new spec applied at once (the lease holder holds Ready
/// back until every node's entry says it applied it); otherwise as it says. (An entry written
/// before entries had generations gets one like any other change of detail: an upgrade is no
/// burst.)
fn standing_against(wanted: &Entry, was: &Stamp) -> Standing {
    match was.generation {
        Some(generation) if wanted.stamp.generation != Some(generation) => Standing::Final,
        _ => wanted.stamp.standing,
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
pub trait Coalesced {
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
pub fn apiserver_unwell(error: &kube::Error) -> bool {
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

    /// A target's entry as a pass wants it, saying `message`.
    fn entry(uid: &str, message: &str, standing: Standing, generation: i64) -> Entry {
        let body = json!({"node": "a", "observedGeneration": generation, "message": message});
        let reported = Reported {
            uid: uid.to_owned(),
            entry: status_body(&body).expect("an entry"),
        };
        let stamp = Stamp::of(&reported, standing, Some(generation));
        Entry { reported, stamp }
    }

    #[test]
    fn a_shard_goes_out_when_an_entry_in_it_is_due_and_only_then() {
        let key = |name: &str| (Kind::IscsiTarget, ObjectKey::new("lab", name));
        let wanted_before: Entries = BTreeMap::from([
            (key("t"), entry("u", "waiting", Standing::Passing, 1)),
            (key("u"), entry("u", "ready", Standing::Ready, 1)),
        ]);
        let written: Stamps = (wanted_before.iter())
            .map(|(k, e)| (k.clone(), e.stamp))
            .collect();
        let mut coalescer = Coalescer::new(Duration::from_secs(2));
        let now = Instant::now();
        let mut due = |wanted: &Entries| shard_due(&mut coalescer, wanted, &written, now);
        assert_eq!(due(&wanted_before), None, "as written: nothing");
        let with = |name: &str, changed: Entry| {
            let mut wanted = wanted_before.clone();
            wanted.insert(key(name), changed);
            wanted
        };
        let progress = with("t", entry("u", "still waiting", Standing::Passing, 1));
        assert!(
            matches!(due(&progress), Some(When::At(_))),
            "progress waits"
        );
        let ready = with("t", entry("u", "ready", Standing::Ready, 1));
        assert_eq!(due(&ready), Some(When::Now), "Ready reached: at once");
        let applied = with("u", entry("u", "applying", Standing::Passing, 2));
        assert_eq!(
            due(&applied),
            Some(When::Now),
            "a new spec applied: at once"
        );
        let mut dropped = wanted_before.clone();
        dropped.remove(&key("u"));
        assert_eq!(due(&dropped), Some(When::Now), "an entry dropped: at once");
    }

    #[test]
    fn a_node_keeps_its_set_across_a_restart_and_starts_a_new_one_with_a_new_count() {
        let set = Timestamp::from_second(1).expect("a time");
        let stored = |index, count| {
            let shard = Shard {
                stamps: Stamps::new(),
                set,
                version: None,
                at: Instant::now(),
            };
            (
                ShardName {
                    shard: index,
                    count,
                },
                shard,
            )
        };
        // Restarted with the set of one shard stored: the same set.
        let mut written = Written {
            shards: BTreeMap::from([stored(0, 1)]),
            ..Written::default()
        };
        assert_eq!(written.set_for(1), set);
        // Two shards now: a new set, kept while the count stays.
        let grown = written.set_for(2);
        assert!(grown > set);
        assert_eq!(written.set_for(2), grown);
        // Entries that would make a shard too large make the count grow.
        let big = "x".repeat(SHARD_BYTES_AT_MOST / 2);
        let wanted = Wanted {
            entries: (0..4)
                .map(|n| (key_of(n), entry("u", &big, Standing::Ready, 1)))
                .collect(),
            unwritable: BTreeSet::new(),
        };
        assert!(count_for(&wanted, None) >= 2);
        let count = count_for(&wanted, None);
        assert!(largest_shard(&wanted.entries, count).0 <= SHARD_BYTES_AT_MOST);
        // One entry too large alone: a shard of its own, not ever more shards.
        let huge = "x".repeat(SHARD_BYTES_AT_MOST * 2);
        let mut wanted = wanted;
        (wanted.entries).insert(key_of(9), entry("u", &huge, Standing::Ready, 1));
        let count = count_for(&wanted, None);
        assert!(count <= 32, "{count}");
        assert_eq!(largest_shard(&wanted.entries, count).1, 1);
    }

    fn key_of(n: u32) -> (Kind, ObjectKey) {
        (Kind::IscsiTarget, ObjectKey::new("lab", format!("t{n}")))
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
