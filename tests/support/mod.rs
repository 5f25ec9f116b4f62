//! Helpers shared by the integration suites.
#![allow(dead_code)] // each suite uses a different part

pub mod control_plane;

use std::path::PathBuf;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `discus` binary built for this test run.
pub fn discus() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_discus"))
}
