//! Images on a node: fetch ▸ hash ▸ inspect ▸ convert ▸ store.
//!
//! Bytes are hashed as they arrive; nothing reaches the store before its SHA-256 matches the
//! one the user named; hostile headers are refused before qemu-img sees the image; qcow2, VHDX
//! and VMDK are converted to raw with an explicit source format and under resource limits; and
//! the raw result is stored under its own digest, shared by every DiscImage that resolves to it.

pub mod fetch;
pub mod file;
pub mod inspect;
pub mod manager;
pub mod progress;
pub mod qemu;
mod sink;
pub mod store;

use std::io::Read;
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use url::Url;

pub use fetch::{FetchOptions, HttpAuth};
pub use inspect::Format;
pub use progress::{Phase, Progress, ProgressReporter};
pub use store::{Needed, Store, StoredImage};

use crate::api::disc_image::ImageFormat;
use sink::Sink;

/// The default `maxVirtualSize`.
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 128 << 30;

/// Where an image comes from.
#[derive(Clone, Debug)]
pub enum Source {
    Http { url: Url, auth: HttpAuth },
    File { path: PathBuf },
}

/// One image to import.
#[derive(Clone, Debug)]
pub struct ImportRequest {
    pub source: Source,
    /// The SHA-256 the source bytes must have, lower-case hex.
    pub sha256: String,
    pub format: ImageFormat,
    pub max_virtual_size: u64,
}

#[derive(Clone, Debug)]
pub struct ImporterConfig {
    pub data_dir: PathBuf,
    /// Folders `file` sources may read from; none by default.
    pub file_roots: Vec<PathBuf>,
    pub fetch: FetchOptions,
    pub qemu: qemu::QemuImg,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    #[error(transparent)]
    File(#[from] file::FileSourceError),
    #[error(
        "the image's SHA-256 is {actual}, but spec.sha256 is {expected}; the download was deleted and is \
         not served"
    )]
    DigestMismatch { expected: String, actual: String },
    #[error(transparent)]
    Inspect(#[from] inspect::InspectError),
    #[error("the image's virtual size is {size} bytes, more than maxVirtualSize ({limit} bytes)")]
    TooLarge { size: u64, limit: u64 },
    #[error("qemu-img wrote {written} bytes for an image of {expected}")]
    ConvertedSize { written: u64, expected: u64 },
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error("image store: {0}")]
    Store(#[from] store::StoreError),
    #[error("image store: {0}")]
    Io(#[from] std::io::Error),
}

impl ImportError {
    /// Whether trying again later may succeed (a network fault), as opposed to a verdict on the
    /// image or the spec.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Fetch(
                fetch::FetchError::Transport { .. } | fetch::FetchError::Incomplete { .. },
            ) => true,
            Self::Fetch(fetch::FetchError::Status { status, .. }) => status.is_server_error(),
            Self::Fetch(fetch::FetchError::NoSpace { .. }) | Self::Store(_) | Self::Io(_) => true,
            Self::Qemu(qemu::QemuError::Timeout { .. } | qemu::QemuError::Spawn { .. }) => true,
            _ => false,
        }
    }
}

pub struct Importer {
    store: Store,
    fetcher: fetch::Fetcher,
    qemu: qemu::QemuImg,
    file_roots: Vec<PathBuf>,
}

/// The most bytes a download may bring: an ISO or raw image is exactly its virtual size; other
/// formats may exceed it by their own metadata, which this bounds.
fn download_limit(format: ImageFormat, max_virtual_size: u64) -> u64 {
    match format {
        ImageFormat::Iso | ImageFormat::Raw => max_virtual_size,
        _ => max_virtual_size
            .saturating_add(max_virtual_size / 8)
            .saturating_add(64 << 20),
    }
}

