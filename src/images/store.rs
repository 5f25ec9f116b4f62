//! The content-addressed image store under the data directory:
//!
//! ```text
//! images/<served sha256>.raw   the bytes served, one file per digest, shared by every DiscImage
//! index/<source sha256>.json   what a verified source became: format, size, served digest, and
//!                              the namespaces entitled to it
//! tmp/                         work in progress; nothing here is ever served
//! uploads/<DiscImage uid>.part  an upload received so far, kept across restarts so that it
//!                              resumes (and, once complete, until it is stored); never
//!                              served, removed when no DiscImage awaits it
//! ```
//!
//! A file reaches `images/` only by a rename after its digest was checked, so a half-written or
//! unverified image is never served. Work in progress holds a lock on its file; at start-up every
//! unlocked file in `tmp/` is a leftover of interrupted work and is removed. Garbage collection
//! removes what the caller says is no longer needed, and nothing else. Committing an image and
//! collecting garbage both hold the store's lock (`store.lock`), so an import that finishes while
//! a collection runs — in this process or another — is judged by its index record, never by a
//! half-written pair of files.
//!
//! **Tenancy.** Knowing a digest is not owning the bytes. A namespace gets a stored image only
//! once a source it declares delivered bytes with that digest: the index record lists the
//! namespaces that proved it (`namespaces`), and [`Store::lookup`] finds an image for those only.
//! Another namespace with the same digest fetches and verifies its own source first, and then
//! shares the stored file (no second conversion). A record without the field — written before
//! discus had tenancy, which it never had in a release — entitles nobody. When a namespace no
//! longer declares the digest, garbage collection takes its entitlement back, so a namespace
//! deleted and re-created by someone else inherits nothing.
//!
//! Start-up never fails on the store: a full disk must not keep a node from applying what it can
//! (a credential rotation, a revoked grant). Directories are created when first needed, and every
//! operation reports its own error.
//!
//! **Bytes on disk rot.** A served file is named by its own digest, so it can be checked with
//! nothing but itself. The store remembers which files this process hashed, and when — a commit
//! hashed its bytes, the scrub (`scrub.rs`) hashes the rest — and removes a file that no longer
//! matches its name unless an import wrote it again meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

// Cannot be poisoned: a panicking scrub must not make every image look unverified for ever.
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tempfile::NamedTempFile;

use super::inspect::Format;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not an index record: {source}", path.display())]
    Record {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the source {sha256} became {recorded} on this node, not {offered}: nothing was kept")]
    OtherServedDigest {
        sha256: String,
        recorded: String,
        offered: String,
    },
}

trait Context<T> {
    fn at(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> Context<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Io {
            path: path.to_owned(),
            source,
        })
    }
}

/// On whose behalf an image is looked up or imported.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requester {
    /// A DiscImage in this namespace: it gets only what its own sources proved.
    Namespace(String),
    /// The node's operator (`discus image fetch`, root on the node): finds whatever is stored, and
    /// entitles nobody by importing.
    Operator,
}

/// An image in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredImage {
    /// The raw file that is served.
    pub path: PathBuf,
    pub format: String,
    pub virtual_size: u64,
    /// The verified digest of the source.
    pub sha256: String,
    /// The digest of the served raw bytes.
    pub served_sha256: String,
}

/// What a verified source became (`index/<sha256>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    format: String,
    virtual_size: u64,
    served_sha256: String,
    /// The namespaces whose own source delivered these bytes. Missing in old records: nobody.
    #[serde(default)]
    namespaces: BTreeSet<String>,
}

impl Record {
    fn entitles(&self, requester: &Requester) -> bool {
        match requester {
            Requester::Operator => true,
            Requester::Namespace(namespace) => self.namespaces.contains(namespace),
        }
    }
}

/// A file being written: work in `tmp/`, removed when dropped unless committed, or an upload's
/// file in `uploads/`, which stays (see [`Staging::kept`]).
pub struct Staging {
    file: NamedTempFile,
}

