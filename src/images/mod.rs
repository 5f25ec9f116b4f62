//! Images on a node: fetch ▸ hash ▸ inspect ▸ convert ▸ store.
//!
//! Bytes are hashed as they arrive; nothing reaches the store before its SHA-256 matches the
//! one the user named; hostile headers are refused before qemu-img sees the image; qcow2, VHDX
//! and VMDK are converted to raw with an explicit source format and under resource limits; and
//! the raw result is stored under its own digest, shared by every DiscImage that resolves to it —
//! in namespaces whose own source delivered those bytes (see `store` for the tenancy rule). What
//! is stored is read again and checked against its digest (see `scrub`): before a file is first
//! served after a start, and in the background.

pub mod destinations;
pub mod fetch;
pub mod file;
pub mod inspect;
pub mod manager;
pub mod pace;
pub mod peers;
pub mod progress;
pub mod qemu;
pub mod scrub;
mod sink;
pub mod store;
pub mod upload;

use std::io::Read;
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use url::Url;

pub use destinations::DestinationPolicy;
pub use fetch::{FetchOptions, HttpAuth};
pub use inspect::Format;
pub use peers::{PeerCopy, PeerSource};
pub use progress::{Phase, Progress, ProgressReporter};
pub use store::{Needed, Requester, Store, StoredImage};
pub use upload::{UploadOptions, Uploads};

use crate::api::disc_image::ImageFormat;
use sink::Sink;

/// The default `maxVirtualSize`.
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 128 << 30;

/// Where an image comes from.
#[derive(Clone, Debug)]
pub enum Source {
    Http {
        url: Url,
        auth: HttpAuth,
    },
    File {
        path: PathBuf,
    },
    /// Bytes a client uploads to the node for the DiscImage with this uid.
    Upload {
        uid: String,
    },
    /// An uploaded image, from other nodes that hold it.
    Peer(PeerSource),
}

impl Source {
    /// Identifies the source — URL, trusted CAs and headers, or path — without showing it: a
    /// digest over all of it (header values are secrets).
    pub fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        match self {
            Self::Http { url, auth } => {
                field(b"http");
                field(url.as_str().as_bytes());
                field(auth.ca_bundle.as_deref().unwrap_or_default());
                for (name, value) in &auth.headers {
                    field(name.as_bytes());
                    field(value.expose().as_bytes());
                }
            }
            Self::File { path } => {
                field(b"file");
                field(path.as_os_str().as_encoded_bytes());
            }
            Self::Upload { uid } => {
                field(b"upload");
                field(uid.as_bytes());
            }
            // Not the nodes: one more that holds the image, or one that restarted, changes them,
            // and the fetch under way goes on (a failed one starts again with those of then).
            Self::Peer(peer) => {
                field(b"peer");
                field(peer.uid.as_bytes());
            }
        }
        hex::encode(hash.finalize())
    }
}

