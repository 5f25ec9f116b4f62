//! The pass: from everything declared to the node's desired state — images looked up, fetched
//! and copied as the targets placed here need them — then reconciled (reconcile.rs), with
//! images no longer needed collected.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
// Cannot be poisoned: facts read as empty after a panic would tear every placed target down.
use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::Resources;
use super::reconcile::Memory;
use super::report::{NodeReport, Pass};
use super::requests::{UploadReception, import_requests};
use super::sessions::{SessionBook, SessionChange};
use crate::api::disc_image::NodeEndpointStatus;
use crate::backend::Backend;
use crate::boot::{BootTable, BootTables};
use crate::desired::{
    self, Backing, DesiredState, Inputs, Kind, NodeFacts, ObjectKey, Problem, ReadyImage, Reason,
    Settings,
};
use crate::images::manager::{ImageManager, ImageState};
use crate::images::{self, ImportRequest};
use crate::metrics::Metrics;

/// How many session changes wait for the Event teller before the oldest are dropped (the log
/// line of each is written regardless).
const SESSION_NEWS: usize = 1024;

pub struct Syncer<B: Backend> {
    pub(super) backend: B,
    pub(super) images: ImageManager,
    /// The node's name, labels and addresses: they change when its Node does.
    pub(super) node: Mutex<NodeFacts>,
    pub(super) settings: Settings,
    pub(super) default_max_virtual_size: u64,
    /// Fetch every declared image, not only those a target placed here needs (one server that
    /// is the only node).
    pub(super) prefetch_all: bool,
    /// The live sessions, from pass to pass.
    pub(super) sessions: Mutex<SessionBook>,
    /// Sessions begun and ended, for whoever tells them as Events (the agent).
    pub(super) session_news: broadcast::Sender<SessionChange>,
    pub(super) memory: Mutex<Memory>,
    pub(super) metrics: Arc<Metrics>,
    /// The boot endpoint's table, when it serves: kept to what each pass applied.
    pub(super) boot: Option<BootTables>,
    /// Whether the node receives uploads.
    pub(super) uploads: UploadReception,
}

impl<B: Backend> Syncer<B> {
    pub fn new(
        backend: B,
        images: ImageManager,
        node: NodeFacts,
        mut settings: Settings,
        default_max_virtual_size: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        settings.cdrom_supported = backend.capabilities().cdrom;
        Self {
            metrics,
            backend,
            images,
            node: Mutex::new(node),
            settings,
            default_max_virtual_size,
            prefetch_all: false,
            sessions: Mutex::default(),
            session_news: broadcast::channel(SESSION_NEWS).0,
            memory: Mutex::default(),
            boot: None,
            uploads: UploadReception::off_in_agent(),
        }
    }

    /// Whether the node receives uploads (off by default).
    pub fn with_uploads(mut self, uploads: UploadReception) -> Self {
        self.uploads = uploads;
        self
    }

    /// The boot endpoint's table, when it serves.
    pub fn boot_tables(&self) -> Option<&BootTables> {
        self.boot.as_ref()
    }

    /// Keeps `tables` to the boot grants each pass applies, for the boot endpoint.
    pub fn with_boot(mut self, tables: BootTables) -> Self {
        self.boot = Some(tables);
        self
    }

    /// Sessions begun and ended on this node from now on, as passes see them.
    pub fn session_news(&self) -> broadcast::Receiver<SessionChange> {
        self.session_news.subscribe()
    }

    /// The node's metrics, which every pass updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Fetches every declared image, as a single server should.
    pub fn prefetch_all(mut self) -> Self {
        self.prefetch_all = true;
        self
    }

