//! The whole-node sync: the same loop for `discus serve` and the Kubernetes agent.
//!
//! Level-triggered: every pass computes the complete desired state of the node from all the
//! resources, diffs it against what the backend holds, applies only the difference, and observes
//! again to see what converged. One pass at a time (one writer per node); images download in the
//! background and a finished import asks for another pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::Resource;
// Cannot be poisoned: facts read as empty after a panic would tear every placed target down.
use parking_lot::Mutex;

use crate::api::chap::{Password, SecretData};
use crate::api::disc_image::{ValidImage, ValidSource};
use crate::api::{DiscImage, InitiatorAccess, IscsiTarget};
use crate::backend::{Backend, BackendError, Failures, Operation, Session};
use crate::desired::TargetConfig;
use crate::desired::{
    self, Backing, DesiredState, Inputs, Kind, NodeFacts, ObjectKey, Problem, ReadyImage, Reason,
    Settings,
};
use crate::images::manager::{ImageManager, ImageState};
use crate::images::{self, HttpAuth, ImportRequest, Requester, Source};
use crate::metrics::{ErrorKind, Metrics};

/// Everything declared: the input of a sync.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub images: Vec<DiscImage>,
    pub targets: Vec<IscsiTarget>,
    pub grants: Vec<InitiatorAccess>,
    pub secrets: BTreeMap<ObjectKey, SecretData>,
    /// Some input could not be read and nothing earlier is known of it: what these resources do
    /// not declare may still be declared there. A pass then removes no target and no image.
    pub partial: bool,
}

/// Work that did not converge: an operation that failed, or one still planned after applying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsettled {
    pub target: Option<String>,
    pub initiator: Option<String>,
    pub message: String,
}

/// What one pass found and did on this node: the input of status.
#[derive(Debug, Default)]
pub struct NodeReport {
    pub node: String,
    pub backend: &'static str,
    pub desired: DesiredState,
    /// The desired state's problems, what the backend refused, and images that cannot be had.
    pub problems: Vec<Problem>,
    pub unsettled: Vec<Unsettled>,
    pub sessions: Vec<Session>,
    /// When each session (target, initiator, address) was first seen.
    pub session_since: BTreeMap<(String, String, String), Timestamp>,
    pub images: BTreeMap<ObjectKey, ImageState>,
    /// API LUN → the LUN initiators see.
    pub device_luns: BTreeMap<u32, u32>,
    /// The targets (IQNs) this pass read and reconciled; `None` when it covered all of them.
    /// Every other target is as the previous pass left it.
    pub scope: Option<BTreeSet<String>>,
    /// Lookups for status, built once a pass: statuses of thousands of resources must not each
    /// search the whole report.
    index: ReportIndex,
}

#[derive(Debug, Default)]
struct ReportIndex {
    target_by_owner: BTreeMap<ObjectKey, usize>,
    acl_by_grant: BTreeMap<ObjectKey, (usize, usize)>,
    problems: BTreeMap<(Kind, ObjectKey), Vec<usize>>,
    sessions: BTreeMap<String, Vec<usize>>,
}

impl NodeReport {
    /// Builds the lookups once the report is complete.
    fn index(&mut self) {
        let mut index = ReportIndex::default();
        for (t, target) in self.desired.targets.iter().enumerate() {
            index.target_by_owner.insert(target.owner.clone(), t);
            for (a, acl) in target.acls.iter().enumerate() {
                index.acl_by_grant.insert(acl.grant.clone(), (t, a));
            }
        }
        for (i, problem) in self.problems.iter().enumerate() {
            index
                .problems
                .entry((problem.kind, problem.key.clone()))
                .or_default()
                .push(i);
        }
        for (i, session) in self.sessions.iter().enumerate() {
            index
                .sessions
                .entry(session.target.clone())
                .or_default()
                .push(i);
        }
        self.index = index;
    }

    /// The LUN number initiators see for an API LUN, when it differs (status shows it only then).
    pub fn device_lun(&self, lun: u32) -> Option<u32> {
        self.device_luns.get(&lun).copied().filter(|d| *d != lun)
    }

