//! The LIO backend against the kernel's own cost, in the guest of tests/support/lio_vm.rs
//! (`cargo bench --bench lio`; `DISCUS_BENCH_SIZES=100,300` to choose the sizes):
//!
//! - cold sync of N targets (one LUN and two CHAP grants each) by `discus serve --once`, against a
//!   shell script that makes exactly the same configfs objects with `mkdir`, `echo` and `ln` — the
//!   kernel's own cost. Target: discus / baseline under 1.5 at every N.
//! - a one-grant change in a running `discus serve`: from the manifest's change to the grant's
//!   Ready status. Target: flat in N.
//! - the data path (`DISCUS_BENCH_DATAPATH_MIB`, 128 by default, 0 to skip): fio's libiscsi
//!   engine on the host reads one LUN through the guest's forwarded portal — discus's target
//!   against one made by hand in configfs as an administrator would (targetcli's choices:
//!   buffered fileio, 512-byte blocks, CHAP, one ACL), the same stored file behind both, the
//!   median of three interleaved rounds. Target: discus within 10% of the hand-made one.
//!
//! Times are the guest's, under software emulation: compare the ratios, not the seconds.
//! `cargo test --bench lio` runs it all once at a small size (5 targets, 8 MiB, one round), so
//! that it cannot rot.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

#[path = "support/mod.rs"]
mod bench_support;
#[path = "support/fio.rs"]
mod fio;
#[path = "../tests/support/mod.rs"]
mod support;

use bench_support::{incompressible, median, tools};
use fio::Source;
use support::initiator::Login;
use support::lio_by_hand::{ByHand, PRELUDE, backstore, settings_that_differ};
use support::lio_vm;

use std::time::Duration;

use lio_vm::LioVm;
use sha2::{Digest, Sha256};

/// Manifests in a folder of the guest's own: inotify does not see changes on the 9p share.
const SERVE: &str = "discus serve --backend lio --manifests /manifests --data-dir /var/lib/discus \
                     --file-root /host/images --node-name guest --address 0.0.0.0";
const SIZE: u64 = 1 << 20;

fn manifests(n: usize, digest: &str) -> String {
    let mut yaml = format!(
        "apiVersion: discus.dev/v1alpha1\nkind: DiscImage\nmetadata: {{name: small, namespace: lab}}\n\
         spec: {{source: {{file: {{path: /host/images/small.raw}}}}, sha256: {digest}, format: raw}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: chap, namespace: lab}}\n\
         stringData: {{username: client, password: client-secret}}\n"
    );
    for i in 0..n {
        yaml.push_str(&format!(
            "---\napiVersion: discus.dev/v1alpha1\nkind: IscsiTarget\nmetadata: {{name: t{i}, namespace: lab}}\n\
             spec: {{iqn: 'iqn.2026-11.dev.discus:t{i}', luns: [{{lun: 0, image: small}}]}}\n"
        ));
        for g in 0..2 {
            yaml.push_str(&grant(&format!("g{i}-{g}"), i, g));
        }
    }
    yaml
}

fn grant(name: &str, target: usize, client: usize) -> String {
    format!(
        "---\napiVersion: discus.dev/v1alpha1\nkind: InitiatorAccess\nmetadata: {{name: {name}, namespace: lab}}\n\
         spec: {{targetRef: {{name: t{target}}}, initiatorIqn: 'iqn.2026-11.dev.discus:client-{client}', \
         chap: {{secretRef: {{name: chap}}}}}}\n"
    )
}

/// The configfs writes discus makes for the same N targets, as a busybox shell script.
fn baseline(n: usize) -> String {
    let mut script = String::from(PRELUDE);
    for i in 0..n {
        let clients = [
            "iqn.2026-11.dev.discus:client-0",
            "iqn.2026-11.dev.discus:client-1",
        ];
        let target = ByHand {
            name: &format!("base-{i}"),
            alias: &format!("discus:lab/base-{i}"),
            iqn: &format!("iqn.2026-11.dev.discus:b{i}"),
            file: "/var/lib/discus/base.raw",
            size: SIZE,
            serial: &format!("{i:032x}"),
            initiators: &clients,
        };
        script.push_str(&target.script());
    }
    script
}

