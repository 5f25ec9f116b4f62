//! The scrub: stored images checked against their digests, so that bytes that rotted on disk
//! are never served as verified ones.
//!
//! A served file is named by the SHA-256 of its bytes (`images/<digest>.raw`), so checking it
//! needs nothing but the file. A file is checked
//! - when an import commits it (its bytes were hashed on the way in: the store records that);
//! - after a start, once, at full speed, before it is first served (the manager's job reports
//!   `Verifying`) — except a file the target already serves when discus starts: that one keeps
//!   being served, as the last good state (taking it away would end its sessions), and the
//!   background scrub checks it first;
//! - in the background, every stored file again each `interval`, at most `rate` bytes a second,
//!   so that a scrub never competes with the initiators for the disk.
//!
//! A mismatch removes the file (unless an import wrote it again meanwhile), which takes its LUNs out
//! of the target at the next pass and makes the next pass import the source again; the DiscImages
//! whose source became that file say so in status until the file is whole again.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

// Cannot be poisoned: a panicking check must not stop every later one.
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::store::{Store, StoreError};
use crate::metrics::{ErrorKind, Metrics};

/// How the background scrub paces itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrubConfig {
    /// The most bytes a second the background scrub reads.
    pub rate: u64,
    /// How long a file stays verified before the background scrub reads it again.
    pub interval: Duration,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        Self {
            rate: 32 << 20,
            interval: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What reading a stored file found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Its bytes still have its digest.
    Whole,
    /// They do not: `actual` is what they hash to now.
    Rotten { actual: String },
    /// There is no such file (any more).
    Gone,
}

/// Hashes the stored file with this served digest — as fast as it can, or at most `rate` bytes
/// a second — telling `progress` the bytes done and the size. A whole file is marked verified in
/// the store; a rotten one is removed, unless an import committed it again meanwhile.
pub fn check(
    store: &Store,
    served_sha256: &str,
    rate: Option<u64>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Checked, StoreError> {
    let path = store.image_path(served_sha256);
    let at = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Checked::Gone),
        Err(e) => return Err(at(e)),
    };
    let read_since = Instant::now();
    let size = file.metadata().map_err(at)?.len();
    let actual = hash(&mut file, size, rate, progress).map_err(at)?;
    if actual == served_sha256 {
        store.mark_verified(served_sha256);
        return Ok(Checked::Whole);
    }
    store.remove_rotten(served_sha256, read_since)?;
    Ok(Checked::Rotten { actual })
}

/// The file's digest, read at most `rate` bytes a second.
fn hash(
    file: &mut File,
    size: u64,
    rate: Option<u64>,
    progress: &mut dyn FnMut(u64, u64),
) -> std::io::Result<String> {
    let started = Instant::now();
    let mut digest = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hex::encode(digest.finalize()));
        }
        digest.update(&buffer[..n]);
        done += n as u64;
        progress(done, size);
        if let Some(rate) = rate {
            // Ahead of the rate: wait until these bytes are due. Pacing, not synchronisation.
            let due = Duration::from_secs_f64(done as f64 / rate.max(1) as f64);
            if let Some(early) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(early);
            }
        }
    }
}

/// The node's scrub: which files it may serve before checking them, what it found rotten, and
/// the background loop.
pub struct Scrub {
    store: Store,
    config: ScrubConfig,
    state: Mutex<State>,
    /// Woken when a file was found rotten, so that the sync loop takes it out at once.
    found: Arc<Notify>,
    /// Told once the files served at the start are known: the background scrub reads them first.
    served_known: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct State {
    /// The served digests of the files the target served when discus started; `None` until
    /// the backend was read once.
    served_at_start: Option<BTreeSet<String>>,
    /// Files found rotten: when, and what to tell.
    rotten: BTreeMap<String, (Instant, String)>,
}

impl Scrub {
    pub fn new(
        store: Store,
        config: ScrubConfig,
        found: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            config,
            state: Mutex::default(),
            found,
            served_known: Notify::new(),
            metrics,
        }
    }

    /// Whether the files served at start are known yet.
    pub fn knows_what_was_served(&self) -> bool {
        self.state.lock().served_at_start.is_some()
    }

    /// The backend's backing files when discus started: those in the store keep being served
    /// until the background scrub checked them (first).
    pub fn served_at_start(&self, backing_files: &[PathBuf]) {
        let digests = backing_files
            .iter()
            .filter_map(|path| self.served_digest(path))
            .collect();
        self.state.lock().served_at_start = Some(digests);
        self.served_known.notify_one();
    }

