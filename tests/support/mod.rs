//! Helpers shared by the integration suites.
#![allow(dead_code)] // each suite uses a different part

pub mod api_front;
pub mod chaos;
pub mod chart;
pub mod cluster;
pub mod control_plane;
pub mod diskless;
pub mod docker;
pub mod http;
pub mod initiator;
pub mod kstatus;
pub mod lio_by_hand;
pub mod lio_vm;
pub mod manifests;
pub mod netboot;
pub mod network;
pub mod node;
pub mod proxy;
pub mod rbac;
pub mod sandbox;
pub mod serve_host;

use std::path::PathBuf;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The processes `pid` forked, as `/proc` lists them (none when it is gone): the program an
/// `nsenter --pid` or `unshare --fork` in front of it started.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The `discus` binary built for this test run.
pub fn discus() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_discus"))
}

/// An expectation header of a test manifest: the value of its `# key: value` line.
pub fn header(file: &std::path::Path, key: &str) -> String {
    let text = std::fs::read_to_string(file).expect("manifest");
    let prefix = format!("# {key}: ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{} has no `{prefix}` header", file.display()))
        .to_owned()
}

/// The files of a folder of the repository, in name order.
pub fn files_in(folder: &str) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo().join(folder))
        .unwrap_or_else(|e| panic!("{folder}: {e}"))
        .map(|entry| entry.expect("entry").path())
        .collect();
    files.sort();
    files
}

/// Sends signal `name` (`TERM`, `INT`, …) to a process this test started.
pub fn signal(child: &std::process::Child, name: &str) -> bool {
    signal_pid(child.id(), name)
}

/// Sends the signal `name` (e.g. `TERM`) to the process `pid`; whether it was delivered.
pub fn signal_pid(pid: u32, name: &str) -> bool {
    std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}
