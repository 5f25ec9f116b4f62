//! The lease holder: one agent at a time writes each resource's status — every node's entry,
//! from the nodes' reports (`reports`), and what no single node can say: the top-level
//! `observedGeneration` and conditions merged from the entries — in one write per object, and
//! only when it changed. An entry of a node that has written no report (an agent of an earlier
//! version, during an upgrade) is kept as the object has it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::DeleteParams;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::{Client, Resource};
use kube_lease_manager::LeaseManagerBuilder;
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::disc_image::{DiscImageNodeStatus, DiscImageStatus};
use crate::api::initiator_access::{AccessNodeStatus, HeartbeatStatus, InitiatorAccessStatus};
use crate::api::iscsi_target::{IscsiTargetStatus, TargetNodeStatus};
use crate::api::{DiscImage, InitiatorAccess, IscsiTarget};
use crate::desired::{Kind, ObjectKey, Snapshot, object_key, wake_for_expiry};
use crate::metrics::{Metrics, StatusWrite};
use crate::status;

use super::arrivals::{Arrival, Arrivals, Object, Reach, Telling};
use super::coalesce::{Coalescer, Standing, When, earliest};
use super::connection::ApiTimeouts;
use super::events::{self, State, Summary, Teller};
use super::expected::Expected;
use super::generated_secrets;
use super::liveness::{Liveness, NodeEntry, Tracker};
use super::node_status::{Coalesced, IN_FLIGHT_FOR};
use super::reports::{AllReports, Report, Reported};
use super::stores::{Stores, Wakers};
use super::upload_tokens::{self, Due};
use super::{StatusBody, bounded, merge_patch, patch_status, status_body};
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
    /// How long a watch of the nodes' reports lasts before it is renewed.
    pub api_timeouts: ApiTimeouts,
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
    metrics: Arc<Metrics>,
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
    let teller = Teller::new(client.clone(), &options.identity, Arc::clone(&metrics));
    let telling = Telling::start(teller, leading.clone(), wakers.aggregate.clone());
    let aggregator = Aggregator::new(
        client.clone(),
        options.lease_namespace.clone(),
        options.iqn_authority.clone(),
        telling,
        Tracker::new(Instant::now(), options.node_lost_after, options.prune_after),
        options.status_settle,
        metrics,
    );
    stores.ready().await;
    let mut was_holding = false;
    // Every node's reports, watched while this agent holds the lease.
    let mut reports: Option<AllReports> = None;
    loop {
        let holding = *leading.borrow_and_update();
        if holding != was_holding {
            tracing::info!(identity = %options.identity, holding, "leader lease");
            if holding {
                aggregator.liveness.lock().restart(Instant::now());
                // What the last term could not tell is the stored status's to show.
                let _ = aggregator.telling.taken_back();
                aggregator.arrivals.lock().clear();
            }
            was_holding = holding;
        }
        if !holding {
            reports = None;
            if leading.changed().await.is_err() {
                tracing::warn!("the leader election stopped");
                return;
            }
            continue;
        }
        let reports = reports.get_or_insert_with(|| {
            let (namespace, timeouts) = (&options.lease_namespace, &options.api_timeouts);
            AllReports::watch(
                client.clone(),
                namespace,
                timeouts,
                wakers.aggregate.clone(),
            )
        });
        aggregator.generate_secrets(&stores).await;
        let tokens_due = match &options.upload_keys {
            Some(keys) => aggregator.upload_tokens(&stores, keys).await,
            None => None,
        };
        // Before the reports are listed, no node seems to report: wait for them (their listing
        // wakes the aggregation).
        let aggregated = match reports.listed() {
            true => {
                aggregator
                    .aggregate(&stores, reports, Timestamp::now())
                    .await
            }
            false => None,
        };
        let wait = aggregated
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
    /// The agents' namespace, where the reports are.
    namespace: String,
    iqn_authority: String,
    liveness: Mutex<Tracker>,
    /// What was last written per object, until the store shows it, for `IN_FLIGHT_FOR` at
    /// most (see `node_status`).
    in_flight: Mutex<HashMap<Object, InFlight>>,
    /// Status that only reports progress waits here for the next (see `coalesce`).
    coalescer: Mutex<Coalescer<Object>>,
    /// Secrets created and not yet seen in the store, so that each is created once.
    created_secrets: Mutex<BTreeSet<ObjectKey>>,
    /// Upload tokens written, and when: not written again before the store shows them.
    written_tokens: Mutex<BTreeMap<ObjectKey, Instant>>,
    /// Token Secret names taken by Secrets discus did not make, told once each.
    taken_tokens: Mutex<BTreeSet<ObjectKey>>,
    /// How many objects' status the apiserver keeps otherwise than written, as last told.
    kept_otherwise_told: Mutex<usize>,
    /// The nodes each object was told to have reached, and the task that tells them (see
    /// `arrivals`).
    arrivals: Mutex<Arrivals>,
    telling: Telling,
    metrics: Arc<Metrics>,
}

/// How long a status the apiserver keeps otherwise than it was written (see `Writes::push`)
/// is not written again.
const KEPT_OTHERWISE_FOR: Duration = Duration::from_secs(10 * 60);

/// A write made, until the store shows it or `IN_FLIGHT_FOR` passed.
#[derive(Clone, Debug)]
pub struct InFlight {
    /// The status written, hashed: thousands are in flight on a cold start.
    digest: [u8; 32],
    /// The status itself, where the next write builds on it (a malformed object's).
    kept: Option<StatusBody>,
    /// The object's resourceVersion right after the write.
    version: Option<String>,
    /// The merge patch sent, hashed.
    patch: [u8; 32],
    /// What it said, for when the next write goes out (`coalesce`).
    standing: Standing,
    at: Instant,
}