impl Staging {
    /// The file of an upload in `uploads/`, created if absent, locked for as long as it lives
    /// and positioned at its end. Unlike work in `tmp/`, it stays when dropped, for the upload to
    /// resume, or to be stored after a restart; [`Staging::discard`] removes it once stored.
    fn kept(path: PathBuf) -> io::Result<Self> {
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(io::Error::from)?;
        io::Seek::seek(&mut file, io::SeekFrom::End(0))?;
        let mut kept = NamedTempFile::from_parts(file, tempfile::TempPath::try_from_path(path)?);
        kept.disable_cleanup(true);
        Ok(Self { file: kept })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Removes the file now, the complete upload an import has stored included (which dropping
    /// keeps). What cannot be removed is left to garbage collection, which removes the uploads
    /// of stored images.
    pub fn discard(self) {
        if let Err(error) = remove_if_present(self.file.path()) {
            tracing::warn!(%error, "cannot remove a file the import no longer needs; garbage collection will");
        }
    }

    pub fn file(&self) -> &File {
        self.file.as_file()
    }

    pub fn file_mut(&mut self) -> &mut File {
        self.file.as_file_mut()
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    /// Served digests whose bytes this process hashed, and when: shared by every clone.
    verified: Arc<Mutex<BTreeMap<String, Instant>>>,
}

/// What the node still needs: sources (by their verified digest, with the namespaces that declare
/// them; whatever each became is kept) and served files (by their served digest, for LUNs already
/// pointing at them).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Needed {
    pub sources: BTreeMap<String, BTreeSet<String>>,
    pub served: BTreeSet<String>,
    /// DiscImages (by uid) that await an upload on this node: their partial uploads are kept.
    pub uploads: BTreeSet<String>,
}

impl Needed {
    /// Adds a declared source: its digest, and the namespace that declares it.
    pub fn source(&mut self, sha256: &str, requester: &Requester) {
        let namespaces = self.sources.entry(sha256.to_owned()).or_default();
        if let Requester::Namespace(namespace) = requester {
            namespaces.insert(namespace.clone());
        }
    }
}

/// What garbage collection removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub images: Vec<String>,
    pub bytes: u64,
}

impl Store {
    /// Opens the store under `data_dir`, creating it and removing leftovers of interrupted work
    /// as far as it can. Never fails: a store that cannot be written (a full disk) is reported
    /// by each import, while the node goes on applying everything else.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let store = Self {
            root: data_dir.to_owned(),
            verified: Arc::default(),
        };
        let prepared = [store.images_dir(), store.index_dir(), store.tmp_dir()]
            .iter()
            .try_for_each(|dir| create_dir(dir))
            .and_then(|()| store.remove_leftovers());
        if let Err(error) = prepared {
            tracing::warn!(%error, "the image store is not ready; imports will fail until it is");
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    fn index_dir(&self) -> PathBuf {
        self.root.join("index")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn uploads_dir(&self) -> PathBuf {
        self.root.join("uploads")
    }

    /// The partial upload for the DiscImage with this uid (created empty if there is none),
    /// locked while it lives and kept when dropped. `uid` must be a uid the caller checked
    /// (`upload::check_uid`): it names the file.
    pub fn upload_file(&self, uid: &str) -> Result<Staging, StoreError> {
        let dir = self.uploads_dir();
        create_dir(&dir)?;
        let path = dir.join(format!("{uid}.part"));
        Staging::kept(path.clone()).at(&path)
    }

    /// Removes the partial uploads no DiscImage awaits (unless a process is receiving into one).
    fn collect_uploads(&self, needed: &Needed) -> Result<(), StoreError> {
        for path in entries(&self.uploads_dir())? {
            let awaited = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".part"))
                .is_some_and(|uid| needed.uploads.contains(uid));
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let free =
                rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive);
            if !awaited && free.is_ok() {
                tracing::info!(path = %path.display(), "removing an upload no DiscImage awaits");
                remove_if_present(&path)?;
            }
        }
        Ok(())
    }

    /// Where the image with this served digest lives.
    pub fn image_path(&self, served_sha256: &str) -> PathBuf {
        self.images_dir().join(format!("{served_sha256}.raw"))
    }

    /// When this process last hashed the served file with this digest and found it whole.
    pub fn verified_at(&self, served_sha256: &str) -> Option<Instant> {
        self.verified.lock().get(served_sha256).copied()
    }

    /// The served file with this digest was just hashed and found whole.
    pub fn mark_verified(&self, served_sha256: &str) {
        self.verified
            .lock()
            .insert(served_sha256.to_owned(), Instant::now());
    }

    /// Removes the served file with this digest because its bytes no longer match it — unless
    /// an import committed it again since the check began to read it (`read_since`). Returns
    /// whether it removed it. Its index records stay: the next import of their source writes
    /// the file again.
    pub fn remove_rotten(
        &self,
        served_sha256: &str,
        read_since: Instant,
    ) -> Result<bool, StoreError> {
        // Commits hold the lock while they mark what they wrote: judged under it, a commit is
        // either before this check (and seen) or after the removal.
        let _lock = self.lock()?;
        if self
            .verified_at(served_sha256)
            .is_some_and(|at| at > read_since)
        {
            return Ok(false);
        }
        self.verified.lock().remove(served_sha256);
        let path = self.image_path(served_sha256);
        remove_if_present(&path)?;
        sync_dir(&self.images_dir())?;
        Ok(true)
    }

    fn record_path(&self, sha256: &str) -> PathBuf {
        self.index_dir().join(format!("{sha256}.json"))
    }

    /// The store-wide lock, held while the set of committed images changes. Released on drop.
    fn lock(&self) -> Result<File, StoreError> {
        let path = self.root.join("store.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(&path)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(io::Error::from)
            .at(&path)?;
        Ok(file)
    }

    /// A new file in `tmp/`, locked for as long as it lives.
    pub fn staging(&self) -> Result<Staging, StoreError> {
        let dir = self.tmp_dir();
        create_dir(&dir)?;
        let file = tempfile::Builder::new()
            .prefix("work-")
            .suffix(".part")
            .tempfile_in(&dir)
            .at(&dir)?;
        rustix::fs::flock(
            file.as_file(),
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .map_err(io::Error::from)
        .at(file.path())?;
        Ok(Staging { file })
    }

    fn remove_leftovers(&self) -> Result<(), StoreError> {
        let dir = self.tmp_dir();
        for path in entries(&dir)? {
            // A file another process is still writing is locked; everything else is a leftover.
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let lock =
                rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive);
            if lock.is_ok() {
                tracing::info!(path = %path.display(), "removing the leftover of interrupted work");
                remove_if_present(&path)?;
            }
        }
        Ok(())
    }

    /// The stored image a verified source became, if it is still in the store and `requester`
    /// is entitled to it.
    pub fn lookup(
        &self,
        sha256: &str,
        requester: &Requester,
    ) -> Result<Option<StoredImage>, StoreError> {
        match self.record(sha256)? {
            Some(record) if record.entitles(requester) => Ok(self.image(sha256, record)),
            _ => Ok(None),
        }
    }

    /// The digest of the file the source with this digest became, whoever it is for: to name
    /// it, never to serve it.
    pub fn served_digest(&self, sha256: &str) -> Option<String> {
        Some(self.record(sha256).ok()??.served_sha256)
    }

    /// The stored image, whoever it is for: only after the caller verified bytes with this
    /// digest itself.
    fn stored(&self, sha256: &str) -> Result<Option<(StoredImage, Record)>, StoreError> {
        Ok(self
            .record(sha256)?
            .and_then(|record| Some((self.image(sha256, record.clone())?, record))))
    }

    fn image(&self, sha256: &str, record: Record) -> Option<StoredImage> {
        let image = self.image_path(&record.served_sha256);
        match fs::metadata(&image) {
            Ok(meta) if meta.len() == record.virtual_size => Some(StoredImage {
                path: image,
                format: record.format,
                virtual_size: record.virtual_size,
                sha256: sha256.to_owned(),
                served_sha256: record.served_sha256,
            }),
            Ok(_) | Err(_) => None,
        }
    }

    fn record(&self, sha256: &str) -> Result<Option<Record>, StoreError> {
        let path = self.record_path(sha256);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at(&path),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| StoreError::Record { path, source })
    }

    /// Writes a record atomically (a temporary file renamed over it).
    fn write_record(&self, sha256: &str, record: &Record) -> Result<(), StoreError> {
        let record_path = self.record_path(sha256);
        let dir = self.index_dir();
        create_dir(&dir)?;
        let mut file = tempfile::Builder::new()
            .prefix(".record-")
            .tempfile_in(&dir)
            .at(&dir)?;
        serde_json::to_writer(file.as_file_mut(), record).map_err(|source| StoreError::Record {
            path: record_path.clone(),
            source,
        })?;
        file.as_file().sync_all().at(file.path())?;
        file.persist(&record_path)
            .map_err(|e| e.error)
            .at(&record_path)?;
        sync_dir(&dir)
    }

    /// The source with this digest is already stored, and `requester` just delivered bytes with
    /// the same digest from its own source: it is entitled from now on. `None` when the image is
    /// not (or no longer) stored.
    pub fn entitle(
        &self,
        sha256: &str,
        requester: &Requester,
    ) -> Result<Option<StoredImage>, StoreError> {
        let _lock = self.lock()?;
        // A record that cannot be read is written again by the commit of these verified bytes.
        let Some((image, mut record)) = self.stored(sha256).ok().flatten() else {
            return Ok(None);
        };
        if let Requester::Namespace(namespace) = requester
            && record.namespaces.insert(namespace.clone())
        {
            self.write_record(sha256, &record)?;
            tracing::info!(
                sha256,
                namespace,
                "the namespace's own source proved the stored image"
            );
        }
        Ok(Some(image))
    }

    /// Moves a verified raw file into `images/` and records what the source became, and that
    /// `requester` proved it. The file must be complete and its digest checked: from here on it
    /// is served.
    pub fn commit(
        &self,
        served: Staging,
        sha256: &str,
        served_sha256: &str,
        format: Format,
        requester: &Requester,
    ) -> Result<StoredImage, StoreError> {
        self.commit_as(served, sha256, served_sha256, format, requester, false)
    }

    /// Like [`Self::commit`], for bytes another node says the source became (their digest
    /// checked here, the source's there): refused if this node recorded something else for the
    /// source, which another node's word never changes.
    pub fn commit_from_peer(
        &self,
        served: Staging,
        sha256: &str,
        served_sha256: &str,
        format: Format,
        requester: &Requester,
    ) -> Result<StoredImage, StoreError> {
        self.commit_as(served, sha256, served_sha256, format, requester, true)
    }

    fn commit_as(
        &self,
        mut served: Staging,
        sha256: &str,
        served_sha256: &str,
        format: Format,
        requester: &Requester,
        keep_recorded: bool,
    ) -> Result<StoredImage, StoreError> {
        let staged = served.path().to_owned();
        served.file_mut().sync_all().at(&staged)?;
        let metadata = served.file().metadata().at(&staged)?;
        let (virtual_size, writable) = (metadata.len(), metadata.permissions());
        let target = self.image_path(served_sha256);
        let _lock = self.lock()?;
        if keep_recorded
            && let Some(record) = self.record(sha256)?
            && record.served_sha256 != served_sha256
        {
            return Err(StoreError::OtherServedDigest {
                sha256: sha256.to_owned(),
                recorded: record.served_sha256,
                offered: served_sha256.to_owned(),
            });
        }
        create_dir(&self.images_dir())?;
        let mut read_only = writable.clone();
        read_only.set_readonly(true);
        served.file().set_permissions(read_only).at(&staged)?;
        // Another import of the same bytes may have won the race; the content is the same.
        // Not moved, an upload's file stays as it was, for the import to be tried again.
        served
            .file
            .persist(&target)
            .map_err(|e| {
                let _ = e.file.as_file().set_permissions(writable);
                e.error
            })
            .at(&target)?;
        sync_dir(&self.images_dir())?;
        self.mark_verified(served_sha256);

        // Whoever proved these bytes before keeps their entitlement.
        let mut namespaces = match self.record(sha256) {
            Ok(Some(record)) => record.namespaces,
            Ok(None) | Err(_) => BTreeSet::new(),
        };
        if let Requester::Namespace(namespace) = requester {
            namespaces.insert(namespace.clone());
        }
        let record = Record {
            format: format.as_str().to_owned(),
            virtual_size,
            served_sha256: served_sha256.to_owned(),
            namespaces,
        };
        self.write_record(sha256, &record)?;
        Ok(StoredImage {
            path: target,
            format: record.format,
            virtual_size,
            sha256: sha256.to_owned(),
            served_sha256: served_sha256.to_owned(),
        })
    }

    /// Every served digest in the store.
    pub fn served_digests(&self) -> Result<BTreeSet<String>, StoreError> {
        Ok(entries(&self.images_dir())?
            .iter()
            .filter_map(|path| {
                path.file_name()?
                    .to_str()?
                    .strip_suffix(".raw")
                    .map(str::to_owned)
            })
            .collect())
    }

    /// Removes every image that no needed source became and no needed served digest names, the
    /// index records that lead to nothing, and the entitlements of namespaces that no longer
    /// declare a source. The caller knows what the node needs; the store never guesses.
    pub fn collect_garbage(&self, needed: &Needed) -> Result<Collected, StoreError> {
        let _lock = self.lock()?;
        let mut keep = needed.served.clone();
        for source in needed.sources.keys() {
            if let Some(record) = self.record(source)? {
                keep.insert(record.served_sha256);
            }
        }
        let mut collected = Collected::default();
        for digest in self.served_digests()? {
            if keep.contains(&digest) {
                continue;
            }
            let path = self.image_path(&digest);
            collected.bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            remove_if_present(&path)?;
            tracing::info!(served_sha256 = %digest, "removed an image nothing needs");
            collected.images.push(digest);
        }
        for path in entries(&self.index_dir())? {
            self.collect_record(&path, needed)?;
        }
        self.collect_uploads(needed)?;
        if self.images_dir().exists() {
            sync_dir(&self.images_dir())?;
        }
        Ok(collected)
    }

    /// Removes a record that leads to no image, or takes back the entitlements of namespaces
    /// that no longer declare its source.
    fn collect_record(&self, path: &Path, needed: &Needed) -> Result<(), StoreError> {
        let Some(sha256) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            // A temporary record a crash left behind.
            return remove_if_present(path);
        };
        let record = fs::read(path)
            .ok()
            .and_then(|text| serde_json::from_slice::<Record>(&text).ok());
        let Some(mut record) = record.filter(|r| self.image_path(&r.served_sha256).exists()) else {
            return remove_if_present(path);
        };
        let declaring = needed.sources.get(sha256);
        let before = record.namespaces.len();
        record
            .namespaces
            .retain(|namespace| declaring.is_some_and(|d| d.contains(namespace)));
        if record.namespaces.len() != before {
            self.write_record(sha256, &record)?;
        }
        Ok(())
    }
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(dir).at(dir)
}

