//! The tgt backend: discus's own `tgtd`, on its own control port, driven with tgtadm.
//!
//! discus starts tgtd when none answers on its control port and adopts the one that does, so a
//! restart of discus leaves targets serving. tgtd never touches a host's other tgtd instances.
//! What discus created is remembered in `owned.json` (tgtd has no place for a tag): anything else
//! in the daemon is left alone.

mod plan;
mod show;
mod tgtadm;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

pub use plan::{Owned, TgtOp, device_lun};
pub use show::TgtState;
use tgtadm::Tgtadm;

use super::{Backend, BackendError, Capabilities, Plan, Session};
use crate::desired::TargetConfig;

#[derive(Clone, Debug)]
pub struct TgtConfig {
    /// Where discus keeps tgtd's log and what it owns.
    pub state_dir: PathBuf,
    /// tgtd's control port (`-C`): its IPC socket is `/var/run/tgtd/socket.<port>`.
    pub control_port: u16,
    pub tgtd: PathBuf,
    pub tgtadm: PathBuf,
    pub timeout: Duration,
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
        }
    }
}

pub struct TgtBackend {
    config: TgtConfig,
    tgtadm: Tgtadm,
    owned: Mutex<Owned>,
}

fn io_error(path: &Path, error: impl std::fmt::Display) -> BackendError {
    BackendError::Io(std::io::Error::other(format!(
        "{}: {error}",
        path.display()
    )))
}