impl InFlight {
    fn new(write: Write, version: Option<String>) -> Self {
        Self {
            digest: write.digest,
            patch: digest(&write.patch),
            kept: write.kept,
            version,
            standing: write.standing,
            at: Instant::now(),
        }
    }

    /// Whether writing `status` now would repeat this write while it may still land.
    fn repeats(&self, status: &RawValue, now: Instant) -> bool {
        self.digest == digest(status) && now.saturating_duration_since(self.at) < IN_FLIGHT_FOR
    }

    /// Whether the object is still as this write left it (`version`: its resourceVersion now).
    fn unchanged_at(&self, version: Option<&str>) -> bool {
        self.version.is_some() && self.version.as_deref() == version
    }
}

fn digest(status: &RawValue) -> [u8; 32] {
    Sha256::digest(status.get().as_bytes()).into()
}

struct Write {
    kind: Kind,
    key: ObjectKey,
    /// The merge patch that makes the object's status the one wanted…
    patch: StatusBody,
    /// …which is this, hashed…
    digest: [u8; 32],
    /// …and kept whole where the next write builds on it (see `InFlight::kept`).
    kept: Option<StatusBody>,
    standing: Standing,
}

/// What one pass of the lease holder does.
struct Plan {
    writes: Vec<Write>,
    /// Arrivals to tell once their status is written (see `arrivals`).
    arrivals_due: Vec<Arrival>,
    /// Nodes gone, whose reports are deleted.
    gone: Vec<String>,
    /// How long until something changes by itself.
    next: Option<Duration>,
}

/// The lease holder's writes, in the making.
struct Writes<'a> {
    kind: Kind,
    in_flight: &'a mut HashMap<Object, InFlight>,
    coalescer: &'a mut Coalescer<Object>,
    writes: Vec<Write>,
    /// When the earliest write held back falls due.
    held_until: Option<Instant>,
    /// Every node with an entry in an object gone over.
    nodes: BTreeSet<String>,
    /// Every object gone over.
    seen: HashSet<Object>,
    /// Objects whose status the apiserver keeps otherwise than it was written (see `push`).
    kept_otherwise: BTreeSet<Object>,
    /// The nodes each object was told to have reached, and the arrivals to tell now.
    told: &'a mut Arrivals,
    arrivals_due: Vec<Arrival>,
    now: Instant,
}

/// What a status write says, for when it goes out (see `coalesce`): what it says, and what the
/// object says now (`None`: no conditions yet).
struct Saying {
    standing: Standing,
    current: Option<Standing>,
}

impl<'a> Writes<'a> {
    fn new(
        kind: Kind,
        in_flight: &'a mut HashMap<Object, InFlight>,
        coalescer: &'a mut Coalescer<Object>,
        told: &'a mut Arrivals,
    ) -> Self {
        Self {
            kind,
            in_flight,
            coalescer,
            writes: Vec::new(),
            held_until: None,
            nodes: BTreeSet::new(),
            seen: HashSet::new(),
            kept_otherwise: BTreeSet::new(),
            told,
            arrivals_due: Vec::new(),
            now: Instant::now(),
        }
    }

    /// Queues the write of `wanted` over `current` (the object at `version`) unless the same is
    /// already in flight, would change nothing, or is not due yet (see `coalesce`).
    fn push(
        &mut self,
        key: &ObjectKey,
        version: Option<&str>,
        wanted: &Value,
        current: &Value,
        saying: Saying,
    ) -> StatusNow {
        let flight = (self.kind, key.clone());
        let Some(status) = status_body(wanted) else {
            return StatusNow::Held;
        };
        let written = self.in_flight.get(&flight);
        if written.is_some_and(|f| f.repeats(&status, self.now)) {
            return StatusNow::Stands;
        }
        // The object is as the last write left it, and yet not as wanted: the apiserver kept
        // less of the status than it was sent (CRDs older than this agent prune what they do
        // not know). The same patch again would change nothing, for a while: without this,
        // every object would be written again each time `IN_FLIGHT_FOR` passed; with it, once
        // every `KEPT_OTHERWISE_FOR`, which also heals the status once the CRDs are upgraded
        // (that changes no object).
        let sent = written
            .filter(|f| f.unchanged_at(version))
            .filter(|f| self.now.saturating_duration_since(f.at) < KEPT_OTHERWISE_FOR)
            .map(|f| f.patch);
        // The patch, made once: here when it is compared, below otherwise.
        let patch = sent.map(|_| status_body(&merge_patch(current, wanted)));
        if let (Some(sent), Some(Some(patch))) = (sent, &patch)
            && digest(patch) == sent
        {
            self.kept_otherwise.insert(flight);
            return StatusNow::Stands;
        }
        let written = written.map(|f| f.standing);
        let (standing, now) = (saying.standing, self.now);
        let due = (self.coalescer).due(&flight, standing, saying.current, written, now);
        if let When::At(at) = due {
            self.held_until = earliest(self.held_until, Some(at));
            return StatusNow::Held;
        }
        let patch = patch.unwrap_or_else(|| status_body(&merge_patch(current, wanted)));
        let Some(patch) = patch else {
            return StatusNow::Held;
        };
        let (kind, current) = (self.kind, saying.current);
        tracing::trace!(?kind, object = %key, ?standing, ?current, "status write due");
        self.writes.push(Write {
            kind: self.kind,
            key: flight.1,
            patch,
            digest: digest(&status),
            kept: None,
            standing,
        });
        StatusNow::Stands
    }

    /// The object has the status it wants: what was in flight has landed.
    fn landed(&mut self, key: &ObjectKey) {
        let flight = (self.kind, key.clone());
        self.coalescer.settled(&flight);
        self.in_flight.remove(&flight);
    }
}

