//! Uploads and peer transfers against their floor, as ratios measured in the same run
//! (`cargo bench --bench upload`):
//!
//! 1. **Upload**: a 1 GiB image sent over loopback HTTPS as `discus image upload` sends it (one
//!    request) to a node's upload endpoint, which hashes and writes it as it arrives, verifies
//!    it, inspects it and stores it durably.
//! 2. **Peer transfer**: a second node fetches it from the first (HTTPS, a peer token, Range),
//!    checks it against the digest the first published, and stores it durably.
//!
//! The floor of a verified durable import is the slower of the two things it must do: hash the
//! bytes (`openssl dgst -sha256` of the file) and write them durably (`dd conv=fsync` of the file
//! to the same file system, the faster of one before and one after discus's). Target: at most
//! 1.3× for both. Everything is on the file system of
//! `$TMPDIR` (default /var/tmp), the kind of disk a node stores images on; the source file is in
//! the page cache for every side alike.
//!
//! `cargo test --bench upload` runs it once with 16 MiB, as a smoke test that it still works.
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmarks fail by panicking

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use secrecy::SecretString;
use sha2::{Digest, Sha256};

use discus::api::disc_image::{ImageFormat, NodeEndpointStatus};
use discus::credentials::Keys;
use discus::credentials::tls::NodeIdentity;
use discus::credentials::token::{Audience, Scope, SigningKey};
use discus::images::inspect::Format;
use discus::images::{
    FetchOptions, ImportRequest, Importer, ImporterConfig, PeerCopy, PeerSource, ProgressReporter,
    Requester, Source, qemu::QemuImg,
};
use discus::upload::endpoint::{self, EndpointConfig};

use support::{incompressible, median, timed};

const UID: &str = "0b6a2c1e-57d4-4c7e-9a55-8f3d2b1c0e9a";

fn key() -> SigningKey {
    SigningKey::from_bytes(&[5; 32]).expect("key")
}

fn node(data: &Path, keys: &Arc<Keys>) -> Arc<Importer> {
    Arc::new(
        Importer::new(ImporterConfig {
            data_dir: data.to_owned(),
            file_roots: Vec::new(),
            fetch: FetchOptions::default(),
            upload: Default::default(),
            qemu: QemuImg::default(),
            peer_keys: Some(Arc::clone(keys)),
        })
        .expect("importer"),
    )
}

fn request(sha256: &str, source: Source) -> ImportRequest {
    ImportRequest {
        requester: Requester::Namespace("lab".into()),
        source,
        sha256: sha256.to_owned(),
        format: ImageFormat::Raw,
        max_virtual_size: 2 << 30,
    }
}

/// Incompressible bytes, written to `path`; their digest.
fn write_image(path: &Path, size: usize) -> String {
    let bytes = incompressible(size, b"discus-upload-bench");
    std::fs::write(path, &bytes).expect("write the image");
    hex::encode(Sha256::digest(&bytes))
}

/// A node receiving uploads on loopback; the URL of the upload, and of the image once stored.
struct Holder {
    importer: Arc<Importer>,
    upload: NodeEndpointStatus,
    image_url: String,
}

async fn holder(data: &Path, keys: &Arc<Keys>, sha256: &str) -> Holder {
    let identity = NodeIdentity::generate("a", &[[127, 0, 0, 1].into()]).expect("identity");
    let fingerprint = identity.fingerprint().to_owned();
    let importer = node(data, keys);
    let config = EndpointConfig {
        address: "127.0.0.1:0".parse().expect("address"),
        identity: Arc::new(identity),
        keys: Arc::clone(keys),
    };
    let address = endpoint::start(&config, Arc::clone(&importer))
        .await
        .expect("the endpoint");
    Holder {
        importer,
        upload: NodeEndpointStatus {
            urls: vec![format!("https://{address}{}", endpoint::path(UID))],
            certificate_sha256: fingerprint,
        },
        image_url: format!("https://{address}{}", discus::images::peers::path(sha256)),
    }
}

fn upload_token(sha256: &str) -> SecretString {
    use secrecy::ExposeSecret;
    let scope = Scope {
        uid: UID.into(),
        sha256: sha256.into(),
        namespace: "lab".into(),
        name: "bench".into(),
    };
    let token = key()
        .mint(&scope, Audience::Upload, SystemTime::now())
        .expect("mint");
    SecretString::from(token.text.expose_secret().to_owned())
}

