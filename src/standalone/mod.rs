//! `discus serve`: one storage server without a cluster. The same resources and the same sync
//! loop as the Kubernetes agent, read from a folder of manifests; status goes to files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::backend::Backend;
pub use crate::node_runtime::BackendChoice;
use crate::node_runtime::{self, NodeConfig, NodeLoop};
use crate::sync::{Pass, Resync, Syncer};

mod folder;
mod status_files;

pub use folder::{Loaded, ManifestCache, load, load_cached};
use status_files::{all_ready, forget_missing, read_statuses, write_statuses};
pub use status_files::{not_ready_messages, status_table};

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub manifests: PathBuf,
    /// The node this server is; every image is fetched (it is the only node).
    pub node: NodeConfig,
    pub once: bool,
    pub resync: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Node(#[from] node_runtime::SetupError),
    #[error("{0}")]
    Setup(String),
}

/// How a `--once` run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    AllReady,
    NotAllReady,
    /// Stopped by a signal; targets keep serving.
    Stopped,
}

/// Runs `discus serve` until a signal (or, with `--once`, after one complete sync).
pub async fn serve(options: ServeOptions) -> Result<Outcome, ServeError> {
    let mut config = options.node.clone();
    config.prefetch_all = true;
    config.upload_off = crate::sync::UploadReception::off_in_serve();
    node_runtime::start(config, ServeLoop(&options)).await?
}

struct ServeLoop<'a>(&'a ServeOptions);

impl NodeLoop for ServeLoop<'_> {
    type Output = Result<Outcome, ServeError>;
    async fn run<B: Backend + 'static>(self, syncer: Syncer<B>) -> Self::Output {
        run(syncer, self.0).await
    }
}

async fn run<B: Backend>(syncer: Syncer<B>, options: &ServeOptions) -> Result<Outcome, ServeError> {
    let (changes_tx, mut changes) = tokio::sync::mpsc::unbounded_channel::<()>();
    let _watcher = watch_folder(&options.manifests, changes_tx);
    let finished = syncer.images().finished();
    let status_dir = options.node.data_dir.join("status");
    let mut previous = read_statuses(&status_dir);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ServeError::Setup(format!("cannot handle SIGTERM: {e}")))?;
    tracing::info!(backend = syncer.backend().name(), manifests = %options.manifests.display(), "serving");
    // A pass is due at least every resync: ten of them missed, and /healthz says so.
    syncer
        .metrics()
        .expect_passes_within((options.resync * 10).max(Duration::from_secs(300)));
    let mut cache = ManifestCache::default();
    let mut pass = Pass::Full;
    let mut resync = Resync::every(options.resync);
    loop {
        let started = std::time::Instant::now();
        let loaded = load_cached(&options.manifests, &mut cache);
        let loading = started.elapsed();
        for problem in &loaded.unreadable {
            tracing::warn!("{problem}");
        }
        let now = Timestamp::now();
        if pass == Pass::Full {
            // Status files someone removed are written again.
            forget_missing(&mut previous);
        }
        let report = syncer.sync(&loaded.resources, now, pass).await;
        resync.ran(pass);
        let syncing = started.elapsed() - loading;
        let written = write_statuses(&status_dir, &loaded, &report, previous, now);
        tracing::debug!(
            targets = report.desired.targets.len(),
            unsettled = report.unsettled.len(),
            load_ms = loading.as_millis() as u64,
            sync_ms = syncing.as_millis() as u64,
            status_ms = (started.elapsed() - loading - syncing).as_millis() as u64,
            "sync pass done"
        );
        // Only `--once` needs the verdict: it reads every status back.
        let all_ready = options.once
            && loaded.unreadable.is_empty()
            && loaded.invalid.is_empty()
            && all_ready(&written);
        previous = written;
        let importing = report
            .images
            .values()
            .any(|i| matches!(i, crate::images::manager::ImageState::InProgress(_)));
        if options.once && !importing {
            return Ok(if all_ready {
                Outcome::AllReady
            } else {
                Outcome::NotAllReady
            });
        }
        // Sleep until something changes: the folder, an import, the clock of a grant, or drift
        // worth correcting. A change reads only what it touches; the periodic pass reads
        // everything, for drift.
        let next = report.next_pass(&resync);
        pass = Pass::Changes;
        tokio::select! {
            _ = changes.recv() => {
                // Let an editor finish writing before reading again.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while changes.try_recv().is_ok() {}
            }
            () = finished.notified() => {}
            () = tokio::time::sleep(next.after) => pass = next.pass,
            _ = tokio::signal::ctrl_c() => return Ok(Outcome::Stopped),
            _ = terminate.recv() => return Ok(Outcome::Stopped),
        }
        pass = resync.at_least(pass);
    }
}

fn watch_folder(
    folder: &Path,
    changes: tokio::sync::mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = changes.send(());
        }
    })
    .map_err(|e| tracing::warn!(%e, "cannot watch the manifest folder; re-reading it periodically"))
    .ok()?;
    watcher
        .watch(folder, notify::RecursiveMode::Recursive)
        .map_err(
            |e| tracing::warn!(%e, "cannot watch the manifest folder; re-reading it periodically"),
        )
        .ok()?;
    Some(watcher)
}
