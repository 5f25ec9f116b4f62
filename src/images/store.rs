//! The content-addressed image store under the data directory:
//!
//! ```text
//! images/<served sha256>.raw   the bytes served, one file per digest, shared by every DiscImage
//! index/<source sha256>.json   what a verified source became: format, size, served digest
//! tmp/                         work in progress; nothing here is ever served
//! ```
//!
//! A file reaches `images/` only by a rename after its digest was checked, so a half-written or
//! unverified image is never served. Work in progress holds a lock on its file; at start-up every
//! unlocked file in `tmp/` is a leftover of interrupted work and is removed. Garbage collection
//! removes what the caller says is no longer needed, and nothing else. Committing an image and
//! collecting garbage both hold the store's lock (`store.lock`), so an import that finishes while
//! a collection runs — in this process or another — is judged by its index record, never by a
//! half-written pair of files.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

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
}

/// A file being written in `tmp/`. Removed when dropped, unless committed.
pub struct Staging {
    file: NamedTempFile,
}

impl Staging {
    pub fn path(&self) -> &Path {
        self.file.path()
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
}

/// What the node still needs: sources (by their verified digest; whatever each became is kept)
/// and served files (by their served digest, for LUNs already pointing at them).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Needed {
    pub sources: BTreeSet<String>,
    pub served: BTreeSet<String>,
}

/// What garbage collection removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub images: Vec<String>,
    pub bytes: u64,
}