/// The paths in `dir`; none if it does not exist (yet).
fn entries(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let read = match fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).at(dir),
    };
    read.map(|entry| entry.map(|e| e.path()).at(dir)).collect()
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).at(path),
        _ => Ok(()),
    }
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn staged(store: &Store, content: &[u8]) -> Staging {
        let mut staging = store.staging().expect("staging");
        staging.file_mut().write_all(content).expect("write");
        staging
    }

    fn ns(name: &str) -> Requester {
        Requester::Namespace(name.to_owned())
    }

    fn needed(sources: &[(&str, &str)], served: &[&str]) -> Needed {
        let mut needed = Needed {
            served: served.iter().map(|s| (*s).to_owned()).collect(),
            uploads: BTreeSet::new(),
            ..Needed::default()
        };
        for (sha256, namespace) in sources {
            needed.source(sha256, &ns(namespace));
        }
        needed
    }

    #[test]
    fn a_committed_image_is_found_by_its_source_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        assert_eq!(store.lookup("aa", &ns("lab")).expect("lookup"), None);
        let image = store
            .commit(
                staged(&store, b"hello"),
                "aa",
                "bb",
                Format::Raw,
                &ns("lab"),
            )
            .expect("commit");
        assert_eq!(image.path, dir.path().join("images/bb.raw"));
        assert_eq!(std::fs::read(&image.path).expect("read"), b"hello");
        assert_eq!(
            store.lookup("aa", &ns("lab")).expect("lookup"),
            Some(image.clone())
        );
        assert_eq!(
            store.lookup("aa", &Requester::Operator).expect("lookup"),
            Some(image)
        );
        assert!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .next()
                .is_none()
        );
    }

    #[test]
    fn another_node_s_word_never_changes_what_a_source_became_here() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        store
            .commit(
                staged(&store, b"mine"),
                "aa",
                "bb",
                Format::Qcow2,
                &ns("lab"),
            )
            .expect("commit");
        let refused = store.commit_from_peer(
            staged(&store, b"theirs"),
            "aa",
            "cc",
            Format::Qcow2,
            &ns("other"),
        );
        assert!(
            matches!(refused, Err(StoreError::OtherServedDigest { .. })),
            "{refused:?}"
        );
        assert_eq!(store.lookup("aa", &ns("other")).expect("lookup"), None);
        assert!(!store.image_path("cc").exists());
        let same = store.commit_from_peer(
            staged(&store, b"mine"),
            "aa",
            "bb",
            Format::Qcow2,
            &ns("other"),
        );
        assert_eq!(same.expect("the same bytes").served_sha256, "bb");
    }

    #[test]
    fn uncommitted_work_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        drop(staged(&store, b"half an image"));
        assert!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .next()
                .is_none()
        );
    }

    #[test]
    fn leftovers_are_removed_at_start_up_but_work_in_progress_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let in_progress = staged(&store, b"still being written");
        let leftover = dir.path().join("tmp/work-crashed.part");
        std::fs::write(&leftover, b"a crash left this").expect("write");
        Store::open(dir.path()).expect("reopen");
        assert!(!leftover.exists(), "leftover removed");
        assert!(
            in_progress.path().exists(),
            "another process's work is kept"
        );
    }

    #[test]
    fn garbage_collection_removes_only_what_is_not_needed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        store
            .commit(
                staged(&store, b"keep"),
                "src-keep",
                "keep",
                Format::Raw,
                &ns("lab"),
            )
            .expect("commit");
        store
            .commit(
                staged(&store, b"drop!"),
                "src-drop",
                "drop",
                Format::Qcow2,
                &ns("lab"),
            )
            .expect("commit");
        let collected = store
            .collect_garbage(&needed(&[("src-keep", "lab")], &[]))
            .expect("gc");
        assert_eq!(
            collected,
            Collected {
                images: vec!["drop".into()],
                bytes: 5
            }
        );
        assert!(
            store
                .lookup("src-keep", &ns("lab"))
                .expect("lookup")
                .is_some()
        );
        assert!(
            store
                .lookup("src-drop", &ns("lab"))
                .expect("lookup")
                .is_none()
        );
        assert!(!dir.path().join("index/src-drop.json").exists());
    }

    #[test]
    fn an_image_committed_after_the_caller_looked_is_kept_when_its_source_is_needed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        // The caller decided what it needs before this import finished.
        let needed = needed(&[("src", "lab")], &["in-use"]);
        store
            .commit(
                staged(&store, b"late"),
                "src",
                "late",
                Format::Iso,
                &ns("lab"),
            )
            .expect("commit");
        store
            .commit(
                staged(&store, b"used"),
                "other",
                "in-use",
                Format::Raw,
                &ns("lab"),
            )
            .expect("commit");
        let collected = store.collect_garbage(&needed).expect("gc");
        assert_eq!(collected, Collected::default());
        assert!(store.lookup("src", &ns("lab")).expect("lookup").is_some());
        assert!(
            store
                .lookup("other", &Requester::Operator)
                .expect("lookup")
                .is_some(),
            "kept for the LUN that uses it"
        );
    }

    #[test]
    fn a_record_whose_image_is_gone_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let image = store
            .commit(
                staged(&store, b"x"),
                "src",
                "served",
                Format::Raw,
                &ns("lab"),
            )
            .expect("commit");
        std::fs::remove_file(image.path).expect("remove");
        assert_eq!(store.lookup("src", &ns("lab")).expect("lookup"), None);
    }

    #[test]
    fn a_namespace_gets_a_stored_image_only_once_its_own_source_proved_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let image = store
            .commit(
                staged(&store, b"tenant a"),
                "src",
                "served",
                Format::Raw,
                &ns("a"),
            )
            .expect("commit");
        assert_eq!(
            store.lookup("src", &ns("a")).expect("lookup"),
            Some(image.clone())
        );
        assert_eq!(
            store.lookup("src", &ns("b")).expect("lookup"),
            None,
            "knowing the digest is not enough"
        );
        assert_eq!(
            store.entitle("src", &ns("b")).expect("entitle"),
            Some(image.clone())
        );
        assert_eq!(
            store.lookup("src", &ns("b")).expect("lookup"),
            Some(image.clone())
        );
        assert_eq!(store.entitle("missing", &ns("b")).expect("entitle"), None);
        // A later commit of the same source (a race between namespaces) keeps both.
        store
            .commit(
                staged(&store, b"tenant a"),
                "src",
                "served",
                Format::Raw,
                &ns("c"),
            )
            .expect("commit");
        for namespace in ["a", "b", "c"] {
            assert!(
                store
                    .lookup("src", &ns(namespace))
                    .expect("lookup")
                    .is_some(),
                "{namespace}"
            );
        }
    }

    #[test]
    fn a_record_from_before_tenancy_entitles_nobody() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        std::fs::write(dir.path().join("images/served.raw"), b"old").expect("image");
        std::fs::write(
            dir.path().join("index/src.json"),
            br#"{"format":"raw","virtualSize":3,"servedSha256":"served"}"#,
        )
        .expect("record");
        assert_eq!(store.lookup("src", &ns("default")).expect("lookup"), None);
        assert!(
            store
                .lookup("src", &Requester::Operator)
                .expect("lookup")
                .is_some()
        );
    }

    #[test]
    fn garbage_collection_takes_back_what_a_namespace_no_longer_declares() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        store
            .commit(
                staged(&store, b"shared"),
                "src",
                "served",
                Format::Raw,
                &ns("a"),
            )
            .expect("commit");
        store.entitle("src", &ns("b")).expect("entitle");
        store
            .collect_garbage(&needed(&[("src", "a")], &[]))
            .expect("gc");
        assert!(store.lookup("src", &ns("a")).expect("lookup").is_some());
        assert_eq!(
            store.lookup("src", &ns("b")).expect("lookup"),
            None,
            "a namespace re-created by someone else inherits nothing"
        );
    }

    #[test]
    fn a_store_that_cannot_be_created_does_not_stop_the_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Where the store should be, a file: nothing can be created under it.
        let data = dir.path().join("data");
        std::fs::write(&data, b"not a directory").expect("file");
        let store = Store::open(&data).expect("opens anyway");
        let error = store
            .staging()
            .err()
            .expect("each import says why")
            .to_string();
        assert!(error.contains("data/tmp"), "{error}");
    }
}
