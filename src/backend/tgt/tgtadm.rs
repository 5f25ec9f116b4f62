//! tgtadm, always with an argument vector, discus's own control port and a timeout. Secrets in
//! the arguments are shown as `<redacted>` wherever a command line is reported.

use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::api::chap::Password;
use crate::backend::BackendError;

/// One argument of a tgtadm command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    Plain(String),
    /// A CHAP password: given to tgtadm, never shown.
    Secret(Password),
}

impl From<&str> for Arg {
    fn from(value: &str) -> Self {
        Self::Plain(value.to_owned())
    }
}

impl From<String> for Arg {
    fn from(value: String) -> Self {
        Self::Plain(value)
    }
}

impl Arg {
    fn value(&self) -> &str {
        match self {
            Self::Plain(value) => value,
            Self::Secret(secret) => secret.expose(),
        }
    }
}

/// A command line as it may be shown: secrets redacted.
pub struct Shown<'a>(pub &'a [Arg]);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tgtadm")?;
        for arg in self.0 {
            match arg {
                Arg::Plain(value) => write!(f, " {value}")?,
                Arg::Secret(_) => f.write_str(" <redacted>")?,
            }
        }
        Ok(())
    }
}

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
    pub async fn run(&self, args: &[Arg]) -> Result<String, BackendError> {
        let failed = |message: String| BackendError::Failed {
            operation: Shown(args).to_string(),
            message,
        };
        let mut command = Command::new(&self.binary);
        command
            .arg("-C")
            .arg(self.control_port.to_string())
            .args(["--lld", "iscsi"])
            .args(args.iter().map(Arg::value))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(self.timeout, command.output())
            .await
            .map_err(|_| failed(format!("no answer within {:?}", self.timeout)))?
            // Not being able to start tgtadm (not installed, no process slots left) says
            // nothing about tgtd: taking it for "tgtd is down" would start a second one.
            .map_err(|e| {
                failed(format!(
                    "cannot run {}: {e} (is tgt installed?)",
                    self.binary.display()
                ))
            })?;
        let stderr = redact(String::from_utf8_lossy(&output.stderr).trim(), args);
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        if unreachable(output.status.code(), &stderr) {
            return Err(BackendError::Unreachable(stderr));
        }
        Err(failed(
            stderr
                .strip_prefix("tgtadm: ")
                .unwrap_or(&stderr)
                .to_owned(),
        ))
    }

    /// Runs a command without secrets.
    pub async fn run_plain(&self, args: &[&str]) -> Result<String, BackendError> {
        let args: Vec<Arg> = args.iter().map(|a| Arg::from(*a)).collect();
        self.run(&args).await
    }
}

/// tgtadm's own messages could quote an argument back: never a secret.
fn redact(text: &str, args: &[Arg]) -> String {
    args.iter().fold(text.to_owned(), |text, arg| match arg {
        Arg::Secret(secret) if !secret.expose().is_empty() => {
            text.replace(secret.expose(), "<redacted>")
        }
        _ => text,
    })
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
            .run_plain(&["--mode", "system", "--op", "show"])
            .await
            .expect_err("no such program");
        assert!(
            matches!(&error, BackendError::Failed { message, .. } if message.contains("is tgt installed")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_command_never_shows_its_secret() {
        // `false` fails whatever its arguments, as a tgtadm that refused an account would.
        let tgtadm = Tgtadm {
            binary: PathBuf::from("false"),
            control_port: 3261,
            timeout: Duration::from_secs(5),
        };
        let args = [
            Arg::from("--password"),
            Arg::Secret(Password::new("hunter2-hunter2".into())),
        ];
        let error = tgtadm.run(&args).await.expect_err("false fails");
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("--password <redacted>"), "{shown}");
        assert_eq!(
            redact("bad password hunter2-hunter2", &args),
            "bad password <redacted>"
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
