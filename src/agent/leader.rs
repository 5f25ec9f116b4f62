//! The lease holder: one agent at a time writes what no single node can — each resource's
//! top-level `observedGeneration` and conditions, merged from every node's entry — under a field
//! manager of its own, and only when it changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::{Client, Resource};
use kube_lease_manager::LeaseManagerBuilder;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};

use crate::api::disc_image::{DiscImageNodeStatus, DiscImageStatus};
use crate::api::initiator_access::{AccessNodeStatus, HeartbeatStatus, InitiatorAccessStatus};
use crate::api::iscsi_target::{IscsiTargetStatus, TargetNodeStatus};
use crate::api::{DiscImage, InitiatorAccess, IscsiTarget};
use crate::desired::{Kind, ObjectKey, Snapshot, object_key, wake_for_expiry};
use crate::status;

use super::coalesce::{Coalescer, Standing, When, earliest};
use super::expected::Expected;
use super::generated_secrets;
use super::liveness::{Liveness, NodeEntry, Tracker};
use super::node_status::{InFlight, field_manager};
use super::stores::{Stores, Wakers};
use super::upload_tokens::{self, Due};
use super::{StatusBody, apply_status, status_body};
use crate::credentials::Keys;

/// The field manager of everything the lease holder writes.
pub const MANAGER: &str = "discus-leader";
/// The Lease whose holder aggregates.
pub const LEASE: &str = "discus-leader";
const CONCURRENT_WRITES: usize = 16;
/// An upload token written is not written again for this long while the store does not show it.
const TOKEN_IN_FLIGHT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct LeaderOptions {
    pub lease_namespace: String,
    /// Unique among agents: the node name.
    pub identity: String,
    /// How long a silent holder keeps the lease.
    pub lease_seconds: u64,
    pub iqn_authority: String,
    /// A node whose heartbeat is silent this long is lost…
    pub node_lost_after: Duration,
    /// …and, this much later, gone: its entries are removed.
    pub prune_after: Duration,
    /// The agents' upload signing key, for the tokens the lease holder mints (when it receives
    /// uploads).
    pub upload_keys: Option<Arc<Keys>>,
    /// How long top-level status that only reports progress waits for the next (`coalesce`).
    pub status_settle: Duration,
}

