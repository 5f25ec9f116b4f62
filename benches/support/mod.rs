//! What the benchmarks share: timing a command, the median of runs, incompressible bytes, and
//! the load generators of tools/build-bench-tools.
#![allow(clippy::expect_used, dead_code)] // benchmarks fail by panicking; not every bench uses all

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// How long `program` took (its output discarded); it must succeed.
pub fn timed(program: &str, args: &[&str]) -> Duration {
    let start = Instant::now();
    let status = (Command::new(program).args(args))
        .stdout(Stdio::null())
        .status()
        .expect(program);
    assert!(status.success(), "{program} {args:?}");
    start.elapsed()
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `size` bytes that no compression shrinks (so qcow2 stores every cluster, and nothing is
/// cheaper to move than it would be for a real image), the same for the same `seed`.
pub fn incompressible(size: usize, seed: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(size);
    let mut block = Sha256::digest(seed).to_vec();
    while bytes.len() < size {
        block = Sha256::digest(&block).to_vec();
        let page = block.iter().cycle().take(4096).enumerate();
        bytes.extend(page.map(|(i, b)| b ^ (i as u8)));
    }
    bytes.truncate(size);
    bytes
}

/// The directory holding `fio` and `vegeta`: `DISCUS_BENCH_TOOLS`, or what
/// tools/build-bench-tools builds (cached in ~/.cache/discus after the first time).
pub fn tools() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("DISCUS_BENCH_TOOLS") {
            return PathBuf::from(dir);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/build-bench-tools");
        let output = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("tools/build-bench-tools runs");
        assert!(output.status.success(), "tools/build-bench-tools failed");
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    })
    .clone()
}
