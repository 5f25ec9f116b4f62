//! One change at scale, natively (`cargo bench --bench change`; `DISCUS_BENCH_SIZES=1000,5000`
//! by default): `discus serve` on tgt in a host of its own serving N targets (one LUN and two
//! CHAP grants each), then one more grant in a file of its own — as a user adds a machine —
//! timed from the file's appearance to the grant's Ready status. Beside it, the parts of that
//! pass as discus logs them: reading the changed manifests (`load_ms`), computing the node's
//! desired state and reconciling (`sync_ms`), writing the status files (`status_ms`).
//!
//! The change's time includes the 200 ms `discus serve` waits after a file changes, so that an
//! editor finishes writing before it reads; the pass itself (load + sync + status) is what grows
//! with N. The baseline in the same run: the same change at the smallest size. Goal: the pass
//! stays under 100 ms at 5000 targets, and the change flat in N (ratio to the smallest size).
//! tgtd runs 16 I/O threads per LUN, each a PID of the host's with a stack of its own: 5000
//! targets need kernel.pid_max above its default of 32768 and vm.max_map_count above its default
//! of 65530 (`sysctl -w kernel.pid_max=4194304 vm.max_map_count=1048576`; the bench checks
//! first). `cargo test --bench change` runs it with 10 and 20 targets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmarks fail by panicking

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;

use support::manifests;
use support::serve_host::{Host, numbered_target, raw_image};

/// How often a wait looks: fine enough to time a change of a few hundred milliseconds.
const POLL: Duration = Duration::from_millis(5);

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = std::env::var("DISCUS_BENCH_SIZES")
        .unwrap_or_else(|_| if full { "1000,5000" } else { "10,20" }.to_owned())
        .split(',')
        .map(|s| s.trim().parse().expect("DISCUS_BENCH_SIZES: numbers"))
        .collect();
    check_pid_space(sizes.iter().copied().max().unwrap_or(0));
    println!("| targets | cold sync (--once) | one-grant change | load | sync | status |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut smallest = None;
    for n in sizes {
        let measured = measure(n);
        let base = *smallest.get_or_insert(measured.change);
        println!(
            "| {n} | {:.1} s | {:.0} ms ({:.2}× the smallest) | {} ms | {} ms | {} ms |",
            measured.cold.as_secs_f64(),
            measured.change.as_secs_f64() * 1e3,
            measured.change.as_secs_f64() / base.as_secs_f64(),
            measured.pass[0],
            measured.pass[1],
            measured.pass[2]
        );
    }
}

struct Measured {
    cold: Duration,
    change: Duration,
    /// load_ms, sync_ms, status_ms of the pass that applied the change.
    pass: [u64; 3],
}

fn measure(n: usize) -> Measured {
    let host = Host::new();
    let (image, digest) = host.image("small.raw", 1 << 20);
    host.manifest("lab.yaml", &manifests_for(&image, &digest, n));
    let start = Instant::now();
    host.converge();
    let cold = start.elapsed();

    let mut serve = host.start_with(&["--resync-seconds", "3600"]);
    host.wait_polling(Duration::from_secs(600), POLL, "the first pass", || {
        host.log().contains("sync pass done")
    });
    // No pass under way when the file appears: the next pass logged is the change's.
    let mut quiet = (host.log().len(), Instant::now());
    host.wait_polling(Duration::from_secs(120), POLL, "a quiet second", || {
        let length = host.log().len();
        if length != quiet.0 {
            quiet = (length, Instant::now());
        }
        quiet.1.elapsed() >= Duration::from_secs(1)
    });
    let passes_before = host.log().matches("sync pass done").count();
    let staged = host.sandbox.scratch("staged").join("new.yaml");
    std::fs::write(&staged, manifests::yaml([&grant("g-new", n / 2, 9)])).expect("manifest");
    let start = Instant::now();
    std::fs::rename(&staged, host.manifests.join("new.yaml")).expect("rename");
    host.wait_polling(
        Duration::from_secs(120),
        POLL,
        "the new grant's Ready",
        || host.condition("InitiatorAccess", "g-new", "Ready").0 == "True",
    );
    let change = start.elapsed();
    // The pass logs its parts after it wrote the status.
    host.wait_polling(
        Duration::from_secs(60),
        POLL,
        "the change's pass logged",
        || host.log().matches("sync pass done").count() > passes_before,
    );
    let log = host.log();
    let pass = log
        .lines()
        .filter(|l| l.contains("sync pass done"))
        .nth(passes_before)
        .map(|l| ["load_ms", "sync_ms", "status_ms"].map(|k| field(l, k)))
        .expect("the pass of the change was logged");
    host.sandbox.kill(&mut serve);
    Measured { cold, change, pass }
}

/// `key=<number>` in a log line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn manifests_for(image: &std::path::Path, digest: &str, n: usize) -> String {
    let mut objects = vec![
        raw_image("small", image, digest),
        support::serve_host::chap_secret("client-secret"),
    ];
    for i in 0..n {
        objects.push(numbered_target(i, "small"));
        for g in 0..2 {
            objects.push(grant(&format!("g{i}-{g}"), i, g));
        }
    }
    manifests::yaml(&objects)
}

fn grant(name: &str, target: usize, client: usize) -> serde_json::Value {
    manifests::discus(
        "InitiatorAccess",
        "lab",
        name,
        json!({
            "targetRef": {"name": format!("t{target}")},
            "initiatorIqn": format!("iqn.2026-11.dev.discus:client-{client}"),
            "chap": {"secretRef": {"name": "client-chap"}},
        }),
    )
}

/// tgtd's 16 I/O threads per LUN must fit under kernel.pid_max, and their stacks under
/// vm.max_map_count (two mappings each: the default 65530 stops one tgtd near 2000 LUNs, where
/// tgtadm answers "out of memory").
fn check_pid_space(targets: usize) {
    let maps: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65530);
    let needed_maps = targets * 16 * 2 + 10_000;
    assert!(
        maps >= needed_maps,
        "{targets} targets need vm.max_map_count >= {needed_maps} (tgtd's threads' stacks), it \
         is {maps}: sysctl -w vm.max_map_count=1048576"
    );
    let max: usize = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let needed = targets * 17 + 10_000;
    assert!(
        max >= needed,
        "{targets} targets need kernel.pid_max >= {needed} (tgtd runs 16 threads per LUN), it is \
         {max}: sysctl -w kernel.pid_max=4194304"
    );
}
