//! The agent's view of the cluster: a reflector per kind in every watched namespace, the Secrets
//! there, its own Node, and the heartbeat Leases. A change that matters to the sync — a spec, an
//! object created or deleted, a Secret, the Node's labels or addresses — wakes the sync loop; a
//! status change wakes only the lease holder, so that agents writing status do not wake each
//! other's syncs.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::api::initiator_access::{GRANT_HEARTBEAT_LABEL, InitiatorAccessStatus};
use crate::api::rules;
use crate::api::{DiscImage, InitiatorAccess, IscsiTarget};
use crate::desired::{Holds, NodeFacts, ObjectKey, object_key};
use crate::manifests::ObjectId;
use crate::metrics::{ErrorKind, Metrics};
use crate::sync::Resources;

use super::connection::ApiTimeouts;
use super::heartbeat::node_hash;
use super::holds::{GrantLeases, HoldTracker, Renewal};
use super::reports::REPORT_LABEL;
use super::watch_backoff::watch_backoff;

/// Label of the heartbeat Leases, whose value is the node's name hashed (see `heartbeat`).
pub const HEARTBEAT_LABEL: &str = "discus.dev/heartbeat";

/// What wakes whom.
#[derive(Clone, Default)]
pub struct Wakers {
    /// Something the desired state depends on changed.
    pub sync: Arc<Notify>,
    /// Something the lease holder aggregates changed (nodes' reports, specs, status).
    pub aggregate: Arc<Notify>,
    /// A heartbeat Lease changed: the lease holder checks whether a node came back.
    pub heartbeat: Arc<Notify>,
    /// This node's labels or addresses changed, or became known: its heartbeat tells new labels
    /// within a second.
    pub node: Arc<Notify>,
}

impl Wakers {
    fn both(&self) {
        self.sync.notify_one();
        self.aggregate.notify_one();
    }
}

pub struct Stores {
    images: Vec<Store<DeserializeGuard<DiscImage>>>,
    targets: Vec<Store<DeserializeGuard<IscsiTarget>>>,
    grants: Vec<Store<DeserializeGuard<InitiatorAccess>>>,
    secrets: Vec<Store<Secret>>,
    node: Store<Node>,
    heartbeats: Store<Lease>,
    /// This node's reports (`reports`; the lease holder watches every node's itself).
    reports: Store<ConfigMap>,
    /// The Leases holders of grants held by heartbeat renew, one store per namespace.
    grant_leases: Vec<Store<Lease>>,
    holds: Arc<Mutex<HoldTracker>>,
    node_name: String,
}

/// What the stores hold at one moment.
#[derive(Default)]
pub struct Snapshot {
    pub resources: Resources,
    /// Objects that are not even well-formed, with why.
    pub invalid: Vec<(ObjectId, String)>,
}