    /// The served digest of a file in the store's `images/`.
    fn served_digest(&self, path: &Path) -> Option<String> {
        let digest = path.file_stem()?.to_str()?;
        (self.store.image_path(digest) == path).then(|| digest.to_owned())
    }

    /// Whether the file with this served digest may be served without reading it first: it was
    /// hashed since the start, or it was already being served then and the scrub has not found
    /// it rotten.
    pub fn may_serve(&self, served_sha256: &str) -> bool {
        if self.store.verified_at(served_sha256).is_some() {
            return true;
        }
        let state = self.state.lock();
        !state.rotten.contains_key(served_sha256)
            && state
                .served_at_start
                .as_ref()
                .is_some_and(|served| served.contains(served_sha256))
    }

    /// What to tell about a file found rotten that is not whole again yet.
    pub fn rotten(&self, served_sha256: &str) -> Option<String> {
        let state = self.state.lock();
        let (found, message) = state.rotten.get(served_sha256)?;
        let whole_since = self
            .store
            .verified_at(served_sha256)
            .is_some_and(|at| at > *found);
        (!whole_since).then(|| message.clone())
    }

    /// Checks one file now, as fast as it can or paced; records and tells what it finds.
    pub fn check(
        &self,
        served_sha256: &str,
        paced: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Checked, StoreError> {
        let rate = paced.then_some(self.config.rate);
        let mut read = 0;
        let checked = check(&self.store, served_sha256, rate, &mut |done, size| {
            read = done;
            progress(done, size);
        })?;
        if checked != Checked::Gone {
            self.metrics.scrubbed(read, checked == Checked::Whole);
        }
        if checked == Checked::Whole {
            tracing::info!(
                served_sha256,
                bytes = read,
                paced,
                "stored image read again: whole"
            );
        }
        if let Checked::Rotten { actual } = &checked {
            let message = format!(
                "the stored image's bytes no longer match their SHA-256 {served_sha256} (they \
                 hash to {actual}): the file was removed and the source is fetched again; check \
                 the node's disk"
            );
            tracing::error!(
                served_sha256,
                actual,
                "stored image rotten: removed, fetching it again"
            );
            self.metrics.error(ErrorKind::StoredImageRotten);
            self.state
                .lock()
                .rotten
                .insert(served_sha256.to_owned(), (Instant::now(), message));
            self.found.notify_one();
        }
        Ok(checked)
    }

    /// The stored files in the order the background scrub reads them: those served at start and
    /// not checked since first, then the longest unchecked; only those due.
    fn due(&self) -> Result<Vec<String>, StoreError> {
        let served_at_start = self
            .state
            .lock()
            .served_at_start
            .clone()
            .unwrap_or_default();
        let now = Instant::now();
        let mut due: Vec<(bool, Option<Instant>, String)> = self
            .store
            .served_digests()?
            .into_iter()
            .filter_map(|digest| {
                let checked = self.store.verified_at(&digest);
                let is_due =
                    checked.is_none_or(|at| now.duration_since(at) >= self.config.interval);
                is_due.then(|| (!served_at_start.contains(&digest), checked, digest))
            })
            .collect();
        due.sort();
        Ok(due.into_iter().map(|(_, _, digest)| digest).collect())
    }

    /// When the next file falls due, at the latest.
    fn next_due(&self) -> Duration {
        let now = Instant::now();
        self.store
            .served_digests()
            .unwrap_or_default()
            .iter()
            .filter_map(|digest| self.store.verified_at(digest))
            .map(|at| (at + self.config.interval).saturating_duration_since(now))
            .min()
            .unwrap_or(self.config.interval)
    }

    /// The background scrub: reads every due file, paced, for as long as the process lives.
    pub async fn run(self: Arc<Self>) {
        if !self.knows_what_was_served() {
            self.served_known.notified().await;
        }
        loop {
            let due = match self.due() {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(%error, "the scrub cannot list the stored images");
                    Vec::new()
                }
            };
            for digest in due {
                let scrub = Arc::clone(&self);
                let checked =
                    tokio::task::spawn_blocking(move || scrub.check(&digest, true, &mut |_, _| {}))
                        .await;
                match checked {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "the scrub could not read a stored image")
                    }
                    Err(error) => tracing::warn!(%error, "the scrub's check ended abnormally"),
                }
            }
            // At least a second between rounds: files that cannot be read are not read in a
            // tight loop.
            tokio::time::sleep(self.next_due().max(Duration::from_secs(1))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::io::{Seek, SeekFrom, Write};

    use super::*;
    use crate::images::Format;
    use crate::images::store::Requester;

    fn stored(store: &Store, content: &[u8]) -> String {
        let digest = hex::encode(Sha256::digest(content));
        let mut staging = store.staging().unwrap();
        staging.file_mut().write_all(content).unwrap();
        store
            .commit(staging, &digest, &digest, Format::Raw, &Requester::Operator)
            .unwrap();
        digest
    }

    fn flip_a_bit(path: &Path) {
        let mut file = File::options().read(true).write(true).open(path).unwrap();
        let mut byte = [0u8];
        file.seek(SeekFrom::Start(3)).unwrap();
        file.read_exact(&mut byte).unwrap();
        file.seek(SeekFrom::Start(3)).unwrap();
        file.write_all(&[byte[0] ^ 0x10]).unwrap();
    }

    fn scrub(store: &Store) -> Scrub {
        Scrub::new(
            store.clone(),
            ScrubConfig::default(),
            Arc::default(),
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn a_committed_file_is_verified_and_a_rotten_one_is_removed_and_told() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = stored(&store, b"the bytes of a disc");
        let scrub = scrub(&store);
        assert!(scrub.may_serve(&digest), "the commit hashed it");
        assert_eq!(
            scrub.check(&digest, false, &mut |_, _| {}).unwrap(),
            Checked::Whole
        );

        flip_a_bit(&store.image_path(&digest));
        let checked = scrub.check(&digest, false, &mut |_, _| {}).unwrap();
        assert!(matches!(checked, Checked::Rotten { .. }), "{checked:?}");
        assert!(!store.image_path(&digest).exists(), "removed");
        assert!(!scrub.may_serve(&digest));
        assert!(scrub.rotten(&digest).is_some_and(|m| m.contains(&digest)));
        assert_eq!(
            scrub.check(&digest, false, &mut |_, _| {}).unwrap(),
            Checked::Gone
        );

        // Imported again: whole, and nothing more to tell.
        stored(&store, b"the bytes of a disc");
        assert!(scrub.may_serve(&digest));
        assert_eq!(scrub.rotten(&digest), None);
    }

    #[test]
    fn after_a_start_only_what_was_served_may_be_served_unchecked_and_it_is_checked_first() {
        let dir = tempfile::tempdir().unwrap();
        let before = Store::open(dir.path()).unwrap();
        let (served, spare) = (stored(&before, b"served"), stored(&before, b"spare"));
        // A new process: nothing hashed yet.
        let store = Store::open(dir.path()).unwrap();
        let scrub = scrub(&store);
        assert!(!scrub.knows_what_was_served());
        assert!(!scrub.may_serve(&served) && !scrub.may_serve(&spare));
        scrub.served_at_start(&[store.image_path(&served), PathBuf::from("/elsewhere/x.raw")]);
        assert!(scrub.may_serve(&served), "kept, as the last good state");
        assert!(!scrub.may_serve(&spare), "read before it is first served");
        assert_eq!(scrub.due().unwrap(), vec![served.clone(), spare.clone()]);

        flip_a_bit(&store.image_path(&served));
        scrub.check(&served, true, &mut |_, _| {}).unwrap();
        assert!(!scrub.may_serve(&served), "rotten: no longer served");
        assert_eq!(
            scrub.check(&spare, true, &mut |_, _| {}).unwrap(),
            Checked::Whole
        );
        assert!(scrub.may_serve(&spare));
        assert!(
            scrub.due().unwrap().is_empty(),
            "nothing due until the interval passed"
        );
    }

    #[test]
    fn a_file_committed_again_meanwhile_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = stored(&store, b"bytes");
        let path = store.image_path(&digest);
        let read_since = Instant::now();
        flip_a_bit(&path);
        // The import commits a fresh file before the check removes the one it read.
        std::fs::remove_file(&path).unwrap();
        stored(&store, b"bytes");
        assert!(!store.remove_rotten(&digest, read_since).unwrap());
        assert!(path.exists());
        assert!(
            store.remove_rotten(&digest, Instant::now()).unwrap(),
            "read after the commit"
        );
    }

    #[test]
    fn the_background_rate_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 << 20]).unwrap();
        let started = Instant::now();
        let mut file = File::open(&path).unwrap();
        hash(&mut file, 3 << 20, Some(2 << 20), &mut |_, _| {}).unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            started.elapsed()
        );
    }
}
