//! What `discus connect` made for a grant, written down before it is made, so that `discus
//! disconnect` undoes exactly that and nothing else: one small JSON file per grant in the state
//! folder (`<namespace>_<name>.json`; both are DNS names, which hold no `_` and no `/`), and a
//! lock beside it so that two runs for one grant never interleave. What is read back is checked
//! as strictly as a manifest: it names what iscsiadm and umount will act on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ClientError;
use crate::api::rules;
use crate::desired::ObjectKey;
use crate::fsutil::Claim;

/// A read-only mount connect made.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mounted {
    /// The mount point, absolute and without symbolic links.
    pub path: PathBuf,
    /// The device mounted there, as (major, minor): unmounted only while it is still that.
    pub device: (u32, u32),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Made {
    /// The target's IQN.
    pub target: String,
    /// The portals whose node records connect created (and logs in to).
    pub records: Vec<SocketAddr>,
    pub mount: Option<Mounted>,
}

/// Held while connect or disconnect works on a grant.
pub fn claim(dir: &Path, key: &ObjectKey) -> Result<Claim, ClientError> {
    let path = dir.join(format!("{}_{}.lock", key.namespace, key.name));
    Claim::take(&path, &format!("InitiatorAccess {key} on this machine"), "")
        .map_err(|e| ClientError::Refused(format!("{e}: another discus connect or disconnect")))
}

impl Made {
    fn path(dir: &Path, key: &ObjectKey) -> PathBuf {
        dir.join(format!("{}_{}.json", key.namespace, key.name))
    }

    pub fn read(dir: &Path, key: &ObjectKey) -> Result<Option<Self>, ClientError> {
        let path = Self::path(dir, key);
        let failed =
            |e: &dyn std::fmt::Display| ClientError::Refused(format!("{}: {e}", path.display()));
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(failed(&e)),
        };
        let made: Self = serde_json::from_slice(&bytes).map_err(|e| failed(&e))?;
        made.check().map_err(|e| failed(&e))?;
        Ok(Some(made))
    }

    /// Whether it names only what connect could have made.
    fn check(&self) -> Result<(), String> {
        rules::iscsi_name(&self.target).map_err(|e| format!("target {e}"))?;
        match &self.mount {
            Some(mounted) if !mounted.path.is_absolute() => {
                Err("the mount point is not an absolute path".to_owned())
            }
            _ => Ok(()),
        }
    }

    pub fn write(&self, dir: &Path, key: &ObjectKey) -> Result<(), ClientError> {
        let path = Self::path(dir, key);
        let failed =
            |e: &dyn std::fmt::Display| ClientError::Refused(format!("{}: {e}", path.display()));
        std::fs::create_dir_all(dir).map_err(|e| failed(&e))?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| failed(&e))?;
        crate::fsutil::write_atomic(&path, &json).map_err(|e| failed(&e))
    }

    pub fn remove(dir: &Path, key: &ObjectKey) -> Result<(), ClientError> {
        let path = Self::path(dir, key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ClientError::Refused(format!("{}: {e}", path.display()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_connect_made_is_written_down_read_back_checked_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = ObjectKey::new("lab", "web-1");
        assert_eq!(Made::read(dir.path(), &key).expect("read"), None);
        let made = Made {
            target: "iqn.2026-11.dev.discus:demo".into(),
            records: vec!["10.0.0.11:3260".parse().expect("portal")],
            mount: Some(Mounted {
                path: PathBuf::from("/mnt/disc"),
                device: (8, 0),
            }),
        };
        made.write(dir.path(), &key).expect("write");
        assert!(dir.path().join("lab_web-1.json").is_file());
        assert_eq!(Made::read(dir.path(), &key).expect("read"), Some(made));
        Made::remove(dir.path(), &key).expect("remove");
        Made::remove(dir.path(), &key).expect("removing twice is fine");
        // A file that names what connect never makes is refused, not acted on.
        for bad in [
            r#"{"target": "", "records": []}"#,
            r#"{"target": "iqn.2026-11.dev.discus:demo", "records": [], "mount": {"path": "mnt", "device": [8, 0]}}"#,
        ] {
            std::fs::write(dir.path().join("lab_web-1.json"), bad).expect("write");
            assert!(Made::read(dir.path(), &key).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_run_at_a_time_per_grant() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = ObjectKey::new("lab", "web-1");
        let held = claim(dir.path(), &key).expect("claim");
        let refused = claim(dir.path(), &key).expect_err("held");
        assert!(
            refused.to_string().contains("another discus connect"),
            "{refused}"
        );
        drop(held);
        claim(dir.path(), &key).expect("free again");
    }
}