    pub fn problems_of(&self, kind: Kind, key: &ObjectKey) -> impl Iterator<Item = &Problem> {
        self.index
            .problems
            .get(&(kind, key.clone()))
            .into_iter()
            .flatten()
            .filter_map(|i| self.problems.get(*i))
    }

    /// The target an IscsiTarget became on this node.
    pub fn served_target(&self, owner: &ObjectKey) -> Option<&TargetConfig> {
        self.index
            .target_by_owner
            .get(owner)
            .and_then(|t| self.desired.targets.get(*t))
    }

    /// The target and ACL a grant became on this node.
    pub fn grant_acl(&self, grant: &ObjectKey) -> Option<(&TargetConfig, &desired::AclConfig)> {
        let (t, a) = self.index.acl_by_grant.get(grant)?;
        let target = self.desired.targets.get(*t)?;
        Some((target, target.acls.get(*a)?))
    }

    /// The sessions on a target.
    pub fn sessions_on(&self, iqn: &str) -> impl Iterator<Item = &Session> {
        self.index
            .sessions
            .get(iqn)
            .into_iter()
            .flatten()
            .filter_map(|i| self.sessions.get(*i))
    }

    /// Whether this pass left a served target exactly as the previous pass did — outside its
    /// scope, without a problem, with nothing unsettled node-wide — so that its status is the
    /// previous one, unless its own declaration changed.
    pub fn untouched_target(&self, owner: &ObjectKey) -> bool {
        self.served_target(owner)
            .is_some_and(|target| self.untouched(&target.iqn))
            && self.problems_of(Kind::IscsiTarget, owner).next().is_none()
    }

    /// Like `untouched_target`, for a grant and the target it applies to.
    pub fn untouched_grant(&self, grant: &ObjectKey) -> bool {
        self.grant_acl(grant)
            .is_some_and(|(target, _)| self.untouched(&target.iqn))
            && self
                .problems_of(Kind::InitiatorAccess, grant)
                .next()
                .is_none()
            && !self.desired.expired.contains(grant)
    }

    fn untouched(&self, iqn: &str) -> bool {
        self.scope
            .as_ref()
            .is_some_and(|scope| !scope.contains(iqn))
            && self.unsettled.iter().all(|u| u.target.is_some())
    }

    /// What did not converge for a target (`initiator: None`) or for one grant on it: its own
    /// work, and work that concerns every target (a backend that cannot be reached).
    pub fn unsettled_messages(&self, iqn: &str, initiator: Option<&str>) -> Vec<&str> {
        self.unsettled
            .iter()
            .filter(|u| match (&u.target, &u.initiator) {
                (None, _) => true,
                (Some(target), None) => target == iqn,
                (Some(target), Some(who)) => target == iqn && initiator == Some(who.as_str()),
            })
            .map(|u| u.message.as_str())
            .collect()
    }
}

/// When the next pass is due without any change: at the next grant's expiry, or after `resync`
/// for a full pass that catches drift.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextPass {
    pub after: std::time::Duration,
    pub pass: Pass,
}

impl NodeReport {
    pub fn next_pass(&self, resync: std::time::Duration) -> NextPass {
        let expiry = self.desired.next_expiry.map(|at| {
            let wait = at.duration_since(Timestamp::now());
            // Just past the instant, so the pass sees the grant expired.
            std::time::Duration::try_from(wait).unwrap_or_default()
                + std::time::Duration::from_millis(10)
        });
        match expiry {
            Some(expiry) if expiry < resync => NextPass {
                after: expiry,
                pass: Pass::Changes,
            },
            _ => NextPass {
                after: resync,
                pass: Pass::Full,
            },
        }
    }
}

pub struct Syncer<B: Backend> {
    backend: B,
    images: ImageManager,
    /// The node's name, labels and addresses: they change when its Node does.
    node: Mutex<NodeFacts>,
    settings: Settings,
    default_max_virtual_size: u64,
    /// Fetch every declared image, not only those a target placed here needs (one server that
    /// is the only node).
    prefetch_all: bool,
    session_since: Mutex<BTreeMap<(String, String, String), Timestamp>>,
    memory: Mutex<Memory>,
    metrics: Arc<Metrics>,
}