impl Stores {
    /// Starts every watch (as background tasks); `namespaces` empty means all of them. Heartbeat
    /// Leases live in `lease_namespace`. Every watch ends before the client's read deadline.
    pub fn start(
        client: &Client,
        namespaces: &[String],
        node_name: &str,
        lease_namespace: &str,
        wakers: &Wakers,
        timeouts: &ApiTimeouts,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let watch = |w: &Wakers| Watch {
            wakers: w.clone(),
            metrics: Arc::clone(metrics),
        };
        let namespaces: Vec<Option<String>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.iter().cloned().map(Some).collect()
        };
        let mut stores = Self {
            images: Vec::new(),
            targets: Vec::new(),
            grants: Vec::new(),
            secrets: Vec::new(),
            node: spawn_reflector(
                Api::all(client.clone()),
                timeouts
                    .watcher()
                    .fields(&format!("metadata.name={node_name}")),
                NodeChanges::default(),
                watch(wakers),
            ),
            heartbeats: spawn_reflector(
                Api::namespaced(client.clone(), lease_namespace),
                timeouts.watcher().labels(HEARTBEAT_LABEL),
                Heartbeats,
                watch(wakers),
            ),
            reports: spawn_reflector(
                Api::namespaced(client.clone(), lease_namespace),
                timeouts
                    .watcher()
                    .labels(&format!("{REPORT_LABEL}={}", node_hash(node_name))),
                OwnReports,
                watch(wakers),
            ),
            grant_leases: Vec::new(),
            holds: Arc::default(),
            node_name: node_name.to_owned(),
        };
        for namespace in &namespaces {
            stores.images.push(spawn_reflector(
                namespaced_api(client, namespace),
                timeouts.watcher(),
                SpecChanges::default(),
                watch(wakers),
            ));
            stores.targets.push(spawn_reflector(
                namespaced_api(client, namespace),
                timeouts.watcher(),
                SpecChanges::default(),
                watch(wakers),
            ));
            stores.grants.push(spawn_reflector(
                namespaced_api(client, namespace),
                timeouts.watcher(),
                SpecChanges::default(),
                watch(wakers),
            ));
            stores.secrets.push(spawn_reflector(
                namespaced_api(client, namespace),
                timeouts.watcher(),
                EveryChange,
                watch(wakers),
            ));
            stores.grant_leases.push(spawn_reflector(
                namespaced_api(client, namespace),
                timeouts.watcher().labels(GRANT_HEARTBEAT_LABEL),
                GrantLeases::new(Arc::clone(&stores.holds), namespace.clone()),
                watch(wakers),
            ));
        }
        stores
    }

    /// Waits until every store has listed once: before that, an empty store would look like
    /// "nothing is declared" and the sync would remove every target.
    pub async fn ready(&self) {
        while !self.unlisted().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The kinds whose watches have not listed yet (all of them listed: a complete view).
    pub fn unlisted(&self) -> Vec<&'static str> {
        let mut waiting = Vec::new();
        let mut check = |name: &'static str, ready: bool| {
            if !ready {
                waiting.push(name);
            }
        };
        check("DiscImage", self.images.iter().all(listed));
        check("IscsiTarget", self.targets.iter().all(listed));
        check("InitiatorAccess", self.grants.iter().all(listed));
        check("Secret", self.secrets.iter().all(listed));
        check("Node", listed(&self.node));
        check("Lease", listed(&self.heartbeats));
        check(
            "Lease (grant heartbeats)",
            self.grant_leases.iter().all(listed),
        );
        waiting
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let r = &mut snapshot.resources;
        // A pass reads no status but images' (where other nodes hold an uploaded image) and the
        // node entries of grants with a boot block (the other nodes' portals for the script):
        // the rest is copied without, the larger part of a busy cluster's objects.
        r.images = valid(&self.images, &mut snapshot.invalid, DiscImage::clone);
        r.targets = valid(&self.targets, &mut snapshot.invalid, target_for_pass);
        r.grants = valid(&self.grants, &mut snapshot.invalid, grant_for_pass);
        for store in &self.secrets {
            for secret in store.state() {
                r.secrets.insert(
                    object_key(&secret.metadata),
                    crate::api::chap::secret_data(&secret),
                );
            }
        }
        // An image or a target that cannot be decoded is not "not declared": nothing it may
        // declare is removed (its targets admit nobody) until it decodes.
        snapshot.resources.partial = snapshot
            .invalid
            .iter()
            .any(|(id, _)| matches!(id.kind.as_str(), "DiscImage" | "IscsiTarget"));
        snapshot.resources.holds = Some(self.holds(&snapshot.resources.grants));
        snapshot
    }

    /// Whether each grant held by heartbeat is held now, on this node's clock.
    fn holds(&self, grants: &[InitiatorAccess]) -> Holds {
        let now = std::time::Instant::now();
        let tracker = self.holds.lock();
        let held = grants.iter().filter_map(|grant| {
            let grace = rules::grace_seconds(grant.spec.heartbeat.as_ref()?.grace_seconds).ok()?;
            let key = object_key(&grant.metadata);
            let hold = tracker.judge(&key, grace, now);
            Some((key, hold))
        });
        held.collect()
    }

    /// The holder and last renewal of a grant's Lease, as this node saw them.
    pub fn renewal(&self, grant: &ObjectKey) -> Option<Renewal> {
        self.holds.lock().renewal(grant)
    }

    /// The node's labels and InternalIP addresses, once its Node is known.
    pub fn node_facts(&self) -> Option<NodeFacts> {
        let node = self.node.state().into_iter().next()?;
        Some(node_facts(&self.node_name, &node))
    }

    /// A Secret in a watched namespace's store.
    pub fn secret(&self, key: &ObjectKey) -> Option<Arc<Secret>> {
        let reference = reflector::ObjectRef::new(&key.name).within(&key.namespace);
        self.secrets.iter().find_map(|store| store.get(&reference))
    }

    /// Whether a Secret is in a watched namespace's store.
    pub fn secret_exists(&self, key: &ObjectKey) -> bool {
        let reference = reflector::ObjectRef::new(&key.name).within(&key.namespace);
        self.secrets
            .iter()
            .any(|store| store.get(&reference).is_some())
    }

    pub fn heartbeats(&self) -> Vec<Arc<Lease>> {
        self.heartbeats.state()
    }

    /// This node's reports, once listed: a pass needs none (their watch failing must not stop
    /// a pass, nor with it the end of an expiring grant), only the next publication.
    pub fn own_reports(&self) -> Option<Vec<Arc<ConfigMap>>> {
        listed(&self.reports).then(|| self.reports.state())
    }

    /// Returns once this node's reports are listed (or their watch has ended, as `listed`).
    pub async fn own_reports_listed(&self) {
        let _ended = self.reports.wait_until_ready().await;
    }

    pub fn images(&self) -> impl Iterator<Item = Arc<DeserializeGuard<DiscImage>>> + '_ {
        self.images.iter().flat_map(Store::state)
    }

    pub fn targets(&self) -> impl Iterator<Item = Arc<DeserializeGuard<IscsiTarget>>> + '_ {
        self.targets.iter().flat_map(Store::state)
    }

    pub fn grants(&self) -> impl Iterator<Item = Arc<DeserializeGuard<InitiatorAccess>>> + '_ {
        self.grants.iter().flat_map(Store::state)
    }
}

