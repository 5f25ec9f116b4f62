//! The LIO backend: the kernel's own iSCSI target, written directly through configfs.
//!
//! No targetcli, no saveconfig: every sync reads what the kernel holds, plans the difference to
//! the declared state, and applies it. After a reboot configfs is empty and the first sync
//! rebuilds everything from the declared state.

mod layout;
mod model;
mod plan;
pub(crate) mod read;
mod write;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use model::LioState;
pub use plan::{LioOp, storage_name};

use super::{Backend, BackendError, Capabilities, Plan, Session};
use crate::desired::TargetConfig;

pub const CONFIGFS: &str = "/sys/kernel/config/target";

/// Whether this kernel has configfs target support.
pub fn available() -> bool {
    Path::new(CONFIGFS).exists()
}

pub struct LioBackend {
    configfs: Arc<write::Configfs>,
}

impl LioBackend {
    pub fn new(root: PathBuf) -> Result<Self, BackendError> {
        let root = layout::Root::new(root);
        if !root.core().exists() {
            return Err(BackendError::Unreachable(format!(
                "{} has no target support: load target_core_mod, target_core_file and iscsi_target_mod, and mount configfs",
                root.path().display()
            )));
        }
        Ok(Self {
            configfs: Arc::new(write::Configfs { root }),
        })
    }
}

impl Backend for LioBackend {
    type Observed = LioState;
    type Op = LioOp;

    fn name(&self) -> &'static str {
        "lio"
    }

    fn capabilities(&self) -> Capabilities {
        // The kernel's backstores present disks only.
        Capabilities { cdrom: false }
    }

    fn device_lun(&self, lun: u32) -> u32 {
        lun
    }

    async fn observe(&self) -> Result<LioState, BackendError> {
        let configfs = Arc::clone(&self.configfs);
        tokio::task::spawn_blocking(move || read::read(&configfs.root))
            .await
            .map_err(|e| BackendError::Unreachable(e.to_string()))?
            .map_err(BackendError::Io)
    }

    fn scoped(&self) -> bool {
        true
    }

    async fn observe_scoped(
        &self,
        desired: &[TargetConfig],
        iqns: &BTreeSet<String>,
    ) -> Result<LioState, BackendError> {
        let storage: BTreeSet<String> = desired
            .iter()
            .flat_map(|t| t.luns.iter().map(|l| storage_name(&t.iqn, l.lun)))
            .collect();
        let (configfs, iqns) = (Arc::clone(&self.configfs), iqns.clone());
        tokio::task::spawn_blocking(move || read::read_scoped(&configfs.root, &iqns, &storage))
            .await
            .map_err(|e| BackendError::Unreachable(e.to_string()))?
            .map_err(BackendError::Io)
    }

    fn keep_undeclared(&self, observed: &mut LioState, desired: &[TargetConfig]) {
        plan::keep_undeclared(observed, desired);
    }

    fn plan(&self, desired: &[TargetConfig], observed: &LioState) -> Plan<LioOp> {
        plan::plan(desired, observed)
    }

    async fn apply(&self, op: &LioOp) -> Result<(), BackendError> {
        let (configfs, op) = (Arc::clone(&self.configfs), op.clone());
        tokio::task::spawn_blocking(move || configfs.apply(&op))
            .await
            .map_err(|e| BackendError::Unreachable(e.to_string()))?
    }

    fn backing_files(&self, observed: &LioState) -> Vec<PathBuf> {
        (observed.storage.iter())
            .filter_map(|object| object.file.as_deref().map(PathBuf::from))
            .collect()
    }

    fn sessions(&self, observed: &LioState) -> Vec<Session> {
        observed
            .targets
            .iter()
            .filter_map(|t| Some((t, t.tpg()?)))
            .flat_map(|(t, tpg)| {
                tpg.acls.iter().flat_map(move |acl| {
                    acl.sessions.iter().map(move |address| Session {
                        target: t.iqn.clone(),
                        initiator: acl.initiator.clone(),
                        address: Some(address.clone()),
                    })
                })
            })
            .collect()
    }
}
