//! `discus serve` on tgt, end to end: manifests in, a real tgtd serving, real initiators
//! (libiscsi's tools and qemu-img's iSCSI driver) logging in, status out. Each test has a host
//! of its own (tests/support/sandbox.rs): its own loopback, /var/lib/discus and tgtd.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::sandbox::Sandbox;

const DISCUS: &str = env!("CARGO_BIN_EXE_discus");
const INITIATOR: &str = "iqn.2026-11.dev.discus:test-client";
const PORTAL: &str = "127.0.0.1:3260";

/// tests/tools/readcapacity10.c, built once per run against libiscsi.
fn readcapacity10() -> &'static Path {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("readcapacity10");
        let status = std::process::Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&out)
            .arg(support::repo().join("tests/tools/readcapacity10.c"))
            .arg("-liscsi")
            .status()
            .expect("a C compiler (cc) runs");
        assert!(
            status.success(),
            "building readcapacity10 needs libiscsi-dev"
        );
        out
    })
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("read")))
}

/// A sandboxed host running `discus serve` on a folder of manifests.
struct Host {
    sandbox: Sandbox,
    manifests: PathBuf,
    images: PathBuf,
}

impl Host {
    fn new() -> Self {
        let sandbox = Sandbox::new();
        let manifests = sandbox.scratch("manifests");
        let images = sandbox.scratch("images");
        Self {
            sandbox,
            manifests,
            images,
        }
    }

    fn serve_args(&self) -> Vec<String> {
        [
            "serve",
            "--manifests",
            &self.manifests.display().to_string(),
            "--data-dir",
            "/var/lib/discus",
            "--backend",
            "tgt",
            "--node-name",
            "storage-1",
            "--address",
            "127.0.0.1",
            "--file-root",
            &self.images.display().to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// `discus serve --once`.
    fn once(&self) -> Output {
        self.sandbox
            .command(DISCUS)
            .args(self.serve_args())
            .arg("--once")
            .output()
            .expect("discus runs")
    }

    /// `discus serve` in the background, re-syncing every second.
    fn start(&self) -> Child {
        let log = std::fs::File::create(self.sandbox.path().join("serve.log")).expect("log");
        self.sandbox
            .command(DISCUS)
            .args(self.serve_args())
            .args(["--resync-seconds", "1"])
            .stderr(log)
            .spawn()
            .expect("discus runs")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.sandbox.path().join("serve.log")).unwrap_or_default()
    }

    /// Writes an image of `size` pseudo-random bytes and returns its path and digest.
    fn image(&self, name: &str, size: usize) -> (PathBuf, String) {
        let mut bytes = Vec::with_capacity(size);
        let mut block = Sha256::digest(name.as_bytes());
        while bytes.len() < size {
            block = Sha256::digest(block);
            bytes.extend_from_slice(&block);
        }
        bytes.truncate(size);
        let path = self.images.join(name);
        std::fs::write(&path, &bytes).expect("image");
        let digest = hex::encode(Sha256::digest(&bytes));
        (path, digest)
    }

    fn manifest(&self, name: &str, yaml: &str) {
        std::fs::write(self.manifests.join(name), yaml).expect("manifest");
    }

    fn remove_manifest(&self, name: &str) {
        std::fs::remove_file(self.manifests.join(name)).expect("remove");
    }

    fn status(&self, kind: &str, name: &str) -> Value {
        let path = self
            .sandbox
            .data_dir()
            .join(format!("status/{kind}/lab/{name}.json"));
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    fn condition(&self, kind: &str, name: &str, condition: &str) -> (String, String, String) {
        let status = self.status(kind, name);
        let found = status
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| c["type"] == condition).cloned())
            .unwrap_or_default();
        let text = |k: &str| found[k].as_str().unwrap_or("").to_owned();
        (text("status"), text("reason"), text("message"))
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("timed out waiting for {what}; serve log:\n{}", self.log());
    }

    fn tgtadm(&self, args: &[&str]) -> String {
        let mut all = vec!["tgtadm", "-C", "3261", "--lld", "iscsi"];
        all.extend_from_slice(args);
        self.sandbox.must(&all)
    }

