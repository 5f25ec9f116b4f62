//! `discus teardown`: removes every target discus created on this node, and nothing else.
//!
//! A stopped agent leaves its targets serving (so that an upgrade or a restart does not cut
//! initiators off), and uninstalling discus stops its agents: LIO's targets stay in the kernel,
//! and a tgtd that outlived its agent keeps serving. This is the one way to remove them all: the
//! backend's own planner, asked for "nothing", removes what discus owns (storage objects named
//! `discus-…`, targets aliased `discus:…` or bare and in `lio/unmarked.json`, what `owned.json`
//! lists in tgtd) and never touches
//! anything else. It starts nothing: without discus's tgtd there is nothing of tgt's to remove;
//! when its tgtd holds nothing more, it is stopped.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::backend::lio::{self, LioBackend};
use crate::backend::tgt::{TgtBackend, TgtConfig};
use crate::backend::{Backend, BackendError};
use crate::fsutil::Claim;

#[derive(Args)]
pub struct TeardownArgs {
    /// The data directory the agent used (tgt's records of what it owns are there).
    #[arg(long, default_value = "/var/lib/discus")]
    data_dir: PathBuf,
    /// Where configfs is mounted (from a `kubectl debug node` Pod: /host/sys/kernel/config).
    #[arg(long, default_value = "/sys/kernel/config")]
    configfs: PathBuf,
    /// The control port of discus's tgtd.
    #[arg(long, default_value_t = crate::backend::tgt::DEFAULT_CONTROL_PORT)]
    tgt_control_port: u16,
}

pub fn run(args: TeardownArgs) -> ExitCode {
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(error) => return super::fail(&error),
    };
    match runtime.block_on(teardown(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => super::fail(&error),
    }
}

async fn teardown(args: &TeardownArgs) -> Result<(), BackendError> {
    // Never beside a discus writing configfs on this host; taken before its record is read.
    let _claim = Claim::take(Path::new(lio::CLAIM), "the kernel's LIO target", "")
        .map_err(|e| BackendError::Unreachable(e.to_string()))?;
    match LioBackend::new(args.configfs.join("target"), &args.data_dir.join("lio")) {
        Ok(lio) => {
            let removed = remove_all(&lio).await?;
            println!("lio: removed {removed} object(s) discus created");
        }
        // No target support in this kernel: nothing of discus's can be there.
        Err(BackendError::Unreachable(why)) => println!("lio: {why}: nothing to remove"),
        Err(other) => return Err(other),
    }
    let mut config = TgtConfig::new(args.data_dir.join("tgt"));
    config.control_port = args.tgt_control_port;
    if !tgtd_answers(&config).await {
        println!(
            "tgt: no tgtd answers on control port {}: nothing to remove",
            config.control_port
        );
        return Ok(());
    }
    let removed = remove_all(&TgtBackend::start(config.clone()).await?).await?;
    println!("tgt: removed {removed} object(s) discus created");
    stop_tgtd(&config).await
}

/// Plans "no target at all" and applies it: the backend removes what discus owns, in order.
async fn remove_all<B: Backend>(backend: &B) -> Result<usize, BackendError> {
    let observed = backend.observe().await?;
    let plan = backend.plan(&[], &observed);
    for op in &plan.ops {
        backend.apply(op).await?;
        println!("{}: {op}", backend.name());
    }
    Ok(plan.ops.len())
}

fn tgtadm(config: &TgtConfig, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(&config.tgtadm);
    command
        .arg("-C")
        .arg(config.control_port.to_string())
        .args(["--lld", "iscsi"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

async fn tgtd_answers(config: &TgtConfig) -> bool {
    tgtadm(config, &["--mode", "system", "--op", "show"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Stops discus's tgtd; it refuses while it still holds targets (someone else's).
async fn stop_tgtd(config: &TgtConfig) -> Result<(), BackendError> {
    let output = tgtadm(config, &["--mode", "system", "--op", "delete"])
        .output()
        .await
        .map_err(|e| BackendError::Failed {
            operation: "tgtadm --mode system --op delete".into(),
            message: format!("cannot run {}: {e}", config.tgtadm.display()),
        })?;
    if output.status.success() {
        println!(
            "tgt: stopped discus's tgtd (control port {})",
            config.control_port
        );
    } else {
        println!(
            "tgt: discus's tgtd keeps running: it holds targets discus did not create ({})",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
