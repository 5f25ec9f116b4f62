//! The tgt backend: discus's own `tgtd`, on its own control port, driven with tgtadm — in the
//! same steps as LIO: read (`--op show` into model.rs), plan (pure), write (`argv`, and what discus owns).
//!
//! discus starts tgtd when none answers on its control port and adopts the one that does, so a
//! restart of discus leaves targets serving (`daemon`). tgtd never touches a host's other tgtd
//! instances. What discus created is remembered in `owned.json` (tgtd has no place for a tag):
//! anything else in the daemon is left alone.

mod daemon;
mod model;
mod owned;
mod plan;
pub(crate) mod read;
mod tgtadm;
mod view;
mod write;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use model::TgtState;
pub use plan::{Owned, TgtOp, device_lun};
use tgtadm::Tgtadm;

use super::record::{Record, Unreadable};
use super::{Backend, BackendError, Capabilities, Plan, Session};
use crate::desired::{Backing, TargetConfig};

#[derive(Clone, Debug)]
pub struct TgtConfig {
    /// Where discus keeps tgtd's log and what it owns.
    pub state_dir: PathBuf,
    /// tgtd's control port (`-C`): its IPC socket is `/var/run/tgtd/socket.<port>`.
    pub control_port: u16,
    pub tgtd: PathBuf,
    pub tgtadm: PathBuf,
    pub timeout: Duration,
    /// The image store's folder: tgtd is given its files through a read-only view of it.
    pub images: Option<PathBuf>,
}

/// The control port discus uses unless told otherwise; a host's own tgtd uses 0.
pub const DEFAULT_CONTROL_PORT: u16 = 3261;

impl TgtConfig {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            control_port: DEFAULT_CONTROL_PORT,
            tgtd: PathBuf::from("tgtd"),
            tgtadm: PathBuf::from("tgtadm"),
            timeout: Duration::from_secs(30),
            images: None,
        }
    }
}

pub struct TgtBackend {
    config: TgtConfig,
    tgtadm: Tgtadm,
    view: Option<view::ReadOnlyView>,
    /// What discus owns, as tgtd holds it now. `owned.json` may lag behind it only in the safe
    /// direction (see `remember_before`).
    owned: Record<Owned>,
}

impl TgtBackend {
    /// Loads what discus owns and makes sure its tgtd runs.
    pub async fn start(config: TgtConfig) -> Result<Self, BackendError> {
        let owned = Record::open(
            config.state_dir.join("owned.json"),
            || {
                let mut salt = [0u8; 16];
                getrandom::fill(&mut salt)
                    .map_err(|e| BackendError::Io(std::io::Error::other(e.to_string())))?;
                Ok(Owned {
                    salt: hex::encode(salt),
                    ..Owned::default()
                })
            },
            Unreadable::Fail(format!(
                "discus cannot tell which targets and accounts in tgtd are its own. Move the file away \
                 and remove discus's targets from tgtd (tgtadm -C {}) to start afresh",
                config.control_port
            )),
        )?;
        let view = config.images.clone().map(|images| view::ReadOnlyView {
            images,
            view: config.state_dir.join("images-ro"),
        });
        let backend = Self {
            view,
            tgtadm: Tgtadm {
                binary: config.tgtadm.clone(),
                control_port: config.control_port,
                timeout: config.timeout,
            },
            config,
            owned,
        };
        daemon::ensure(&backend.config, &backend.tgtadm).await?;
        Ok(backend)
    }

    /// The control port of the tgtd this backend drives.
    pub fn control_port(&self) -> u16 {
        self.config.control_port
    }

    async fn read_state(&self) -> Result<TgtState, BackendError> {
        read::state(&self.tgtadm).await
    }

    /// Records what `op` is about to change. An account's password is marked unknown — durably —
    /// before tgtd changes it, so that `owned.json` can never claim a password tgtd does not
    /// hold (that would keep an old password valid for good); a target is owned before it
    /// exists, so a crash in between leaves a harmless record, never an orphan.
    async fn remember_before(&self, op: &TgtOp) -> Result<(), BackendError> {
        self.owned.claim(|owned| owned.before(op)).await
    }

    /// Drops the record of an account discus did not make after all.
    async fn forget_account(&self, user: &str) {
        let forgotten = |owned: &mut Owned| owned.accounts.remove(user).is_some();
        if let Err(error) = self.owned.record(forgotten).await {
            tracing::warn!(%error, "cannot record what discus owns in tgtd");
        }
    }

