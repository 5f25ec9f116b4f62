//! The LIO backend against the kernel's own cost, in the guest of tests/support/lio_vm.rs
//! (`cargo bench --bench lio`; `DISCUS_BENCH_SIZES=100,300` to choose the sizes):
//!
//! - cold sync of N targets (one LUN and two CHAP grants each) by `discus serve --once`, against a
//!   shell script that makes exactly the same configfs objects with `mkdir`, `echo` and `ln` — the
//!   kernel's own cost. Target: discus / baseline under 1.5 at every N.
//! - a one-grant change in a running `discus serve`: from the manifest's change to the grant's
//!   Ready status. Target: flat in N.
//!
//! Times are the guest's, under software emulation: compare the ratios, not the seconds.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

#[path = "../tests/support/lio_vm.rs"]
#[allow(dead_code)]
mod lio_vm;

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
    let mut script =
        String::from("set -e\ncd /sys/kernel/config/target\nmkdir -p iscsi core/fileio_3261\n");
    for i in 0..n {
        let so = format!("core/fileio_3261/base-{i}");
        let tpg = format!("iscsi/iqn.2026-11.dev.discus:b{i}/tpgt_1");
        script.push_str(&format!(
            "mkdir {so}\necho -n fd_dev_name=/var/lib/discus/base.raw,fd_dev_size={SIZE},fd_buffered_io=1 > {so}/control\n\
             echo -n /var/lib/discus/base.raw > {so}/udev_path\necho -n 1 > {so}/enable\n\
             echo -n {i:032x} > {so}/wwn/vpd_unit_serial\necho -n 512 > {so}/attrib/block_size\n\
             mkdir iscsi/iqn.2026-11.dev.discus:b{i}\nmkdir {tpg}\necho -n discus:lab/b{i} > {tpg}/param/TargetAlias\n"
        ));
        for (name, value) in [
            ("generate_node_acls", 0),
            ("authentication", 1),
            ("demo_mode_write_protect", 1),
            ("prod_mode_write_protect", 1),
            ("cache_dynamic_acls", 0),
            ("demo_mode_discovery", 0),
        ] {
            script.push_str(&format!("echo -n {value} > {tpg}/attrib/{name}\n"));
        }
        script.push_str(&format!(
            "mkdir {tpg}/np/0.0.0.0:3260\nmkdir {tpg}/lun/lun_0\n\
             ln -s /sys/kernel/config/target/{so} {tpg}/lun/lun_0/discus\n"
        ));
        for g in 0..2 {
            let acl = format!("{tpg}/acls/iqn.2026-11.dev.discus:client-{g}");
            script.push_str(&format!(
                "mkdir {acl}\necho -n client > {acl}/auth/userid\necho -n client-secret > {acl}/auth/password\n\
                 mkdir {acl}/lun_0\nln -s /sys/kernel/config/target/{tpg}/lun/lun_0 {acl}/lun_0/lun\n\
                 echo -n 1 > {acl}/lun_0/write_protect\n"
            ));
        }
        script.push_str(&format!("echo -n 1 > {tpg}/enable\n"));
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

fn main() {
    let sizes: Vec<usize> = std::env::var("DISCUS_BENCH_SIZES")
        .unwrap_or_else(|_| "100,300,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut vm = LioVm::boot();
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
        while vm.sh("grep -q 'sync pass done' /tmp/serve.log").0 != 0 {
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