/// Uploads `file` to a new node in `data` and, from it, to a second node in `peer_data`: how
/// long each took, from the first byte sent (or asked for) to the image stored.
async fn upload_then_peer(
    file: &Path,
    sha256: &str,
    size: u64,
    data: &Path,
    peer_data: &Path,
) -> (Duration, Duration) {
    let keys = Arc::new(Keys::default());
    keys.set(key());
    let holder = holder(data, &keys, sha256).await;
    let awaiting = {
        let (importer, request) = (
            Arc::clone(&holder.importer),
            request(sha256, Source::Upload { uid: UID.into() }),
        );
        tokio::spawn(async move {
            importer
                .import(&request, &mut ProgressReporter::silent())
                .await
        })
    };
    while holder.importer.uploads().held(UID, sha256).is_err() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    settle();
    let start = Instant::now();
    discus::client::upload::send_once(&holder.upload, &upload_token(sha256), file, size)
        .await
        .expect("the upload");
    let stored = awaiting.await.expect("import task").expect("stored");
    let upload = start.elapsed();
    // What a pass of the holder's agent does once the image is Ready there.
    let offered = [(sha256.to_owned(), "lab".to_owned())];
    holder
        .importer
        .peer_offers()
        .replace(offered.into_iter().collect());

    let copy = PeerCopy {
        node: "a".into(),
        urls: vec![holder.image_url.parse().expect("url")],
        certificate_sha256: holder.upload.certificate_sha256.clone(),
        served_sha256: stored.served_sha256.clone(),
        format: Format::from_name(&stored.format).expect("format"),
    };
    let peer = node(peer_data, &keys);
    let from_peer = request(
        sha256,
        Source::Peer(PeerSource {
            uid: UID.into(),
            name: "bench".into(),
            copies: vec![copy],
        }),
    );
    settle();
    let start = Instant::now();
    let fetched = peer
        .import(&from_peer, &mut ProgressReporter::silent())
        .await
        .expect("the peer transfer");
    assert_eq!(fetched.served_sha256, sha256);
    (upload, start.elapsed())
}

/// Writes back what earlier steps left dirty, so that each side's fsync pays for its own bytes
/// only (the disk of a VM is noisy enough without that).
fn settle() {
    rustix::fs::sync();
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --bench upload` does not: a smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let (size, runs) = if full {
        (1usize << 30, 5)
    } else {
        (16 << 20, 1)
    };
    let base = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let work = tempfile::Builder::new()
        .prefix("discus-bench-upload-")
        .tempdir_in(&base)
        .expect("a work directory");
    let file = work.path().join("disc.raw");
    let sha256 = write_image(&file, size);
    let file_arg = file.display().to_string();
    let copy = work.path().join("dd.out");
    let dd_args = [
        format!("if={file_arg}"),
        format!("of={}", copy.display()),
        "bs=4M".into(),
        "conv=fsync".into(),
        "status=none".into(),
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!(
        "{} MiB: upload over loopback HTTPS, and peer transfer, each to stored / the slower of \
         openssl dgst -sha256 and dd conv=fsync of the file (target at most 1.3)",
        size >> 20
    );
    let (mut uploads, mut peers, mut over_hash) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        settle();
        let hash = timed("openssl", &["dgst", "-sha256", &file_arg]);
        let dd = || {
            settle();
            let args: Vec<&str> = dd_args.iter().map(String::as_str).collect();
            let took = timed("dd", &args);
            std::fs::remove_file(&copy).expect("clean");
            took
        };
        let before = dd();
        let (a, b) = (work.path().join("a"), work.path().join("b"));
        let (upload, peer) =
            runtime.block_on(upload_then_peer(&file, &sha256, size as u64, &a, &b));
        for dir in [&a, &b] {
            std::fs::remove_dir_all(dir).expect("clean");
        }
        // The disk of a VM is fast and slow by turns: the floor is the faster of two writes,
        // one on each side of discus's.
        let write = before.min(dd());
        let floor = hash.max(write);
        let (u, p) = (
            upload.as_secs_f64() / floor.as_secs_f64(),
            peer.as_secs_f64() / floor.as_secs_f64(),
        );
        println!(
            "  run {run}: upload {upload:.2?} ({u:.3}), peer {peer:.2?} ({p:.3}); floor {floor:.2?} \
             (hash {hash:.2?}, dd conv=fsync {write:.2?})"
        );
        uploads.push(u);
        peers.push(p);
        over_hash.push(upload.as_secs_f64() / hash.as_secs_f64());
    }
    println!(
        "  median ratio: upload {:.3}, peer transfer {:.3} (upload / the hash alone: {:.3})",
        median(uploads),
        median(peers),
        median(over_hash)
    );
}
