//! `discus serve`: one storage server without a cluster. The same resources and the same sync
//! loop as the Kubernetes agent, read from a folder of manifests; status goes to files.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::backend::Backend;
use crate::backend::lio::{self, LioBackend};
use crate::backend::tgt::{TgtBackend, TgtConfig};
use crate::desired::{NodeFacts, Settings};
use crate::images::manager::ImageManager;
use crate::images::{FetchOptions, Importer, ImporterConfig};
use crate::sync::{Pass, Syncer};

mod folder;
mod status_files;

pub use folder::{Loaded, ManifestCache, load, load_cached};
use status_files::{all_ready, read_statuses, write_statuses};
pub use status_files::{not_ready_messages, status_table};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Lio,
    Tgt,
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub manifests: PathBuf,
    pub data_dir: PathBuf,
    pub backend: BackendChoice,
    pub node_name: String,
    pub node_labels: BTreeMap<String, String>,
    /// Where targets without portals listen.
    pub addresses: Vec<IpAddr>,
    pub file_roots: Vec<PathBuf>,
    pub allow_loopback: bool,
    pub once: bool,
    pub resync: Duration,
    pub iqn_authority: String,
    pub default_max_virtual_size: u64,
    pub tgt_control_port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Images(#[from] crate::images::ImportError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
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
    let importer = Importer::new(ImporterConfig {
        data_dir: options.data_dir.clone(),
        file_roots: options.file_roots.clone(),
        fetch: FetchOptions {
            allow_loopback: options.allow_loopback,
            ..FetchOptions::default()
        },
        qemu: crate::images::qemu::QemuImg::default(),
    })?;
    let images = ImageManager::new(Arc::new(importer));
    let node = NodeFacts {
        name: options.node_name.clone(),
        labels: options.node_labels.clone(),
        addresses: options.addresses.clone(),
    };
    let settings = Settings {
        iqn_authority: options.iqn_authority.clone(),
        writable_dir: options.data_dir.join("writable"),
        ..Settings::default()
    };
    match choose_backend(options.backend) {
        BackendChoice::Lio => {
            let backend = LioBackend::new(PathBuf::from(lio::CONFIGFS))?;
            let syncer = Syncer::new(
                backend,
                images,
                node,
                settings,
                options.default_max_virtual_size,
            )
            .prefetch_all();
            run(syncer, &options).await
        }
        BackendChoice::Tgt | BackendChoice::Auto => {
            let mut config = TgtConfig::new(options.data_dir.join("tgt"));
            config.control_port = options.tgt_control_port;
            let backend = TgtBackend::start(config).await?;
            let syncer = Syncer::new(
                backend,
                images,
                node,
                settings,
                options.default_max_virtual_size,
            )
            .prefetch_all();
            run(syncer, &options).await
        }
    }
}

/// `auto`: LIO where the kernel has configfs target support, else tgt; the log says which and why.
fn choose_backend(choice: BackendChoice) -> BackendChoice {
    if choice != BackendChoice::Auto {
        return choice;
    }
    if lio::available() {
        tracing::info!(
            "backend: lio (the kernel has configfs target support at {})",
            lio::CONFIGFS
        );
        BackendChoice::Lio
    } else {
        tracing::info!(
            "backend: tgt ({} is absent: no target modules loaded, or configfs not mounted)",
            lio::CONFIGFS
        );
        BackendChoice::Tgt
    }
}

async fn run<B: Backend>(syncer: Syncer<B>, options: &ServeOptions) -> Result<Outcome, ServeError> {
    let (changes_tx, mut changes) = tokio::sync::mpsc::unbounded_channel::<()>();
    let _watcher = watch_folder(&options.manifests, changes_tx);
    let finished = syncer.images().finished();
    let status_dir = options.data_dir.join("status");
    let mut previous = read_statuses(&status_dir);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ServeError::Setup(format!("cannot handle SIGTERM: {e}")))?;
    tracing::info!(backend = syncer.backend().name(), manifests = %options.manifests.display(), "serving");
    let mut cache = ManifestCache::default();
    let mut pass = Pass::Full;
    loop {
        let started = std::time::Instant::now();
        let loaded = load_cached(&options.manifests, &mut cache);
        let loading = started.elapsed();
        for problem in &loaded.unreadable {
            tracing::warn!("{problem}");
        }
        let now = Timestamp::now();
        let report = syncer.sync(&loaded.resources, now, pass).await;
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
        let all_ready = options.once && loaded.unreadable.is_empty() && all_ready(&written);
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
        // worth correcting.
        let expiry = report.desired.next_expiry.map(|at| {
            let wait = at.duration_since(Timestamp::now());
            Duration::try_from(wait).unwrap_or(Duration::ZERO) + Duration::from_millis(10)
        });
        let wake = expiry.map_or(options.resync, |d| d.min(options.resync));
        // A change reads only what it touches; the periodic pass reads everything, for drift.
        pass = Pass::Changes;
        tokio::select! {
            _ = changes.recv() => {
                // Let an editor finish writing before reading again.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while changes.try_recv().is_ok() {}
            }
            () = finished.notified() => {}
            () = tokio::time::sleep(wake) => {
                if expiry.is_none_or(|e| e >= options.resync) {
                    pass = Pass::Full;
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(Outcome::Stopped),
            _ = terminate.recv() => return Ok(Outcome::Stopped),
        }
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
