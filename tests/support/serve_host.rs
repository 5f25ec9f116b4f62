//! `discus serve` on tgt in a host of its own (a sandbox: private network, mount and PID
//! namespaces, its own /var/lib/discus and tgtd), with the resources most tests serve, and the
//! initiators that read from it.
#![allow(dead_code)] // each suite uses a different part

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::manifests;
use super::sandbox::Sandbox;

pub const DISCUS: &str = env!("CARGO_BIN_EXE_discus");
pub const INITIATOR: &str = "iqn.2026-11.dev.discus:test-client";
pub const PORTAL: &str = "127.0.0.1:3260";

/// tests/tools/readcapacity10.c, built once per run against libiscsi.
pub fn readcapacity10() -> &'static Path {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("readcapacity10");
        let status = std::process::Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&out)
            .arg(super::repo().join("tests/tools/readcapacity10.c"))
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

pub fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("read")))
}

/// Flips one bit of a file in place, as a failing disk would: no write through discus, the
/// file's name and size unchanged.
pub fn rot(path: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the stored image");
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.read_exact(&mut byte).expect("read");
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.write_all(&[byte[0] ^ 0x04]).expect("write");
    file.sync_all().expect("sync");
}

/// A sandboxed host running `discus serve` on a folder of manifests.
pub struct Host {
    pub sandbox: Sandbox,
    pub manifests: PathBuf,
    pub images: PathBuf,
}

impl Host {
    pub fn new() -> Self {
        let sandbox = Sandbox::new();
        let manifests = sandbox.scratch("manifests");
        let images = sandbox.scratch("images");
        Self {
            sandbox,
            manifests,
            images,
        }
    }

    pub fn serve_args(&self) -> Vec<String> {
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
    pub fn once(&self) -> Output {
        self.sandbox
            .command(DISCUS)
            .args(self.serve_args())
            .arg("--once")
            .output()
            .expect("discus runs")
    }

    /// `discus serve --once`, which must converge (exit 0); fails the test with what discus said
    /// otherwise.
    pub fn converge(&self) -> Output {
        let output = self.once();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// `discus serve` in the background, re-syncing every second.
    pub fn start(&self) -> Child {
        self.start_with(&[])
    }

    /// `discus serve` in the background with more options, re-syncing every second unless they
    /// say otherwise; its log starts afresh.
    pub fn start_with(&self, options: &[&str]) -> Child {
        let log = std::fs::File::create(self.sandbox.path().join("serve.log")).expect("log");
        let resync = (!options.contains(&"--resync-seconds")).then_some(["--resync-seconds", "1"]);
        self.sandbox
            .command(DISCUS)
            .args(self.serve_args())
            .args(resync.into_iter().flatten())
            .args(["--log-level", "debug"])
            .args(options)
            .stderr(log)
            .spawn()
            .expect("discus runs")
    }

    /// Where the store keeps the served file with this digest.
    pub fn stored_image(&self, served_sha256: &str) -> PathBuf {
        self.sandbox
            .data_dir()
            .join(format!("images/{served_sha256}.raw"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.sandbox.path().join("serve.log")).unwrap_or_default()
    }

    /// Writes an image of `size` pseudo-random bytes and returns its path and digest.
    pub fn image(&self, name: &str, size: usize) -> (PathBuf, String) {
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

    pub fn manifest(&self, name: &str, yaml: &str) {
        std::fs::write(self.manifests.join(name), yaml).expect("manifest");
    }

    pub fn remove_manifest(&self, name: &str) {
        std::fs::remove_file(self.manifests.join(name)).expect("remove");
    }

    pub fn status(&self, kind: &str, name: &str) -> Value {
        let path = self
            .sandbox
            .data_dir()
            .join(format!("status/{kind}/lab/{name}.json"));
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    pub fn condition(&self, kind: &str, name: &str, condition: &str) -> (String, String, String) {
        let status = self.status(kind, name);
        let found = status
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| c["type"] == condition).cloned())
            .unwrap_or_default();
        let text = |k: &str| found[k].as_str().unwrap_or("").to_owned();
        (text("status"), text("reason"), text("message"))
    }

    pub fn wait_for(&self, what: &str, done: impl FnMut() -> bool) {
        self.wait_polling(
            Duration::from_secs(60),
            Duration::from_millis(200),
            what,
            done,
        );
    }

    /// Asks `done` every `every` until it holds; fails with the serve log after `deadline`.
    pub fn wait_polling(
        &self,
        deadline: Duration,
        every: Duration,
        what: &str,
        mut done: impl FnMut() -> bool,
    ) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < deadline,
                "timed out waiting for {what}; serve log:\n{}",
                self.log()
            );
            std::thread::sleep(every);
        }
    }

    pub fn tgtadm(&self, args: &[&str]) -> String {
        let mut all = vec!["tgtadm", "-C", "3261", "--lld", "iscsi"];
        all.extend_from_slice(args);
        self.sandbox.must(&all)
    }