/// One image to import.
#[derive(Clone, Debug)]
pub struct ImportRequest {
    /// On whose behalf: a DiscImage's namespace gets only what its own sources proved.
    pub requester: Requester,
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
    pub upload: UploadOptions,
    pub qemu: qemu::QemuImg,
    /// The agents' key, with which this node fetches uploaded images from other nodes (an
    /// agent whose upload endpoint is on).
    pub peer_keys: Option<std::sync::Arc<crate::credentials::Keys>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    #[error(transparent)]
    File(#[from] file::FileSourceError),
    #[error(transparent)]
    Upload(#[from] upload::UploadError),
    #[error(transparent)]
    Peer(#[from] peers::PeerError),
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
            // A slow source may be faster later; trying again costs one bounded transfer.
            Self::Fetch(fetch::FetchError::TooSlow { .. })
            | Self::File(file::FileSourceError::TooSlow { .. }) => true,
            // A disk that fills up may empty again.
            Self::Fetch(fetch::FetchError::NoSpace { .. })
            | Self::File(file::FileSourceError::Space(fetch::FetchError::NoSpace { .. }))
            | Self::Store(_)
            | Self::Io(_)
            | Self::Upload(upload::UploadError::Store(_) | upload::UploadError::Io(_)) => true,
            Self::Qemu(qemu::QemuError::Timeout { .. } | qemu::QemuError::Spawn { .. }) => true,
            // Another node may answer later, or another node hold it.
            Self::Peer(_) => true,
            _ => false,
        }
    }
}

pub struct Importer {
    store: Store,
    fetcher: fetch::Fetcher,
    peer_fetcher: fetch::Fetcher,
    peer_keys: Option<std::sync::Arc<crate::credentials::Keys>>,
    peer_offers: peers::Offers,
    uploads: Uploads,
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
        let store = Store::open(&config.data_dir)?;
        Ok(Self {
            uploads: Uploads::new(store.clone(), config.upload),
            store,
            peer_fetcher: fetch::Fetcher::for_peers(config.fetch.clone()),
            peer_keys: config.peer_keys,
            peer_offers: peers::Offers::default(),
            fetcher: fetch::Fetcher::new(config.fetch),
            qemu: config.qemu,
            file_roots: config.file_roots,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The uploads this node awaits, for the upload endpoint.
    pub fn uploads(&self) -> &Uploads {
        &self.uploads
    }

    /// The uploaded images this node gives other nodes, for the upload endpoint.
    pub fn peer_offers(&self) -> &peers::Offers {
        &self.peer_offers
    }

    /// The node's own networks now, which no download may reach.
    pub fn deny_node(&self, nets: &[ipnet::IpNet]) {
        self.fetcher.options().destinations.deny_node(nets);
    }

    /// The stored image the request may have right away: one its namespace is entitled to, that
    /// fits its maxVirtualSize and its declared format. An error when it is stored but does not
    /// fit the request.
    pub fn lookup(&self, request: &ImportRequest) -> Result<Option<StoredImage>, ImportError> {
        match self.store.lookup(&request.sha256, &request.requester)? {
            Some(stored) => {
                check_stored(&stored, request)?;
                Ok(Some(stored))
            }
            None => Ok(None),
        }
    }

    /// Imports one image, or finds it already stored. On any error the last progress is
    /// `Failed` and nothing is left behind but an upload's bytes (kept in `uploads/` for the
    /// import to be tried again without the client).
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
        match self.lookup(request) {
            Ok(Some(stored)) => {
                progress.update(Phase::Ready, stored.virtual_size, Some(stored.virtual_size));
                return Ok(stored);
            }
            // A record that cannot be read: the verified bytes of this import write it again.
            Ok(None) | Err(ImportError::Store(_)) => {}
            Err(other) => return Err(other),
        }
        if let Source::Peer(peer) = &request.source {
            return self.import_from_peer(request, peer, progress).await;
        }
        let written = self.transfer(request, progress).await?;
        // The requester's own source delivered these bytes: if they are stored already (for
        // another namespace), it shares them, without converting again.
        if let Some(stored) = self.store.entitle(&request.sha256, &request.requester)? {
            written.staging.discard();
            check_stored(&stored, request)?;
            progress.update(Phase::Ready, stored.virtual_size, Some(stored.virtual_size));
            return Ok(stored);
        }
        let format = inspect::inspect(written.staging.file(), request.format)?;
        let stored = if format.is_raw() {
            check_size(written.bytes, request.max_virtual_size)?;
            self.store.commit(
                written.staging,
                &request.sha256,
                &request.sha256,
                format,
                &request.requester,
            )?
        } else {
            self.convert(written.staging, format, request, progress)
                .await?
        };
        progress.update(Phase::Ready, stored.virtual_size, Some(stored.virtual_size));
        Ok(stored)
    }

    /// Fetches an uploaded image from a node that holds it, and stores what that node serves as
    /// what the source became there: verified against the digest that node published, and
    /// raw. The source's own digest was verified where the upload arrived.
    async fn import_from_peer(
        &self,
        request: &ImportRequest,
        peer: &PeerSource,
        progress: &mut ProgressReporter,
    ) -> Result<StoredImage, ImportError> {
        let keys = self.peer_keys.as_deref();
        let (written, copy) = peers::fetch(
            &self.peer_fetcher,
            keys,
            &self.store,
            request,
            peer,
            progress,
        )
        .await?;
        progress.update(Phase::Verifying, written.bytes, Some(written.bytes));
        inspect::check_declared(request.format, copy.format)?;
        check_size(written.bytes, request.max_virtual_size)?;
        let stored = self.store.commit_from_peer(
            written.staging,
            &request.sha256,
            &copy.served_sha256,
            copy.format,
            &request.requester,
        )?;
        tracing::info!(sha256 = %request.sha256, node = copy.node, bytes = written.bytes, "stored an uploaded image fetched from another node");
        progress.update(Phase::Ready, stored.virtual_size, Some(stored.virtual_size));
        Ok(stored)
    }

    /// Fetches or copies the source into a staging file and checks its digest.
    async fn transfer(
        &self,
        request: &ImportRequest,
        progress: &mut ProgressReporter,
    ) -> Result<sink::Written, ImportError> {
        let limit = download_limit(request.format, request.max_virtual_size);
        if let Source::Upload { uid } = &request.source {
            // Judged against the digest as it arrives: only matching bytes come back.
            return Ok(self
                .uploads
                .receive(uid, &request.sha256, limit, progress)
                .await?);
        }
        let pace = self.fetcher.options().pace();
        let sink = Sink::start(self.store.staging()?)?;
        let received = match &request.source {
            Source::Http { url, auth } => {
                self.fetcher
                    .fetch(url, auth, limit, pace, &sink, progress)
                    .await?
            }
            Source::File { path } => {
                file::copy(path, &self.file_roots, limit, pace, &sink, progress).await?
            }
            Source::Upload { .. } | Source::Peer(_) => {
                return Err(upload::UploadError::NotAwaited.into());
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
        Ok(written)
    }

    /// Converts a verified, inspected image to raw and stores it.
    async fn convert(
        &self,
        source: store::Staging,
        format: Format,
        request: &ImportRequest,
        progress: &mut ProgressReporter,
    ) -> Result<StoredImage, ImportError> {
        let info = self.qemu.info(source.path(), format).await?;
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
        let converted = self
            .qemu
            .convert(source.path(), format, output.path(), &mut report)
            .await;
        if let Err(error) = converted {
            // qemu-img only says it could not write: a disk too full for the rest of the image
            // is told as such, and tried again later, like a download that does not fit.
            // What it wrote, not the size it may have set the file to at the start.
            let written = output
                .file()
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m).saturating_mul(512))
                .unwrap_or(0);
            let dir = output.path().parent().unwrap_or(output.path());
            fetch::ensure_space(dir, total.saturating_sub(written))?;
            return Err(error.into());
        }
        let (output, served_sha256, size) = hash_file(output).await?;
        if size != info.virtual_size {
            return Err(ImportError::ConvertedSize {
                written: size,
                expected: info.virtual_size,
            });
        }
        let stored = self.store.commit(
            output,
            &request.sha256,
            &served_sha256,
            format,
            &request.requester,
        )?;
        // Not before: an upload's bytes stay until what they became is stored.
        source.discard();
        tracing::info!(sha256 = %request.sha256, served_sha256 = %served_sha256, format = format.as_str(), "converted the image to raw");
        Ok(stored)
    }
}

/// Whether a stored image fits the request: its size limit and its declared format.
fn check_stored(stored: &StoredImage, request: &ImportRequest) -> Result<(), ImportError> {
    check_size(stored.virtual_size, request.max_virtual_size)?;
    let format =
        Format::from_name(&stored.format).ok_or_else(|| inspect::InspectError::Malformed {
            format: "stored",
            what: format!("the index records an unknown format {:?}", stored.format),
        })?;
    inspect::check_declared(request.format, format)?;
    Ok(())
}

fn check_size(size: u64, limit: u64) -> Result<(), ImportError> {
    if size > limit {
        Err(ImportError::TooLarge { size, limit })
    } else {
        Ok(())
    }
}

/// Hashes everything `reader` gives, in large reads (blocking): the hash, not finished, so that
/// more may follow, and how many bytes it hashed.
pub fn hash_reader(mut reader: impl Read) -> std::io::Result<(Sha256, u64)> {
    let mut hash = Sha256::new();
    let mut buffer = vec![0u8; 4 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            return Ok((hash, total));
        }
        hash.update(&buffer[..n]);
        total += n as u64;
    }
}

/// Hashes a file qemu-img wrote (the one place a second pass is unavoidable).
async fn hash_file(staging: store::Staging) -> Result<(store::Staging, String, u64), ImportError> {
    tokio::task::spawn_blocking(move || {
        let (hash, total) = hash_reader(staging.file())?;
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