/// Why a pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Read everything: the first pass, and the periodic one that finds drift.
    Full,
    /// Something declared changed (a file, an image, the clock of a grant): read only the
    /// targets the change touches, when the backend can.
    Changes,
}

/// What the previous pass left for the next.
#[derive(Clone, Debug, Default)]
struct Memory {
    targets: Option<Vec<TargetConfig>>,
    converged: bool,
    sessions: Vec<Session>,
    /// What the backend refused, by target IQN.
    refused: Vec<(String, Problem)>,
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
            session_since: Mutex::default(),
            memory: Mutex::default(),
        }
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
        let mut report = NodeReport {
            node: node.name.clone(),
            backend: self.backend.name(),
            ..NodeReport::default()
        };

        // What is stored already; the desired state says which of the rest this node needs.
        let requests = self.import_requests(resources, &mut report);
        let mut ready = BTreeMap::new();
        let mut partial = resources.partial;
        for (key, request) in &requests {
            match self.images.importer().lookup(request) {
                Ok(Some(stored)) => {
                    ready.insert(key.clone(), ready_image(&stored));
                    report.images.insert(key.clone(), ImageState::Ready(stored));
                }
                // A record that cannot be read is not "not stored": what it may hold stays.
                Err(images::ImportError::Store(error)) => {
                    tracing::warn!(%error, "the image store cannot say what it holds");
                    partial = true;
                }
                Ok(None) | Err(_) => {}
            }
        }
        // Partial input: read everything, so that what it may still declare is seen and kept.
        let pass = if partial { Pass::Full } else { pass };
        let mut state = desired::desired_state(&self.inputs(resources, &ready, &node, now));
        let mut newly_ready = false;
        let wanted: BTreeSet<ObjectKey> = if self.prefetch_all {
            requests.keys().cloned().collect()
        } else {
            state.needed_images.clone()
        };
        for key in &wanted {
            if let Some(request) = requests.get(key)
                && !ready.contains_key(key)
            {
                let image_state = self.images.ensure(request);
                if let ImageState::Ready(stored) = &image_state {
                    ready.insert(key.clone(), ready_image(stored));
                    newly_ready = true;
                }
                report.images.insert(key.clone(), image_state);
            }
        }
        if newly_ready {
            // An image turned out to be stored: compute again with it.
            state = desired::desired_state(&self.inputs(resources, &ready, &node, now));
        }
        for (key, image) in &report.images {
            if let ImageState::Failed { message, retry_at } = image {
                report.problems.push(Problem {
                    kind: Kind::DiscImage,
                    key: key.clone(),
                    reason: if retry_at.is_some() {
                        Reason::ImageNotReady
                    } else {
                        Reason::ImportFailed
                    },
                    message: message.clone(),
                });
            }
        }
        self.make_writable_copies(&mut state, &mut report).await;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "desired state computed"
        );

        self.reconcile(&state, &mut report, pass, partial).await;
        report.problems.extend(state.problems.iter().cloned());
        if !partial {
            self.collect_garbage(&requests, &state);
        }
        report.desired = state;
        report.index();
        self.metrics.pass_finished(pass, started.elapsed(), &report);
        report
    }

    fn inputs<'a>(
        &'a self,
        r: &'a Resources,
        ready: &'a BTreeMap<ObjectKey, ReadyImage>,
        node: &'a NodeFacts,
        now: Timestamp,
    ) -> Inputs<'a> {
        Inputs {
            images: &r.images,
            targets: &r.targets,
            grants: &r.grants,
            secrets: &r.secrets,
            node,
            ready,
            settings: &self.settings,
            now,
        }
    }

    /// An import request for every valid DiscImage (the invalid ones are the desired state's
    /// problems); those whose Secrets are missing become problems here.
    fn import_requests(
        &self,
        resources: &Resources,
        report: &mut NodeReport,
    ) -> BTreeMap<ObjectKey, ImportRequest> {
        let mut requests = BTreeMap::new();
        for image in &resources.images {
            let key = desired::object_key(image.meta());
            let Ok(valid) = image.spec.validate() else {
                continue;
            };
            match self.request(&key, valid, &resources.secrets) {
                Ok(request) => {
                    requests.insert(key, request);
                }
                Err(message) => report.problems.push(Problem {
                    kind: Kind::DiscImage,
                    key,
                    reason: Reason::SecretNotFound,
                    message,
                }),
            }
        }
        requests
    }

    fn request(
        &self,
        key: &ObjectKey,
        image: ValidImage,
        secrets: &BTreeMap<ObjectKey, SecretData>,
    ) -> Result<ImportRequest, String> {
        let source = match image.source {
            ValidSource::File { path } => Source::File { path: path.into() },
            ValidSource::Http {
                url,
                ca_bundle,
                headers,
            } => {
                let mut auth = HttpAuth::default();
                if let Some(reference) = ca_bundle {
                    let data = secrets.get(&key.sibling(&reference.name)).ok_or_else(|| {
                        format!(
                            "spec.source.http.caBundleSecretRef: Secret {} not found",
                            reference.name
                        )
                    })?;
                    let pem = data.get(&reference.key).ok_or_else(|| {
                        format!(
                            "spec.source.http.caBundleSecretRef: Secret {} has no key {}",
                            reference.name, reference.key
                        )
                    })?;
                    auth.ca_bundle = Some(pem.clone());
                }
                if let Some(reference) = headers {
                    let data = secrets.get(&key.sibling(&reference.name)).ok_or_else(|| {
                        format!(
                            "spec.source.http.headersSecretRef: Secret {} not found",
                            reference.name
                        )
                    })?;
                    for (name, value) in data {
                        let value = String::from_utf8(value.clone()).map_err(|_| {
                            format!(
                                "spec.source.http.headersSecretRef: the value of {name} is not text"
                            )
                        })?;
                        auth.headers.push((name.clone(), Password::new(value)));
                    }
                }
                Source::Http { url, auth }
            }
        };
        Ok(ImportRequest {
            requester: Requester::Namespace(key.namespace.clone()),
            source,
            sha256: image.sha256,
            format: image.format,
            max_virtual_size: image
                .max_virtual_size
                .unwrap_or(self.default_max_virtual_size),
        })
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

    /// Observe, plan, apply, observe again — everything, or, after a change, only the targets
    /// it touched (when the backend can, and the last pass converged).
    async fn reconcile(
        &self,
        state: &DesiredState,
        report: &mut NodeReport,
        pass: Pass,
        partial: bool,
    ) {
        for target in &state.targets {
            for lun in &target.luns {
                report
                    .device_luns
                    .insert(lun.lun, self.backend.device_lun(lun.lun));
            }
        }
        let memory = self.memory.lock().clone();
        let scope: Option<BTreeSet<String>> =
            (pass == Pass::Changes && self.backend.scoped() && memory.converged)
                .then_some(memory.targets.as_ref())
                .flatten()
                .map(|before| {
                    let now: BTreeMap<&str, &TargetConfig> =
                        state.targets.iter().map(|t| (t.iqn.as_str(), t)).collect();
                    let then: BTreeMap<&str, &TargetConfig> =
                        before.iter().map(|t| (t.iqn.as_str(), t)).collect();
                    now.keys()
                        .chain(then.keys())
                        .filter(|iqn| now.get(*iqn) != then.get(*iqn))
                        .map(|iqn| (*iqn).to_owned())
                        .collect()
                });
        let desired: Vec<TargetConfig> = match &scope {
            Some(iqns) => state
                .targets
                .iter()
                .filter(|t| iqns.contains(&t.iqn))
                .cloned()
                .collect(),
            None => state.targets.clone(),
        };
        if let Some(iqns) = &scope {
            tracing::debug!(targets = iqns.len(), "sync scoped to the changed targets");
        }
        report.scope = scope.clone();
        let observe = || async {
            let mut observed = match &scope {
                Some(iqns) if iqns.is_empty() => return None,
                Some(iqns) => self.backend.observe_scoped(&desired, iqns).await,
                None => self.backend.observe().await,
            };
            if partial && let Ok(observed) = &mut observed {
                self.backend.keep_undeclared(observed, &desired);
            }
            Some(observed)
        };

        let observed = match observe().await {
            // Nothing changed since a converged pass: nothing to read, nothing to do.
            None => {
                report.sessions = memory.sessions.clone();
                report
                    .problems
                    .extend(memory.refused.iter().map(|(_, p)| p.clone()));
                self.record_sessions(report);
                return;
            }
            Some(Ok(observed)) => observed,
            Some(Err(error)) => {
                self.metrics.error(ErrorKind::BackendObserve);
                report.unsettled.extend(desired.iter().map(|t| Unsettled {
                    target: Some(t.iqn.clone()),
                    initiator: None,
                    message: format!("{} backend: {error}", self.backend.name()),
                }));
                self.remember(state, report, &memory, scope.as_ref(), Vec::new());
                return;
            }
        };
        let plan = self.backend.plan(&desired, &observed);
        let mut failures = Failures::default();
        for op in &plan.ops {
            // After a failure, what builds on it would build on a missing step; revocations
            // still run.
            if !failures.admit(op) {
                continue;
            }
            tracing::info!(backend = self.backend.name(), "{op}");
            let applied = self.backend.apply(op).await;
            self.metrics
                .backend_operation(self.backend.name(), applied.is_ok());
            if let Err(error) = applied {
                tracing::warn!(backend = self.backend.name(), %error, "{op} failed");
                failures.record(op);
                report.unsettled.push(Unsettled {
                    target: op.target().map(str::to_owned),
                    initiator: op.initiator().map(str::to_owned),
                    message: error.to_string(),
                });
            }
        }
        report.problems.extend(plan.refused.iter().cloned());
        let refused = plan
            .refused
            .into_iter()
            .map(|problem| (refused_target(&desired, &problem), problem))
            .collect();
        let after = if plan.ops.is_empty() {
            // Nothing was changed: what was observed is what holds.
            Ok(observed)
        } else {
            observe()
                .await
                .unwrap_or_else(|| Err(BackendError::Unreachable("nothing to observe".into())))
        };
        match after {
            Ok(after) => {
                for op in self.backend.plan(&desired, &after).ops {
                    let already = report.unsettled.iter().any(|u| {
                        u.target.as_deref() == op.target()
                            && u.initiator.as_deref() == op.initiator()
                    });
                    if !already {
                        report.unsettled.push(Unsettled {
                            target: op.target().map(str::to_owned),
                            initiator: op.initiator().map(str::to_owned),
                            message: format!("not converged: {op}"),
                        });
                    }
                }
                report.sessions = self.backend.sessions(&after);
            }
            Err(error) => report.unsettled.push(Unsettled {
                target: None,
                initiator: None,
                message: format!("{} backend: {error}", self.backend.name()),
            }),
        }
        self.remember(state, report, &memory, scope.as_ref(), refused);
        self.record_sessions(report);
    }

    /// Keeps what the next pass needs to scope itself: the targets as applied, whether they
    /// converged, and what the backend said of the targets this pass did not read — their
    /// sessions, and what it refused — which this pass reports as still true.
    fn remember(
        &self,
        state: &DesiredState,
        report: &mut NodeReport,
        before: &Memory,
        scope: Option<&BTreeSet<String>>,
        mut refused: Vec<(String, Problem)>,
    ) {
        if let Some(iqns) = scope {
            let kept = before
                .sessions
                .iter()
                .filter(|s| !iqns.contains(&s.target))
                .cloned();
            report.sessions.extend(kept);
            report.sessions.sort();
            let kept: Vec<(String, Problem)> = before
                .refused
                .iter()
                .filter(|(iqn, _)| !iqns.contains(iqn))
                .cloned()
                .collect();
            report.problems.extend(kept.iter().map(|(_, p)| p.clone()));
            refused.extend(kept);
        }
        *self.memory.lock() = Memory {
            targets: Some(state.targets.clone()),
            converged: report.unsettled.is_empty(),
            sessions: report.sessions.clone(),
            refused,
        };
    }

    /// When each live session was first seen, for status.
    fn record_sessions(&self, report: &mut NodeReport) {
        let now = Timestamp::now();
        {
            let mut since = self.session_since.lock();
            let live: BTreeSet<(String, String, String)> = report
                .sessions
                .iter()
                .map(|s| {
                    (
                        s.target.clone(),
                        s.initiator.clone(),
                        s.address.clone().unwrap_or_default(),
                    )
                })
                .collect();
            since.retain(|k, _| live.contains(k));
            for key in live {
                since.entry(key).or_insert(now);
            }
            report.session_since = since.clone();
        }
    }

    /// Removes stored images no DiscImage names and no LUN uses. Callers run a sync only with a
    /// complete set of resources, so an empty list here really means "nothing declared".
    fn collect_garbage(&self, requests: &BTreeMap<ObjectKey, ImportRequest>, state: &DesiredState) {
        let mut needed = images::Needed {
            sources: Default::default(),
            served: state
                .targets
                .iter()
                .flat_map(|target| &target.luns)
                .filter_map(|lun| lun.backing.path().file_stem()?.to_str().map(str::to_owned))
                .collect(),
        };
        for request in requests.values() {
            needed.source(&request.sha256, &request.requester);
        }
        if let Err(error) = self.images.importer().store().collect_garbage(&needed) {
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

/// The IQN of the target a refusal is about: the target itself, or the one a grant applies to.
fn refused_target(targets: &[TargetConfig], problem: &Problem) -> String {
    targets
        .iter()
        .find(|t| match problem.kind {
            Kind::IscsiTarget => t.owner == problem.key,
            _ => t.acls.iter().any(|a| a.grant == problem.key),
        })
        .map(|t| t.iqn.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, grants: &[&str]) -> TargetConfig {
        TargetConfig {
            iqn: format!("iqn.2026-11.dev.discus:{name}"),
            owner: ObjectKey::new("lab", name),
            portals: Vec::new(),
            chap_required: false,
            luns: Vec::new(),
            acls: grants
                .iter()
                .map(|g| desired::AclConfig {
                    initiator: format!("iqn.2026-11.dev.discus:{g}"),
                    grant: ObjectKey::new("lab", *g),
                    chap: None,
                    luns: Vec::new(),
                })
                .collect(),
        }
    }

    fn report(scope: Option<&[&str]>) -> NodeReport {
        let mut report = NodeReport {
            scope: scope.map(|s| {
                s.iter()
                    .map(|t| format!("iqn.2026-11.dev.discus:{t}"))
                    .collect()
            }),
            ..NodeReport::default()
        };
        report.desired.targets = vec![target("a", &["a1"]), target("b", &["b1", "b2"])];
        report.problems.push(Problem {
            kind: Kind::InitiatorAccess,
            key: ObjectKey::new("lab", "b2"),
            reason: Reason::SecretNotFound,
            message: "spec.chap.secretRef: Secret chap not found".into(),
        });
        report.index();
        report
    }

    #[test]
    fn only_what_a_scoped_pass_did_not_read_is_untouched() {
        let key = |name: &str| ObjectKey::new("lab", name);
        let scoped = report(Some(&["a"]));
        assert!(!scoped.untouched_target(&key("a")), "in scope");
        assert!(!scoped.untouched_grant(&key("a1")), "its target in scope");
        assert!(scoped.untouched_target(&key("b")));
        assert!(scoped.untouched_grant(&key("b1")));
        assert!(!scoped.untouched_grant(&key("b2")), "it has a problem");
        assert!(!scoped.untouched_target(&key("c")), "not served");

        let full = report(None);
        assert!(
            !full.untouched_target(&key("b")),
            "a full pass reads everything"
        );

        let mut unsettled = report(Some(&["a"]));
        unsettled.unsettled.push(Unsettled {
            target: None,
            initiator: None,
            message: "lio backend: configfs is gone".into(),
        });
        assert!(!unsettled.untouched_target(&key("b")), "trouble node-wide");
    }
}