/// Competes for the lease for ever; while holding it, aggregates whenever something changed.
/// The election's requests go through `lease_client`, whose deadline is shorter than the lease:
/// a renewal whose answer is lost must fail while the lease still holds, not after.
pub async fn run(
    lease_client: Client,
    client: Client,
    stores: Arc<Stores>,
    wakers: Wakers,
    options: LeaderOptions,
) {
    let manager = loop {
        let built = LeaseManagerBuilder::new(lease_client.clone(), LEASE)
            .with_namespace(&options.lease_namespace)
            .with_identity(&options.identity)
            .with_duration(options.lease_seconds)
            .with_grace((options.lease_seconds / 3).max(1))
            .build()
            .await;
        match built {
            Ok(manager) => break manager,
            Err(error) => {
                tracing::warn!(%error, "cannot take part in the leader election; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let (mut leading, _election) = manager.watch().await;
    let aggregator = Aggregator::new(
        client,
        options.iqn_authority.clone(),
        Tracker::new(Instant::now(), options.node_lost_after, options.prune_after),
        options.status_settle,
    );
    stores.ready().await;
    let mut was_holding = false;
    loop {
        let holding = *leading.borrow_and_update();
        if holding != was_holding {
            tracing::info!(identity = %options.identity, holding, "leader lease");
            was_holding = holding;
        }
        if !holding {
            if leading.changed().await.is_err() {
                tracing::warn!("the leader election stopped");
                return;
            }
            continue;
        }
        aggregator.generate_secrets(&stores).await;
        let tokens_due = match &options.upload_keys {
            Some(keys) => aggregator.upload_tokens(&stores, keys).await,
            None => None,
        };
        let wait = aggregator
            .aggregate(&stores, Timestamp::now())
            .await
            .unwrap_or(Duration::from_secs(60))
            .min(tokens_due.unwrap_or(Duration::MAX));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                changed = leading.changed() => {
                    if changed.is_err() { return }
                    break;
                }
                () = wakers.aggregate.notified() => {
                    // Entries from several nodes often land together.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
                // A renewed heartbeat of a live node changes no verdict: nothing to go over.
                () = wakers.heartbeat.notified() => {
                    if aggregator.heartbeats_changed_a_verdict(&stores) {
                        break;
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
    }
}

pub struct Aggregator {
    client: Client,
    iqn_authority: String,
    liveness: Mutex<Tracker>,
    /// What was last written per object and manager, until the store shows it (`Null`: an
    /// entry removed), for `IN_FLIGHT_FOR` at most (see `node_status`).
    in_flight: Mutex<HashMap<(Kind, ObjectKey, String), InFlight>>,
    /// Top-level status that only reports progress waits here for the next (see `coalesce`).
    coalescer: Mutex<Coalescer<(Kind, ObjectKey, String)>>,
    /// Secrets created and not yet seen in the store, so that each is created once.
    created_secrets: Mutex<BTreeSet<ObjectKey>>,
    /// Upload tokens written, and when: not written again before the store shows them.
    written_tokens: Mutex<BTreeMap<ObjectKey, Instant>>,
    /// Token Secret names taken by Secrets discus did not make, told once each.
    taken_tokens: Mutex<BTreeSet<ObjectKey>>,
}

struct Write {
    kind: Kind,
    key: ObjectKey,
    manager: String,
    /// `None` drops what the manager owned.
    status: Option<StatusBody>,
    standing: Standing,
}

/// The lease holder's writes, in the making.
struct Writes<'a> {
    kind: Kind,
    in_flight: &'a mut HashMap<(Kind, ObjectKey, String), InFlight>,
    coalescer: &'a mut Coalescer<(Kind, ObjectKey, String)>,
    writes: Vec<Write>,
    /// When the earliest write held back falls due.
    held_until: Option<Instant>,
    /// Every node with an entry in an object gone over.
    nodes: BTreeSet<String>,
    now: Instant,
}

impl<'a> Writes<'a> {
    fn new(
        kind: Kind,
        in_flight: &'a mut HashMap<(Kind, ObjectKey, String), InFlight>,
        coalescer: &'a mut Coalescer<(Kind, ObjectKey, String)>,
    ) -> Self {
        Self {
            kind,
            in_flight,
            coalescer,
            writes: Vec::new(),
            held_until: None,
            nodes: BTreeSet::new(),
            now: Instant::now(),
        }
    }

    /// Queues a write that users act on (see `coalesce`) unless the same is already in flight.
    fn push(&mut self, key: &ObjectKey, manager: String, status: Option<Value>) {
        self.push_when(key, manager, status, Standing::Final, None);
    }

    /// Queues a write unless the same is already in flight or it is not due yet: `standing` is
    /// what it says, `current` what the object says now.
    fn push_when(
        &mut self,
        key: &ObjectKey,
        manager: String,
        status: Option<Value>,
        standing: Standing,
        current: Option<Standing>,
    ) {
        let flight = (self.kind, key.clone(), manager);
        let status = match status.as_ref().map(status_body) {
            Some(None) => return,
            status => status.flatten(),
        };
        let written = self.in_flight.get(&flight);
        if written.is_some_and(|f| f.repeats(status.as_deref(), self.now)) {
            return;
        }
        let written = written.map(InFlight::standing);
        let due = (self.coalescer).due(&flight, standing, current, written, self.now);
        if let When::At(at) = due {
            self.held_until = earliest(self.held_until, Some(at));
            return;
        }
        self.writes.push(Write {
            kind: self.kind,
            key: flight.1,
            manager: flight.2,
            status,
            standing,
        });
    }

    /// Nothing to write for this object and manager: what was in flight has landed.
    fn landed(&mut self, key: &ObjectKey, manager: &str) {
        let flight = (self.kind, key.clone(), manager.to_owned());
        self.coalescer.settled(&flight);
        self.in_flight.remove(&flight);
    }
}

impl Aggregator {
    pub fn new(
        client: Client,
        iqn_authority: String,
        liveness: Tracker,
        status_settle: Duration,
    ) -> Self {
        Self {
            client,
            iqn_authority,
            liveness: Mutex::new(liveness),
            in_flight: Mutex::default(),
            coalescer: Mutex::new(Coalescer::new(status_settle)),
            created_secrets: Mutex::default(),
            written_tokens: Mutex::default(),
            taken_tokens: Mutex::default(),
        }
    }

    /// Takes in the heartbeats; whether a node came back (or appeared), which the entries must
    /// show. Renewals of live nodes only move their deadlines, which `aggregate` wakes for.
    pub fn heartbeats_changed_a_verdict(&self, stores: &Stores) -> bool {
        self.liveness.lock().observe(
            stores.heartbeats().iter().map(|l| l.as_ref()),
            Instant::now(),
        )
    }

    /// Creates the CHAP Secrets that grants with `generateSecret` name and that do not exist.
    pub async fn generate_secrets(&self, stores: &Stores) {
        let wanted: Vec<_> = {
            let mut created = self.created_secrets.lock();
            created.retain(|key| !stores.secret_exists(key));
            stores
                .grants()
                .filter_map(|guarded| guarded.0.as_ref().ok().cloned())
                .filter_map(|grant| {
                    let key = generated_secrets::wanted(&grant, &|key| {
                        created.contains(key) || stores.secret_exists(key)
                    })?;
                    Some((grant, key))
                })
                .collect()
        };
        for (grant, key) in wanted {
            let secret = match generated_secrets::build(&grant, &key) {
                Ok(secret) => secret,
                Err(error) => {
                    tracing::warn!(secret = %key, %error, "cannot generate a CHAP Secret");
                    continue;
                }
            };
            match generated_secrets::create(&self.client, &secret).await {
                Ok(created) => {
                    if created {
                        tracing::info!(secret = %key, grant = %object_key(grant.meta()), "generated a CHAP Secret");
                    }
                    self.created_secrets.lock().insert(key);
                }
                Err(error) => {
                    tracing::warn!(secret = %key, %error, "cannot create a CHAP Secret")
                }
            }
        }
    }

    /// Mints the upload token of every DiscImage awaiting an upload whose token is missing or
    /// due (see `upload_tokens`); returns when the next one falls due.
    pub async fn upload_tokens(&self, stores: &Stores, keys: &Keys) -> Option<Duration> {
        let key = keys.current()?;
        let now = SystemTime::now();
        let seconds = upload_tokens::seconds(now);
        let mut next: Option<u64> = None;
        let mut writes = Vec::new();
        {
            let mut written = self.written_tokens.lock();
            let mut taken = self.taken_tokens.lock();
            written.retain(|_, at| at.elapsed() < TOKEN_IN_FLIGHT);
            taken.retain(|key| stores.secret(key).is_some());
            for guarded in stores.images() {
                let Ok(image) = &guarded.0 else { continue };
                let secret_key = upload_tokens::token_key(image);
                let existing = stores.secret(&secret_key);
                match upload_tokens::due(image, existing.as_deref(), &key, seconds) {
                    Due::Mint => {
                        let recent = (written.get(&secret_key))
                            .is_some_and(|at| at.elapsed() < TOKEN_IN_FLIGHT);
                        if !recent {
                            writes.push((secret_key, upload_tokens::build(image, &key, now)));
                        }
                    }
                    Due::No(Some(at)) => next = Some(next.map_or(at, |n| n.min(at))),
                    Due::No(None) => {}
                    Due::Taken => {
                        if taken.insert(secret_key.clone()) {
                            tracing::warn!(secret = %secret_key, "a Secret discus did not make holds the name of an upload token; it is left alone and the DiscImage gets no token");
                        }
                    }
                }
            }
        }
        futures::stream::iter(writes)
            .for_each_concurrent(CONCURRENT_WRITES, |(secret_key, built)| async move {
                let written = match built {
                    Ok(secret) => upload_tokens::write(&self.client, &secret)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(error) => Err(error),
                };
                match written {
                    Ok(()) => tracing::info!(secret = %secret_key, "minted an upload token"),
                    Err(error) => {
                        tracing::warn!(secret = %secret_key, %error, "cannot write an upload token; trying again shortly")
                    }
                }
                // Written or not, not again before the store shows it or a while passed.
                self.written_tokens.lock().insert(secret_key, Instant::now());
            })
            .await;
        next.map(|at| Duration::from_secs(at.saturating_sub(seconds).max(1)))
    }

    /// Writes every top-level status that changed, marks the entries of lost nodes and removes
    /// those of gone ones; returns when something will change by itself (a grant expiring, a
    /// node turning lost or gone).
    pub async fn aggregate(&self, stores: &Stores, now: Timestamp) -> Option<Duration> {
        let (writes, next) = self.plan(stores, now);
        futures::stream::iter(writes)
            .for_each_concurrent(CONCURRENT_WRITES, |write| self.write(write))
            .await;
        next
    }

    /// The writes due now, and how long until something changes by itself.
    fn plan(&self, stores: &Stores, now: Timestamp) -> (Vec<Write>, Option<Duration>) {
        let clock = Instant::now();
        let heartbeats = stores.heartbeats();
        let mut liveness = self.liveness.lock();
        liveness.observe(heartbeats.iter().map(|l| l.as_ref()), clock);
        let live = |node: &str| liveness.of(node, clock);
        let (mut in_flight, mut coalescer) = (self.in_flight.lock(), self.coalescer.lock());
        let mut writes = Writes::new(Kind::DiscImage, &mut in_flight, &mut coalescer);
        // Every spec validated once, for IQNs, expiries and the nodes that should serve it.
        let (images, targets, grants): (Vec<_>, Vec<_>, Vec<_>) = (
            stores.images().collect(),
            stores.targets().collect(),
            stores.grants().collect(),
        );
        let no_secrets = BTreeMap::new();
        let snapshot = Snapshot::new(
            images.iter().filter_map(|i| i.0.as_ref().ok()),
            targets.iter().filter_map(|t| t.0.as_ref().ok()),
            grants.iter().filter_map(|g| g.0.as_ref().ok()),
            &no_secrets,
        );
        let is_live = |node: &str| live(node) == Liveness::Live;
        let leases = heartbeats.iter().map(|l| l.as_ref());
        let expected = Expected::new(leases, is_live, &snapshot, now);
        plan_kind(
            &mut writes,
            images.iter().cloned(),
            &live,
            |image: &DiscImage| expected.image(&object_key(image.meta())),
            |image, entries, status| status::image_status(image, entries, Some(status), now),
        );
        writes.kind = Kind::IscsiTarget;
        plan_kind(
            &mut writes,
            targets.iter().cloned(),
            &live,
            |target: &IscsiTarget| expected.target(&snapshot, &object_key(target.meta())),
            |target, entries, status| {
                let iqn = snapshot.target_iqn(&object_key(target.meta()), &self.iqn_authority);
                status::target_status(target, entries, iqn, Some(status), now)
            },
        );
        writes.kind = Kind::InitiatorAccess;
        plan_kind(
            &mut writes,
            grants.iter().cloned(),
            &live,
            |grant: &InitiatorAccess| expected.grant(&snapshot, &object_key(grant.meta())),
            |grant, entries, status| grant_status(stores, &snapshot, grant, entries, status, now),
        );
        let Writes {
            writes,
            held_until,
            nodes,
            ..
        } = writes;
        coalescer.forget_stale(clock);
        // What was written for objects deleted since is of no use any more.
        let present = stores.keys();
        in_flight.retain(|(kind, key, _), _| present.contains(&(*kind, key.clone())));
        let next_change = liveness
            .next_change(nodes.iter().map(String::as_str), clock)
            .map(|at| at.saturating_duration_since(clock));
        let expiry = (snapshot.next_expiry(now)).map(|at| wake_for_expiry(at, now));
        let held = held_until.map(|at| at.saturating_duration_since(clock));
        (
            writes,
            [expiry, next_change, held].into_iter().flatten().min(),
        )
    }

    async fn write(&self, write: Write) {
        let status = write.status.as_deref();
        match apply_status(&self.client, write.kind, &write.key, &write.manager, status).await {
            Ok(version) => {
                let flight = (write.kind, write.key, write.manager);
                self.coalescer.lock().settled(&flight);
                let written = InFlight::new(write.status, write.standing, version);
                self.in_flight.lock().insert(flight, written);
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => {
                tracing::warn!(kind = write.kind.as_str(), object = %write.key, %error, "cannot write status");
            }
        }
    }
}

/// A grant's top-level status: merged from its entries, with its expiry and its Lease's holder.
fn grant_status(
    stores: &Stores,
    snapshot: &Snapshot<'_>,
    grant: &InitiatorAccess,
    entries: Vec<AccessNodeStatus>,
    status: &InitiatorAccessStatus,
    now: Timestamp,
) -> InitiatorAccessStatus {
    let key = object_key(grant.meta());
    let expired = snapshot.expired(&key, now);
    let heartbeat = grant.spec.heartbeat.as_ref().map(|_| {
        let renewal = stores.renewal(&key);
        HeartbeatStatus {
            holder: renewal.as_ref().and_then(|r| r.holder.clone()),
            renew_time: (renewal.and_then(|r| r.renewed)).map(|t| t.to_string()),
        }
    });
    status::grant_status(grant, entries, expired, heartbeat, Some(status), now)
}

/// One kind's writes: for each well-formed object, its lost nodes' entries marked, gone nodes'
/// entries dropped, and its top-level status (from `top`) when that changed — a Ready waiting a
/// moment for the nodes `expected` says should report and have not; a malformed object is
/// marked Stalled. Every node with an entry goes to `writes.nodes`.
fn plan_kind<K: Reported>(
    writes: &mut Writes<'_>,
    objects: impl Iterator<Item = Arc<DeserializeGuard<K>>>,
    live: &dyn Fn(&str) -> Liveness,
    expected: impl Fn(&K) -> BTreeSet<String>,
    mut top: impl FnMut(&K, Vec<K::Entry>, &K::Status) -> K::Status,
) {
    for guarded in objects {
        match &guarded.0 {
            Ok(object) => {
                let status = object.current_status();
                let entries = K::entries(&status);
                (writes.nodes).extend(entries.iter().map(|e| e.node().to_owned()));
                let entries = judge(writes, object.meta(), entries, live);
                let reported: HashSet<String> =
                    entries.iter().map(|e| e.node().to_owned()).collect();
                let wanted = top(object, entries, &status);
                // Asked only of a Ready about to be written.
                let unreported = || expected(object).iter().any(|n| !reported.contains(n));
                top_level_write(writes, object.meta(), &wanted, &status, &unreported);
            }
            Err(invalid) => invalid_write(writes, invalid),
        }
    }
}

/// A kind whose status holds an entry from each node and a top level the lease holder writes.
trait Reported: Resource<DynamicType = ()> {
    type Status: Serialize;
    type Entry: NodeEntry + Serialize;
    fn current_status(&self) -> Self::Status;
    fn entries(status: &Self::Status) -> Vec<Self::Entry>;
}

/// `Reported` for a kind whose `status` has a `nodes` list.
macro_rules! reported {
    ($kind:ty, $status:ty, $entry:ty) => {
        impl Reported for $kind {
            type Status = $status;
            type Entry = $entry;
            fn current_status(&self) -> $status {
                self.status.clone().unwrap_or_default()
            }
            fn entries(status: &$status) -> Vec<$entry> {
                status.nodes.clone()
            }
        }
    };
}

reported!(DiscImage, DiscImageStatus, DiscImageNodeStatus);
reported!(IscsiTarget, IscsiTargetStatus, TargetNodeStatus);
reported!(InitiatorAccess, InitiatorAccessStatus, AccessNodeStatus);

/// The entries to aggregate: a live node's as it wrote it, a lost node's marked (in the object
/// too, as that node's manager), a gone node's removed.
fn judge<E: NodeEntry + Serialize>(
    writes: &mut Writes<'_>,
    meta: &ObjectMeta,
    entries: Vec<E>,
    live: &dyn Fn(&str) -> Liveness,
) -> Vec<E> {
    let key = object_key(meta);
    let mut kept = Vec::new();
    for entry in entries {
        let manager = field_manager(entry.node());
        match live(entry.node()) {
            Liveness::Live => {
                writes.landed(&key, &manager);
                kept.push(entry);
            }
            Liveness::Lost(message) => {
                if entry.is_marked_lost() {
                    writes.landed(&key, &manager);
                    kept.push(entry);
                } else {
                    let mut marked = entry;
                    marked.mark_lost(&message);
                    writes.push(&key, manager, Some(json!({"nodes": [&marked]})));
                    kept.push(marked);
                }
            }
            Liveness::Gone => writes.push(&key, manager, None),
        }
    }
    kept
}

/// The top-level status, written when it differs from the object's; `unreported`: whether a
/// node that should serve the object has no entry in it yet.
fn top_level_write<S: Serialize>(
    writes: &mut Writes<'_>,
    meta: &ObjectMeta,
    wanted: &S,
    current: &S,
    unreported: &dyn Fn() -> bool,
) {
    let key = object_key(meta);
    let (wanted, current) = (top_level(wanted), top_level(current));
    if wanted == current {
        writes.landed(&key, MANAGER);
    } else {
        // Conditions about an older generation are what kstatus waits on after a change: the
        // new ones go out at once, whatever they say. (A new object has none yet.)
        let generations = (
            current.get("observedGeneration"),
            wanted.get("observedGeneration"),
        );
        let standing = match (generations, top_level_standing(&wanted)) {
            ((Some(seen), Some(now)), _) if seen != now => Standing::Final,
            (_, Standing::Ready) if unreported() => Standing::Partial,
            (_, standing) => standing,
        };
        let now = (current.get("conditions")).map(|_| top_level_standing(&current));
        writes.push_when(&key, MANAGER.to_owned(), Some(wanted), standing, now);
    }
}

/// What a top-level status says, for when to write it (see `coalesce`): Ready; Stalled or
/// Expired (access ended), for users to act on; or on its way.
fn top_level_standing(status: &Value) -> Standing {
    let holds = |kind: &str| {
        (status.get("conditions").and_then(Value::as_array))
            .into_iter()
            .flatten()
            .any(|c| c["type"] == kind && c["status"] == "True")
    };
    if holds("Ready") {
        Standing::Ready
    } else if holds("Stalled") || holds("Expired") {
        Standing::Final
    } else {
        Standing::Passing
    }
}

/// An object that is not even well-formed: not Ready, Stalled, with why.
fn invalid_write(writes: &mut Writes<'_>, invalid: &InvalidObject) {
    let key = object_key(&invalid.metadata);
    #[derive(serde::Deserialize)]
    struct Written {
        conditions: Vec<Condition>,
    }
    let written = (writes.in_flight).get(&(writes.kind, key.clone(), MANAGER.to_owned()));
    // Its status is not read (it does not decode): unchanged since this wrote it, it still holds
    // what this wrote, and at rest nothing is written again.
    let version = invalid.metadata.resource_version.as_deref();
    if written.is_some_and(|w| w.unchanged_at(version)) {
        return;
    }
    let previous: Vec<Condition> = written
        .and_then(InFlight::body)
        .and_then(|body| serde_json::from_str::<Written>(body.get()).ok())
        .map(|written| written.conditions)
        .unwrap_or_default();
    let conditions = status::invalid_conditions(
        &previous,
        &invalid.error,
        invalid.metadata.generation,
        Timestamp::now(),
    );
    writes.push(
        &key,
        MANAGER.to_owned(),
        Some(json!({ "conditions": conditions })),
    );
}

/// A status without the node entries: what the lease holder owns.
fn top_level<S: Serialize>(status: &S) -> Value {
    let mut value = serde_json::to_value(status).unwrap_or(Value::Null);
    if let Some(fields) = value.as_object_mut() {
        fields.remove("nodes");
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IscsiTarget's metadata, `lab/t`.
    fn target_meta() -> ObjectMeta {
        ObjectMeta {
            name: Some("t".to_owned()),
            namespace: Some("lab".to_owned()),
            ..ObjectMeta::default()
        }
    }

    type Flights = HashMap<(Kind, ObjectKey, String), InFlight>;

    /// The lease holder's memory before any write: nothing in flight, nothing waiting.
    fn nothing_written() -> (Flights, Coalescer<(Kind, ObjectKey, String)>) {
        (HashMap::new(), Coalescer::new(Duration::from_secs(2)))
    }

    #[test]
    fn a_malformed_object_s_status_is_not_written_again_while_the_object_is_as_it_left_it() {
        let invalid = |version: &str| InvalidObject {
            error: "spec.luns: invalid type: integer `5`, expected a sequence".to_owned(),
            metadata: ObjectMeta {
                resource_version: Some(version.to_owned()),
                generation: Some(1),
                ..target_meta()
            },
        };
        let (mut in_flight, mut coalescer) = nothing_written();
        let mut writes = Writes::new(Kind::IscsiTarget, &mut in_flight, &mut coalescer);
        invalid_write(&mut writes, &invalid("7"));
        let Some(write) = writes.writes.pop() else {
            panic!("Stalled is written at once");
        };
        // Landed: the object is at version 8 after it.
        let flight = (
            Kind::IscsiTarget,
            object_key(&target_meta()),
            MANAGER.to_owned(),
        );
        let landed = InFlight::new(write.status, write.standing, Some("8".to_owned()));
        in_flight.insert(flight, landed);
        let mut writes = Writes::new(Kind::IscsiTarget, &mut in_flight, &mut coalescer);
        writes.now = Instant::now() + 2 * super::super::node_status::IN_FLIGHT_FOR;
        invalid_write(&mut writes, &invalid("8"));
        assert!(writes.writes.is_empty(), "at rest, long after: nothing");
        invalid_write(&mut writes, &invalid("9"));
        assert_eq!(writes.writes.len(), 1, "changed since: written again");
    }

    #[test]
    fn what_a_top_level_status_says_decides_when_it_goes_out() {
        let conditions = |pairs: &[(&str, &str)]| {
            let list: Vec<Value> = (pairs.iter())
                .map(|(kind, status)| json!({"type": kind, "status": status}))
                .collect();
            json!({"observedGeneration": 2, "conditions": list})
        };
        let ready = conditions(&[("Ready", "True"), ("Reconciling", "False")]);
        assert_eq!(top_level_standing(&ready), Standing::Ready);
        let stalled = conditions(&[("Ready", "False"), ("Stalled", "True")]);
        assert_eq!(top_level_standing(&stalled), Standing::Final);
        let expired = conditions(&[("Ready", "False"), ("Expired", "True")]);
        assert_eq!(top_level_standing(&expired), Standing::Final);
        let pending = conditions(&[("Ready", "False"), ("Reconciling", "True")]);
        assert_eq!(top_level_standing(&pending), Standing::Passing);
    }

    #[test]
    fn a_new_generation_goes_out_at_once_and_a_new_object_s_progress_waits() {
        let meta = target_meta();
        let status = |generation: i64, ready: &str| {
            json!({"observedGeneration": generation,
                   "conditions": [{"type": "Ready", "status": ready}]})
        };
        let (mut in_flight, mut coalescer) = nothing_written();
        let mut writes = Writes::new(Kind::IscsiTarget, &mut in_flight, &mut coalescer);
        // Ready at generation 1; the spec changed, and generation 2 is not Ready yet.
        top_level_write(
            &mut writes,
            &meta,
            &status(2, "False"),
            &status(1, "True"),
            &|| false,
        );
        assert_eq!(
            writes.writes.len(),
            1,
            "the new generation's conditions, at once"
        );
        // A new object, not Ready yet: its first status waits for the next state.
        let mut writes = Writes::new(Kind::IscsiTarget, &mut in_flight, &mut coalescer);
        top_level_write(&mut writes, &meta, &status(1, "False"), &json!({}), &|| {
            false
        });
        assert!(writes.writes.is_empty() && writes.held_until.is_some());
    }

    #[test]
    fn a_kind_s_ready_waits_only_while_an_expected_live_node_has_no_entry() {
        let target: IscsiTarget = serde_json::from_value(json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "IscsiTarget",
            "metadata": {"name": "t", "namespace": "lab", "generation": 1},
            "spec": {"luns": [{"lun": 0, "image": "disc"}]},
            "status": {"nodes": [{"node": "a", "ready": true}, {"node": "b", "ready": true},
                                 {"node": "gone", "ready": true}]},
        }))
        .expect("a target");
        let objects = [Arc::new(DeserializeGuard(Ok(target)))];
        let live = |node: &str| match node {
            "gone" => Liveness::Gone,
            _ => Liveness::Live,
        };
        let plan = |expected: &[&str]| {
            let (mut in_flight, mut coalescer) = nothing_written();
            let mut writes = Writes::new(Kind::IscsiTarget, &mut in_flight, &mut coalescer);
            let expected: BTreeSet<String> = expected.iter().map(|n| n.to_string()).collect();
            plan_kind(
                &mut writes,
                objects.iter().cloned(),
                &live,
                |_| expected.clone(),
                |target, entries, status| {
                    let iqn = Some("iqn.2026-01.test.lab:t".to_owned());
                    status::target_status(target, entries, iqn, Some(status), Timestamp::now())
                },
            );
            let managers: Vec<String> = writes.writes.iter().map(|w| w.manager.clone()).collect();
            (managers, writes.held_until.is_some())
        };
        let gone = field_manager("gone");
        // Every node that should serve it reported (a gone node's entry is removed either way).
        assert_eq!(
            plan(&["a", "b"]),
            (vec![gone.clone(), MANAGER.to_owned()], false)
        );
        // Node c should, and has not: Ready waits; the removal does not.
        assert_eq!(plan(&["a", "b", "c"]), (vec![gone], true));
    }

    #[test]
    fn a_ready_waits_for_the_nodes_that_should_serve_and_have_not_reported() {
        let meta = target_meta();
        let ready = json!({"observedGeneration": 1,
                           "conditions": [{"type": "Ready", "status": "True"}]});
        let (mut in_flight, mut coalescer) = nothing_written();
        let mut writes = Writes::new(Kind::IscsiTarget, &mut in_flight, &mut coalescer);
        top_level_write(&mut writes, &meta, &ready, &json!({}), &|| true);
        assert!(writes.writes.is_empty() && writes.held_until.is_some());
        // Every node that should serve it reported: at once.
        let mut writes = Writes::new(Kind::IscsiTarget, &mut in_flight, &mut coalescer);
        top_level_write(&mut writes, &meta, &ready, &json!({}), &|| false);
        assert_eq!(writes.writes.len(), 1);
    }
}