    pub fn images(&self) -> &ImageManager {
        &self.images
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn node_facts(&self) -> NodeFacts {
        self.node.lock().clone()
    }

    /// The node's labels or addresses changed: the next pass places targets by the new ones.
    pub fn set_node_facts(&self, facts: NodeFacts) {
        *self.node.lock() = facts;
    }

    /// One pass. Never fails: what goes wrong is in the report, for status.
    pub async fn sync(&self, resources: &Resources, now: Timestamp, pass: Pass) -> NodeReport {
        let started = std::time::Instant::now();
        self.metrics.pass_started();
        let node = self.node_facts();
        self.images.importer().deny_node(&node.own_networks);
        let mut report = NodeReport::new(&node.name, self.backend.name());
        report.grant_uids = (resources.grants.iter())
            .filter_map(|g| Some((desired::object_key(&g.metadata), g.metadata.uid.clone()?)))
            .collect();
        report.read = resources.read();
        // Every spec validated once, for everything this pass computes.
        let snapshot = resources.snapshot();
        // Until the files served at the start are known, an unchecked image cannot be told
        // from one that is served: the pass removes nothing.
        let served_unknown = !self.learn_what_was_served().await;

        // What is stored already; the desired state says which of the rest this node needs.
        let requests = import_requests(
            &snapshot,
            &node.name,
            self.default_max_virtual_size,
            &self.uploads,
            &mut report.problems,
        );
        let (mut ready, store_unreadable) = self.stored(&requests, &mut report);
        let partial = resources.partial || store_unreadable || served_unknown;
        // Partial input: read everything, so that what it may still declare is seen and kept.
        let pass = if partial { Pass::Full } else { pass };
        let desired_state = |ready: &BTreeMap<ObjectKey, ReadyImage>| {
            desired::desired_state(&Inputs {
                snapshot: &snapshot,
                node: &node,
                ready,
                settings: &self.settings,
                now,
                holds: resources.holds.as_ref(),
            })
        };
        let mut state = desired_state(&ready);
        // Revocations first: what the declarations no longer back stops booting now, before
        // imports and copies take their time.
        if let Some(boot) = &self.boot {
            boot.retain_desired(&state);
        }
        let wanted: BTreeSet<ObjectKey> = if self.prefetch_all {
            requests.keys().cloned().collect()
        } else {
            state.needed_images.clone()
        };
        if self.fetch(&wanted, &requests, &mut ready, &mut report) {
            // An image turned out to be stored: compute again with it.
            state = desired_state(&ready);
        }
        if !partial {
            let asked = wanted.iter().filter_map(|key| requests.get(key));
            self.images.end_uploads_except(asked);
        }
        self.make_writable_copies(&mut state, &mut report).await;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "desired state computed"
        );

        // And what the target is about to lose, before it does.
        if let Some(boot) = &self.boot {
            boot.retain_desired(&state);
        }
        self.reconcile(&state, &mut report, pass, partial).await;
        report.problems.extend(state.problems.iter().cloned());
        if !partial {
            self.collect_garbage(&requests, &state);
        }
        report.desired = state;
        report.upload = self.upload_endpoint(&node.addresses);
        report.offered = self.offer_uploads(&requests, &report);
        report.index();
        if let Some(boot) = &self.boot {
            let table = BootTable::applied(&report, &resources.grants);
            report.booting = table.grants();
            report.boot_urls = boot.urls(&node.addresses);
            boot.replace(table);
        }
        self.metrics
            .pass_finished(&report.summary(pass, started.elapsed()));
        report
    }

    /// Once after the start: tells the scrub which stored files the target serves already (they
    /// stay served while it checks them). Whether they are known.
    async fn learn_what_was_served(&self) -> bool {
        let scrub = self.images.scrub();
        if scrub.knows_what_was_served() {
            return true;
        }
        match self.backend.observe().await {
            Ok(observed) => {
                scrub.served_at_start(&self.backend.backing_files(&observed));
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read which images the target serves; removing nothing");
                false
            }
        }
    }

    /// The requested images the store holds, and whether it could not say (a record that cannot
    /// be read is not "not stored": what it may hold stays).
    fn stored(
        &self,
        requests: &BTreeMap<ObjectKey, ImportRequest>,
        report: &mut NodeReport,
    ) -> (BTreeMap<ObjectKey, ReadyImage>, bool) {
        let mut ready = BTreeMap::new();
        let mut unreadable = false;
        for (key, request) in requests {
            match self.images.stored(request) {
                Ok(Some(stored)) => {
                    ready.insert(key.clone(), ready_image(&stored));
                    report.images.insert(key.clone(), ImageState::Ready(stored));
                }
                Err(images::ImportError::Store(error)) => {
                    tracing::warn!(%error, "the image store cannot say what it holds");
                    unreadable = true;
                }
                Ok(None) | Err(_) => {}
            }
        }
        (ready, unreadable)
    }

    /// Starts (or follows) the import of every wanted image not stored yet; failed imports
    /// become problems. Returns whether one turned out to be stored.
    fn fetch(
        &self,
        wanted: &BTreeSet<ObjectKey>,
        requests: &BTreeMap<ObjectKey, ImportRequest>,
        ready: &mut BTreeMap<ObjectKey, ReadyImage>,
        report: &mut NodeReport,
    ) -> bool {
        let mut newly_ready = false;
        for key in wanted {
            let Some(request) = requests.get(key).filter(|_| !ready.contains_key(key)) else {
                continue;
            };
            let image_state = self.images.ensure(request);
            match &image_state {
                ImageState::Ready(stored) => {
                    ready.insert(key.clone(), ready_image(stored));
                    newly_ready = true;
                }
                ImageState::Failed { message, retry_at } => report.problems.push(Problem {
                    kind: Kind::DiscImage,
                    key: key.clone(),
                    reason: if retry_at.is_some() {
                        Reason::ImageNotReady
                    } else {
                        Reason::ImportFailed
                    },
                    message: message.clone(),
                }),
                ImageState::InProgress(_) => {
                    if let Some(message) = self.images.rotten(request) {
                        report.problems.push(Problem {
                            kind: Kind::DiscImage,
                            key: key.clone(),
                            reason: Reason::StoredImageRotten,
                            message,
                        });
                    }
                }
            }
            report.images.insert(key.clone(), image_state);
        }
        newly_ready
    }

