//! Image import against its floor, as ratios measured in the same run (`cargo bench --bench import`):
//!
//! 1. A 1 GiB raw image over loopback HTTP, imported (downloaded, hashed, written, inspected,
//!    stored), against `openssl dgst -sha256` of the same file. Downloading, hashing and writing
//!    overlap, so the import should cost little more than the hash alone (target: ≤ 1.25).
//! 2. The same image as qcow2, from verification to stored raw (qemu-img info, conversion under
//!    prlimit, hashing the output, commit), against a bare `qemu-img convert` plus `openssl dgst`
//!    of its output (target: ≤ 1.15).
//!
//! Everything lives on tmpfs (/dev/shm) so that both sides are measured without disk noise, after
//! a warm-up that spares either side the cost of a VM's first touch of its memory.
//! Prints the ratio of every run and the median. `cargo test --bench import` runs it with 16 MiB.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

#[path = "../tests/support/http.rs"]
#[allow(dead_code)]
mod http;
#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Instant;

use discus::api::disc_image::ImageFormat;
use discus::images::{
    FetchOptions, HttpAuth, ImportRequest, Importer, ImporterConfig, Phase, Requester, Source,
    progress, qemu::QemuImg,
};
use sha2::{Digest, Sha256};

use support::{incompressible, median, timed};

const RUNS: usize = 5;

fn importer(dir: &Path, roots: Vec<std::path::PathBuf>) -> Importer {
    Importer::new(ImporterConfig {
        upload: Default::default(),
        data_dir: dir.to_owned(),
        file_roots: roots,
        fetch: FetchOptions {
            destinations: discus::images::DestinationPolicy::new(true, Vec::new(), Vec::new()),
            ..FetchOptions::default()
        },
        qemu: QemuImg::default(),
        peer_keys: None,
    })
    .expect("importer")
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --bench import` does not: 16 MiB, so that it
    // cannot rot.
    let size: usize = if std::env::args().any(|a| a == "--bench") {
        1 << 30
    } else {
        16 << 20
    };
    let work = tempfile::Builder::new()
        .prefix("discus-bench-")
        .tempdir_in("/dev/shm")
        .expect("tmpfs");
    let raw_path = work.path().join("disk.raw");
    // Incompressible, so qcow2 stores every cluster and qemu-img has real work to do.
    let raw = incompressible(size, b"discus-bench");
    std::fs::write(&raw_path, &raw).expect("write raw");
    let raw_digest = hex::encode(Sha256::digest(&raw));
    let qcow2_path = work.path().join("disk.qcow2");
    let (raw_arg, qcow2_arg) = (
        raw_path.display().to_string(),
        qcow2_path.display().to_string(),
    );
    timed(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &raw_arg, &qcow2_arg],
    );
    let qcow2_digest = hex::encode(Sha256::digest(std::fs::read(&qcow2_path).expect("qcow2")));

    // Pages a VM touches for the first time cost the host a fault each, which would make
    // whichever side runs first look slow: touch (and free) more memory than both sides use.
    let warm = work.path().join("warm-up");
    std::fs::write(&warm, vec![1u8; 6 * size]).expect("warm up");
    std::fs::remove_file(&warm).expect("warm up");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = runtime.block_on(http::HttpServer::start());
    server.route("/disk.raw", raw, http::Behavior::normal());
    let url: url::Url = server.url("/disk.raw").parse().expect("url");

    println!(
        "import of a {} MiB raw image over loopback HTTP / openssl dgst -sha256 of the file",
        size >> 20
    );
    let mut ratios = Vec::new();
    for run in 1..=RUNS {
        let hash = timed("openssl", &["dgst", "-sha256", &raw_arg]);
        let data = work.path().join(format!("data-http-{run}"));
        let importer = importer(&data, Vec::new());
        let request = ImportRequest {
            requester: Requester::Operator,
            source: Source::Http {
                url: url.clone(),
                auth: HttpAuth::default(),
            },
            sha256: raw_digest.clone(),
            format: ImageFormat::Raw,
            max_virtual_size: 2 << 30,
        };
        let start = Instant::now();
        runtime
            .block_on(importer.import(&request, &mut progress::ProgressReporter::silent()))
            .expect("import");
        let import = start.elapsed();
        std::fs::remove_dir_all(&data).expect("clean");
        let ratio = import.as_secs_f64() / hash.as_secs_f64();
        println!("  run {run}: import {import:.2?}, hash {hash:.2?}, ratio {ratio:.3}");
        ratios.push(ratio);
    }
    println!("  median ratio {:.3} (target at most 1.25)", median(ratios));

    println!(
        "qcow2 → raw, verified to stored / bare qemu-img convert + openssl dgst of its output"
    );
    let mut ratios = Vec::new();
    let bare = work.path().join("bare.raw").display().to_string();
    for run in 1..=RUNS {
        let convert = timed(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", &qcow2_arg, &bare],
        );
        let hash = timed("openssl", &["dgst", "-sha256", &bare]);
        std::fs::remove_file(&bare).expect("clean");
        let baseline = convert + hash;

        let data = work.path().join(format!("data-qcow2-{run}"));
        let importer = importer(&data, vec![work.path().to_owned()]);
        let request = ImportRequest {
            requester: Requester::Operator,
            source: Source::File {
                path: qcow2_path.clone(),
            },
            sha256: qcow2_digest.clone(),
            format: ImageFormat::Qcow2,
            max_virtual_size: 2 << 30,
        };
        let (mut reporter, mut watch) = progress::channel();
        let stage = runtime.block_on(async {
            let watcher = tokio::spawn(async move {
                let mut verifying = None;
                while watch.changed().await.is_ok() {
                    let phase = watch.borrow().phase;
                    if phase == Phase::Verifying && verifying.is_none() {
                        verifying = Some(Instant::now());
                    }
                    if phase == Phase::Ready {
                        return verifying.map(|v| v.elapsed());
                    }
                }
                None
            });
            let stored = importer
                .import(&request, &mut reporter)
                .await
                .expect("import");
            assert_eq!(stored.served_sha256, raw_digest);
            drop(reporter);
            watcher
                .await
                .expect("watcher")
                .expect("saw Verifying and Ready")
        });
        std::fs::remove_dir_all(&data).expect("clean");
        let ratio = stage.as_secs_f64() / baseline.as_secs_f64();
        println!(
            "  run {run}: verified→stored {stage:.2?}, convert {convert:.2?} + hash {hash:.2?}, ratio {ratio:.3}"
        );
        ratios.push(ratio);
    }
    println!("  median ratio {:.3} (target at most 1.15)", median(ratios));
}