    /// Records what `op` changed. Failing to save is only logged: the record lags behind tgtd
    /// in the safe direction (an account it calls unknown is made again).
    async fn remember_after(&self, op: &TgtOp) {
        if let Err(error) = self.owned.record(|owned| owned.after(op)).await {
            tracing::warn!(%error, "cannot record what discus owns in tgtd; it will be checked again");
        }
    }
}

/// The targets with their images' paths as tgtd sees them, through the read-only view.
fn through(view: &view::ReadOnlyView, desired: &[TargetConfig]) -> Vec<TargetConfig> {
    let mut desired = desired.to_vec();
    for lun in desired.iter_mut().flat_map(|t| t.luns.iter_mut()) {
        if let Backing::Image(path) = &lun.backing
            && let Some(seen) = view.of(path)
        {
            lun.backing = Backing::Image(seen);
        }
    }
    desired
}

impl Backend for TgtBackend {
    type Observed = (TgtState, Owned);
    type Op = TgtOp;

    fn name(&self) -> &'static str {
        "tgt"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { cdrom: true }
    }

    fn device_lun(&self, lun: u32) -> u32 {
        device_lun(lun)
    }

    async fn observe(&self) -> Result<Self::Observed, BackendError> {
        let state = match self.read_state().await {
            Err(BackendError::Unreachable(why)) => {
                // Supervision: a tgtd that went away is started again; the sync loop then
                // rebuilds every target from the declared state.
                tracing::warn!(%why, "tgtd is not answering; starting it again");
                daemon::ensure(&self.config, &self.tgtadm).await?;
                self.read_state().await?
            }
            other => other?,
        };
        Ok((state, self.owned.read(Owned::clone).await))
    }

    fn keep_undeclared(&self, (state, owned): &mut Self::Observed, desired: &[TargetConfig]) {
        // Planned as if discus did not own them (never deleted, nor the accounts bound to
        // them), except that they admit nobody.
        let (declared, kept): (BTreeSet<String>, BTreeSet<String>) =
            std::mem::take(&mut owned.targets)
                .into_iter()
                .partition(|iqn| desired.iter().any(|t| t.iqn == *iqn));
        owned.targets = declared;
        state.kept = kept;
    }

    fn plan(&self, desired: &[TargetConfig], (state, owned): &Self::Observed) -> Plan<TgtOp> {
        match &self.view {
            Some(view) => plan::plan(&through(view, desired), state, owned),
            None => plan::plan(desired, state, owned),
        }
    }

    async fn apply(&self, op: &TgtOp) -> Result<(), BackendError> {
        // An image is given to tgtd only through the read-only view.
        if let (TgtOp::AddLun { path, .. }, Some(view)) = (op, &self.view)
            && path.starts_with(&view.view)
        {
            view.ensure()?;
        }
        let recorded = match op {
            TgtOp::CreateAccount { user, .. } => {
                self.owned.read(|o| o.accounts.contains_key(user)).await
            }
            _ => true,
        };
        self.remember_before(op).await?;
        let result = self.tgtadm.run(&write::argv(op)).await;
        if let (TgtOp::CreateAccount { user, .. }, Err(BackendError::Failed { message, .. })) =
            (op, &result)
            && message.contains("already exists")
            && !recorded
        {
            // Someone else made it in between: not discus's, and never to be deleted by it.
            self.forget_account(user).await;
        }
        let result = match (result, write::already_done(op)) {
            (Err(BackendError::Failed { message, .. }), Some(words)) if message.contains(words) => {
                Ok(String::new())
            }
            (other, _) => other,
        };
        if result.is_ok() {
            self.remember_after(op).await;
        }
        result.map(drop)
    }

    /// As the store names them: tgtd reads the store's images through the read-only view.
    fn backing_files(&self, (state, _): &Self::Observed) -> Vec<PathBuf> {
        (state.targets.iter())
            .flat_map(|t| &t.luns)
            .filter_map(|lun| lun.backing_path.as_deref().map(Path::new))
            .map(|seen| {
                (self.view.as_ref())
                    .and_then(|view| view.back(seen))
                    .unwrap_or_else(|| seen.to_owned())
            })
            .collect()
    }

    fn sessions(&self, (state, _): &Self::Observed) -> Vec<Session> {
        state
            .targets
            .iter()
            .flat_map(|t| {
                t.sessions.iter().map(|s| Session {
                    target: t.name.clone(),
                    initiator: s.initiator.clone(),
                    address: s.address.clone(),
                })
            })
            .collect()
    }
}