    /// `iscsi-inq` as `initiator` with optional CHAP, `lun` as tgt numbers it.
    fn inquiry(
        &self,
        iqn: &str,
        lun: u32,
        initiator: &str,
        chap: Option<(&str, &str)>,
    ) -> Result<String, String> {
        let credentials = chap.map(|(u, p)| format!("{u}%{p}@")).unwrap_or_default();
        let output = self
            .sandbox
            .command("iscsi-inq")
            .args([
                "-i",
                initiator,
                &format!("iscsi://{credentials}{PORTAL}/{iqn}/{lun}"),
            ])
            .output()
            .expect("iscsi-inq runs (libiscsi-bin)");
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// What READ CAPACITY(10) says: (blocks, block size).
    fn read_capacity(&self, iqn: &str, lun: u32, user: &str, password: &str) -> (u64, u64) {
        let url = format!("iscsi://{user}%{password}@{PORTAL}/{iqn}/{lun}");
        let out = self
            .sandbox
            .must(&[readcapacity10().to_str().expect("utf-8"), INITIATOR, &url]);
        let words: Vec<&str> = out.split_whitespace().collect();
        match words.as_slice() {
            ["blocks", blocks, "block_size", size] => {
                (blocks.parse().expect("blocks"), size.parse().expect("size"))
            }
            _ => panic!("unexpected answer: {out}"),
        }
    }

    /// Reads the whole LUN with qemu-img's iSCSI driver and returns the digest.
    fn read_lun(&self, iqn: &str, lun: u32, user: &str, password: &str) -> String {
        let out = self.sandbox.path().join(format!("read-{lun}.raw"));
        let options = format!(
            "driver=iscsi,transport=tcp,portal={PORTAL},target={iqn},lun={lun},user={user},password={password},initiator-name={INITIATOR}"
        );
        self.sandbox.must(&[
            "qemu-img",
            "convert",
            "-O",
            "raw",
            "--image-opts",
            &options,
            &out.display().to_string(),
        ]);
        sha256_file(&out)
    }
}

/// The DiscImage `disk` from a file.
fn image_manifest(image: &Path, digest: &str) -> String {
    format!(
        "apiVersion: discus.dev/v1alpha1\nkind: DiscImage\nmetadata: {{name: disk, namespace: lab}}\n\
         spec: {{source: {{file: {{path: {}}}}}, sha256: {digest}, format: raw}}\n",
        image.display()
    )
}

/// The DiscImage, a target with it as LUN 0, a grant for INITIATOR with CHAP, and its Secret.
fn served(image: &Path, digest: &str, extra_lun: &str) -> String {
    format!(
        "{}---\n\
         apiVersion: discus.dev/v1alpha1\nkind: IscsiTarget\nmetadata: {{name: boot, namespace: lab}}\n\
         spec:\n  iqn: iqn.2026-11.dev.discus:boot\n  luns:\n  - {{lun: 0, image: disk}}\n{extra_lun}---\n\
         apiVersion: discus.dev/v1alpha1\nkind: InitiatorAccess\nmetadata: {{name: client, namespace: lab}}\n\
         spec: {{targetRef: {{name: boot}}, initiatorIqn: {INITIATOR}, chap: {{secretRef: {{name: client-chap}}}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-chap, namespace: lab}}\n\
         stringData: {{username: client, password: client-secret}}\n",
        image_manifest(image, digest)
    )
}

#[test]
fn the_standalone_example_is_served_read_only_to_its_chap_client() {
    let host = Host::new();
    let demo = host.sandbox.data_dir().join("demo");
    std::fs::create_dir_all(&demo).expect("mkdir");
    let iso = support::repo().join("examples/standalone/discus-demo.iso");
    std::fs::copy(&iso, demo.join("discus-demo.iso")).expect("copy");

    let output = host
        .sandbox
        .command(DISCUS)
        .args(["serve", "--manifests"])
        .arg(support::repo().join("examples/standalone"))
        .args([
            "--data-dir",
            "/var/lib/discus",
            "--file-root",
            "/var/lib/discus/demo",
            "--backend",
            "tgt",
            "--once",
        ])
        .output()
        .expect("runs");
    let table = host
        .sandbox
        .must(&[DISCUS, "status", "--data-dir", "/var/lib/discus"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}\n{table}",
        String::from_utf8_lossy(&output.stderr)
    );
    for row in [
        "DiscImage/demo/discus-demo",
        "IscsiTarget/demo/demo",
        "InitiatorAccess/demo/demo-client",
    ] {
        let line = table
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("{row} in\n{table}"));
        assert!(line.split_whitespace().nth(1) == Some("True"), "{table}");
    }

