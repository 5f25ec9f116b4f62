//! What runs on a storage node whoever declares its resources (a folder for `discus serve`, the
//! apiserver for `discus agent`): the image store, the backend the kernel offers, the syncer.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::Backend;
use crate::backend::lio::{self, LioBackend};
use crate::backend::tgt::{TgtBackend, TgtConfig};
use crate::boot::{self, BootTables};
use crate::desired::{NodeFacts, Settings};
use crate::fsutil::Claim;
use crate::http;
use crate::images::manager::ImageManager;
use crate::images::scrub::ScrubConfig;
use crate::images::{FetchOptions, Importer, ImporterConfig};
use crate::metrics::Metrics;
use crate::sync::{Receiving, Syncer, UploadReception};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Lio,
    Tgt,
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub backend: BackendChoice,
    pub node: NodeFacts,
    pub file_roots: Vec<PathBuf>,
    /// How images are downloaded, and where to (`fetch.destinations`: the agent adds the
    /// cluster's own networks with `DestinationPolicy::deny_more` before `start`).
    pub fetch: FetchOptions,
    pub iqn_authority: String,
    pub default_max_virtual_size: u64,
    pub tgt_control_port: u16,
    /// Fetch every declared image, not only those a target placed here needs.
    pub prefetch_all: bool,
    /// Where to serve /metrics, /healthz and /readyz, if anywhere.
    pub http_address: Option<std::net::SocketAddr>,
    /// Where to answer iPXE with boot scripts, if anywhere.
    pub boot: Option<crate::boot::BootOptions>,
    /// What targets may ask for.
    pub policy: crate::desired::Policy,
    /// How the stored images are read again in the background.
    pub scrub: ScrubConfig,
    /// Where to receive uploads, if anywhere.
    pub upload: Option<crate::upload::endpoint::EndpointConfig>,
    /// What an uploaded image is told where the node receives none.
    pub upload_off: UploadReception,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    DataDir(#[from] crate::fsutil::LockError),
    #[error(transparent)]
    Images(#[from] crate::images::ImportError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error("cannot serve the HTTP endpoints on {address} (--http-address): {source}")]
    Http {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve boot scripts on {address} (--boot-address): {source}")]
    Boot {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot receive uploads on {address} (--upload-listen): {source}")]
    Upload {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The loop a syncer runs in, whatever its backend.
pub trait NodeLoop {
    type Output;
    fn run<B: Backend + 'static>(self, syncer: Syncer<B>) -> impl Future<Output = Self::Output>;
}

/// Opens the image store and the backend, and runs `node_loop` with a syncer over them.
pub async fn start<L: NodeLoop>(config: NodeConfig, node_loop: L) -> Result<L::Output, SetupError> {
    // One discus per data directory, held until the process ends.
    let _data_dir = Claim::take(
        &config.data_dir.join("lock"),
        &config.data_dir.display().to_string(),
        ", or give this one its own --data-dir",
    )?;
    let importer = Arc::new(Importer::new(ImporterConfig {
        upload: Default::default(),
        data_dir: config.data_dir.clone(),
        file_roots: config.file_roots.clone(),
        fetch: config.fetch.clone(),
        qemu: crate::images::qemu::QemuImg::default(),
        peer_keys: config
            .upload
            .as_ref()
            .map(|upload| Arc::clone(&upload.keys)),
    })?);
    let uploads = match &config.upload {
        Some(upload) => {
            let bound = crate::upload::endpoint::start(upload, Arc::clone(&importer))
                .await
                .map_err(|source| SetupError::Upload {
                    address: upload.address,
                    source,
                })?;
            UploadReception::On(Receiving {
                bound,
                certificate_sha256: upload.identity.fingerprint().to_owned(),
            })
        }
        None => config.upload_off.clone(),
    };
    let metrics = Arc::new(Metrics::new());
    if let Some(address) = config.http_address {
        http::start(address, Arc::clone(&metrics))
            .await
            .map_err(|source| SetupError::Http { address, source })?;
    }
    let boot = match config.boot {
        Some(options) => {
            let tables = BootTables::default();
            let bound = boot::endpoint::start(options, tables.clone(), Arc::clone(&metrics))
                .await
                .map_err(|source| SetupError::Boot {
                    address: options.address,
                    source,
                })?;
            Some(tables.serving_at(bound))
        }
        None => None,
    };
    let images = ImageManager::new(importer, Arc::clone(&metrics), config.scrub);
    // For as long as the process lives; `--once` ends with its pass.
    tokio::spawn(Arc::clone(images.scrub()).run());
    let settings = Settings {
        iqn_authority: config.iqn_authority.clone(),
        writable_dir: config.data_dir.join("writable"),
        policy: config.policy.clone(),
        ..Settings::default()
    };
    Ok(match choose_backend(config.backend) {
        BackendChoice::Lio => {
            // One configfs writer per kernel, whatever its data directory.
            let _lio = Claim::take(Path::new(lio::CLAIM), "the kernel's LIO target", "")?;
            let backend =
                LioBackend::new(PathBuf::from(lio::CONFIGFS), &config.data_dir.join("lio"))?;
            node_loop
                .run(syncer(
                    backend, images, settings, &config, metrics, boot, uploads,
                ))
                .await
        }
        BackendChoice::Tgt | BackendChoice::Auto => {
            // One driver per tgtd, whatever its data directory.
            let _tgtd = Claim::take(
                &PathBuf::from(format!("/run/tgtd/discus.{}.lock", config.tgt_control_port)),
                &format!("the tgtd on control port {}", config.tgt_control_port),
                ", or give this one its own --tgt-control-port",
            )?;
            let mut tgt = TgtConfig::new(config.data_dir.join("tgt"));
            tgt.images = Some(config.data_dir.join("images"));
            tgt.control_port = config.tgt_control_port;
            let backend = TgtBackend::start(tgt).await?;
            node_loop
                .run(syncer(
                    backend, images, settings, &config, metrics, boot, uploads,
                ))
                .await
        }
    })
}

fn syncer<B: Backend>(
    backend: B,
    images: ImageManager,
    settings: Settings,
    config: &NodeConfig,
    metrics: Arc<Metrics>,
    boot: Option<BootTables>,
    uploads: UploadReception,
) -> Syncer<B> {
    let mut syncer = Syncer::new(
        backend,
        images,
        config.node.clone(),
        settings,
        config.default_max_virtual_size,
        metrics,
    );
    if let Some(tables) = boot {
        syncer = syncer.with_boot(tables);
    }
    syncer = syncer.with_uploads(uploads);
    if config.prefetch_all {
        syncer.prefetch_all()
    } else {
        syncer
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
