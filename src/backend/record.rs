//! A backend's durable record of what discus made where the target software cannot say it: tgtd
//! has no place for a mark, and LIO's mark (the TPG alias) comes one step after the target. Kept
//! as JSON in the backend's folder and changed before the change it records, so that a crash
//! between the two leaves a harmless record, never an object discus cannot recognise as its own.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use super::BackendError;

pub struct Record<T> {
    path: PathBuf,
    value: Mutex<T>,
}

fn io_error(path: &Path, error: impl std::fmt::Display) -> BackendError {
    BackendError::Io(std::io::Error::other(format!(
        "{}: {error}",
        path.display()
    )))
}

impl<T: Serialize + DeserializeOwned + Clone + Send + 'static> Record<T> {
    /// Loads `path`, or starts from `fresh()` where there is none. A fresh record that cannot be
    /// saved yet is only logged: a full disk must not keep discus from starting, and revoking.
    pub fn open(
        path: PathBuf,
        fresh: impl Fn() -> Result<T, BackendError>,
        unreadable: Unreadable,
    ) -> Result<Self, BackendError> {
        if let Some(dir) = path.parent()
            && let Err(error) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(path = %dir.display(), %error, "cannot create the backend's folder");
        }
        let value = match std::fs::read(&path) {
            Ok(bytes) => match (serde_json::from_slice(&bytes), unreadable) {
                (Ok(value), _) => value,
                (Err(e), Unreadable::Fail(hint)) => {
                    return Err(io_error(&path, format!("{e}; {hint}")));
                }
                (Err(error), Unreadable::StartAfresh) => {
                    tracing::warn!(path = %path.display(), %error, "unreadable; starting afresh");
                    fresh()?
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let value = fresh()?;
                if let Err(error) = save(&path, &value) {
                    tracing::warn!(%error, "cannot save what discus owns yet");
                }
                value
            }
            Err(e) => return Err(io_error(&path, e)),
        };
        Ok(Self {
            path,
            value: Mutex::new(value),
        })
    }

    pub async fn read<R>(&self, look: impl FnOnce(&T) -> R) -> R {
        look(&*self.value.lock().await)
    }

    /// A change that widens what the record claims (an object about to be made): applied, saved
    /// durably, and only then held — a claim that cannot be saved is not made, and the
    /// operation it guards must not run.
    pub async fn claim(&self, change: impl FnOnce(&mut T) -> bool) -> Result<(), BackendError> {
        let mut value = self.value.lock().await;
        let mut changed = value.clone();
        if !change(&mut changed) {
            return Ok(());
        }
        self.save(changed.clone()).await?;
        *value = changed;
        Ok(())
    }

    /// A change that records what already happened (an object made, removed, or found to be
    /// someone else's): held at once, then saved durably. A save that fails leaves the file
    /// behind memory — claiming more, which the next pass settles — never memory behind the
    /// target software.
    pub async fn record(&self, change: impl FnOnce(&mut T) -> bool) -> Result<(), BackendError> {
        let mut value = self.value.lock().await;
        if !change(&mut value) {
            return Ok(());
        }
        self.save(value.clone()).await
    }

    /// Writes `value` to the record's file, durably, off the runtime's threads.
    async fn save(&self, value: T) -> Result<(), BackendError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || save(&path, &value))
            .await
            .map_err(|e| BackendError::Unreachable(e.to_string()))?
    }
}

/// What to do with a record that does not parse.
#[derive(Clone, Debug)]
pub enum Unreadable {
    /// Refuse to start, with what the operator can do: the record is what keeps discus's hands
    /// off objects it did not make.
    Fail(String),
    /// Start from a fresh record: losing it only narrows what discus claims.
    StartAfresh,
}

fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), BackendError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| io_error(path, e))?;
    crate::fsutil::write_atomic(path, &json).map_err(|e| io_error(path, e))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// A record whose folder became a file: nothing can be saved any more.
    async fn unsavable(claimed: &[&str]) -> (tempfile::TempDir, Record<BTreeSet<String>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let folder = dir.path().join("lio");
        let record = Record::open(
            folder.join("record.json"),
            || Ok(claimed.iter().map(|s| (*s).to_owned()).collect()),
            Unreadable::StartAfresh,
        )
        .expect("opened");
        std::fs::remove_dir_all(&folder).expect("remove");
        std::fs::write(&folder, "").expect("a file where the folder was");
        (dir, record)
    }

    #[tokio::test]
    async fn a_claim_that_cannot_be_saved_is_not_held_and_a_release_always_is() {
        let (_dir, record) = unsavable(&["a"]).await;
        let claim = record.claim(|claims| claims.insert("b".to_owned())).await;
        assert!(claim.is_err(), "saving cannot succeed");
        let release = record.record(|claims| claims.remove("a")).await;
        assert!(release.is_err(), "saving cannot succeed");
        assert!(
            record.read(BTreeSet::is_empty).await,
            "neither a nor b held"
        );
    }
}
