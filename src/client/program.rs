//! Running the machine's own tools (iscsiadm, mount, umount, blockdev): argument vectors, never
//! a shell; a deadline, and the process killed when it passes.

use std::ffi::OsStr;
use std::process::Output;
use std::time::Duration;

/// Runs `program` with `args`; `Err` says why it did not finish (not how it exited).
pub async fn run(program: &OsStr, args: &[&OsStr], deadline: Duration) -> Result<Output, String> {
    let mut command = tokio::process::Command::new(program);
    command.args(args).kill_on_drop(true);
    match tokio::time::timeout(deadline, command.output()).await {
        Err(_) => Err(format!("no answer within {}s", deadline.as_secs())),
        Ok(Err(error)) => Err(error.to_string()),
        Ok(Ok(output)) => Ok(output),
    }
}

/// What a program said on stderr, on one line, with its exit code.
pub fn complaint(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    format!("exit {}: {text}", output.status.code().unwrap_or(-1))
}

/// The command as text, for errors.
pub fn shown(program: &OsStr, args: &[&OsStr]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