/// What a pass reads of a target: no status.
fn target_for_pass(target: &IscsiTarget) -> IscsiTarget {
    IscsiTarget {
        metadata: target.metadata.clone(),
        spec: target.spec.clone(),
        status: None,
    }
}

/// What a pass reads of a grant: for one with a boot block, the node entries (the other nodes'
/// portals, for its script); no other status.
fn grant_for_pass(grant: &InitiatorAccess) -> InitiatorAccess {
    let entries =
        (grant.spec.boot.as_ref().and(grant.status.as_ref())).map(|status| InitiatorAccessStatus {
            nodes: status.nodes.clone(),
            ..InitiatorAccessStatus::default()
        });
    InitiatorAccess {
        metadata: grant.metadata.clone(),
        spec: grant.spec.clone(),
        status: entries,
    }
}

/// Whether a store has listed once (a dropped writer counts: its watch is gone for good).
fn listed<K: Resource + Clone>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + Hash + Clone,
{
    store.wait_until_ready().now_or_never().is_some()
}

fn namespaced_api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// The well-formed objects of some stores, copied as far as `copy` goes; the others go to
/// `invalid`.
fn valid<K: Resource<DynamicType = ()> + Clone>(
    stores: &[Store<DeserializeGuard<K>>],
    invalid: &mut Vec<(ObjectId, String)>,
    copy: impl Fn(&K) -> K,
) -> Vec<K> {
    let mut objects = Vec::new();
    for store in stores {
        for guarded in store.state() {
            match &guarded.0 {
                Ok(object) => objects.push(copy(object)),
                Err(error) => invalid.push((
                    ObjectId {
                        kind: K::kind(&()).into_owned(),
                        key: object_key(&error.metadata),
                    },
                    error.error.clone(),
                )),
            }
        }
    }
    objects
}