/// The nodes' reports of one pass, by object.
#[derive(Default)]
struct NodeReports<'a> {
    by_object: HashMap<(Kind, &'a ObjectKey), Vec<(&'a str, &'a Reported)>>,
    /// Every node that writes reports: its reports alone say what its entries are.
    reporting: BTreeSet<&'a str>,
}

impl<'a> NodeReports<'a> {
    fn new(reports: &'a [Arc<Report>]) -> Self {
        let mut index = Self::default();
        for report in reports {
            index.reporting.insert(&report.node);
            for ((kind, key), reported) in &report.records {
                let entries = index.by_object.entry((*kind, key)).or_default();
                entries.push((&report.node, reported));
            }
        }
        index
    }

    /// An object's entries, by node: from each reporting node's report (about this very
    /// object, by uid), and as the object has them from the others — and from a node marked lost
    /// there that may still be dead (`unconfirmed`: a new lease holder has not seen it renew its
    /// heartbeat yet), lest a dead node's portals come back with each change of holder.
    fn entries<E: NodeEntry + DeserializeOwned>(
        &self,
        kind: Kind,
        meta: &ObjectMeta,
        in_object: Vec<E>,
        unconfirmed: &dyn Fn(&str) -> bool,
    ) -> Vec<E> {
        let key = object_key(meta);
        let uid = meta.uid.as_deref().unwrap_or_default();
        let mut entries: Vec<E> = (in_object.into_iter())
            .filter(|e| {
                let lost = e.is_marked_lost() && unconfirmed(e.node());
                !self.reporting.contains(e.node()) || lost
            })
            .collect();
        let kept: HashSet<String> = entries.iter().map(|e| e.node().to_owned()).collect();
        for (node, reported) in self.by_object.get(&(kind, &key)).into_iter().flatten() {
            if reported.uid != uid || kept.contains(*node) {
                continue;
            }
            // An entry that does not decode, or that names another node, is not trusted.
            match serde_json::from_str::<E>(reported.entry.get()) {
                Ok(entry) if entry.node() == *node => entries.push(entry),
                _ => {}
            }
        }
        entries.sort_by(|a, b| a.node().cmp(b.node()));
        entries
    }
}

