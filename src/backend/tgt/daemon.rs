//! discus's own tgtd: started when none answers on discus's control port, adopted when one does,
//! so that a restart of discus leaves the targets serving.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::TgtConfig;
use super::tgtadm::Tgtadm;
use crate::backend::BackendError;

const SHOW_SYSTEM: [&str; 4] = ["--mode", "system", "--op", "show"];

/// Makes sure discus's tgtd answers on its control port, starting it if none does.
pub async fn ensure(config: &TgtConfig, tgtadm: &Tgtadm) -> Result<(), BackendError> {
    match tgtadm.run_plain(&SHOW_SYSTEM).await {
        Ok(_) => return Ok(()),
        Err(BackendError::Unreachable(_)) => {}
        Err(other) => return Err(other),
    }
    let log_path = config.state_dir.join("tgtd.log");
    start(config, &log_path)?;
    let start = Instant::now();
    loop {
        match tgtadm.run_plain(&SHOW_SYSTEM).await {
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

/// tgtd allocates each command's data buffer (`posix_memalign`) and frees it once sent. glibc's
/// defaults hand such large, short-lived buffers back to the kernel (as mappings of their own, or
/// by trimming the heap's top), so every large read faults in and zeroes fresh pages — one fault
/// per 4 KiB served, a third of tgtd's CPU in sequential 1 MiB reads, which its one network
/// thread cannot spare (docs/performance.md). With buffers up to 4 MiB taken from the heap and a
/// free top of up to 64 MiB kept, tgtd reuses its buffers: 1.45–2.2 times the throughput, for a
/// tgtd that keeps the memory of its busiest moment (sessions × commands in flight × their
/// size; some 100 MiB after an initiator reading 1 MiB at a time, 16 at once).
///
/// Each with the older variable an operator may have set it with instead.
const MALLOC_TUNABLES: [(&str, &str); 2] = [
    (
        "glibc.malloc.mmap_threshold=4194304",
        "MALLOC_MMAP_THRESHOLD_",
    ),
    (
        "glibc.malloc.trim_threshold=67108864",
        "MALLOC_TRIM_THRESHOLD_",
    ),
];

/// `GLIBC_TUNABLES` for tgtd, from discus's environment (`env`): ours, less those the operator
/// set through their older variable (which glibc ignores once `GLIBC_TUNABLES` names the
/// tunable), then the operator's own `GLIBC_TUNABLES` (the last setting wins, so theirs do).
/// None when there is nothing to set.
fn malloc_tunables(env: impl Fn(&str) -> Option<OsString>) -> Option<OsString> {
    let ours = (MALLOC_TUNABLES.iter())
        .filter(|(_, older)| env(older).is_none())
        .map(|(tunable, _)| OsString::from(tunable));
    let theirs = env("GLIBC_TUNABLES").filter(|t| !t.is_empty());
    let all: Vec<OsString> = ours.chain(theirs).collect();
    (!all.is_empty()).then(|| all.join(OsStr::new(":")))
}

fn start(config: &TgtConfig, log_path: &Path) -> Result<(), BackendError> {
    // tgtd's log is a help, not a condition: on a full disk tgtd runs without it.
    // 0600: with its debug switched on, tgtd logs its requests, CHAP passwords included.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log_path)
        .and_then(|log| Ok((log.try_clone()?, log)))
        .map_or_else(
            |error| {
                tracing::warn!(path = %log_path.display(), %error, "tgtd runs without its log");
                (Stdio::null(), Stdio::null())
            },
            |(out, err)| (Stdio::from(out), Stdio::from(err)),
        );
    tracing::info!(control_port = config.control_port, "starting tgtd");
    // Its own process group, so that it outlives discus and a restart of discus leaves the
    // targets serving. It starts listening on an ephemeral loopback port only; the planner
    // opens the portals the targets want.
    let mut command = std::process::Command::new(&config.tgtd);
    if let Some(tunables) = malloc_tunables(|name| std::env::var_os(name)) {
        command.env("GLIBC_TUNABLES", tunables);
    }
    let mut child = command
        .args([
            "-f",
            "-C",
            &config.control_port.to_string(),
            "--iscsi",
            "portal=127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(log.0)
        .stderr(log.1)
        .process_group(0)
        .spawn()
        .map_err(|e| {
            BackendError::Unreachable(format!(
                "cannot start {}: {e} (is tgt installed?)",
                config.tgtd.display()
            ))
        })?;
    let pid_path = config.state_dir.join("tgtd.pid");
    if let Err(error) = std::fs::write(&pid_path, child.id().to_string()) {
        // Only a convenience for people: tgtd runs whether or not its pid is written down.
        tracing::warn!(path = %pid_path.display(), %error, "cannot write tgtd's pid");
    }
    // Reap it whenever it exits, and say so.
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            tracing::warn!(%status, "tgtd exited");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunables(set: &[(&str, &str)]) -> Option<String> {
        let env = |name: &str| {
            (set.iter())
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        };
        malloc_tunables(env).map(|t| t.to_string_lossy().into_owned())
    }

    const OURS: &str = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864";

    #[test]
    fn the_operators_malloc_tunables_follow_ours_and_so_win() {
        assert_eq!(tunables(&[]).as_deref(), Some(OURS));
        assert_eq!(tunables(&[("GLIBC_TUNABLES", "")]).as_deref(), Some(OURS));
        assert_eq!(
            tunables(&[("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")]),
            Some(format!("{OURS}:glibc.malloc.mmap_threshold=131072"))
        );
    }

    #[test]
    fn a_tunable_the_operator_set_the_older_way_is_left_to_them() {
        assert_eq!(
            tunables(&[("MALLOC_TRIM_THRESHOLD_", "131072")]).as_deref(),
            Some("glibc.malloc.mmap_threshold=4194304")
        );
        assert_eq!(
            tunables(&[
                ("MALLOC_TRIM_THRESHOLD_", "131072"),
                ("MALLOC_MMAP_THRESHOLD_", "131072")
            ]),
            None
        );
    }
}