    /// Copies the image of every writable LUN that has no copy yet; a LUN whose copy cannot be
    /// made keeps its target out, with the reason.
    async fn make_writable_copies(&self, state: &mut DesiredState, report: &mut NodeReport) {
        let mut failed = Vec::new();
        for target in &state.targets {
            for lun in &target.luns {
                let Backing::WritableCopy { seed, path } = &lun.backing else {
                    continue;
                };
                if path.exists() {
                    continue;
                }
                let (seed, path) = (seed.clone(), path.clone());
                let copied =
                    tokio::task::spawn_blocking(move || images::copy_for_writing(&seed, &path))
                        .await;
                if let Err(message) = copied
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                {
                    failed.push((
                        target.iqn.clone(),
                        target.owner.clone(),
                        format!("LUN {}: cannot make its writable copy: {message}", lun.lun),
                    ));
                }
            }
        }
        for (iqn, owner, message) in failed {
            state.targets.retain(|t| t.iqn != iqn);
            report.problems.push(Problem {
                kind: Kind::IscsiTarget,
                key: owner,
                reason: Reason::ImageNotReady,
                message,
            });
        }
    }

    /// Where clients reach this node's upload endpoint, if it has one.
    fn upload_endpoint(&self, addresses: &[std::net::IpAddr]) -> Option<NodeEndpointStatus> {
        let UploadReception::On(receiving) = &self.uploads else {
            return None;
        };
        Some(NodeEndpointStatus {
            urls: crate::http_server::reachable(receiving.bound, addresses)
                .into_iter()
                .map(|at| format!("https://{at}"))
                .collect(),
            certificate_sha256: receiving.certificate_sha256.clone(),
        })
    }

    /// The uploaded images this node gives the other nodes from now on: those it holds Ready
    /// and hashed since its start (a copy served since before the start waits for the scrub).
    fn offer_uploads(
        &self,
        requests: &BTreeMap<ObjectKey, ImportRequest>,
        report: &NodeReport,
    ) -> BTreeSet<ObjectKey> {
        let importer = self.images.importer();
        let mut offered = BTreeSet::new();
        let mut keys = BTreeSet::new();
        if report.upload.is_some() {
            for (key, request) in requests {
                let uploaded = matches!(
                    request.source,
                    images::Source::Upload { .. } | images::Source::Peer(_)
                );
                let (Some(ImageState::Ready(stored)), images::Requester::Namespace(namespace)) =
                    (report.images.get(key), &request.requester)
                else {
                    continue;
                };
                if uploaded
                    && importer
                        .store()
                        .verified_at(&stored.served_sha256)
                        .is_some()
                {
                    offered.insert((request.sha256.clone(), namespace.clone()));
                    keys.insert(key.clone());
                }
            }
        }
        importer.peer_offers().replace(offered);
        keys
    }

    /// Removes stored images no DiscImage names and no LUN uses. Callers run a sync only with a
    /// complete set of resources, so an empty list here really means "nothing declared".
    fn collect_garbage(&self, requests: &BTreeMap<ObjectKey, ImportRequest>, state: &DesiredState) {
        let mut needed = images::Needed {
            sources: Default::default(),
            uploads: Default::default(),
            served: state
                .targets
                .iter()
                .flat_map(|target| &target.luns)
                .filter_map(|lun| lun.backing.path().file_stem()?.to_str().map(str::to_owned))
                .collect(),
        };
        let importer = self.images.importer();
        for request in requests.values() {
            needed.source(&request.sha256, &request.requester);
            // An upload whose image is stored is done with (a crash may have come between
            // storing it and removing it); one that cannot be judged is kept.
            if let images::Source::Upload { uid } = &request.source
                && !matches!(importer.lookup(request), Ok(Some(_)))
            {
                needed.uploads.insert(uid.clone());
            }
        }
        if let Err(error) = importer.store().collect_garbage(&needed) {
            tracing::warn!(%error, "garbage collection failed");
        }
    }
}

fn ready_image(stored: &images::StoredImage) -> ReadyImage {
    ReadyImage {
        path: stored.path.clone(),
        size_bytes: stored.virtual_size,
        served_sha256: stored.served_sha256.clone(),
    }
}