    // The whole LUN reads back as the ISO; API LUN 0 is tgt LUN 1.
    let grant: Value = serde_json::from_slice(
        &std::fs::read(
            host.sandbox
                .data_dir()
                .join("status/InitiatorAccess/demo/demo-client.json"),
        )
        .expect("status"),
    )
    .expect("json");
    assert_eq!(
        grant.pointer("/status/connection/luns/0/deviceLun"),
        Some(&Value::from(1))
    );
    assert_eq!(
        grant.pointer("/status/connection/iqn"),
        Some(&Value::from("iqn.2026-11.dev.discus:demo"))
    );
    let out = host.sandbox.path().join("demo-read.raw");
    host.sandbox.must(&[
        "qemu-img",
        "convert",
        "-O",
        "raw",
        "--image-opts",
        "driver=iscsi,transport=tcp,portal=0.0.0.0:3260,target=iqn.2026-11.dev.discus:demo,lun=1,user=demo,\
         password=discus-demo-1,initiator-name=iqn.2026-11.dev.discus:demo-client",
        &out.display().to_string(),
    ]);
    assert_eq!(sha256_file(&out), sha256_file(&iso));

    // Every write is refused with DATA PROTECT.
    let writes = host
        .sandbox
        .command("iscsi-test-cu")
        .args([
            "-i",
            "iqn.2026-11.dev.discus:demo-client",
            "--dataloss",
            "-V",
            "-t",
            "ALL.Write10.Simple",
        ])
        .arg("iscsi://demo%discus-demo-1@127.0.0.1:3260/iqn.2026-11.dev.discus:demo/1")
        .output()
        .expect("iscsi-test-cu runs");
    let report = String::from_utf8_lossy(&writes.stdout);
    assert!(
        report.contains("sense key DATA PROTECTION(0x07)"),
        "{report}"
    );
    assert!(
        !report.contains("[OK] WRITE10"),
        "a write succeeded: {report}"
    );
}

#[test]
fn chap_admits_the_right_credentials_only_and_mutual_chap_works() {
    let host = Host::new();
    let (image, digest) = host.image("disk.raw", 2 << 20);
    host.manifest("lab.yaml", &served(&image, &digest, ""));
    host.manifest(
        "mutual.yaml",
        &format!(
            "apiVersion: discus.dev/v1alpha1\nkind: IscsiTarget\nmetadata: {{name: mutual, namespace: lab}}\n\
             spec: {{iqn: 'iqn.2026-11.dev.discus:mutual', luns: [{{lun: 0, image: disk}}]}}\n---\n\
             apiVersion: discus.dev/v1alpha1\nkind: InitiatorAccess\nmetadata: {{name: mutual-client, namespace: lab}}\n\
             spec: {{targetRef: {{name: mutual}}, initiatorIqn: {INITIATOR}, chap: {{secretRef: {{name: mutual-chap}}, mutual: true}}}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: mutual-chap, namespace: lab}}\n\
             stringData: {{username: mclient, password: mclient-secret, mutualUsername: mtarget, mutualPassword: mtarget-secret}}\n"
        ),
    );
    let output = host.once();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let iqn = "iqn.2026-11.dev.discus:boot";

    assert!(
        host.inquiry(iqn, 1, INITIATOR, Some(("client", "client-secret")))
            .is_ok()
    );
    let wrong = host
        .inquiry(iqn, 1, INITIATOR, Some(("client", "wrong-secret1")))
        .expect_err("wrong password");
    assert!(wrong.contains("Authentication failure"), "{wrong}");
    let none = host
        .inquiry(iqn, 1, INITIATOR, None)
        .expect_err("no credentials");
    assert!(none.contains("Login Failed"), "{none}");
    let stranger = host
        .inquiry(
            iqn,
            1,
            "iqn.2026-11.dev.discus:stranger",
            Some(("client", "client-secret")),
        )
        .expect_err("no grant");
    assert!(stranger.contains("Target not found"), "{stranger}");
    assert_eq!(host.read_lun(iqn, 1, "client", "client-secret"), digest);

    // Mutual CHAP: the target must prove itself with the mutual credentials.
    let mutual = |target_password: &str| {
        host.sandbox
            .command("iscsi-inq")
            .env("LIBISCSI_CHAP_TARGET_USERNAME", "mtarget")
            .env("LIBISCSI_CHAP_TARGET_PASSWORD", target_password)
            .args([
                "-i",
                INITIATOR,
                &format!("iscsi://mclient%mclient-secret@{PORTAL}/iqn.2026-11.dev.discus:mutual/1"),
            ])
            .output()
            .expect("runs")
    };
    assert!(mutual("mtarget-secret").status.success());
    assert!(
        !mutual("not-the-secret").status.success(),
        "an impostor target must not be trusted"
    );
}

