//! The LIO backend: the kernel's own iSCSI target, written directly through configfs.
//!
//! No targetcli, no saveconfig: every sync reads what the kernel holds, plans the difference to
//! the declared state, and applies it. After a reboot configfs is empty and the first sync
//! rebuilds everything from the declared state.
//!
//! discus marks its targets with their TPG's alias, one step after the target exists; so before
//! it makes one it records so in `unmarked.json`, and a crash in between leaves a bare target it
//! can still recognise as its own (see `plan::owned`).

mod layout;
mod model;
mod plan;
pub(crate) mod read;
mod unmarked;
mod write;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use model::LioState;
pub use plan::{LioOp, storage_name};

use super::record::{Record, Unreadable};
use super::{Backend, BackendError, Capabilities, Plan, Session};
use crate::desired::TargetConfig;
use unmarked::Unmarked;

pub const CONFIGFS: &str = "/sys/kernel/config/target";

/// Where a discus claims the kernel's LIO target for itself: one configfs writer per kernel.
pub const CLAIM: &str = "/run/discus/lio.lock";

/// Whether this kernel has configfs target support.
pub fn available() -> bool {
    Path::new(CONFIGFS).exists()
}

pub struct LioBackend {
    configfs: Arc<write::Configfs>,
    unmarked: Record<Unmarked>,
}

impl LioBackend {
    /// Drives the configfs at `root`, keeping its record in `state_dir`.
    pub fn new(root: PathBuf, state_dir: &Path) -> Result<Self, BackendError> {
        let root = layout::Root::new(root);
        if !root.core().exists() {
            return Err(BackendError::Unreachable(format!(
                "{} has no target support: load target_core_mod, target_core_file and iscsi_target_mod, and mount configfs",
                root.path().display()
            )));
        }
        let unmarked = Record::open(
            state_dir.join("unmarked.json"),
            || Ok(Unmarked::default()),
            // Losing it only narrows what discus claims: a bare target it left is then refused
            // (ForeignObject) until removed by hand.
            Unreadable::StartAfresh,
        )?;
        Ok(Self {
            configfs: Arc::new(write::Configfs { root }),
            unmarked,
        })
    }
}

impl LioBackend {
    /// A state read from configfs (of the targets `scope`, or all), with the targets discus
    /// recorded as unmarked — less those the state shows need no record any more: gone (after a
    /// reboot, or a step that failed) or marked.
    async fn with_record(
        &self,
        read: tokio::task::JoinHandle<std::io::Result<LioState>>,
        scope: Option<&BTreeSet<String>>,
    ) -> Result<LioState, BackendError> {
        let mut state = read
            .await
            .map_err(|e| BackendError::Unreachable(e.to_string()))?
            .map_err(BackendError::Io)?;
        if let Err(error) = self.unmarked.record(|u| u.settle(&state, scope)).await {
            tracing::warn!(%error, "cannot update the record of unmarked targets");
        }
        state.unmarked = self.unmarked.read(|u| u.targets.clone()).await;
        Ok(state)
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
        let state = tokio::task::spawn_blocking(move || read::read(&configfs.root));
        self.with_record(state, None).await
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
        let (configfs, read) = (Arc::clone(&self.configfs), iqns.clone());
        let state =
            tokio::task::spawn_blocking(move || read::read_scoped(&configfs.root, &read, &storage));
        self.with_record(state, Some(iqns)).await
    }

    fn keep_undeclared(&self, observed: &mut LioState, desired: &[TargetConfig]) {
        plan::keep_undeclared(observed, desired);
    }

    fn plan(&self, desired: &[TargetConfig], observed: &LioState) -> Plan<LioOp> {
        plan::plan(desired, observed)
    }

    async fn apply(&self, op: &LioOp) -> Result<(), BackendError> {
        self.unmarked.claim(|u| u.before(op)).await?;
        let (configfs, owned_op) = (Arc::clone(&self.configfs), op.clone());
        let applied = tokio::task::spawn_blocking(move || configfs.apply(&owned_op))
            .await
            .map_err(|e| BackendError::Unreachable(e.to_string()))
            .and_then(|applied| applied);
        let settled = match &applied {
            Ok(()) => self.unmarked.record(|u| u.after(op)).await,
            Err(BackendError::Exists { .. }) => self.unmarked.record(|u| u.failed(op)).await,
            Err(_) => Ok(()),
        };
        if let Err(error) = settled {
            // The next observation settles the record again.
            tracing::warn!(%error, "cannot update the record of unmarked targets");
        }
        applied
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
