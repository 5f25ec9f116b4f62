//! `discus serve` on tgt in a host of its own (a sandbox: private network, mount and PID
//! namespaces, its own /var/lib/discus and tgtd), with the resources most tests serve, and the
//! initiators that read from it.
#![allow(dead_code)] // each suite uses a different part

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

    /// `discus serve` in the background, re-syncing every second.
    pub fn start(&self) -> Child {
        let log = std::fs::File::create(self.sandbox.path().join("serve.log")).expect("log");
        self.sandbox
            .command(DISCUS)
            .args(self.serve_args())
            .args(["--resync-seconds", "1", "--log-level", "debug"])
            .stderr(log)
            .spawn()
            .expect("discus runs")
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

    pub fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("timed out waiting for {what}; serve log:\n{}", self.log());
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