#[test]
fn a_removed_or_expired_grant_ends_its_sessions_and_the_others_keep_working() {
    let host = Host::new();
    let (image, digest) = host.image("disk.raw", 4 << 20);
    host.manifest("lab.yaml", &served(&image, &digest, ""));
    let expiring = "iqn.2026-11.dev.discus:expiring";
    let leaving = "iqn.2026-11.dev.discus:leaving";
    let expires_at =
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(6);
    for (name, initiator, extra) in [
        ("leaving", leaving, String::new()),
        ("expiring", expiring, format!(", expiresAt: '{expires_at}'")),
    ] {
        host.manifest(
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: discus.dev/v1alpha1\nkind: InitiatorAccess\nmetadata: {{name: {name}, namespace: lab}}\n\
                 spec: {{targetRef: {{name: boot}}, initiatorIqn: '{initiator}', chap: {{secretRef: {{name: client-chap}}}}{extra}}}\n"
            ),
        );
    }
    let mut server = host.start();
    host.wait_for("every grant applied", || {
        ["client", "leaving", "expiring"]
            .iter()
            .all(|g| host.condition("InitiatorAccess", g, "Ready").0 == "True")
    });
    let iqn = "iqn.2026-11.dev.discus:boot";
    let session = |initiator: &str| {
        host.sandbox
            .command("iscsi-perf")
            .args([
                "-i",
                initiator,
                "-t",
                "60",
                &format!("iscsi://client%client-secret@{PORTAL}/{iqn}/1"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("iscsi-perf runs")
    };
    let (mut leaving_session, mut expiring_session) = (session(leaving), session(expiring));
    host.wait_for("both sessions", || {
        let show = host.tgtadm(&["--mode", "target", "--op", "show"]);
        show.contains(leaving) && show.contains(expiring) && show.matches("I_T nexus:").count() >= 2
    });
    host.wait_for("the sessions in status", || {
        host.status("InitiatorAccess", "leaving")
            .pointer("/status/nodes/0/sessions/0/address")
            .is_some()
    });

    host.remove_manifest("leaving.yaml");
    host.wait_for("the removed grant's session to end", || {
        leaving_session.try_wait().ok().flatten().is_some()
            || !host
                .tgtadm(&["--mode", "target", "--op", "show"])
                .contains(leaving)
    });
    assert!(
        host.inquiry(iqn, 1, leaving, Some(("client", "client-secret")))
            .is_err(),
        "new logins refused"
    );

    host.wait_for("the grant to expire", || {
        host.condition("InitiatorAccess", "expiring", "Expired").0 == "True"
    });
    host.wait_for("the expired grant's session to end", || {
        expiring_session.try_wait().ok().flatten().is_some()
            || !host
                .tgtadm(&["--mode", "target", "--op", "show"])
                .contains(expiring)
    });
    assert!(
        host.inquiry(iqn, 1, expiring, Some(("client", "client-secret")))
            .is_err()
    );
    let (ready, reason, _) = host.condition("InitiatorAccess", "expiring", "Ready");
    assert_eq!((ready.as_str(), reason.as_str()), ("False", "Expired"));

    // The remaining grant never noticed.
    assert!(
        host.inquiry(iqn, 1, INITIATOR, Some(("client", "client-secret")))
            .is_ok()
    );
    assert_eq!(
        host.condition("InitiatorAccess", "client", "Ready").0,
        "True"
    );
    for child in [&mut leaving_session, &mut expiring_session, &mut server] {
        host.sandbox.kill(child);
    }
}

#[test]
fn a_cdrom_lun_is_a_cd_dvd_device_with_2048_byte_blocks() {
    let host = Host::new();
    let iso = support::repo().join("examples/standalone/discus-demo.iso");
    std::fs::copy(&iso, host.images.join("disc.iso")).expect("copy");
    let yaml = served(&host.images.join("disc.iso"), &sha256_file(&iso), "").replace(
        "- {lun: 0, image: disk}",
        "- {lun: 0, image: disk, deviceType: cdrom}",
    );
    host.manifest("lab.yaml", &yaml.replace("format: raw", "format: iso"));
    let output = host.once();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let inquiry = host
        .inquiry(
            "iqn.2026-11.dev.discus:boot",
            1,
            INITIATOR,
            Some(("client", "client-secret")),
        )
        .expect("inquiry");
    // Peripheral device type 5, which SPC names MMC: a CD/DVD drive.
    assert!(inquiry.contains("Peripheral Device Type:MMC"), "{inquiry}");
    let capacity = host.read_capacity("iqn.2026-11.dev.discus:boot", 1, "client", "client-secret");
    let size = std::fs::metadata(&iso).expect("iso").len();
    assert_eq!(
        capacity,
        (size / 2048, 2048),
        "2048-byte blocks covering the whole ISO"
    );
}

#[test]
fn a_disk_lun_has_the_block_size_the_spec_asks_for() {
    let host = Host::new();
    let (image, digest) = host.image("disk.raw", 4 << 20);
    let yaml = served(&image, &digest, "").replace(
        "- {lun: 0, image: disk}",
        "- {lun: 0, image: disk, blockSize: 4096}",
    );
    host.manifest("lab.yaml", &yaml);
    let output = host.once();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        host.read_capacity("iqn.2026-11.dev.discus:boot", 1, "client", "client-secret"),
        (1024, 4096)
    );
}

#[test]
fn drift_is_corrected_and_foreign_targets_are_left_alone() {
    let host = Host::new();
    let (image, digest) = host.image("disk.raw", 2 << 20);
    host.manifest("lab.yaml", &served(&image, &digest, ""));
    let mut server = host.start();
    host.wait_for("the target", || {
        host.condition("IscsiTarget", "boot", "Ready").0 == "True"
    });
    let foreign = "iqn.2001-04.com.example:not-discus";
    host.tgtadm(&[
        "--mode",
        "target",
        "--op",
        "new",
        "--tid",
        "99",
        "--targetname",
        foreign,
    ]);

    // Behind discus's back: the LUN and the ACL go.
    host.tgtadm(&[
        "--mode",
        "target",
        "--op",
        "unbind",
        "--tid",
        "1",
        "--initiator-name",
        INITIATOR,
    ]);
    host.tgtadm(&[
        "--mode",
        "logicalunit",
        "--op",
        "delete",
        "--tid",
        "1",
        "--lun",
        "1",
    ]);
    host.wait_for("the LUN and ACL to come back", || {
        let show = host.tgtadm(&["--mode", "target", "--op", "show"]);
        show.contains("LUN: 1") && show.contains(&format!("        {INITIATOR}"))
    });
    assert!(
        host.inquiry(
            "iqn.2026-11.dev.discus:boot",
            1,
            INITIATOR,
            Some(("client", "client-secret"))
        )
        .is_ok()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        host.tgtadm(&["--mode", "target", "--op", "show"])
            .contains(foreign),
        "the foreign target survives syncs"
    );
    host.sandbox.kill(&mut server);
}

#[test]
fn a_sync_killed_midway_converges_after_restart_without_duplicates() {
    let host = Host::new();
    let mut yaml = String::new();
    for i in 0..6 {
        let (image, digest) = host.image(&format!("disk{i}.raw"), 1 << 20);
        yaml.push_str(&format!(
            "---\napiVersion: discus.dev/v1alpha1\nkind: DiscImage\nmetadata: {{name: disk{i}, namespace: lab}}\n\
             spec: {{source: {{file: {{path: {}}}}}, sha256: {digest}}}\n---\n\
             apiVersion: discus.dev/v1alpha1\nkind: IscsiTarget\nmetadata: {{name: t{i}, namespace: lab}}\n\
             spec: {{luns: [{{lun: 0, image: disk{i}}}, {{lun: 1, image: disk{i}}}], authentication: none}}\n---\n\
             apiVersion: discus.dev/v1alpha1\nkind: InitiatorAccess\nmetadata: {{name: g{i}, namespace: lab}}\n\
             spec: {{targetRef: {{name: t{i}}}, initiatorIqn: {INITIATOR}}}\n",
            image.display()
        ));
    }
    host.manifest("lab.yaml", &yaml);
    // Kill discus while it is building targets: after the first LUN of the first target exists.
    let mut server = host.start();
    host.wait_for("the sync to be under way", || {
        host.sandbox
            .command("tgtadm")
            .args([
                "-C", "3261", "--lld", "iscsi", "--mode", "target", "--op", "show",
            ])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("LUN: 1"))
    });
    host.sandbox.kill(&mut server);

    let output = host.once();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let show = host.tgtadm(&["--mode", "target", "--op", "show"]);
    for i in 0..6 {
        let iqn = format!("iqn.2026-11.dev.discus:lab.t{i}\n");
        assert_eq!(show.matches(&iqn).count(), 1, "{iqn} once:\n{show}");
    }
    assert_eq!(
        show.matches("Type: disk").count(),
        12,
        "two LUNs per target:\n{show}"
    );
    assert_eq!(
        show.matches(&format!("        {INITIATOR}\n")).count(),
        6,
        "one ACL per target:\n{show}"
    );
}