pub fn node_facts(name: &str, node: &Node) -> NodeFacts {
    let listed = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten());
    let addresses: Vec<IpAddr> = listed
        .clone()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let spec = node.spec.as_ref();
    let pod_networks = spec
        .and_then(|s| s.pod_cidrs.clone())
        .into_iter()
        .flatten()
        .chain(spec.and_then(|s| s.pod_cidr.clone()))
        .filter_map(|cidr| cidr.parse::<ipnet::IpNet>().ok());
    let own_networks = listed
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .map(ipnet::IpNet::from)
        .chain(pod_networks)
        .collect();
    NodeFacts {
        name: name.to_owned(),
        labels: node.labels().clone(),
        addresses,
        own_networks,
    }
}

/// Decides, for each watch event, whom it wakes.
pub(super) trait Relevance<K>: Send + 'static {
    fn wake(&mut self, event: &watcher::Event<K>, wakers: &Wakers);
}

/// DiscImage, IscsiTarget, InitiatorAccess: a new generation (the spec changed), a new or deleted
/// object wakes the sync; any change (status included) wakes the lease holder.
#[derive(Default)]
struct SpecChanges {
    generations: HashMap<String, Option<i64>>,
}

impl<K: Resource> Relevance<K> for SpecChanges {
    fn wake(&mut self, event: &watcher::Event<K>, wakers: &Wakers) {
        match event {
            watcher::Event::Apply(object) | watcher::Event::InitApply(object) => {
                let uid = object.meta().uid.clone().unwrap_or_default();
                let generation = object.meta().generation;
                if self.generations.insert(uid, generation) != Some(generation) {
                    wakers.sync.notify_one();
                }
                wakers.aggregate.notify_one();
            }
            watcher::Event::Delete(object) => {
                self.generations
                    .remove(object.meta().uid.as_deref().unwrap_or_default());
                wakers.both();
            }
            watcher::Event::Init => {}
            watcher::Event::InitDone => wakers.both(),
        }
    }
}

/// Secrets: every change can matter (a rotated CHAP password).
struct EveryChange;

impl<K> Relevance<K> for EveryChange {
    fn wake(&mut self, event: &watcher::Event<K>, wakers: &Wakers) {
        if !matches!(event, watcher::Event::Init) {
            wakers.both();
        }
    }
}

/// The Node: only its labels and addresses matter, not the kubelet's heartbeats in its status.
#[derive(Default)]
struct NodeChanges {
    last: Option<(std::collections::BTreeMap<String, String>, Vec<IpAddr>)>,
}

impl Relevance<Node> for NodeChanges {
    fn wake(&mut self, event: &watcher::Event<Node>, wakers: &Wakers) {
        let facts = match event {
            watcher::Event::Apply(node) | watcher::Event::InitApply(node) => {
                let facts = node_facts("", node);
                Some((facts.labels, facts.addresses))
            }
            watcher::Event::Delete(_) => None,
            watcher::Event::Init => return,
            // The store holds what a (re)list brought only from here on.
            watcher::Event::InitDone => {
                wakers.both();
                wakers.node.notify_one();
                return;
            }
        };
        if facts != self.last {
            self.last = facts;
            wakers.both();
            wakers.node.notify_one();
        }
    }
}

/// A node's own reports wake nobody: it knows what it wrote, and reads them when it next
/// publishes.
struct OwnReports;

impl Relevance<ConfigMap> for OwnReports {
    fn wake(&mut self, _: &watcher::Event<ConfigMap>, _: &Wakers) {}
}

/// Heartbeats concern the lease holder only.
struct Heartbeats;

impl Relevance<Lease> for Heartbeats {
    fn wake(&mut self, event: &watcher::Event<Lease>, wakers: &Wakers) {
        if !matches!(event, watcher::Event::Init) {
            wakers.heartbeat.notify_one();
        }
    }
}

/// Whom a watch wakes, and where its failures count.
struct Watch {
    wakers: Wakers,
    metrics: Arc<Metrics>,
}

