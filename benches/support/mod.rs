//! What the benchmarks share: timing a command, the median of runs, incompressible bytes.
#![allow(clippy::expect_used)] // benchmarks fail by panicking

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
