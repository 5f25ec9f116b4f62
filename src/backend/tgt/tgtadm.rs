//! tgtadm, always with an argument vector, discus's own control port and a timeout.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::backend::BackendError;

#[derive(Clone, Debug)]
pub struct Tgtadm {
    pub binary: PathBuf,
    /// The control port of discus's own tgtd (`-C`): tgtadm never talks to another instance.
    pub control_port: u16,
    pub timeout: Duration,
}

/// tgtadm's answer when it cannot reach tgtd (exit code ENOTCONN and friends).
fn unreachable(code: Option<i32>, stderr: &str) -> bool {
    matches!(code, Some(107 | 111 | 2))
        || stderr.contains("can't connect")
        || stderr.contains("failed to send request hdr")
}

impl Tgtadm {
    /// Runs `tgtadm -C <port> --lld iscsi <args>` and returns its standard output.
    pub async fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String, BackendError> {
        let shown = || {
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut command = Command::new(&self.binary);
        command
            .arg("-C")
            .arg(self.control_port.to_string())
            .args(["--lld", "iscsi"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(self.timeout, command.output())
            .await
            .map_err(|_| BackendError::Failed {
                operation: format!("tgtadm {}", shown()),
                message: format!("no answer within {:?}", self.timeout),
            })?
            // Not being able to start tgtadm (not installed, no process slots left) says
            // nothing about tgtd: taking it for "tgtd is down" would start a second one.
            .map_err(|e| BackendError::Failed {
                operation: format!("tgtadm {}", shown()),
                message: format!(
                    "cannot run {}: {e} (is tgt installed?)",
                    self.binary.display()
                ),
            })?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        if unreachable(output.status.code(), &stderr) {
            return Err(BackendError::Unreachable(stderr));
        }
        Err(BackendError::Failed {
            operation: format!("tgtadm {}", shown()),
            message: stderr
                .strip_prefix("tgtadm: ")
                .unwrap_or(&stderr)
                .to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tgtadm_that_cannot_start_is_a_failure_not_an_absent_tgtd() {
        let tgtadm = Tgtadm {
            binary: PathBuf::from("/nonexistent/tgtadm"),
            control_port: 3261,
            timeout: Duration::from_secs(5),
        };
        let error = tgtadm
            .run(&["--mode", "system", "--op", "show"])
            .await
            .expect_err("no such program");
        assert!(
            matches!(&error, BackendError::Failed { message, .. } if message.contains("is tgt installed")),
            "{error:?}"
        );
    }

    #[test]
    fn only_tgtadm_s_own_words_mean_tgtd_is_unreachable() {
        assert!(unreachable(Some(107), ""));
        assert!(unreachable(
            Some(22),
            "tgtadm: can't connect to the tgt daemon"
        ));
        assert!(!unreachable(Some(22), "tgtadm: out of memory"));
    }
}