/// A store kept by a background watch (with backoff on errors, never giving up, and kept up
/// while failures keep coming: `watch_backoff`), waking whoever `relevance` says.
fn spawn_reflector<K, R>(
    api: Api<K>,
    config: watcher::Config,
    mut relevance: R,
    Watch { wakers, metrics }: Watch,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    R: Relevance<K>,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let stream = watcher(api, config)
        .backoff(watch_backoff())
        .modify(|object: &mut K| slim(object.meta_mut()))
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => relevance.wake(&event, &wakers),
                Err(error) => {
                    metrics.error(ErrorKind::Watch);
                    tracing::warn!(%kind, %error, "watch failed; retrying");
                }
            }
        }
    });
    reader
}

/// The annotation client-side `kubectl apply` (and tools built on it) keeps the object's last
/// applied form in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops from an object what nobody here reads and what would cost memory for thousands of
/// them: who wrote which field (managedFields) and the copy of the whole object client-side
/// apply keeps in an annotation — for a Secret, a second copy of the secret.
fn slim(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_nobody_reads_is_not_kept_and_the_rest_is() {
        let mut secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "chap", "namespace": "lab",
                "annotations": {
                    LAST_APPLIED: "{\"data\":{\"password\":\"c2VjcmV0\"}}",
                    "team": "boot",
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
            "data": {"password": "c2VjcmV0"},
        }))
        .expect("a Secret");
        slim(secret.meta_mut());
        assert_eq!(secret.metadata.managed_fields, None);
        let annotations = secret.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["team"]);
        assert!(secret.data.is_some_and(|d| d.contains_key("password")));
    }

    #[test]
    fn a_pass_gets_a_grant_s_node_entries_only_when_it_has_a_boot_block() {
        let grant = |boot: serde_json::Value| -> InitiatorAccess {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "discus.dev/v1alpha1", "kind": "InitiatorAccess",
                "metadata": {"name": "pxe-1", "namespace": "lab"},
                "spec": {"targetRef": {"name": "boot"}, "initiatorIqn": "iqn.2010-04.org.ipxe:pxe-1",
                         "boot": boot},
                "status": {"observedGeneration": 1, "connection": {"iqn": "iqn.2026-11.dev.discus:lab.boot"},
                           "nodes": [{"node": "node-b", "applied": true}]},
            }))
            .expect("an InitiatorAccess")
        };
        let booting = grant_for_pass(&grant(
            serde_json::json!({"macAddresses": ["52:54:00:12:34:56"]}),
        ));
        let status = booting.status.expect("the entries");
        assert_eq!(status.nodes.len(), 1);
        assert_eq!(
            (status.connection, status.observed_generation),
            (None, None)
        );
        assert_eq!(grant_for_pass(&grant(serde_json::Value::Null)).status, None);
    }

    fn guarded(value: serde_json::Value) -> DeserializeGuard<DiscImage> {
        serde_json::from_value(value).expect("a guard always decodes")
    }

    #[test]
    fn a_malformed_object_is_set_aside_with_why_and_the_others_kept() {
        let (reader, mut writer) = reflector::store::<DeserializeGuard<DiscImage>>();
        let good = guarded(serde_json::json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "DiscImage",
            "metadata": {"name": "good", "namespace": "lab", "uid": "1"},
            "spec": {"source": {"file": {"path": "/srv/a.iso"}}, "format": "iso",
                     "sha256": "ad0d2d0256c2a826232a63c44422745af135642c0aceaed052216215868e4795"},
        }));
        let bad = guarded(serde_json::json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "DiscImage",
            "metadata": {"name": "bad", "namespace": "lab", "uid": "2"},
            "spec": {"source": {"file": {"path": "/srv/b.iso"}}, "sha256": 5},
        }));
        writer.apply_watcher_event(&watcher::Event::Apply(good));
        writer.apply_watcher_event(&watcher::Event::Apply(bad));
        let mut invalid = Vec::new();
        let images = valid(&[reader], &mut invalid, DiscImage::clone);
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].metadata.name.as_deref(), Some("good"));
        assert_eq!(invalid.len(), 1);
        let (id, why) = &invalid[0];
        assert_eq!(
            (id.kind.as_str(), id.key.name.as_str()),
            ("DiscImage", "bad")
        );
        assert!(why.contains("integer `5`"), "{why}");
    }
}
