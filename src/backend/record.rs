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

impl<T: Serialize + DeserializeOwned + Clone> Record<T> {
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
                if let Err(error) = save(&path, &value, true) {
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

    /// Applies `change` and, when it says it changed something, saves the record — `durably`
    /// (synced) when a crash must not lose it, otherwise only so that readers never see half —
    /// and only then holds it as the record: a change that cannot be saved is not made.
    pub async fn update(
        &self,
        change: impl FnOnce(&mut T) -> bool,
        durably: bool,
    ) -> Result<(), BackendError>
    where
        T: Send + 'static,
    {
        let mut value = self.value.lock().await;
        let mut changed = value.clone();
        if !change(&mut changed) {
            return Ok(());
        }
        let (path, saved) = (self.path.clone(), changed.clone());
        tokio::task::spawn_blocking(move || save(&path, &saved, durably))
            .await
            .map_err(|e| BackendError::Unreachable(e.to_string()))??;
        *value = changed;
        Ok(())
    }
}

impl<T: Serialize + DeserializeOwned + Clone + Send + 'static> Record<T> {
    /// Applies `change` — one that only narrows what the record claims — and holds it at once,
    /// whether or not it can be saved (durably): a record that cannot be saved then claims less
    /// in memory than on disk, never more, and the next change saves it again.
    pub async fn narrow(&self, change: impl FnOnce(&mut T) -> bool) -> Result<(), BackendError> {
        let mut value = self.value.lock().await;
        if !change(&mut value) {
            return Ok(());
        }
        let (path, saved) = (self.path.clone(), value.clone());
        tokio::task::spawn_blocking(move || save(&path, &saved, true))
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

fn save<T: Serialize>(path: &Path, value: &T, durably: bool) -> Result<(), BackendError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| io_error(path, e))?;
    let written = if durably {
        crate::fsutil::write_atomic(path, &json)
    } else {
        crate::fsutil::write_replace(path, &json)
    };
    written.map_err(|e| io_error(path, e))
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
        let claim = record
            .update(|claims| claims.insert("b".to_owned()), true)
            .await;
        assert!(claim.is_err(), "saving cannot succeed");
        let release = record.narrow(|claims| claims.remove("a")).await;
        assert!(release.is_err(), "saving cannot succeed");
        assert!(
            record.read(BTreeSet::is_empty).await,
            "neither a nor b held"
        );
    }
}
