//! Prometheus metrics of a storage node, and the health the HTTP endpoints report. One
//! `Metrics` per process, shared by the syncer and whatever feeds it (the agent's status writer,
//! events, watches).
//!
//! Health is about the node's sync loop, the one thing that ends access on time: it is unhealthy
//! when a pass runs for too long, or — for a loop that promised a cadence — when no pass has
//! finished for too long, before the first pass included (its watches never listed, its Node
//! never appeared). `/healthz` says which.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A pass that runs longer than this is stuck: `/healthz` fails, so that the kubelet restarts
/// the agent (targets keep serving meanwhile).
const STUCK_AFTER: Duration = Duration::from_secs(15 * 60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PassLabels {
    /// `full` (reads everything, finds drift) or `changes` (only what changed).
    pass: &'static str,
}

/// What one sync pass leaves in the metrics: a small summary, so that metrics need not know
/// the sync's report.
#[derive(Debug)]
pub struct PassSummary<'a> {
    /// `full` or `changes`.
    pub pass: &'static str,
    pub took: Duration,
    pub targets: usize,
    /// The target (IQN) of each session.
    pub sessions: Vec<&'a str>,
    /// Kind and reason of each problem.
    pub problems: Vec<(&'static str, String)>,
    /// State (`ready`, `in_progress`, `failed`) and stored bytes of each image.
    pub images: Vec<(&'static str, u64)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    backend: &'static str,
    /// `ok` or `error`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

/// What failed, for `discus_errors_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ErrorKind {
    /// A backend operation failed.
    BackendOperation,
    /// The backend could not be read.
    BackendObserve,
    /// An image could not be imported.
    Import,
    /// A status write to the apiserver failed.
    StatusWrite,
    /// An event could not be published.
    Event,
    /// A watch failed (it is retried).
    Watch,
    /// A stored image's bytes no longer matched their digest (the scrub removed it).
    StoredImageRotten,
}

impl ErrorKind {
    fn label(self) -> &'static str {
        match self {
            Self::BackendOperation => "backend_operation",
            Self::BackendObserve => "backend_observe",
            Self::Import => "import",
            Self::StatusWrite => "status_write",
            Self::Event => "event",
            Self::Watch => "watch",
            Self::StoredImageRotten => "stored_image_rotten",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProblemLabels {
    kind: &'static str,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScrubLabels {
    /// `whole` or `rotten`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusWriteLabels {
    /// `report` (this node's entries, in its ConfigMaps) or `object` (an object's whole
    /// status, written by the lease holder).
    to: &'static str,
}

/// Where a status write goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusWrite {
    /// This node's report (`agent::reports`).
    Report,
    /// An object's status, by the lease holder.
    Object,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BootLabels {
    /// `served`, `asked_for_mac`, `rate_limited`, or why no script was served.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImageLabels {
    /// `ready`, `in_progress` or `failed`.
    state: &'static str,
}

pub struct Metrics {
    registry: Registry,
    sync_passes: Family<PassLabels, Counter>,
    sync_duration: Family<PassLabels, Histogram>,
    backend_operations: Family<OperationLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    targets: Gauge,
    sessions: Family<TargetLabels, Gauge>,
    problems: Family<ProblemLabels, Gauge>,
    images: Family<ImageLabels, Gauge>,
    image_bytes: Gauge,
    scrubbed: Family<ScrubLabels, Counter>,
    scrubbed_bytes: Counter,
    boot_requests: Family<BootLabels, Counter>,
    status_writes: Family<StatusWriteLabels, Counter>,
    events: Counter,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    /// A pass has completed: the node serves what it was told.
    ready: bool,
    /// When the running pass started.
    running_since: Option<Instant>,
    /// When the last pass finished.
    finished_at: Option<Instant>,
    /// Set by a loop that finishes a pass at least this often while it is alive, and since when.
    cadence: Option<(Instant, Duration)>,
    /// Why the loop runs no pass now, if it says.
    waiting: Option<String>,
}

impl Health {
    /// Why the loop is stuck at `now`, if it is.
    fn stuck(&self, now: Instant) -> Option<String> {
        if let Some(since) = self.running_since {
            let running = now.saturating_duration_since(since);
            return (running >= STUCK_AFTER)
                .then(|| format!("a sync pass has been running for {}s", running.as_secs()));
        }
        let (started, bound) = self.cadence?;
        let silent = now.saturating_duration_since(self.finished_at.unwrap_or(started));
        if silent < bound {
            return None;
        }
        let why = self
            .waiting
            .as_deref()
            .map(|w| format!(": {w}"))
            .unwrap_or_default();
        Some(match self.finished_at {
            None => format!(
                "no sync pass has finished in the {}s since the start{why}",
                silent.as_secs()
            ),
            Some(_) => format!(
                "no sync pass has finished for {}s (the bound is {}s){why}",
                silent.as_secs(),
                bound.as_secs()
            ),
        })
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("discus");
        let sync_passes = Family::<PassLabels, Counter>::default();
        registry.register(
            "sync_passes",
            "Sync passes completed, by kind (full: drift check; changes: only what changed)",
            sync_passes.clone(),
        );
        let sync_duration = Family::<PassLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ])
        });
        registry.register_with_unit(
            "sync_duration",
            "How long a sync pass took",
            prometheus_client::registry::Unit::Seconds,
            sync_duration.clone(),
        );
        let backend_operations = Family::<OperationLabels, Counter>::default();
        registry.register(
            "backend_operations",
            "Operations applied to the target software (configfs writes, tgtadm calls)",
            backend_operations.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register("errors", "Errors, by what failed", errors.clone());
        let targets = Gauge::default();
        registry.register("targets", "Targets this node should serve", targets.clone());
        let sessions = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "target_sessions",
            "Initiator sessions per target (IQN)",
            sessions.clone(),
        );
        let problems = Family::<ProblemLabels, Gauge>::default();
        registry.register(
            "problems",
            "Resources this node cannot serve as declared, by kind and reason",
            problems.clone(),
        );
        let images = Family::<ImageLabels, Gauge>::default();
        registry.register("images", "Images this node needs, by state", images.clone());
        let image_bytes = Gauge::default();
        registry.register_with_unit(
            "image_store",
            "Size of the images this node has ready",
            prometheus_client::registry::Unit::Bytes,
            image_bytes.clone(),
        );
        let scrubbed = Family::<ScrubLabels, Counter>::default();
        registry.register(
            "scrubbed_images",
            "Stored images read and checked against their digest, by result",
            scrubbed.clone(),
        );
        let scrubbed_bytes = Counter::default();
        registry.register_with_unit(
            "scrubbed",
            "Bytes of stored images read to check them",
            prometheus_client::registry::Unit::Bytes,
            scrubbed_bytes.clone(),
        );
        let boot_requests = Family::<BootLabels, Counter>::default();
        registry.register(
            "boot_requests",
            "Requests to the boot endpoint, by what they got",
            boot_requests.clone(),
        );
        let status_writes = Family::<StatusWriteLabels, Counter>::default();
        registry.register(
            "status_writes",
            "Status writes to the apiserver: this node's reports, objects' status by the lease \
             holder (zero at rest)",
            status_writes.clone(),
        );
        let events = Counter::default();
        registry.register("events", "Kubernetes Events published", events.clone());
        Self {
            registry,
            sync_passes,
            sync_duration,
            backend_operations,
            errors,
            targets,
            sessions,
            problems,
            images,
            image_bytes,
            scrubbed,
            scrubbed_bytes,
            boot_requests,
            status_writes,
            events,
            health: Mutex::default(),
        }
    }

    /// A stored image of `bytes` was read and found whole, or not.
    pub fn scrubbed(&self, bytes: u64, whole: bool) {
        let result = if whole { "whole" } else { "rotten" };
        self.scrubbed.get_or_create(&ScrubLabels { result }).inc();
        self.scrubbed_bytes.inc_by(bytes);
    }

    /// A request to the boot endpoint got `result`.
    pub fn boot_request(&self, result: &'static str) {
        self.boot_requests
            .get_or_create(&BootLabels { result })
            .inc();
    }

    pub fn pass_started(&self) {
        self.health.lock().running_since = Some(Instant::now());
    }

    /// The sync loop starts, and promises to finish a pass at least every `bound` from now on
    /// while it is alive: past it, the node is unhealthy.
    pub fn expect_passes_within(&self, bound: Duration) {
        self.health.lock().cadence = Some((Instant::now(), bound));
    }

    /// Why the loop runs no pass now (`None`: it does).
    pub fn waiting(&self, why: Option<String>) {
        self.health.lock().waiting = why;
    }

    /// Records a finished pass and what its report says the node holds.
    pub fn pass_finished(&self, summary: &PassSummary<'_>) {
        let labels = PassLabels { pass: summary.pass };
        self.sync_passes.get_or_create(&labels).inc();
        self.sync_duration
            .get_or_create(&labels)
            .observe(summary.took.as_secs_f64());
        self.targets
            .set(i64::try_from(summary.targets).unwrap_or(i64::MAX));
        // Families are rebuilt each pass, so that removed targets and solved problems vanish.
        self.sessions.clear();
        for target in &summary.sessions {
            self.sessions
                .get_or_create(&TargetLabels {
                    target: (*target).to_owned(),
                })
                .inc();
        }
        self.problems.clear();
        for (kind, reason) in &summary.problems {
            self.problems
                .get_or_create(&ProblemLabels {
                    kind,
                    reason: reason.clone(),
                })
                .inc();
        }
        self.images.clear();
        let mut bytes: u64 = 0;
        for (state, stored) in &summary.images {
            bytes = bytes.saturating_add(*stored);
            self.images.get_or_create(&ImageLabels { state }).inc();
        }
        self.image_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        let mut health = self.health.lock();
        health.ready = true;
        health.running_since = None;
        health.finished_at = Some(Instant::now());
    }

    pub fn backend_operation(&self, backend: &'static str, ok: bool) {
        self.backend_operations
            .get_or_create(&OperationLabels {
                backend,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        if !ok {
            self.error(ErrorKind::BackendOperation);
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors
            .get_or_create(&ErrorLabels { kind: kind.label() })
            .inc();
    }

    pub fn status_written(&self, to: StatusWrite, ok: bool) {
        if ok {
            let to = match to {
                StatusWrite::Report => "report",
                StatusWrite::Object => "object",
            };
            self.status_writes
                .get_or_create(&StatusWriteLabels { to })
                .inc();
        } else {
            self.error(ErrorKind::StatusWrite);
        }
    }

    pub fn event_published(&self, ok: bool) {
        if ok {
            self.events.inc();
        } else {
            self.error(ErrorKind::Event);
        }
    }

    /// Whether a pass has completed since the start.
    pub fn ready(&self) -> bool {
        self.health.lock().ready
    }

    /// Whether the sync loop is alive; if not, why.
    pub fn health(&self) -> Result<(), String> {
        self.health.lock().stuck(Instant::now()).map_or(Ok(()), Err)
    }

    /// Whether the sync loop is alive.
    pub fn healthy(&self) -> bool {
        self.health().is_ok()
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_is_counted_and_makes_the_node_ready() {
        let metrics = Metrics::new();
        assert!(!metrics.ready());
        assert!(metrics.healthy());
        metrics.pass_started();
        metrics.pass_finished(&PassSummary {
            pass: "full",
            took: Duration::from_millis(20),
            targets: 0,
            sessions: Vec::new(),
            problems: Vec::new(),
            images: vec![("ready", 512)],
        });
        metrics.backend_operation("tgt", true);
        metrics.backend_operation("tgt", false);
        assert!(metrics.ready());
        let text = metrics.encode();
        for line in [
            "discus_sync_passes_total{pass=\"full\"} 1",
            "discus_backend_operations_total{backend=\"tgt\",result=\"ok\"} 1",
            "discus_errors_total{kind=\"backend_operation\"} 1",
            "discus_targets 0",
            "discus_images{state=\"ready\"} 1",
            "discus_image_store_bytes 512",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn a_loop_is_stuck_when_no_pass_finishes_within_its_bound_and_says_why() {
        let start = Instant::now();
        let s = Duration::from_secs;
        let mut health = Health::default();
        assert_eq!(health.stuck(start + s(3600)), None, "no cadence promised");
        health.cadence = Some((start, s(60)));
        health.waiting = Some("waiting for the watches of Secret to list".into());
        assert_eq!(health.stuck(start + s(59)), None);
        assert_eq!(
            health.stuck(start + s(61)).as_deref(),
            Some(
                "no sync pass has finished in the 61s since the start: \
                 waiting for the watches of Secret to list"
            )
        );
        health.running_since = Some(start + s(62));
        assert_eq!(health.stuck(start + s(100)), None, "a pass is running");
        assert_eq!(
            health.stuck(start + s(62) + STUCK_AFTER).as_deref(),
            Some("a sync pass has been running for 900s")
        );
        health.running_since = None;
        health.finished_at = Some(start + s(120));
        health.waiting = None;
        assert_eq!(health.stuck(start + s(179)), None);
        assert_eq!(
            health.stuck(start + s(190)).as_deref(),
            Some("no sync pass has finished for 70s (the bound is 60s)")
        );
    }
}