impl Aggregator {
    pub fn new(
        client: Client,
        namespace: String,
        iqn_authority: String,
        telling: Telling,
        liveness: Tracker,
        status_settle: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            telling,
            arrivals: Mutex::default(),
            client,
            namespace,
            iqn_authority,
            liveness: Mutex::new(liveness),
            in_flight: Mutex::default(),
            coalescer: Mutex::new(Coalescer::new(status_settle)),
            created_secrets: Mutex::default(),
            written_tokens: Mutex::default(),
            taken_tokens: Mutex::default(),
            kept_otherwise_told: Mutex::default(),
            metrics,
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

    /// Writes every status that changed — the entries of lost nodes marked, those of gone ones
    /// left out, and their reports deleted; returns when something will change by itself (a
    /// grant expiring, a node turning lost or gone).
    pub async fn aggregate(
        &self,
        stores: &Stores,
        reports: &AllReports,
        now: Timestamp,
    ) -> Option<Duration> {
        let plan = self.plan(stores, &reports.newest(), &reports.nodes(), now);
        let failed: HashSet<Object> = futures::stream::iter(plan.writes)
            .map(|write| async move {
                let object = (write.kind, write.key.clone());
                (!self.write(write).await).then_some(object)
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .filter_map(|failed| async move { failed })
            .collect()
            .await;
        // An arrival is told once its status is written; a later pass tells the others.
        let (due, not_written): (Vec<_>, Vec<_>) =
            (plan.arrivals_due.into_iter()).partition(|arrival| !failed.contains(&arrival.object));
        for arrival in &not_written {
            self.arrivals.lock().untell(arrival);
        }
        self.telling.tell(due);
        self.delete_reports(reports.names_of(&plan.gone)).await;
        plan.next
    }

    /// The writes due now, the nodes gone, and how long until something changes by itself.
    fn plan(
        &self,
        stores: &Stores,
        reports: &[Arc<Report>],
        reporting: &BTreeSet<String>,
        now: Timestamp,
    ) -> Plan {
        let clock = Instant::now();
        let heartbeats = stores.heartbeats();
        let mut liveness = self.liveness.lock();
        liveness.observe(heartbeats.iter().map(|l| l.as_ref()), clock);
        let live = |node: &str| liveness.of(node, clock);
        let reported = NodeReports::new(reports);
        let (mut in_flight, mut coalescer) = (self.in_flight.lock(), self.coalescer.lock());
        let mut arrivals = self.arrivals.lock();
        for arrival in self.telling.taken_back() {
            arrivals.not_told(&arrival);
        }
        let mut writes = Writes::new(
            Kind::DiscImage,
            &mut in_flight,
            &mut coalescer,
            &mut arrivals,
        );
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
        let unconfirmed = |node: &str| !liveness.seen_renewing(node);
        let sources = Sources {
            reported: &reported,
            live: &live,
            unconfirmed: &unconfirmed,
        };
        plan_kind(
            &mut writes,
            images.iter().cloned(),
            &sources,
            |image: &DiscImage| expected.image(&object_key(image.meta())),
            |image, entries, status| status::image_status(image, entries, Some(status), now),
        );
        writes.kind = Kind::IscsiTarget;
        plan_kind(
            &mut writes,
            targets.iter().cloned(),
            &sources,
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
            &sources,
            |grant: &InitiatorAccess| expected.grant(&snapshot, &object_key(grant.meta())),
            |grant, entries, status| grant_status(stores, &snapshot, grant, entries, status, now),
        );
        let Writes {
            writes,
            held_until,
            mut nodes,
            seen,
            kept_otherwise,
            arrivals_due,
            ..
        } = writes;
        arrivals.retain(|object| seen.contains(object));
        self.tell_kept_otherwise(&kept_otherwise);
        coalescer.forget_stale(clock);
        // What was written for objects deleted since is of no use any more.
        in_flight.retain(|object, _| seen.contains(object));
        nodes.extend(reporting.iter().cloned());
        let gone = (reporting.iter())
            .filter(|node| live(node) == Liveness::Gone)
            .cloned()
            .collect();
        let next_change = liveness
            .next_change(nodes.iter().map(String::as_str), clock)
            .map(|at| at.saturating_duration_since(clock));
        let expiry = (snapshot.next_expiry(now)).map(|at| wake_for_expiry(at, now));
        let held = held_until.map(|at| at.saturating_duration_since(clock));
        let next = [expiry, next_change, held].into_iter().flatten().min();
        Plan {
            writes,
            arrivals_due,
            gone,
            next,
        }
    }

    /// Deletes the reports (ConfigMap name, node) of nodes that are gone (their entries are
    /// left out already).
    async fn delete_reports(&self, names: Vec<(String, String)>) {
        if names.is_empty() {
            return;
        }
        let api: kube::Api<ConfigMap> = kube::Api::namespaced(self.client.clone(), &self.namespace);
        for (name, node) in names {
            match bounded(api.delete(&name, &DeleteParams::default())).await {
                Ok(_) => {
                    tracing::info!(%node, report = %name, "deleted a report of a node that is gone")
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => {
                    tracing::warn!(%node, report = %name, %error, "cannot delete a report of a node that is gone")
                }
            }
        }
    }

    /// Says, when their number changes, how many objects' status the apiserver keeps
    /// otherwise than it was written (see `Writes::push`).
    fn tell_kept_otherwise(&self, objects: &BTreeSet<Object>) {
        let mut told = self.kept_otherwise_told.lock();
        if *told == objects.len() {
            return;
        }
        *told = objects.len();
        let Some((kind, example)) = objects.first() else {
            tracing::info!("the apiserver keeps every status as it was written again");
            return;
        };
        tracing::warn!(
            objects = objects.len(),
            example = %format_args!("{} {example}", kind.as_str()),
            "the apiserver keeps less of these objects' status than was written; each is \
             written again every 10 minutes at most: are the CRDs older than this agent? \
             See docs/install.md#upgrades-and-the-crds"
        );
    }

    /// Writes a status; whether it was written.
    async fn write(&self, write: Write) -> bool {
        let written = patch_status(&self.client, write.kind, &write.key, MANAGER, &write.patch);
        let written = written.await;
        if !matches!(&written, Err(kube::Error::Api(status)) if status.code == 404) {
            (self.metrics).status_written(StatusWrite::Object, written.is_ok());
        }
        match written {
            Ok(version) => {
                let flight = (write.kind, write.key.clone());
                self.coalescer.lock().settled(&flight);
                let written = InFlight::new(write, version);
                self.in_flight.lock().insert(flight, written);
                true
            }
            Err(kube::Error::Api(status)) if status.code == 404 => false,
            Err(error) => {
                tracing::warn!(kind = write.kind.as_str(), object = %write.key, %error, "cannot write status");
                false
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

/// Where an object's entries come from: the nodes' reports, judged by whether each node lives
/// (and whether this holder saw it renew its heartbeat).
struct Sources<'a> {
    reported: &'a NodeReports<'a>,
    live: &'a dyn Fn(&str) -> Liveness,
    unconfirmed: &'a dyn Fn(&str) -> bool,
}

/// One kind's writes: for each well-formed object, its status (from `status`) with every node's
/// entry — a lost node's marked, a gone node's left out — when that changed; a Ready waiting a
/// moment for the nodes `expected` says should report and have not; a malformed object is
/// marked Stalled. Every node with an entry goes to `writes.nodes`.
fn plan_kind<K: Aggregated>(
    writes: &mut Writes<'_>,
    objects: impl Iterator<Item = Arc<DeserializeGuard<K>>>,
    sources: &Sources<'_>,
    expected: impl Fn(&K) -> BTreeSet<String>,
    mut status: impl FnMut(&K, Vec<K::Entry>, &K::Status) -> K::Status,
) {
    for guarded in objects {
        match &guarded.0 {
            Ok(object) => {
                let current = object.current_status();
                let in_object = K::entries(&current);
                let entries = (sources.reported).entries(
                    writes.kind,
                    object.meta(),
                    in_object,
                    sources.unconfirmed,
                );
                (writes.nodes).extend(entries.iter().map(|e| e.node().to_owned()));
                let entries = judge(entries, sources.live);
                let reported: HashSet<String> =
                    entries.iter().map(|e| e.node().to_owned()).collect();
                let generation = object.meta().generation;
                let (reached, settled) = reach_of(&entries, generation);
                // A node's failure, expiry or anything only a person can fix goes out at once,
                // even beside a Ready, as the node sent it.
                let was = K::entries(&current);
                let urgent =
                    (entries.iter()).any(|e| e.standing() == Standing::Final && !was.contains(e));
                let wanted = status(object, entries, &current);
                // Asked only of a Ready about to be written.
                let unreported = || expected(object).iter().any(|n| !reported.contains(n));
                let (meta, urgent) = (object.meta(), urgent);
                let status = status_write(writes, meta, &wanted, &current, &unreported, urgent);
                let stands = status == StatusNow::Stands;
                let stored = || told_in(&was, generation, &expected(object));
                let all_settled = || settled && !unreported();
                queue_arrival(writes, object, (&reached, stands), stored, all_settled);
            }
            Err(invalid) => invalid_write(writes, invalid),
        }
    }
}

/// Where `entries` stand at `generation`, for arrivals: the nodes reached (good there, sorted),
/// and whether every entry has settled there — none on its way, none behind (a lost node's
/// aside). Current as the status's conditions judge it (`status::current`): an entry without a
/// generation counts as current, as CRDs older than the agents prune it.
fn reach_of<E: NodeEntry + Summary + Coalesced>(
    entries: &[E],
    generation: Option<i64>,
) -> (Vec<String>, bool) {
    let current = |e: &E| status::current(e.generation(), generation);
    let mut nodes: Vec<String> = (entries.iter())
        .filter(|e| current(e) && e.state() == State::Good)
        .map(|e| e.node().to_owned())
        .collect();
    nodes.sort();
    let settled =
        (entries.iter()).all(|e| e.is_marked_lost() || (current(e) && e.state() != State::Pending));
    (nodes, settled)
}

/// What a stored status says was told (by an earlier lease holder): the nodes it reached, when
/// every node that should serve the object was in it and it had settled; else nothing.
fn told_in<E: NodeEntry + Summary + Coalesced>(
    stored: &[E],
    generation: Option<i64>,
    expected: &BTreeSet<String>,
) -> Vec<String> {
    let has_entry = |node: &String| stored.iter().any(|e| e.node() == node);
    match reach_of(stored, generation) {
        (nodes, true) if expected.iter().all(has_entry) => nodes,
        _ => Vec::new(),
    }
}

/// Queues the arrival of the nodes `object` newly reached (`reached`, and whether its status
/// stands now), once it settled (see `arrivals`).
fn queue_arrival<K: Resource<DynamicType = ()>>(
    writes: &mut Writes<'_>,
    object: &K,
    (reached, stands): (&[String], bool),
    stored: impl FnOnce() -> Vec<String>,
    settled: impl FnOnce() -> bool,
) {
    let meta = object.meta();
    let key = (writes.kind, object_key(meta));
    let uid = meta.uid.as_deref().unwrap_or_default();
    let now = Reach {
        uid,
        generation: meta.generation,
        nodes: reached,
        stands,
        at: writes.now,
    };
    let nodes = writes.told.arrived(&key, &now, stored, settled);
    if !nodes.is_empty() {
        tracing::debug!(kind = key.0.as_str(), object = %key.1, ?nodes, generation = meta.generation, "arrival");
        writes.arrivals_due.push(Arrival {
            object: key,
            uid: uid.to_owned(),
            generation: meta.generation,
            nodes,
            reference: events::reference(object),
        });
    }
}

/// A kind whose status holds an entry from each node and a top level merged from them.
trait Aggregated: Resource<DynamicType = ()> {
    type Status: Serialize;
    type Entry: NodeEntry + Summary + Serialize + DeserializeOwned + Coalesced + PartialEq;
    fn current_status(&self) -> Self::Status;
    fn entries(status: &Self::Status) -> Vec<Self::Entry>;
}

/// `Aggregated` for a kind whose `status` has a `nodes` list.
macro_rules! reported {
    ($kind:ty, $status:ty, $entry:ty) => {
        impl Aggregated for $kind {
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

/// The entries to aggregate: a live node's as it reported it, a lost node's marked as such, a
/// gone node's left out.
fn judge<E: NodeEntry>(entries: Vec<E>, live: &dyn Fn(&str) -> Liveness) -> Vec<E> {
    let mut kept = Vec::new();
    for mut entry in entries {
        match live(entry.node()) {
            Liveness::Live => kept.push(entry),
            Liveness::Lost(message) => {
                if !entry.is_marked_lost() {
                    entry.mark_lost(&message);
                }
                kept.push(entry);
            }
            Liveness::Gone => {}
        }
    }
    kept
}

/// Whether a status stands now — written, in flight, or the object's already — or is held back
/// (or not written at all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StatusNow {
    Stands,
    Held,
}

/// The status, written when it differs from the object's; `unreported`: whether a node that
/// should serve the object has no entry in it yet; `urgent`: whether an entry says what users
/// act on.
fn status_write<S: Serialize>(
    writes: &mut Writes<'_>,
    meta: &ObjectMeta,
    wanted: &S,
    current: &S,
    unreported: &dyn Fn() -> bool,
    urgent: bool,
) -> StatusNow {
    let key = object_key(meta);
    writes.seen.insert((writes.kind, key.clone()));
    let value = |status: &S| serde_json::to_value(status);
    // Not written at all rather than written as nothing (said in the log).
    let (Ok(wanted), Ok(current)) = (value(wanted), value(current)) else {
        tracing::error!(object = %key, "a status that cannot be serialized is not written");
        return StatusNow::Held;
    };
    if wanted == current {
        writes.landed(&key);
        return StatusNow::Stands;
    }
    // Conditions about an older generation are what kstatus waits on after a change: the new
    // ones go out at once, whatever they say. (A new object has none yet.)
    let generations = (
        current.get("observedGeneration"),
        wanted.get("observedGeneration"),
    );
    let standing = match (generations, status_standing(&wanted)) {
        _ if urgent => Standing::Final,
        ((Some(seen), Some(now)), _) if seen != now => Standing::Final,
        (_, Standing::Ready) if unreported() => Standing::Partial,
        (_, standing) => standing,
    };
    let now = (current.get("conditions")).map(|_| status_standing(&current));
    let saying = Saying {
        standing,
        current: now,
    };
    let version = meta.resource_version.as_deref();
    writes.push(&key, version, &wanted, &current, saying)
}

/// What a status says, for when to write it (see `coalesce`): Ready; Stalled or Expired (access
/// ended), for users to act on; or on its way.
fn status_standing(status: &Value) -> Standing {
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
    writes.seen.insert((writes.kind, key.clone()));
    #[derive(serde::Deserialize)]
    struct Written {
        conditions: Vec<Condition>,
    }
    let written = (writes.in_flight).get(&(writes.kind, key.clone()));
    // Its status is not read (it does not decode): unchanged since this wrote it, it still holds
    // what this wrote, and at rest nothing is written again.
    let version = invalid.metadata.resource_version.as_deref();
    if written.is_some_and(|w| w.unchanged_at(version)) {
        return;
    }
    let previous: Vec<Condition> = (written.and_then(|w| w.kept.as_ref()))
        .and_then(|body| serde_json::from_str::<Written>(body.get()).ok())
        .map(|written| written.conditions)
        .unwrap_or_default();
    let conditions = status::invalid_conditions(
        &previous,
        &invalid.error,
        invalid.metadata.generation,
        Timestamp::now(),
    );
    let wanted = json!({ "conditions": conditions });
    let Some(status) = status_body(&wanted) else {
        return;
    };
    // Only the conditions change: the rest of the status is the nodes' and stays.
    writes.writes.push(Write {
        kind: writes.kind,
        key,
        patch: status.clone(),
        digest: digest(&status),
        kept: Some(status),
        standing: Standing::Final,
    });
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

    type Flights = HashMap<Object, InFlight>;

    /// What the lease holder keeps from pass to pass.
    struct Memory {
        in_flight: Flights,
        coalescer: Coalescer<Object>,
        arrivals: Arrivals,
    }

    impl Memory {
        /// A pass's writes of IscsiTargets over this memory.
        fn writes(&mut self) -> Writes<'_> {
            let Self {
                in_flight,
                coalescer,
                arrivals,
            } = self;
            Writes::new(Kind::IscsiTarget, in_flight, coalescer, arrivals)
        }
    }

    /// The lease holder's memory before any write: nothing in flight, nothing waiting, nothing
    /// told.
    fn nothing_written() -> Memory {
        Memory {
            in_flight: HashMap::new(),
            coalescer: Coalescer::new(Duration::from_secs(2)),
            arrivals: Arrivals::default(),
        }
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
        let mut memory = nothing_written();
        let mut writes = memory.writes();
        invalid_write(&mut writes, &invalid("7"));
        let Some(write) = writes.writes.pop() else {
            panic!("Stalled is written at once");
        };
        // Landed: the object is at version 8 after it.
        let flight = (Kind::IscsiTarget, object_key(&target_meta()));
        let landed = InFlight::new(write, Some("8".to_owned()));
        memory.in_flight.insert(flight, landed);
        let mut writes = memory.writes();
        writes.now = Instant::now() + 2 * super::super::node_status::IN_FLIGHT_FOR;
        invalid_write(&mut writes, &invalid("8"));
        assert!(writes.writes.is_empty(), "at rest, long after: nothing");
        invalid_write(&mut writes, &invalid("9"));
        assert_eq!(writes.writes.len(), 1, "changed since: written again");
    }

    #[test]
    fn a_status_the_apiserver_keeps_otherwise_is_written_twice_then_once_in_a_long_while() {
        let meta_at = |version: &str| ObjectMeta {
            resource_version: Some(version.to_owned()),
            ..target_meta()
        };
        // A CRD older than the agent prunes each node's observedGeneration.
        let status = |ready: bool| {
            json!({"observedGeneration": 1,
                   "nodes": [{"node": "a", "ready": ready, "observedGeneration": 1}]})
        };
        let (wanted, other) = (status(true), status(false));
        let kept = json!({"observedGeneration": 1, "nodes": [{"node": "a", "ready": true}]});
        let flight = (Kind::IscsiTarget, object_key(&target_meta()));
        let mut memory = nothing_written();
        let mut pass = |version: &str, current: &Value, wanted: &Value, after: Duration| {
            let mut writes = memory.writes();
            // Long after any write: none of them counts as in flight any more.
            writes.now = Instant::now() + after;
            status_write(
                &mut writes,
                &meta_at(version),
                wanted,
                current,
                &|| false,
                true,
            );
            let (written, kept_otherwise) = (writes.writes.pop(), writes.kept_otherwise.len());
            let sent = written.is_some();
            // Landed, the object left at version 8 (a patch that changes nothing keeps it).
            if let Some(write) = written {
                memory
                    .in_flight
                    .insert(flight.clone(), InFlight::new(write, Some("8".to_owned())));
            }
            (sent, kept_otherwise)
        };
        let a_while = 2 * IN_FLIGHT_FOR;
        assert_eq!(pass("7", &json!({}), &wanted, a_while), (true, 0), "new");
        // The store shows the write, pruned: the patch now differs (the nodes' list, whole).
        let second = pass("8", &kept, &wanted, a_while);
        assert_eq!(
            second,
            (true, 0),
            "the first patch was made against another status"
        );
        let third = pass("8", &kept, &wanted, a_while);
        assert_eq!(
            third,
            (false, 1),
            "the same patch to the same object: not sent"
        );
        let changed = pass("9", &kept, &wanted, a_while);
        assert_eq!(changed, (true, 0), "the object changed since: written");
        let other_status = pass("8", &kept, &other, a_while);
        assert_eq!(other_status, (true, 0), "another status wanted: written");
        assert_eq!(pass("8", &kept, &wanted, a_while), (true, 0), "back");
        assert_eq!(pass("8", &kept, &wanted, a_while), (false, 1));
        let much_later = a_while + KEPT_OTHERWISE_FOR;
        let healing = pass("8", &kept, &wanted, much_later);
        assert_eq!(
            healing,
            (true, 0),
            "in a long while: written (newer CRDs heal it)"
        );
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
        assert_eq!(status_standing(&ready), Standing::Ready);
        let stalled = conditions(&[("Ready", "False"), ("Stalled", "True")]);
        assert_eq!(status_standing(&stalled), Standing::Final);
        let expired = conditions(&[("Ready", "False"), ("Expired", "True")]);
        assert_eq!(status_standing(&expired), Standing::Final);
        let pending = conditions(&[("Ready", "False"), ("Reconciling", "True")]);
        assert_eq!(status_standing(&pending), Standing::Passing);
    }

    #[test]
    fn a_new_generation_goes_out_at_once_and_a_new_object_s_progress_waits() {
        let meta = target_meta();
        let status = |generation: i64, ready: &str| {
            json!({"observedGeneration": generation,
                   "conditions": [{"type": "Ready", "status": ready}]})
        };
        let mut memory = nothing_written();
        let mut writes = memory.writes();
        // Ready at generation 1; the spec changed, and generation 2 is not Ready yet.
        status_write(
            &mut writes,
            &meta,
            &status(2, "False"),
            &status(1, "True"),
            &|| false,
            false,
        );
        assert_eq!(
            writes.writes.len(),
            1,
            "the new generation's conditions, at once"
        );
        // A new object, not Ready yet: its first status waits for the next state.
        let mut writes = memory.writes();
        status_write(
            &mut writes,
            &meta,
            &status(1, "False"),
            &json!({}),
            &|| false,
            false,
        );
        assert!(writes.writes.is_empty() && writes.held_until.is_some());
    }

    /// A target whose status has entries of nodes a, b and gone.
    fn target_with_entries() -> IscsiTarget {
        serde_json::from_value(json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "IscsiTarget",
            "metadata": {"name": "t", "namespace": "lab", "generation": 1, "uid": "u1"},
            "spec": {"luns": [{"lun": 0, "image": "disc"}]},
            "status": {"nodes": [{"node": "a", "ready": true}, {"node": "b", "ready": true},
                                 {"node": "gone", "ready": true}]},
        }))
        .expect("a target")
    }

    /// The lease holder's plan for `target` with `reports`, `expected` the nodes that should
    /// serve it: the nodes of the status it writes (none: no write), whether it waits, and the
    /// notes of the Events it tells.
    fn plan_for(
        target: IscsiTarget,
        reports: &[Arc<Report>],
        expected: &[&str],
    ) -> (Option<Vec<String>>, bool, Vec<String>) {
        plan_told(target, reports, expected, &mut Arrivals::default())
    }

    /// `plan_for`, with what was `told` before.
    fn plan_told(
        target: IscsiTarget,
        reports: &[Arc<Report>],
        expected: &[&str],
        told: &mut Arrivals,
    ) -> (Option<Vec<String>>, bool, Vec<String>) {
        let objects = [Arc::new(DeserializeGuard(Ok(target)))];
        let live = |node: &str| match node {
            "gone" => Liveness::Gone,
            _ => Liveness::Live,
        };
        let reported = NodeReports::new(reports);
        let sources = Sources {
            reported: &reported,
            live: &live,
            unconfirmed: &|_| false,
        };
        let Memory {
            mut in_flight,
            mut coalescer,
            ..
        } = nothing_written();
        let mut writes = Writes::new(Kind::IscsiTarget, &mut in_flight, &mut coalescer, told);
        let expected: BTreeSet<String> = expected.iter().map(|n| n.to_string()).collect();
        plan_kind(
            &mut writes,
            objects.iter().cloned(),
            &sources,
            |_| expected.clone(),
            |target, entries, status| {
                let iqn = Some("iqn.2026-01.test.lab:t".to_owned());
                status::target_status(target, entries, iqn, Some(status), Timestamp::now())
            },
        );
        assert!(writes.writes.len() <= 1, "one write per object at most");
        let nodes = writes.writes.first().map(|write| {
            let status: Value = serde_json::from_str(write.patch.get()).expect("a status");
            (status["nodes"].as_array().into_iter().flatten())
                .map(|e| e["node"].as_str().unwrap_or_default().to_owned())
                .collect()
        });
        let told = (writes.arrivals_due.iter())
            .filter_map(|arrival| arrival.event().note)
            .collect();
        (nodes, writes.held_until.is_some(), told)
    }

    #[test]
    fn a_kind_s_ready_waits_only_while_an_expected_live_node_has_no_entry() {
        let nodes = |names: &[&str]| Some(names.iter().map(|n| n.to_string()).collect());
        // Every node that should serve it reported: one write, a gone node's entry left out.
        // Served on a and b already as stored: nothing told.
        assert_eq!(
            plan_for(target_with_entries(), &[], &["a", "b"]),
            (nodes(&["a", "b"]), false, vec![])
        );
        // Node c should, and has not: the write waits.
        assert_eq!(
            plan_for(target_with_entries(), &[], &["a", "b", "c"]),
            (None, true, vec![])
        );
    }

    #[test]
    fn a_new_object_ready_on_every_node_is_told_served_once_naming_them_all() {
        let mut target = target_with_entries();
        target.status = None;
        let reports: Vec<_> = (["a", "b", "c"].iter())
            .map(|n| report(n, "u1", n))
            .collect();
        let (nodes, held, told) = plan_for(target.clone(), &reports, &["a", "b", "c"]);
        assert_eq!((nodes.map(|n| n.len()), held), (Some(3), false));
        assert_eq!(told, ["served on nodes a, b, c"]);
        // Node d should serve it too: neither the Ready nor its Event goes out yet.
        let (nodes, held, told) = plan_for(target, &reports, &["a", "b", "c", "d"]);
        assert_eq!((nodes, held, told), (None, true, vec![]));
    }

    #[test]
    fn a_new_lease_holder_counts_a_stored_status_as_told_only_when_every_node_was_in_it() {
        // Stored: served on a and b (and a gone node). c should serve it and has no entry yet:
        // the last holder told nothing, so neither does the stored status count as told…
        let reports: Vec<_> = (["a", "b"].iter()).map(|n| report(n, "u1", n)).collect();
        let mut told = Arrivals::default();
        let expected = ["a", "b", "c"];
        let first = plan_told(target_with_entries(), &reports, &expected, &mut told);
        assert_eq!(first.2, Vec::<String>::new(), "c has not reported");
        // …and once c reports, every node is told.
        let reports: Vec<_> = (["a", "b", "c"].iter())
            .map(|n| report(n, "u1", n))
            .collect();
        let (_, _, notes) = plan_told(target_with_entries(), &reports, &expected, &mut told);
        assert_eq!(notes, ["served on nodes a, b, c"]);
        // Every node that should serve it in the stored status: told already, by the last holder.
        let (_, _, notes) = plan_for(target_with_entries(), &reports[..2], &["a", "b"]);
        assert!(notes.is_empty(), "{notes:?}");
    }

    /// Node `node`'s report with an entry of `lab/t` (uid `uid`) that names `named`.
    fn report(node: &str, uid: &str, named: &str) -> Arc<Report> {
        let entry =
            json!({"node": named, "ready": true, "message": format!("from {node}'s report")});
        let reported = Reported {
            uid: uid.to_owned(),
            entry: status_body(&entry).expect("an entry"),
        };
        let key = ObjectKey::new("lab", "t");
        let count = super::super::reports::shard_count(1, None);
        Arc::new(Report {
            node: node.to_owned(),
            name: super::super::reports::ShardName::of(Kind::IscsiTarget, &key, count),
            set: Timestamp::now(),
            records: BTreeMap::from([((Kind::IscsiTarget, key), reported)]),
        })
    }

    #[test]
    fn a_reporting_node_s_entry_is_what_its_report_says_about_this_very_object() {
        let entries = |reports: &[Arc<Report>]| {
            let reported = NodeReports::new(reports);
            let target = target_with_entries();
            let in_object = target.status.clone().map(|s| s.nodes).unwrap_or_default();
            let entries =
                reported.entries(Kind::IscsiTarget, &target.metadata, in_object, &|_| false);
            (entries.into_iter())
                .map(|e| (e.node, e.message.unwrap_or_default()))
                .collect::<Vec<_>>()
        };
        let from = |node: &str, message: &str| (node.to_owned(), message.to_owned());
        // No reports (agents of an earlier version): the object's entries.
        assert_eq!(
            entries(&[]),
            [from("a", ""), from("b", ""), from("gone", "")]
        );
        // Node b reports: its entry is its report's.
        assert_eq!(
            entries(&[report("b", "u1", "b")]),
            [
                from("a", ""),
                from("b", "from b's report"),
                from("gone", "")
            ]
        );
        // About an object of the same name deleted since, or naming another node: no entry of b.
        assert_eq!(
            entries(&[report("b", "u0", "b")]),
            [from("a", ""), from("gone", "")]
        );
        assert_eq!(
            entries(&[report("b", "u1", "a")]),
            [from("a", ""), from("gone", "")]
        );
        // Marked lost in the object by an earlier holder: kept so until this holder sees node b
        // renew its heartbeat, then its report's.
        let mut target = target_with_entries();
        let in_object: Vec<TargetNodeStatus> = (target.status.take().into_iter())
            .flat_map(|s| s.nodes)
            .map(|mut e| {
                if e.node == "b" {
                    e.mark_lost("b is silent");
                }
                e
            })
            .collect();
        let reports = [report("b", "u1", "b")];
        let reported = NodeReports::new(&reports);
        let b = |unconfirmed: bool| {
            let entries = reported.entries(
                Kind::IscsiTarget,
                &target.metadata,
                in_object.clone(),
                &|_| unconfirmed,
            );
            let b = entries.into_iter().find(|e| e.node == "b");
            b.is_some_and(|e| e.is_marked_lost())
        };
        assert!(b(true), "a new holder keeps the mark");
        assert!(!b(false), "renewing again: the report's");
    }

    #[test]
    fn a_write_the_store_never_shows_is_made_again_after_a_while() {
        let mut memory = nothing_written();
        let mut writes = memory.writes();
        let ready =
            json!({"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]});
        status_write(
            &mut writes,
            &target_meta(),
            &ready,
            &json!({}),
            &|| false,
            false,
        );
        let Some(write) = writes.writes.pop() else {
            panic!("Ready is written at once");
        };
        memory
            .in_flight
            .insert(write_key(&write), InFlight::new(write, None));
        let mut writes = memory.writes();
        status_write(
            &mut writes,
            &target_meta(),
            &ready,
            &json!({}),
            &|| false,
            false,
        );
        assert!(writes.writes.is_empty(), "just written: in flight");
        // Changed by someone else before the store showed it: written again after a while.
        writes.now = Instant::now() + IN_FLIGHT_FOR;
        status_write(
            &mut writes,
            &target_meta(),
            &ready,
            &json!({}),
            &|| false,
            false,
        );
        assert_eq!(writes.writes.len(), 1);
    }

    fn write_key(write: &Write) -> Object {
        (write.kind, write.key.clone())
    }

    #[test]
    fn a_ready_waits_for_the_nodes_that_should_serve_and_have_not_reported() {
        let meta = target_meta();
        let ready = json!({"observedGeneration": 1,
                           "conditions": [{"type": "Ready", "status": "True"}]});
        let mut memory = nothing_written();
        let mut writes = memory.writes();
        status_write(&mut writes, &meta, &ready, &json!({}), &|| true, false);
        assert!(writes.writes.is_empty() && writes.held_until.is_some());
        // Every node that should serve it reported: at once.
        let mut writes = memory.writes();
        status_write(&mut writes, &meta, &ready, &json!({}), &|| false, false);
        assert_eq!(writes.writes.len(), 1);
    }
}