impl Store {
    /// Opens (creating) the store under `data_dir`, and removes leftovers of interrupted work.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let store = Self {
            root: data_dir.to_owned(),
        };
        for dir in [store.images_dir(), store.index_dir(), store.tmp_dir()] {
            fs::create_dir_all(&dir).at(&dir)?;
        }
        store.remove_leftovers()?;
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

    /// Where the image with this served digest lives.
    pub fn image_path(&self, served_sha256: &str) -> PathBuf {
        self.images_dir().join(format!("{served_sha256}.raw"))
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
        for entry in fs::read_dir(&dir).at(&dir)? {
            let path = entry.at(&dir)?.path();
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

    /// The stored image a verified source became, if it is still in the store.
    pub fn lookup(&self, sha256: &str) -> Result<Option<StoredImage>, StoreError> {
        let Some(record) = self.record(sha256)? else {
            return Ok(None);
        };
        let image = self.image_path(&record.served_sha256);
        match fs::metadata(&image) {
            Ok(meta) if meta.len() == record.virtual_size => Ok(Some(StoredImage {
                path: image,
                format: record.format,
                virtual_size: record.virtual_size,
                sha256: sha256.to_owned(),
                served_sha256: record.served_sha256,
            })),
            Ok(_) | Err(_) => Ok(None),
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

    /// Moves a verified raw file into `images/` and records what the source became. The file
    /// must be complete and its digest checked: from here on it is served.
    pub fn commit(
        &self,
        mut served: Staging,
        sha256: &str,
        served_sha256: &str,
        format: Format,
    ) -> Result<StoredImage, StoreError> {
        let staged = served.path().to_owned();
        served.file_mut().sync_all().at(&staged)?;
        let virtual_size = served.file().metadata().at(&staged)?.len();
        let target = self.image_path(served_sha256);
        let mut permissions = served.file().metadata().at(&staged)?.permissions();
        permissions.set_readonly(true);
        served.file().set_permissions(permissions).at(&staged)?;
        let _lock = self.lock()?;
        // Another import of the same bytes may have won the race; the content is the same.
        served
            .file
            .persist(&target)
            .map_err(|e| e.error)
            .at(&target)?;
        sync_dir(&self.images_dir())?;

        let record = Record {
            format: format.as_str().to_owned(),
            virtual_size,
            served_sha256: served_sha256.to_owned(),
        };
        let record_path = self.record_path(sha256);
        let dir = self.index_dir();
        let mut file = tempfile::Builder::new()
            .prefix(".record-")
            .tempfile_in(&dir)
            .at(&dir)?;
        serde_json::to_writer(file.as_file_mut(), &record).map_err(|source| {
            StoreError::Record {
                path: record_path.clone(),
                source,
            }
        })?;
        file.as_file().sync_all().at(file.path())?;
        file.persist(&record_path)
            .map_err(|e| e.error)
            .at(&record_path)?;
        sync_dir(&dir)?;
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
        let dir = self.images_dir();
        let mut digests = BTreeSet::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let name = entry.at(&dir)?.file_name();
            if let Some(digest) = name.to_str().and_then(|n| n.strip_suffix(".raw")) {
                digests.insert(digest.to_owned());
            }
        }
        Ok(digests)
    }

    /// Removes every image that no needed source became and no needed served digest names, and
    /// the index records that lead to nothing. The caller knows what the node needs; the store
    /// never guesses.
    pub fn collect_garbage(&self, needed: &Needed) -> Result<Collected, StoreError> {
        let _lock = self.lock()?;
        let mut keep = needed.served.clone();
        for source in &needed.sources {
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
        let dir = self.index_dir();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let path = entry.at(&dir)?.path();
            let orphan = fs::read(&path)
                .ok()
                .and_then(|text| serde_json::from_slice::<Record>(&text).ok())
                .is_none_or(|record| !self.image_path(&record.served_sha256).exists());
            if orphan {
                remove_if_present(&path)?;
            }
        }
        sync_dir(&self.images_dir())?;
        Ok(collected)
    }
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

    #[test]
    fn a_committed_image_is_found_by_its_source_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        assert_eq!(store.lookup("aa").expect("lookup"), None);
        let image = store
            .commit(staged(&store, b"hello"), "aa", "bb", Format::Raw)
            .expect("commit");
        assert_eq!(image.path, dir.path().join("images/bb.raw"));
        assert_eq!(std::fs::read(&image.path).expect("read"), b"hello");
        assert_eq!(store.lookup("aa").expect("lookup"), Some(image));
        assert!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .next()
                .is_none()
        );
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
            .commit(staged(&store, b"keep"), "src-keep", "keep", Format::Raw)
            .expect("commit");
        store
            .commit(staged(&store, b"drop!"), "src-drop", "drop", Format::Qcow2)
            .expect("commit");
        let collected = store
            .collect_garbage(&Needed {
                sources: ["src-keep".to_owned()].into(),
                served: BTreeSet::new(),
            })
            .expect("gc");
        assert_eq!(
            collected,
            Collected {
                images: vec!["drop".into()],
                bytes: 5
            }
        );
        assert!(store.lookup("src-keep").expect("lookup").is_some());
        assert!(store.lookup("src-drop").expect("lookup").is_none());
        assert!(!dir.path().join("index/src-drop.json").exists());
    }

    #[test]
    fn an_image_committed_after_the_caller_looked_is_kept_when_its_source_is_needed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        // The caller decided what it needs before this import finished.
        let needed = Needed {
            sources: ["src".to_owned()].into(),
            served: ["in-use".to_owned()].into(),
        };
        store
            .commit(staged(&store, b"late"), "src", "late", Format::Iso)
            .expect("commit");
        store
            .commit(staged(&store, b"used"), "other", "in-use", Format::Raw)
            .expect("commit");
        let collected = store.collect_garbage(&needed).expect("gc");
        assert_eq!(collected, Collected::default());
        assert!(store.lookup("src").expect("lookup").is_some());
        assert!(store.lookup("other").expect("lookup").is_some());
    }

    #[test]
    fn a_record_whose_image_is_gone_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let image = store
            .commit(staged(&store, b"x"), "src", "served", Format::Raw)
            .expect("commit");
        std::fs::remove_file(image.path).expect("remove");
        assert_eq!(store.lookup("src").expect("lookup"), None);
    }
}
