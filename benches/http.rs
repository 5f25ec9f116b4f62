//! discus's HTTP endpoints under a sustained load, and what that load does to its sync
//! (`cargo bench --bench http`): `discus serve` on tgt in a host of its own with
//! `DISCUS_BENCH_TARGETS` targets (default 100), each with a grant that network-boots one card,
//! re-syncing every second; vegeta (tools/build-bench-tools) sends `DISCUS_BENCH_RATE` requests
//! a second (default 500) for `DISCUS_BENCH_SECONDS` (default 30), first to `/metrics`, then to
//! the boot endpoint (`/boot/ipxe?mac=…`, every card in turn, the per-source limit raised so the
//! load is not simply refused).
//!
//! Reported per endpoint: the share of answers that were 200, latency p50/p99/max; and the sync
//! passes' own time (what `sync pass done` logs) at rest and during each load, with the ratio
//! loaded / at rest — the figure that says whether serving HTTP takes from serving disks.
//! `cargo test --bench http` runs it with 3 targets, 50 requests a second for 3 s.
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmarks fail by panicking

#[path = "support/mod.rs"]
mod bench_support;
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use bench_support::{median, tools};
use support::manifests;
use support::serve_host::{Host, numbered_target};

const METRICS: &str = "127.0.0.1:9464";
const BOOT: &str = "127.0.0.1:8090";

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let number = |name: &str, full_value: usize, smoke: usize| {
        std::env::var(name)
            .ok()
            .map(|v| v.trim().parse().expect("a whole number"))
            .unwrap_or(if full { full_value } else { smoke })
    };
    let targets = number("DISCUS_BENCH_TARGETS", 100, 3);
    let rate = number("DISCUS_BENCH_RATE", 500, 50);
    let seconds = number("DISCUS_BENCH_SECONDS", 30, 3);
    println!(
        "HTTP endpoints of discus serve on tgt: {targets} targets, {rate} requests/s for {seconds} s"
    );

    let host = Host::new();
    let (image, digest) = host.image("disk.raw", 4 << 20);
    host.manifest("lab.yaml", &manifests_for(&image, &digest, targets));
    let mut serve = host.start_with(&[
        "--http-address",
        METRICS,
        "--boot-address",
        BOOT,
        "--boot-requests-per-minute",
        "100000000",
    ]);
    let deadline = Duration::from_secs(60 + targets as u64);
    host.wait_polling(
        deadline,
        Duration::from_millis(200),
        "every grant is Ready",
        || {
            (0..targets).all(|i| {
                host.condition("InitiatorAccess", &format!("m{i}"), "Ready")
                    .0
                    == "True"
            })
        },
    );

    let at_rest = passes_during(&host, Duration::from_secs(seconds as u64), || ());
    let mut rows = Vec::new();
    let metrics_targets = format!("GET http://{METRICS}/metrics\n");
    let boot_targets: String = (0..targets)
        .map(|i| format!("GET http://{BOOT}/boot/ipxe?mac={}\n", mac(i)))
        .collect();
    for (name, targets_file) in [("/metrics", metrics_targets), ("/boot/ipxe", boot_targets)] {
        let mut report = Value::Null;
        let passes = passes_during(&host, Duration::ZERO, || {
            report = attack(&host, name, &targets_file, rate, seconds);
        });
        rows.push((name, report, passes));
    }

    println!(
        "\n{:<12} {:>9} {:>10} {:>10} {:>10}",
        "endpoint", "200s", "p50", "p99", "max"
    );
    for (name, report, _) in &rows {
        let ms = |key: &str| report["latencies"][key].as_f64().unwrap_or(f64::NAN) / 1e6;
        let ok = report["status_codes"]["200"].as_f64().unwrap_or(0.0)
            / report["requests"].as_f64().unwrap_or(1.0);
        println!(
            "{name:<12} {:>8.1}% {:>7.2} ms {:>7.2} ms {:>7.2} ms",
            ok * 100.0,
            ms("50th"),
            ms("99th"),
            ms("max")
        );
        assert!(ok > 0.999, "{name}: {report}");
    }
    host.sandbox.kill(&mut serve);
    let rest = median(at_rest.clone());
    println!(
        "\nsync pass (median of {} passes) at rest: {rest:.1} ms",
        at_rest.len()
    );
    for (name, _, passes) in &rows {
        let loaded = median(passes.clone());
        println!(
            "sync pass during the load on {name}: {loaded:.1} ms ({} passes), {:.2}× at rest",
            passes.len(),
            loaded / rest
        );
    }
}

/// The sync passes' times (ms) logged while `during` runs, and for `at_least` in all.
fn passes_during(host: &Host, at_least: Duration, during: impl FnOnce()) -> Vec<f64> {
    let before = host.log().len();
    let start = Instant::now();
    during();
    while start.elapsed() < at_least {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = host.log();
    let passes: Vec<f64> = log[before.min(log.len())..]
        .lines()
        .filter(|l| l.contains("sync pass done"))
        .filter_map(|l| field(l, "sync_ms"))
        .collect();
    assert!(!passes.is_empty(), "no sync pass was logged:\n{log}");
    passes
}

/// `key=<number>` in a log line.
fn field(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(&format!("{key}="))? + key.len() + 1..];
    rest.split(|c: char| !c.is_ascii_digit() && c != '.')
        .next()?
        .parse()
        .ok()
}

/// vegeta at `rate` requests/s for `seconds` against the requests in `targets`, in the host;
/// its JSON report.
fn attack(host: &Host, name: &str, targets: &str, rate: usize, seconds: usize) -> Value {
    let dir = host.sandbox.scratch("vegeta");
    let slug: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
    let (targets_path, results) = (
        dir.join(format!("{slug}.txt")),
        dir.join(format!("{slug}.bin")),
    );
    std::fs::write(&targets_path, targets).expect("targets");
    let vegeta = tools().join("vegeta");
    let status = host
        .sandbox
        .command(&vegeta)
        .args([
            "attack",
            &format!("-rate={rate}/s"),
            &format!("-duration={seconds}s"),
        ])
        .arg(format!("-targets={}", targets_path.display()))
        .arg(format!("-output={}", results.display()))
        .stdout(Stdio::null())
        .status()
        .expect("vegeta runs");
    assert!(status.success(), "vegeta attack {name}");
    let report = host.sandbox.must(&[
        vegeta.to_str().expect("utf-8"),
        "report",
        "-type=json",
        results.to_str().expect("utf-8"),
    ]);
    serde_json::from_str(&report).expect("vegeta's JSON report")
}

fn mac(i: usize) -> String {
    format!("52:54:00:be:{:02x}:{:02x}", i / 256, i % 256)
}

/// One image, `n` targets with it, and a grant for each that boots one card.
fn manifests_for(image: &std::path::Path, digest: &str, n: usize) -> String {
    let mut objects = vec![
        support::serve_host::raw_image("disk", image, digest),
        support::serve_host::chap_secret("machine-secret"),
    ];
    for i in 0..n {
        objects.push(numbered_target(i, "disk"));
        objects.push(manifests::discus(
            "InitiatorAccess",
            "lab",
            &format!("m{i}"),
            json!({
                "targetRef": {"name": format!("t{i}")},
                "initiatorIqn": format!("iqn.2010-04.org.ipxe:m{i}"),
                "chap": {"secretRef": {"name": "client-chap"}},
                "boot": {"macAddresses": [mac(i)]},
            }),
        ));
    }
    manifests::yaml(&objects)
}