impl TgtBackend {
    /// Loads what discus owns and makes sure its tgtd runs.
    pub async fn start(config: TgtConfig) -> Result<Self, BackendError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|e| io_error(&config.state_dir, e))?;
        let owned_path = config.state_dir.join("owned.json");
        let owned = match std::fs::read(&owned_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| io_error(&owned_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut salt = [0u8; 16];
                getrandom::fill(&mut salt).map_err(|e| io_error(&owned_path, e))?;
                Owned {
                    salt: hex::encode(salt),
                    ..Owned::default()
                }
            }
            Err(e) => return Err(io_error(&owned_path, e)),
        };
        let backend = Self {
            tgtadm: Tgtadm {
                binary: config.tgtadm.clone(),
                control_port: config.control_port,
                timeout: config.timeout,
            },
            config,
            owned: Mutex::new(owned),
        };
        backend.save(&*backend.owned.lock().await)?;
        backend.ensure_daemon().await?;
        Ok(backend)
    }

    fn save(&self, owned: &Owned) -> Result<(), BackendError> {
        let path = self.config.state_dir.join("owned.json");
        let json = serde_json::to_vec_pretty(owned).map_err(|e| io_error(&path, e))?;
        crate::fsutil::write_atomic(&path, &json).map_err(|e| io_error(&path, e))
    }

    /// The control port of the tgtd this backend drives.
    pub fn control_port(&self) -> u16 {
        self.config.control_port
    }

    async fn ensure_daemon(&self) -> Result<(), BackendError> {
        match self.tgtadm.run(&["--mode", "system", "--op", "show"]).await {
            Ok(_) => return Ok(()),
            Err(BackendError::Unreachable(_)) => {}
            Err(other) => return Err(other),
        }
        let log_path = self.config.state_dir.join("tgtd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io_error(&log_path, e))?;
        let log_err = log.try_clone().map_err(|e| io_error(&log_path, e))?;
        tracing::info!(control_port = self.config.control_port, "starting tgtd");
        // Its own process group, so that it outlives discus and a restart of discus leaves the
        // targets serving. It starts listening on an ephemeral loopback port only; the planner
        // opens the portals the targets want.
        let mut child = std::process::Command::new(&self.config.tgtd)
            .args([
                "-f",
                "-C",
                &self.config.control_port.to_string(),
                "--iscsi",
                "portal=127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|e| {
                BackendError::Unreachable(format!(
                    "cannot start {}: {e} (is tgt installed?)",
                    self.config.tgtd.display()
                ))
            })?;
        std::fs::write(
            self.config.state_dir.join("tgtd.pid"),
            child.id().to_string(),
        )
        .map_err(|e| io_error(&self.config.state_dir, e))?;
        // Reap it whenever it exits, and say so.
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                tracing::warn!(%status, "tgtd exited");
            }
        });
        let start = Instant::now();
        loop {
            match self.tgtadm.run(&["--mode", "system", "--op", "show"]).await {
                Ok(_) => return Ok(()),
                Err(error) if start.elapsed() > Duration::from_secs(10) => {
                    return Err(BackendError::Unreachable(format!(
                        "tgtd did not answer within 10 s ({error}); see {}",
                        log_path.display()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn read_state(&self) -> Result<TgtState, BackendError> {
        let targets = self
            .tgtadm
            .run(&["--mode", "target", "--op", "show"])
            .await?;
        let accounts = self
            .tgtadm
            .run(&["--mode", "account", "--op", "show"])
            .await?;
        let portals = self
            .tgtadm
            .run(&["--mode", "portal", "--op", "show"])
            .await?;
        Ok(TgtState {
            // Output discus cannot read is a failure to report, not a reason to restart tgtd.
            targets: show::parse_targets(&targets).map_err(|e| BackendError::Failed {
                operation: "tgtadm --mode target --op show".into(),
                message: e.to_string(),
            })?,
            accounts: show::parse_accounts(&accounts),
            portals: show::parse_portals(&portals),
        })
    }

    async fn own(&self, change: impl FnOnce(&mut Owned)) -> Result<(), BackendError> {
        let mut owned = self.owned.lock().await;
        change(&mut owned);
        self.save(&owned)
    }
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
                self.ensure_daemon().await?;
                self.read_state().await?
            }
            other => other?,
        };
        Ok((state, self.owned.lock().await.clone()))
    }

    fn plan(&self, desired: &[TargetConfig], (state, owned): &Self::Observed) -> Plan<TgtOp> {
        plan::plan(desired, state, owned)
    }

    async fn apply(&self, op: &TgtOp) -> Result<(), BackendError> {
        let tid = |tid: &u32| tid.to_string();
        let result = match op {
            TgtOp::AddPortal(portal) => {
                self.tgtadm
                    .run(&[
                        "--mode",
                        "portal",
                        "--op",
                        "new",
                        "--param",
                        &format!("portal={portal}"),
                    ])
                    .await
            }
            TgtOp::RemovePortal(portal) => {
                self.tgtadm
                    .run(&[
                        "--mode",
                        "portal",
                        "--op",
                        "delete",
                        "--param",
                        &format!("portal={portal}"),
                    ])
                    .await
            }
            TgtOp::CreateTarget { tid: t, iqn } => {
                // Owned before it exists: a crash in between leaves a harmless record, never an
                // orphan discus would refuse to touch.
                self.own(|o| {
                    o.targets.insert(iqn.clone());
                })
                .await?;
                self.tgtadm
                    .run(&[
                        "--mode",
                        "target",
                        "--op",
                        "new",
                        "--tid",
                        &tid(t),
                        "--targetname",
                        iqn,
                    ])
                    .await
            }
            TgtOp::SetState { tid: t, ready, .. } => {
                let state = if *ready { "ready" } else { "offline" };
                self.tgtadm
                    .run(&[
                        "--mode",
                        "target",
                        "--op",
                        "update",
                        "--tid",
                        &tid(t),
                        "--name",
                        "state",
                        "--value",
                        state,
                    ])
                    .await
            }
            TgtOp::DeleteTarget { tid: t, iqn } => {
                let result = self
                    .tgtadm
                    .run(&[
                        "--mode",
                        "target",
                        "--op",
                        "delete",
                        "--force",
                        "--tid",
                        &tid(t),
                    ])
                    .await;
                if result.is_ok() {
                    self.own(|o| {
                        o.targets.remove(iqn);
                    })
                    .await?;
                }
                result
            }
            TgtOp::AddLun {
                tid: t,
                lun,
                path,
                block_size,
                cdrom,
                ..
            } => {
                let mut args: Vec<String> = ["--mode", "logicalunit", "--op", "new", "--tid"]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect();
                args.extend([
                    tid(t),
                    "--lun".into(),
                    lun.to_string(),
                    "--backing-store".into(),
                ]);
                args.push(path.display().to_string());
                if *cdrom {
                    args.extend(["--device-type".into(), "cd".into()]);
                }
                if let Some(size) = block_size {
                    args.extend(["--blocksize".into(), size.to_string()]);
                }
                self.tgtadm.run(&args).await
            }
            TgtOp::UpdateLun {
                tid: t,
                lun,
                readonly,
                serial,
                ..
            } => {
                let params = format!(
                    "readonly={},scsi_sn={serial},scsi_id={serial}",
                    u8::from(*readonly)
                );
                self.tgtadm
                    .run(&[
                        "--mode",
                        "logicalunit",
                        "--op",
                        "update",
                        "--tid",
                        &tid(t),
                        "--lun",
                        &lun.to_string(),
                        "--params",
                        &params,
                    ])
                    .await
            }
            TgtOp::DeleteLun { tid: t, lun, .. } => {
                self.tgtadm
                    .run(&[
                        "--mode",
                        "logicalunit",
                        "--op",
                        "delete",
                        "--tid",
                        &tid(t),
                        "--lun",
                        &lun.to_string(),
                    ])
                    .await
            }
            TgtOp::CreateAccount { user, password } => {
                let fingerprint = self.owned.lock().await.fingerprint(password);
                self.own(|o| {
                    o.accounts.insert(user.clone(), fingerprint);
                })
                .await?;
                // tgtadm takes the secret only as an argument (LIO's configfs needs none).
                self.tgtadm
                    .run(&[
                        "--mode",
                        "account",
                        "--op",
                        "new",
                        "--user",
                        user,
                        "--password",
                        password.expose(),
                    ])
                    .await
            }
            TgtOp::DeleteAccount { user } => {
                let result = self
                    .tgtadm
                    .run(&["--mode", "account", "--op", "delete", "--user", user])
                    .await;
                let result = ok_if(result, "can't find the account");
                if result.is_ok() {
                    self.own(|o| {
                        o.accounts.remove(user);
                    })
                    .await?;
                }
                result
            }
            TgtOp::BindAccount {
                tid: t,
                user,
                outgoing,
                ..
            }
            | TgtOp::UnbindAccount {
                tid: t,
                user,
                outgoing,
                ..
            } => {
                let bind = matches!(op, TgtOp::BindAccount { .. });
                let mut args = vec![
                    "--mode",
                    "account",
                    "--op",
                    if bind { "bind" } else { "unbind" },
                    "--tid",
                ];
                let t = tid(t);
                args.extend([t.as_str(), "--user", user]);
                if *outgoing {
                    args.push("--outgoing");
                }
                let result = self.tgtadm.run(&args).await;
                if bind {
                    result
                } else {
                    ok_if(result, "can't find")
                }
            }
            TgtOp::BindInitiator {
                tid: t, initiator, ..
            } => {
                self.tgtadm
                    .run(&[
                        "--mode",
                        "target",
                        "--op",
                        "bind",
                        "--tid",
                        &tid(t),
                        "--initiator-name",
                        initiator,
                    ])
                    .await
            }
            TgtOp::UnbindInitiator {
                tid: t, initiator, ..
            } => {
                let result = self
                    .tgtadm
                    .run(&[
                        "--mode",
                        "target",
                        "--op",
                        "unbind",
                        "--tid",
                        &tid(t),
                        "--initiator-name",
                        initiator,
                    ])
                    .await;
                ok_if(result, "does not exist")
            }
            TgtOp::CloseSession {
                tid: t, sid, cid, ..
            } => {
                let result = self
                    .tgtadm
                    .run(&[
                        "--mode",
                        "conn",
                        "--op",
                        "delete",
                        "--tid",
                        &tid(t),
                        "--sid",
                        &sid.to_string(),
                        "--cid",
                        &cid.to_string(),
                    ])
                    .await;
                ok_if(result, "can't find")
            }
        };
        result.map(drop)
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

/// An error that says the work is already done is not one (deleting what is gone).
fn ok_if(result: Result<String, BackendError>, already: &str) -> Result<String, BackendError> {
    match result {
        Err(BackendError::Failed { message, .. }) if message.contains(already) => Ok(String::new()),
        other => other,
    }
}