/// Runs a command in the guest and returns how long it took there (busybox's `date` has no
/// sub-second format; the uptime clock counts hundredths).
fn timed(vm: &LioVm, command: &str) -> Duration {
    let out = vm.must(&format!(
        "s=$(cut -d' ' -f1 /proc/uptime); {command} > /tmp/bench.log 2>&1 || {{ cat /tmp/bench.log; exit 1; }}; \
         e=$(cut -d' ' -f1 /proc/uptime); echo $s $e"
    ));
    let times: Vec<f64> = out
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    match times.as_slice() {
        [start, end] => Duration::from_secs_f64(end - start),
        _ => panic!("unexpected timing: {out}"),
    }
}

/// How much a run measures: `cargo bench` passes --bench; `cargo test --bench lio` does not,
/// and runs everything once at a small size, so that nothing here can rot.
struct Scale {
    /// fio's rounds through each target, after the one that fills the page cache.
    rounds: usize,
    /// Seconds of random reads in each round.
    random_seconds: &'static str,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full {
        Scale {
            rounds: 3,
            random_seconds: "10",
        }
    } else {
        Scale {
            rounds: 1,
            random_seconds: "1",
        }
    };
    let sizes: Vec<usize> = std::env::var("DISCUS_BENCH_SIZES")
        .unwrap_or_else(|_| if full { "100,300,1000" } else { "5" }.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let datapath_mib: usize = std::env::var("DISCUS_BENCH_DATAPATH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 128 } else { 8 });
    let mut vm = LioVm::boot();
    if datapath_mib > 0 {
        datapath(&mut vm, datapath_mib, &scale);
    }
    let image: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(vm.share().join("images/small.raw"), &image).expect("image");
    let digest = hex::encode(Sha256::digest(&image));
    println!(
        "| targets | baseline (shell) | discus cold sync | ratio | one-grant change in a running discus |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for n in sizes {
        std::fs::write(vm.share().join("baseline.sh"), baseline(n)).expect("script");
        vm.reboot();
        vm.must("truncate -s 1048576 /var/lib/discus/base.raw");
        let shell = timed(&vm, "sh /host/baseline.sh");

        vm.reboot();
        std::fs::write(vm.share().join("manifests/lab.yaml"), manifests(n, &digest))
            .expect("manifests");
        // Status on the guest's own file system, as on a node (not on the 9p share).
        vm.must(
            "mkdir -p /manifests && cp /host/manifests/lab.yaml /manifests/ && \
             rm /var/lib/discus/status && mkdir /var/lib/discus/status",
        );
        let cold = timed(&vm, &format!("{SERVE} --once"));

        // A running discus; then one more grant, timed in the guest from the change to its
        // Ready status.
        vm.must(&format!(
            "RUST_LOG=discus=debug {SERVE} --resync-seconds 3600 > /tmp/serve.log 2>&1 &"
        ));
        let start = std::time::Instant::now();
        while vm.sh("grep -q 'sync pass done' /tmp/serve.log").0 != 0 {
            // A cold sync of 1000 targets takes some 20 s under TCG.
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "no first pass: {}",
                vm.must("tail -20 /tmp/serve.log")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::fs::create_dir_all(vm.share().join("staging")).expect("staging");
        std::fs::write(
            vm.share().join("staging/new.yaml"),
            grant("g-new", n / 2, 9),
        )
        .expect("manifest");
        vm.must("cp /host/staging/new.yaml /manifests/new.tmp");
        let change = timed(
            &vm,
            "mv /manifests/new.tmp /manifests/new.yaml && \
             until grep -q '\"reason\": \"Ready\"' /var/lib/discus/status/InitiatorAccess/lab/g-new.json \
             2>/dev/null; do sleep 0.02; done",
        );
        vm.must("kill $(pidof discus); rm /manifests/new.yaml");

        println!(
            "| {n} | {:.2} s | {:.2} s | {:.2} | {:.2} s |",
            shell.as_secs_f64(),
            cold.as_secs_f64(),
            cold.as_secs_f64() / shell.as_secs_f64(),
            change.as_secs_f64()
        );
    }
}

const INITIATOR: &str = "iqn.2026-11.dev.discus:client-0";

/// fio on the host reads one LUN through the guest's LIO: discus's target against one made by
/// hand over the same stored file; prints the median of the interleaved rounds and the ratio.
fn datapath(vm: &mut LioVm, mib: usize, scale: &Scale) {
    vm.reboot();
    let size = mib << 20;
    let image = incompressible(size, b"lio datapath");
    std::fs::write(vm.share().join("images/data.raw"), &image).expect("image");
    let digest = hex::encode(Sha256::digest(&image));
    let yaml = format!(
        "apiVersion: discus.dev/v1alpha1\nkind: DiscImage\nmetadata: {{name: data, namespace: lab}}\n\
         spec: {{source: {{file: {{path: /host/images/data.raw}}}}, sha256: {digest}, format: raw}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: chap, namespace: lab}}\n\
         stringData: {{username: client, password: client-secret}}\n---\n\
         apiVersion: discus.dev/v1alpha1\nkind: IscsiTarget\nmetadata: {{name: data, namespace: lab}}\n\
         spec: {{iqn: 'iqn.2026-11.dev.discus:data', luns: [{{lun: 0, image: data}}]}}\n---\n\
         apiVersion: discus.dev/v1alpha1\nkind: InitiatorAccess\nmetadata: {{name: reader, namespace: lab}}\n\
         spec: {{targetRef: {{name: data}}, initiatorIqn: '{INITIATOR}', chap: {{secretRef: {{name: chap}}}}}}\n"
    );
    std::fs::write(vm.share().join("manifests/lab.yaml"), yaml).expect("manifests");
    vm.must(
        "mkdir -p /manifests && cp /host/manifests/lab.yaml /manifests/ && \
         rm /var/lib/discus/status && mkdir /var/lib/discus/status",
    );
    vm.must(&format!("{SERVE} --once"));
    // The file discus serves, behind the hand-made target too.
    let stored = vm.must(&format!(
        "cat {}/udev_path",
        backstore(vm, "iqn.2026-11.dev.discus:data")
    ));
    let stored = stored.trim();
    assert!(stored.starts_with("/var/lib/discus/"), "{stored}");
    let by_hand = ByHand {
        name: "by-hand",
        alias: "by-hand",
        iqn: "iqn.2026-11.dev.discus:by-hand",
        file: stored,
        size: size as u64,
        serial: "0123456789abcdef0123456789abcdef",
        initiators: &[INITIATOR],
    };
    by_hand.make(vm);
    let differ = settings_that_differ(
        vm,
        "iqn.2026-11.dev.discus:data",
        "iqn.2026-11.dev.discus:by-hand",
    );
    println!("settings in which discus's target and the hand-made one differ: {differ:?}");

    let portal = vm.portal();
    let lun = |iqn| {
        Source::Lun(Login {
            portal: &portal,
            iqn,
            lun: 0,
            initiator: INITIATOR,
            user: "client",
            password: "client-secret",
        })
    };
    let sources = [
        ("LIO by hand", lun("iqn.2026-11.dev.discus:by-hand")),
        ("discus", lun("iqn.2026-11.dev.discus:data")),
    ];
    let jobs_dir = tempfile::tempdir().expect("scratch");
    let read = |name: &str, source: &Source<'_>| {
        let path = jobs_dir.path().join(format!("{name}.fio"));
        fio::job_file(
            &path,
            &fio::one_initiator(source, scale.random_seconds),
            false,
        );
        let reads = fio::run(std::process::Command::new(tools().join("fio")), &path);
        let of = |job: &str| reads.iter().find(|(n, _)| n == job).expect("job").1;
        (
            of("sequential").bytes_per_second / f64::from(1 << 20),
            of("random").iops,
        )
    };
    // The first reading brings the file into the guest's page cache, for both alike.
    read("warm", &sources[0].1);
    let mut results = vec![Vec::new(); sources.len()];
    for round in 0..scale.rounds {
        for (i, (_, source)) in sources.iter().enumerate() {
            results[i].push(read(&format!("{round}-{i}"), source));
        }
    }
    let median_of =
        |i: usize, pick: fn(&(f64, f64)) -> f64| median(results[i].iter().map(pick).collect());
    for (i, (name, _)) in sources.iter().enumerate() {
        println!("{name}: every round (MiB/s, IOPS): {:.1?}", results[i]);
    }
    println!(
        "\none initiator through LIO, {mib} MiB, the median of {} runs (guest under TCG):",
        scale.rounds
    );
    for (i, (name, _)) in sources.iter().enumerate() {
        println!(
            "{name:<12} {:>7.1} MiB/s sequential 1M {:>7.0} IOPS random 4k",
            median_of(i, |r| r.0),
            median_of(i, |r| r.1)
        );
    }
    println!(
        "discus / LIO by hand: sequential {:.2}, random {:.2} (goal >= 0.9)\n",
        median_of(1, |r| r.0) / median_of(0, |r| r.0),
        median_of(1, |r| r.1) / median_of(0, |r| r.1)
    );
}
