//! Carries out one planned operation on configfs. Blocking: callers run it on a blocking thread.
//!
//! Every value is written in one `write(2)` without a newline (configfs stores CHAP strings
//! verbatim). `EEXIST` on a `mkdir` the plan asked for means it is already there: success, and the
//! next observation checks its content — except for a target, which the plan makes only where
//! there was none: one that appeared since is someone else's. `EBUSY` and `ENOTEMPTY` mean the order was wrong: a bug,
//! reported loudly, never retried blindly.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::layout::{Root, TPG_TAG, TpgDir};
use super::plan::{HBA, LioOp, StorageSpec};
use crate::backend::BackendError;

pub struct Configfs {
    pub root: Root,
}

fn failed(op: &LioOp, path: &Path, error: &io::Error) -> BackendError {
    let hint = match error.raw_os_error() {
        Some(code)
            if code == rustix::io::Errno::BUSY.raw_os_error()
                || code == rustix::io::Errno::NOTEMPTY.raw_os_error() =>
        {
            " — the kernel refused because something still uses it: discus removed things in the wrong order (a bug, please report it)"
        }
        _ => "",
    };
    tracing::error!(%op, path = %path.display(), %error, "configfs refused an operation");
    BackendError::Failed {
        operation: op.to_string(),
        message: format!("{}: {error}{hint}", path.display()),
    }
}

impl Configfs {
    fn tpg(&self, iqn: &str) -> TpgDir {
        self.root.tpg(iqn, TPG_TAG)
    }

    pub fn apply(&self, op: &LioOp) -> Result<(), BackendError> {
        let mkdir = |path: &Path| match std::fs::create_dir(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            other => other.map_err(|e| failed(op, path, &e)),
        };
        let rmdir = |path: &Path| match std::fs::remove_dir(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(|e| failed(op, path, &e)),
        };
        let write =
            |path: &Path, value: &str| write_value(path, value).map_err(|e| failed(op, path, &e));
        let link = |target: &Path, path: &Path| match std::os::unix::fs::symlink(target, path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            other => other.map_err(|e| failed(op, path, &e)),
        };
        let unlink_all = |dir: &Path| -> Result<(), BackendError> {
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(failed(op, dir, &e)),
            };
            for entry in entries.filter_map(Result::ok) {
                if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                    std::fs::remove_file(entry.path())
                        .map_err(|e| failed(op, &entry.path(), &e))?;
                }
            }
            Ok(())
        };
        match op {
            LioOp::CreateHba => mkdir(&self.root.hba(HBA)),
            LioOp::CreateStorage(spec) => self.create_storage(op, spec),
            LioOp::DeleteStorage { hba, name } => rmdir(self.root.storage(hba, name).path()),
            LioOp::CreateTarget { iqn } => {
                // The first `mkdir iscsi` loads iscsi_target_mod.
                mkdir(&self.root.iscsi())?;
                // Planned only where configfs showed none: one there now is someone else's.
                let target = self.root.target(iqn);
                std::fs::create_dir(&target).map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => BackendError::Exists {
                        operation: op.to_string(),
                        message: format!(
                            "{} appeared since discus read configfs: not discus's, left alone",
                            target.display()
                        ),
                    },
                    _ => failed(op, &target, &e),
                })
            }
            LioOp::CreateTpg { iqn, alias } => {
                mkdir(self.tpg(iqn).path())?;
                write(&self.tpg(iqn).alias(), alias)
            }
            LioOp::SetAttribute { iqn, name, value } => {
                write(&self.tpg(iqn).attribute(name), value)
            }
            LioOp::EnableTpg { iqn, enable } => {
                write(&self.tpg(iqn).enable(), if *enable { "1" } else { "0" })
            }
            LioOp::AddPortal { iqn, portal } => mkdir(&self.tpg(iqn).portal(portal)),
            LioOp::RemovePortal { iqn, portal } => rmdir(&self.tpg(iqn).portal(portal)),
            LioOp::AddLun { iqn, lun, storage } => {
                let tpg = self.tpg(iqn);
                mkdir(&tpg.lun(*lun))?;
                link(self.root.storage(HBA, storage).path(), &tpg.lun_link(*lun))
            }
            LioOp::RemoveLun { iqn, lun } => {
                let dir = self.tpg(iqn).lun(*lun);
                unlink_all(&dir)?;
                rmdir(&dir)
            }
            LioOp::CreateAcl { iqn, initiator } => mkdir(self.tpg(iqn).acl(initiator).path()),
            LioOp::DeleteAcl { iqn, initiator } => rmdir(self.tpg(iqn).acl(initiator).path()),
            LioOp::SetAuth {
                iqn,
                initiator,
                field,
                value,
            } => write(
                &self.tpg(iqn).acl(initiator).auth(field.file()),
                value.expose(),
            ),
            LioOp::MapLun {
                iqn,
                initiator,
                lun,
                write_protect,
            } => {
                let (tpg, acl) = (self.tpg(iqn), self.tpg(iqn).acl(initiator));
                mkdir(&acl.mapped_lun(*lun))?;
                link(&tpg.lun(*lun), &acl.mapped_lun_link(*lun))?;
                write(
                    &acl.write_protect(*lun),
                    if *write_protect { "1" } else { "0" },
                )
            }
            LioOp::UnmapLun {
                iqn,
                initiator,
                lun,
            } => {
                let dir = self.tpg(iqn).acl(initiator).mapped_lun(*lun);
                unlink_all(&dir)?;
                rmdir(&dir)
            }
            LioOp::SetWriteProtect {
                iqn,
                initiator,
                lun,
                write_protect,
            } => write(
                &self.tpg(iqn).acl(initiator).write_protect(*lun),
                if *write_protect { "1" } else { "0" },
            ),
            LioOp::DeleteTpg { iqn } => rmdir(self.tpg(iqn).path()),
            LioOp::DeleteTarget { iqn } => rmdir(&self.root.target(iqn)),
        }
    }

    /// mkdir → control → udev_path → enable → serial and block size, all before any LUN links it.
    fn create_storage(&self, op: &LioOp, spec: &StorageSpec) -> Result<(), BackendError> {
        let storage = self.root.storage(HBA, &spec.name);
        match std::fs::create_dir(storage.path()) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(failed(op, storage.path(), &e));
            }
            _ => {}
        }
        let file = spec.file.display().to_string();
        let mut control = format!("fd_dev_name={file},fd_dev_size={}", spec.size);
        if spec.buffered {
            control.push_str(",fd_buffered_io=1");
        }
        let enable = storage.enable();
        let steps: [(PathBuf, String); 5] = [
            (storage.control(), control),
            (storage.udev_path(), file),
            (enable.clone(), "1".into()),
            (storage.unit_serial(), spec.serial.clone()),
            (storage.block_size(), spec.block_size.to_string()),
        ];
        for (path, value) in steps {
            match write_value(&path, &value) {
                // Enabling twice says EEXIST: it is enabled.
                Err(e) if path == enable && e.kind() == io::ErrorKind::AlreadyExists => {}
                other => other.map_err(|e| failed(op, &path, &e))?,
            }
        }
        Ok(())
    }
}

/// One write, no newline.
fn write_value(path: &Path, value: &str) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    let written = file.write(value.as_bytes())?;
    if written != value.len() {
        return Err(io::Error::other(format!(
            "configfs took {written} of {} bytes",
            value.len()
        )));
    }
    Ok(())
}