#[test]
fn bad_manifests_are_reported_and_the_good_ones_served_regardless() {
    let host = Host::new();
    let (image, digest) = host.image("disk.raw", 2 << 20);
    host.manifest("lab.yaml", &served(&image, &digest, ""));
    host.manifest(
        "bad.yaml",
        "apiVersion: discus.dev/v1alpha1\nkind: IscsiTarget\nmetadata: {name: bad, namespace: lab}\n\
         spec: {iqn: 'iqn.2026-11.dev.discus:../../core', luns: [{lun: 0, image: disk}]}\n---\n\
         apiVersion: discus.dev/v1alpha1\nkind: InitiatorAccess\nmetadata: {name: typo, namespace: lab}\n\
         spec: {targetRef: {name: boot}, initiatorIqn: 'iqn.2026-11.dev.discus:x', expiresAT: '2030-01-01T00:00:00Z'}\n",
    );
    host.manifest("broken.yaml", "apiVersion: v1\nkind: [unclosed\n");
    let output = host.once();
    assert_eq!(output.status.code(), Some(2), "something is not Ready");
    assert_eq!(host.condition("IscsiTarget", "boot", "Ready").0, "True");
    assert_eq!(
        host.condition("InitiatorAccess", "client", "Ready").0,
        "True"
    );
    let (stalled, reason, message) = host.condition("IscsiTarget", "bad", "Stalled");
    assert_eq!((stalled.as_str(), reason.as_str()), ("True", "InvalidSpec"));
    assert!(
        message.contains("spec.iqn: must not contain '/'"),
        "{message}"
    );
    let (stalled, _, message) = host.condition("InitiatorAccess", "typo", "Stalled");
    assert_eq!(stalled, "True");
    assert!(
        message.contains("spec.expiresAT: unknown field"),
        "{message}"
    );
    assert!(
        host.inquiry(
            "iqn.2026-11.dev.discus:boot",
            1,
            INITIATOR,
            Some(("client", "client-secret"))
        )
        .is_ok()
    );
}

