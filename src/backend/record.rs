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
    /// Loads `path`, or starts from `fresh()` where there is none. A file that does not parse is
    /// an error ending with `unreadable` (what the operator can do); a fresh record that cannot
    /// be saved yet is only logged: a full disk must not keep discus from starting, and revoking.
    pub fn open(
        path: PathBuf,
        fresh: impl FnOnce() -> Result<T, BackendError>,
        unreadable: &str,
    ) -> Result<Self, BackendError> {
        if let Some(dir) = path.parent()
            && let Err(error) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(path = %dir.display(), %error, "cannot create the backend's folder");
        }
        let value = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io_error(&path, format!("{e}; {unreadable}")))?,
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

    /// Applies `change` and, when it says it changed something, saves the record: `durably`
    /// (synced) when a crash must not lose it, otherwise only so that readers never see half.
    pub async fn update(
        &self,
        change: impl FnOnce(&mut T) -> bool,
        durably: bool,
    ) -> Result<(), BackendError> {
        let mut value = self.value.lock().await;
        if change(&mut value) {
            save(&self.path, &*value, durably)?;
        }
        Ok(())
    }
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
