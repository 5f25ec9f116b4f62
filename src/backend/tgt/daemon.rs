//! discus's own tgtd: started when none answers on discus's control port, adopted when one does,
//! so that a restart of discus leaves the targets serving.

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

/// tgtd allocates each command's data buffer (`posix_memalign`) and frees it once sent. With
/// glibc's defaults, buffers of 128 KiB and more are fresh mappings, and the heap's top goes
/// back to the kernel as soon as it is free: every large read faults in and zeroes its pages
/// again — one fault per 4 KiB served, a third of tgtd's CPU in sequential 1 MiB reads, which
/// its one network thread cannot spare (docs/performance.md). Buffers up to 4 MiB from the
/// heap, and up to 64 MiB of it kept: after the first reads, no fault at all and twice the
/// throughput, for memory kept at its busiest moment's size (some 100 MiB for an initiator
/// reading 1 MiB at a time, 16 at once). The operator's own tunables come after ours: theirs win.
const MALLOC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864";

fn malloc_tunables(operator: Option<String>) -> String {
    match operator {
        Some(theirs) if !theirs.is_empty() => format!("{MALLOC_TUNABLES}:{theirs}"),
        _ => MALLOC_TUNABLES.to_owned(),
    }
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
    let mut child = std::process::Command::new(&config.tgtd)
        .args([
            "-f",
            "-C",
            &config.control_port.to_string(),
            "--iscsi",
            "portal=127.0.0.1:0",
        ])
        .env(
            "GLIBC_TUNABLES",
            malloc_tunables(std::env::var("GLIBC_TUNABLES").ok()),
        )
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

    #[test]
    fn the_operators_malloc_tunables_follow_ours_and_so_win() {
        assert_eq!(malloc_tunables(None), MALLOC_TUNABLES);
        assert_eq!(malloc_tunables(Some(String::new())), MALLOC_TUNABLES);
        assert_eq!(
            malloc_tunables(Some("glibc.malloc.mmap_threshold=131072".into())),
            format!("{MALLOC_TUNABLES}:glibc.malloc.mmap_threshold=131072")
        );
    }
}