#[test]
fn a_target_removed_under_io_goes_away_whole() {
    let host = Host::new();
    let (image, digest) = host.image("disk.raw", 8 << 20);
    host.manifest(
        "lab.yaml",
        &served(&image, &digest, "  - {lun: 1, image: disk}\n"),
    );
    let mut server = host.start();
    host.wait_for("the target", || {
        host.condition("IscsiTarget", "boot", "Ready").0 == "True"
    });
    let mut load = host
        .sandbox
        .command("iscsi-perf")
        .args([
            "-i",
            INITIATOR,
            "-t",
            "60",
            &format!("iscsi://client%client-secret@{PORTAL}/iqn.2026-11.dev.discus:boot/2"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iscsi-perf runs");
    host.wait_for("I/O under way", || {
        host.tgtadm(&["--mode", "target", "--op", "show"])
            .contains("I_T nexus:")
    });

    // The whole target goes while the initiator reads from it.
    host.manifest("lab.yaml", &image_manifest(&image, &digest));
    host.wait_for("the target to be gone", || {
        !host
            .tgtadm(&["--mode", "target", "--op", "show"])
            .contains("iqn.2026-11.dev.discus:boot")
    });
    let show = host.tgtadm(&["--mode", "target", "--op", "show"]);
    assert!(
        !show.contains("LUN:"),
        "nothing half-deleted is left:\n{show}"
    );
    host.sandbox.kill(&mut load);
    host.sandbox.kill(&mut server);
}