    /// `iscsi-inq` as `initiator` with optional CHAP, `lun` as tgt numbers it.
    pub fn inquiry(
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
    pub fn read_capacity(&self, iqn: &str, lun: u32, user: &str, password: &str) -> (u64, u64) {
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
    pub fn read_lun(&self, iqn: &str, lun: u32, user: &str, password: &str) -> String {
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

/// The resources most tests serve: the DiscImage `disk` from a file, the target `boot` with it
/// as LUN 0, the grant `client` for INITIATOR with CHAP, and its Secret `client-chap`.
pub struct Served {
    pub image: Value,
    pub target: Value,
    pub grant: Value,
    pub secret: Value,
}

impl Served {
    pub fn new(image: &Path, digest: &str) -> Self {
        Self {
            image: image_manifest(image, digest),
            target: manifests::discus(
                "IscsiTarget",
                "lab",
                "boot",
                json!({"iqn": "iqn.2026-11.dev.discus:boot", "luns": [{"lun": 0, "image": "disk"}]}),
            ),
            grant: manifests::discus(
                "InitiatorAccess",
                "lab",
                "client",
                json!({
                    "targetRef": {"name": "boot"},
                    "initiatorIqn": INITIATOR,
                    "chap": {"secretRef": {"name": "client-chap"}},
                }),
            ),
            secret: chap_secret("client-secret"),
        }
    }

    /// Everything, as one manifest file.
    pub fn yaml(&self) -> String {
        manifests::yaml([&self.image, &self.target, &self.grant, &self.secret])
    }

    /// The target's LUN `n`, to change.
    pub fn lun(&mut self, n: usize) -> &mut Value {
        &mut self.target["spec"]["luns"][n]
    }
}

/// The DiscImage `disk` from a file.
pub fn image_manifest(image: &Path, digest: &str) -> Value {
    raw_image("disk", image, digest)
}

/// The raw DiscImage `name` in `lab`, from a file under the host's file root.
pub fn raw_image(name: &str, image: &Path, digest: &str) -> Value {
    manifests::discus(
        "DiscImage",
        "lab",
        name,
        json!({"source": {"file": {"path": image}}, "sha256": digest, "format": "raw"}),
    )
}

/// The IscsiTarget `t<i>` in `lab` (IQN `…:t<i>`) with the DiscImage `image` as LUN 0: one of
/// the many targets of a test or benchmark at scale.
pub fn numbered_target(i: usize, image: &str) -> Value {
    manifests::discus(
        "IscsiTarget",
        "lab",
        &format!("t{i}"),
        json!({"iqn": format!("iqn.2026-11.dev.discus:t{i}"), "luns": [{"lun": 0, "image": image}]}),
    )
}

/// The whole set `Served` describes, as one manifest file.
pub fn served(image: &Path, digest: &str) -> String {
    Served::new(image, digest).yaml()
}

/// The grant `client` with its CHAP Secret's password.
/// The Secret `client-chap` with `password`.
pub fn chap_secret(password: &str) -> Value {
    manifests::secret(
        "lab",
        "client-chap",
        json!({"username": "client", "password": password}),
    )
}

/// What tgtd holds: target IQN → (initiators admitted, accounts bound, LUNs), and the accounts.
#[derive(Debug, Default)]
pub struct Tgtd {
    pub targets: BTreeMap<String, (BTreeSet<String>, Vec<String>, usize)>,
    pub accounts: BTreeSet<String>,
    /// Initiator → its I_T nexus ids.
    pub nexus: BTreeMap<String, BTreeSet<String>>,
}

pub fn tgtd(host: &Host) -> Tgtd {
    Tgtd::parse(
        &host.tgtadm(&["--mode", "target", "--op", "show"]),
        &host.tgtadm(&["--mode", "account", "--op", "show"]),
    )
}

impl Tgtd {
    /// From what `tgtadm --op show` prints for targets and for accounts.
    pub fn parse(show: &str, accounts: &str) -> Self {
        let mut found = Tgtd::default();
        let (mut target, mut section, mut nexus) = (String::new(), "", String::new());
        for line in show.lines() {
            if let Some(rest) = line.strip_prefix("Target ") {
                target = rest
                    .split_once(": ")
                    .map(|(_, n)| n.to_owned())
                    .unwrap_or_default();
                found.targets.entry(target.clone()).or_default();
                continue;
            }
            let trimmed = line.trim();
            match (line.len() - line.trim_start().len(), trimmed) {
                (4, "ACL information:") => section = "acl",
                (4, "Account information:") => section = "account",
                (4, _) => section = "",
                (8, t) if t.starts_with("I_T nexus: ") => {
                    nexus = t["I_T nexus: ".len()..].to_owned()
                }
                (12, t) if t.starts_with("Initiator: ") => {
                    let initiator = t["Initiator: ".len()..]
                        .split(' ')
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    found
                        .nexus
                        .entry(initiator)
                        .or_default()
                        .insert(nexus.clone());
                }
                (8, t) if t.starts_with("LUN: ") => {
                    found.targets.entry(target.clone()).or_default().2 += 1;
                }
                (8, t) if section == "acl" => {
                    found
                        .targets
                        .entry(target.clone())
                        .or_default()
                        .0
                        .insert(t.to_owned());
                }
                (8, t) if section == "account" => {
                    found
                        .targets
                        .entry(target.clone())
                        .or_default()
                        .1
                        .push(t.to_owned());
                }
                _ => {}
            }
        }
        found.accounts = accounts
            .lines()
            .skip(1)
            .map(|l| l.trim().trim_end_matches(" (outgoing)").to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        found
    }
}