impl Importer {
    /// Opens the store (removing leftovers of interrupted work).
    pub fn new(config: ImporterConfig) -> Result<Self, ImportError> {
        Ok(Self {
            store: Store::open(&config.data_dir)?,
            fetcher: fetch::Fetcher::new(config.fetch),
            qemu: config.qemu,
            file_roots: config.file_roots,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Imports one image, or finds it already stored. On any error nothing is left behind and
    /// the last progress is `Failed`.
    pub async fn import(
        &self,
        request: &ImportRequest,
        progress: &mut ProgressReporter,
    ) -> Result<StoredImage, ImportError> {
        let result = self.import_steps(request, progress).await;
        if result.is_err() {
            progress.update(Phase::Failed, 0, None);
        }
        result
    }

    async fn import_steps(
        &self,
        request: &ImportRequest,
        progress: &mut ProgressReporter,
    ) -> Result<StoredImage, ImportError> {
        if let Some(stored) = self.store.lookup(&request.sha256)? {
            check_size(stored.virtual_size, request.max_virtual_size)?;
            progress.update(Phase::Ready, stored.virtual_size, Some(stored.virtual_size));
            return Ok(stored);
        }
        let limit = download_limit(request.format, request.max_virtual_size);
        let sink = Sink::start(self.store.staging()?)?;
        let received = match &request.source {
            Source::Http { url, auth } => {
                self.fetcher
                    .fetch(url, auth, limit, &sink, progress)
                    .await?
            }
            Source::File { path } => {
                file::copy(path, &self.file_roots, limit, &sink, progress).await?
            }
        };
        let written = sink.finish().await?;
        progress.update(Phase::Verifying, received, Some(received));
        if written.sha256 != request.sha256 {
            return Err(ImportError::DigestMismatch {
                expected: request.sha256.clone(),
                actual: written.sha256,
            });
        }
        tracing::info!(sha256 = %request.sha256, bytes = written.bytes, "verified the image's digest");

        let format = inspect::inspect(written.staging.file(), request.format)?;
        if format.is_raw() {
            check_size(written.bytes, request.max_virtual_size)?;
            let stored =
                self.store
                    .commit(written.staging, &request.sha256, &request.sha256, format)?;
            progress.update(Phase::Ready, stored.virtual_size, Some(stored.virtual_size));
            return Ok(stored);
        }

        let info = self.qemu.info(written.staging.path(), format).await?;
        check_size(info.virtual_size, request.max_virtual_size)?;
        progress.update(Phase::Converting, 0, Some(info.virtual_size));
        let output = self.store.staging()?;
        let total = info.virtual_size;
        let mut report = |fraction: f64| {
            progress.update(
                Phase::Converting,
                (fraction * total as f64) as u64,
                Some(total),
            )
        };
        self.qemu
            .convert(written.staging.path(), format, output.path(), &mut report)
            .await?;
        drop(written.staging);
        let (output, served_sha256, size) = hash_file(output).await?;
        if size != info.virtual_size {
            return Err(ImportError::ConvertedSize {
                written: size,
                expected: info.virtual_size,
            });
        }
        let stored = self
            .store
            .commit(output, &request.sha256, &served_sha256, format)?;
        tracing::info!(sha256 = %request.sha256, served_sha256 = %served_sha256, format = format.as_str(), "converted the image to raw");
        progress.update(Phase::Ready, stored.virtual_size, Some(stored.virtual_size));
        Ok(stored)
    }
}

fn check_size(size: u64, limit: u64) -> Result<(), ImportError> {
    if size > limit {
        Err(ImportError::TooLarge { size, limit })
    } else {
        Ok(())
    }
}

/// Hashes a file qemu-img wrote (the one place a second pass is unavoidable).
async fn hash_file(staging: store::Staging) -> Result<(store::Staging, String, u64), ImportError> {
    tokio::task::spawn_blocking(move || {
        let mut hash = Sha256::new();
        let mut buffer = vec![0u8; 4 << 20];
        let mut file = staging.file();
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hash.update(&buffer[..n]);
            total += n as u64;
        }
        Ok((staging, hex::encode(hash.finalize()), total))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Makes the private, writable copy of an image a writable LUN serves, so that writes never
/// reach the verified image (on file systems that can, the copy shares blocks until written).
pub fn copy_for_writing(seed: &std::path::Path, target: &std::path::Path) -> std::io::Result<()> {
    let dir = target.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let copy = tempfile::Builder::new().prefix(".copy-").tempfile_in(dir)?;
    std::fs::copy(seed, copy.path())?;
    let file = copy.as_file();
    let mut permissions = file.metadata()?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o600);
    file.set_permissions(permissions)?;
    file.sync_all()?;
    copy.persist(target).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}
