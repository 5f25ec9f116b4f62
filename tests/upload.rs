//! Uploads into a node's real store: an import whose source is an upload awaits the bytes a
//! client appends, verifies them against the DiscImage's digest and stores them like a download;
//! what the node holds survives a restart and the upload resumes from it; every refused append
//! leaves nothing that could be served. Another node fetches a verified upload from the node
//! that holds it, over HTTPS, with a peer token, and checks it before storing it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use discus::api::disc_image::ImageFormat;
use discus::credentials::Keys;
use discus::credentials::tls::{NodeIdentity, pinned_client};
use discus::credentials::token::{Audience, LIFETIME, Scope, SigningKey};
use discus::images::inspect::Format;
use discus::images::peers::PeerError;
use discus::images::upload::{Appended, Held, UploadError};
use discus::images::{
    FetchOptions, ImportError, ImportRequest, Importer, ImporterConfig, PeerCopy, PeerSource,
    ProgressReporter, Requester, Source, StoredImage, UploadOptions, qemu::QemuImg,
};
use discus::upload::endpoint::{self, EndpointConfig};

const UID: &str = "0b6a2c1e-57d4-4c7e-9a55-8f3d2b1c0e9a";
const DEADLINE: Duration = Duration::from_secs(30);

fn image_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len);
    let mut block = Sha256::digest([seed]);
    while bytes.len() < len {
        block = Sha256::digest(block);
        bytes.extend_from_slice(&block);
    }
    bytes.truncate(len);
    bytes
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn importer(data: &Path, upload: UploadOptions) -> Arc<Importer> {
    node(data, upload, None)
}

/// A node's importer; with `peer_keys`, it fetches uploaded images from other nodes (and gives
/// up on one after two attempts).
fn node(data: &Path, upload: UploadOptions, peer_keys: Option<Arc<Keys>>) -> Arc<Importer> {
    Arc::new(
        Importer::new(ImporterConfig {
            data_dir: data.to_owned(),
            file_roots: Vec::new(),
            fetch: FetchOptions {
                attempts: 2,
                first_backoff: Duration::from_millis(10),
                ..FetchOptions::default()
            },
            upload,
            qemu: QemuImg::default(),
            peer_keys,
        })
        .expect("importer"),
    )
}

fn request(uid: &str, sha256: &str) -> ImportRequest {
    ImportRequest {
        requester: Requester::Namespace("lab".into()),
        source: discus::images::Source::Upload { uid: uid.into() },
        sha256: sha256.to_owned(),
        format: ImageFormat::Auto,
        max_virtual_size: 1 << 30,
    }
}

/// An import awaiting its upload, as the agent runs one.
struct Awaiting {
    importer: Arc<Importer>,
    task: JoinHandle<Result<StoredImage, ImportError>>,
    sha256: String,
}

impl Awaiting {
    /// Starts the import and waits until the node awaits the upload.
    async fn start(importer: Arc<Importer>, sha256: &str) -> Self {
        Self::start_with(importer, request(UID, sha256)).await
    }

    /// Starts the import `request` (of `UID`) and waits until the node awaits the upload.
    async fn start_with(importer: Arc<Importer>, request: ImportRequest) -> Self {
        let sha256 = request.sha256.clone();
        let job = Arc::clone(&importer);
        let task =
            tokio::spawn(
                async move { job.import(&request, &mut ProgressReporter::silent()).await },
            );
        let awaiting = Self {
            importer,
            task,
            sha256,
        };
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while awaiting.held().is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node never awaited the upload"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        awaiting
    }

    /// Waits until the node holds `bytes`.
    async fn wait_for(&self, bytes: u64) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.held().map(|h| h.bytes).ok() != Some(bytes) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node never held {bytes} bytes: {:?}",
                self.held()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn held(&self) -> Result<Held, UploadError> {
        self.importer.uploads().held(UID, &self.sha256)
    }

    async fn append(
        &self,
        offset: u64,
        length: u64,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
    ) -> Result<Appended, UploadError> {
        self.importer
            .uploads()
            .append(UID, &self.sha256, offset, length, None, body)
            .await
    }

    /// Appends `bytes` in pieces of `piece` bytes, announcing how many it brings.
    async fn send(&self, offset: u64, length: u64, bytes: &[u8]) -> Result<Appended, UploadError> {
        let pieces: Vec<_> = bytes
            .chunks(64 << 10)
            .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
            .collect();
        self.importer
            .uploads()
            .append(
                UID,
                &self.sha256,
                offset,
                length,
                Some(bytes.len() as u64),
                stream::iter(pieces),
            )
            .await
    }

    async fn stored(self) -> StoredImage {
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the import ends once the upload is verified")
            .expect("import task")
            .expect("stored")
    }
}

fn pieces(bytes: &[u8]) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
    stream::iter(vec![Ok(Bytes::copy_from_slice(bytes))])
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|read| {
            read.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn an_upload_in_pieces_is_verified_and_stored_like_a_download() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let image = image_bytes(3 << 20, 1);
    let digest = sha256(&image);
    let awaiting = Awaiting::start(importer(&data, UploadOptions::default()), &digest).await;
    assert_eq!(awaiting.held().expect("held"), Held::default());

    let length = image.len() as u64;
    let first = awaiting.send(0, length, &image[..1 << 20]).await;
    assert_eq!(
        first.expect("first piece"),
        Appended::Partial(Held {
            bytes: 1 << 20,
            length: Some(length)
        })
    );
    awaiting
        .send(1 << 20, length, &image[1 << 20..2 << 20])
        .await
        .expect("second piece");
    let last = awaiting.send(2 << 20, length, &image[2 << 20..]).await;
    assert_eq!(last.expect("last piece"), Appended::Verified);

    let stored = awaiting.stored().await;
    assert_eq!(stored.served_sha256, digest);
    assert_eq!(
        sha256(&std::fs::read(&stored.path).expect("stored")),
        digest
    );
    assert!(entries(&data.join("tmp")).is_empty());
    // Received, it awaits nothing more: a late append is refused.
    let importer = importer(&data, UploadOptions::default());
    let late = importer
        .uploads()
        .append(UID, &digest, 0, length, None, pieces(&image))
        .await;
    assert!(matches!(late, Err(UploadError::NotAwaited)), "{late:?}");
}

#[tokio::test]
async fn an_upload_resumes_after_a_restart_from_what_the_node_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let image = image_bytes(2 << 20, 2);
    let digest = sha256(&image);
    let length = image.len() as u64;
    let half = length / 2;
    {
        let awaiting = Awaiting::start(importer(&data, UploadOptions::default()), &digest).await;
        awaiting
            .send(0, length, &image[..half as usize])
            .await
            .expect("first half");
        awaiting.task.abort();
        let _ = awaiting.task.await;
    }
    // The agent restarts: a new importer on the same store.
    let awaiting = Awaiting::start(importer(&data, UploadOptions::default()), &digest).await;
    assert_eq!(awaiting.held().expect("held").bytes, half);
    let wrong_place = awaiting
        .send(half + 1, length, &image[half as usize + 1..])
        .await;
    assert!(
        matches!(wrong_place, Err(UploadError::Offset { held }) if held == half),
        "{wrong_place:?}"
    );
    let rest = awaiting.send(half, length, &image[half as usize..]).await;
    assert_eq!(rest.expect("second half"), Appended::Verified);
    let stored = awaiting.stored().await;
    assert_eq!(
        sha256(&std::fs::read(&stored.path).expect("stored")),
        digest
    );
    assert!(entries(&data.join("uploads")).is_empty());
}

/// A qcow2 image of `raw`, made by qemu-img.
fn qcow2_of(raw: &[u8], dir: &Path) -> Vec<u8> {
    let (source, target) = (dir.join("disk.raw"), dir.join("disk.qcow2"));
    std::fs::write(&source, raw).expect("write");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .args([&source, &target])
        .status()
        .expect("qemu-img");
    assert!(status.success(), "qemu-img convert");
    std::fs::read(&target).expect("the qcow2 image")
}

#[tokio::test]
async fn an_upload_verified_but_not_stored_before_a_restart_is_stored_without_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let raw = image_bytes(3 << 20, 7);
    let image = qcow2_of(&raw, dir.path());
    let digest = sha256(&image);
    // What a node killed after every byte arrived and before it stored them leaves behind.
    std::fs::create_dir_all(data.join("uploads")).expect("mkdir");
    std::fs::write(data.join("uploads").join(format!("{UID}.part")), &image).expect("write");

    let (job, request) = (
        importer(&data, UploadOptions::default()),
        request(UID, &digest),
    );
    let stored = tokio::time::timeout(
        DEADLINE,
        job.import(&request, &mut ProgressReporter::silent()),
    )
    .await
    .expect("stored without waiting for a client")
    .expect("stored");
    assert_eq!(
        sha256(&std::fs::read(&stored.path).expect("stored")),
        sha256(&raw)
    );
    assert!(
        entries(&data.join("uploads")).is_empty(),
        "the upload goes once stored"
    );
    assert!(entries(&data.join("tmp")).is_empty());
}

#[tokio::test]
async fn an_upload_whose_import_fails_after_verification_is_kept_but_never_taken_once_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let image = image_bytes(2 << 20, 9);
    let (digest, length) = (sha256(&image), image.len() as u64);
    let importer = importer(&data, UploadOptions::default());
    // Declared qcow2, the bytes are raw: verified, then refused by the inspection.
    let mut declared_qcow2 = request(UID, &digest);
    declared_qcow2.format = ImageFormat::Qcow2;
    let first = Awaiting::start_with(Arc::clone(&importer), declared_qcow2.clone()).await;
    let sent = first.send(0, length, &image).await;
    assert_eq!(sent.expect("every byte"), Appended::Verified);
    let refused = first
        .task
        .await
        .expect("task")
        .expect_err("raw bytes declared qcow2");
    assert!(refused.to_string().contains("qcow2"), "{refused}");
    let part = data.join("uploads").join(format!("{UID}.part"));
    assert_eq!(std::fs::read(&part).expect("kept"), image, "the bytes stay");

    // Tried again, it needs no client: the same answer at once.
    let mut progress = ProgressReporter::silent();
    let again = importer.import(&declared_qcow2, &mut progress);
    let again = tokio::time::timeout(DEADLINE, again)
        .await
        .expect("the import ends");
    assert!(again.expect_err("still raw").to_string().contains("qcow2"));

    // A byte of the kept file changes: never taken for the verified bytes.
    let mut rotten = image.clone();
    rotten[4096] ^= 1;
    std::fs::write(&part, &rotten).expect("write");
    // Awaited again (it would not be, had it taken them), holding what the file has.
    let awaiting = Awaiting::start(Arc::clone(&importer), &digest).await;
    assert_eq!(awaiting.held().expect("held").bytes, length);
    assert!(entries(&data.join("images")).is_empty());
}

#[tokio::test]
async fn bytes_that_do_not_match_are_dropped_and_the_image_awaits_a_new_upload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let image = image_bytes(1 << 20, 3);
    let digest = sha256(&image);
    let awaiting = Awaiting::start(importer(&data, UploadOptions::default()), &digest).await;
    let mut wrong = image.clone();
    wrong[1000] ^= 1;
    let length = image.len() as u64;
    let refused = awaiting.send(0, length, &wrong).await;
    match refused {
        Err(UploadError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, digest);
            assert_eq!(actual, sha256(&wrong));
        }
        other => panic!("{other:?}"),
    }
    assert!(entries(&data.join("images")).is_empty());
    assert!(!awaiting.task.is_finished());
    awaiting.wait_for(0).await;
    let right = awaiting.send(0, length, &image).await;
    assert_eq!(right.expect("right bytes"), Appended::Verified);
    awaiting.stored().await;
}

#[tokio::test]
async fn appends_out_of_bounds_are_refused_and_keep_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let image = image_bytes(1 << 20, 4);
    let digest = sha256(&image);
    let options = UploadOptions {
        concurrent: 1,
        idle_timeout: Duration::from_millis(300),
        min_rate: 1,
    };
    let awaiting = Awaiting::start(importer(&data, options), &digest).await;
    let length = image.len() as u64;

    let other = awaiting
        .importer
        .uploads()
        .append(UID, &"0".repeat(64), 0, length, None, pieces(&image))
        .await;
    assert!(matches!(other, Err(UploadError::OtherDigest)), "{other:?}");
    let elsewhere = awaiting
        .importer
        .uploads()
        .held("1b6a2c1e-57d4-4c7e-9a55-8f3d2b1c0e9a", &digest);
    assert!(
        matches!(elsewhere, Err(UploadError::NotAwaited)),
        "{elsewhere:?}"
    );
    let huge = awaiting.append(0, 2 << 30, pieces(&image)).await;
    assert!(
        matches!(huge, Err(UploadError::TooLarge { .. })),
        "{huge:?}"
    );
    let announced_too_much = awaiting.send(0, 1000, &image[..1001]).await;
    assert!(
        matches!(
            announced_too_much,
            Err(UploadError::TooLong { length: 1000 })
        ),
        "{announced_too_much:?}"
    );
    // A body longer than declared, without saying so: refused when it passes the length, and
    // nothing of it stays.
    let unannounced = awaiting.append(0, 1000, pieces(&image[..4000])).await;
    assert!(
        matches!(unannounced, Err(UploadError::TooLong { length: 1000 })),
        "{unannounced:?}"
    );
    assert_eq!(awaiting.held().expect("held").bytes, 0);

    // A client that goes silent is cut off; what it sent stays for it to continue.
    let silent =
        stream::iter(vec![Ok(Bytes::copy_from_slice(&image[..1000]))]).chain(stream::pending());
    let idle = awaiting.append(0, length, Box::pin(silent)).await;
    assert!(
        matches!(idle, Err(UploadError::Idle { held: 1000, .. })),
        "{idle:?}"
    );
    // One request per upload, and one upload at a time on this node.
    let slow =
        stream::iter(vec![Ok(Bytes::copy_from_slice(&image[1000..2000]))]).chain(stream::pending());
    let (first, second) = tokio::join!(awaiting.append(1000, length, Box::pin(slow)), async {
        awaiting.wait_for(2000).await;
        awaiting.append(2000, length, pieces(&image[2000..])).await
    });
    assert!(matches!(first, Err(UploadError::Idle { .. })), "{first:?}");
    assert!(matches!(second, Err(UploadError::Busy(1))), "{second:?}");
    assert!(entries(&data.join("images")).is_empty());
    let rest = awaiting.send(2000, length, &image[2000..]).await;
    assert_eq!(rest.expect("the rest"), Appended::Verified);
    awaiting.stored().await;
}

#[tokio::test]
async fn a_trickle_is_cut_off_and_what_it_brought_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let image = image_bytes(1 << 20, 5);
    let digest = sha256(&image);
    let options = UploadOptions {
        concurrent: 1,
        idle_timeout: Duration::from_millis(300),
        min_rate: 10 << 20,
    };
    let awaiting = Awaiting::start(importer(&data, options), &digest).await;
    let length = image.len() as u64;
    let bytes = image.clone();
    let trickle = stream::iter(0..1000usize).then(move |i| {
        let chunk = Bytes::copy_from_slice(&bytes[i * 100..(i + 1) * 100]);
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, std::io::Error>(chunk)
        }
    });
    let cut = awaiting.append(0, length, Box::pin(trickle)).await;
    let held = match cut {
        Err(UploadError::TooSlow { held, min_rate, .. }) => {
            assert_eq!(min_rate, 10 << 20);
            held
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(held % 100, 0, "whole chunks: {held}");
    assert_eq!(awaiting.held().expect("held").bytes, held);
    let rest = awaiting.send(held, length, &image[held as usize..]).await;
    assert_eq!(rest.expect("the rest"), Appended::Verified);
    awaiting.stored().await;
}

/// A node's upload endpoint on loopback, over TLS with its own certificate.
struct Https {
    address: std::net::SocketAddr,
    fingerprint: String,
}

impl Https {
    async fn start(importer: &Arc<Importer>) -> Self {
        let identity = NodeIdentity::generate("n1", &[[127, 0, 0, 1].into()]).expect("identity");
        let fingerprint = identity.fingerprint().to_owned();
        let keys = Arc::new(Keys::default());
        keys.set(key());
        let config = EndpointConfig {
            address: "127.0.0.1:0".parse().expect("address"),
            identity: Arc::new(identity),
            keys,
        };
        let address = endpoint::start(&config, Arc::clone(importer))
            .await
            .expect("the endpoint starts");
        Self {
            address,
            fingerprint,
        }
    }

    fn url(&self, uid: &str) -> String {
        format!("https://{}{}", self.address, endpoint::path(uid))
    }

    fn image_url(&self, sha256: &str) -> String {
        format!(
            "https://{}{}",
            self.address,
            discus::images::peers::path(sha256)
        )
    }

    /// A client that accepts only the certificate with `fingerprint`.
    fn client(fingerprint: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .use_preconfigured_tls(pinned_client(fingerprint).expect("pinned"))
            .build()
            .expect("client")
    }

    async fn patch(
        &self,
        token: Option<&str>,
        offset: u64,
        length: u64,
        bytes: &[u8],
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let mut request = Self::client(&self.fingerprint)
            .patch(self.url(UID))
            .header("Upload-Offset", offset)
            .header("Upload-Length", length)
            .body(bytes.to_vec());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("an answer");
        let status = response.status();
        let body = response.bytes().await.expect("a body");
        (
            status,
            serde_json::from_slice(&body).expect("a JSON answer"),
        )
    }
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32]).expect("key")
}

fn token(uid: &str, sha256: &str, at: std::time::SystemTime) -> String {
    minted(uid, sha256, "lab", Audience::Upload, at)
}

fn minted(
    uid: &str,
    sha256: &str,
    namespace: &str,
    audience: Audience,
    at: std::time::SystemTime,
) -> String {
    use secrecy::ExposeSecret;
    let scope = Scope {
        uid: uid.into(),
        sha256: sha256.into(),
        namespace: namespace.into(),
        name: "installer".into(),
    };
    key()
        .mint(&scope, audience, at)
        .expect("mint")
        .text
        .expose_secret()
        .to_owned()
}

#[tokio::test]
async fn an_upload_over_https_with_a_token_resumes_and_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image_bytes(2 << 20, 6);
    let digest = sha256(&image);
    let importer = importer(&dir.path().join("data"), UploadOptions::default());
    let https = Https::start(&importer).await;
    let awaiting = Awaiting::start(Arc::clone(&importer), &digest).await;
    let token = token(UID, &digest, std::time::SystemTime::now());
    let length = image.len() as u64;

    let (status, body) = https
        .patch(Some(&token), 0, length, &image[..1 << 20])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["bytes"], 1 << 20);
    // Where it stands, as a client that lost its connection asks.
    let head = Https::client(&https.fingerprint)
        .head(https.url(UID))
        .bearer_auth(&token)
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["upload-offset"], "1048576");
    assert_eq!(head.headers()["upload-length"], length.to_string().as_str());
    let (status, body) = https
        .patch(Some(&token), 1 << 20, length, &image[1 << 20..])
        .await;
    assert_eq!(status, 201, "{body}");
    let stored = awaiting.stored().await;
    assert_eq!(
        sha256(&std::fs::read(&stored.path).expect("stored")),
        digest
    );
}

#[tokio::test]
async fn https_refuses_without_a_valid_token_for_the_image_and_keeps_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let image = image_bytes(1 << 20, 7);
    let digest = sha256(&image);
    let importer = importer(&data, UploadOptions::default());
    let https = Https::start(&importer).await;
    let awaiting = Awaiting::start(Arc::clone(&importer), &digest).await;
    let length = image.len() as u64;
    let now = std::time::SystemTime::now();

    let (status, body) = https.patch(None, 0, length, &image).await;
    assert_eq!(status, 401, "{body}");
    let expired = token(UID, &digest, now - LIFETIME - Duration::from_secs(120));
    let (status, body) = https.patch(Some(&expired), 0, length, &image).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{body}"
    );
    let other_image = token("1b6a2c1e-57d4-4c7e-9a55-8f3d2b1c0e9a", &digest, now);
    let (status, body) = https.patch(Some(&other_image), 0, length, &image).await;
    assert_eq!(status, 403, "{body}");
    let forged = {
        use secrecy::ExposeSecret;
        let scope = Scope {
            uid: UID.into(),
            sha256: digest.clone(),
            namespace: "lab".into(),
            name: "installer".into(),
        };
        let other_key = SigningKey::from_bytes(&[8; 32]).expect("key");
        other_key
            .mint(&scope, Audience::Upload, now)
            .expect("mint")
            .text
            .expose_secret()
            .to_owned()
    };
    let (status, body) = https.patch(Some(&forged), 0, length, &image).await;
    assert_eq!(status, 401, "{body}");

    let good = token(UID, &digest, now);
    let (status, body) = https.patch(Some(&good), 0, 1000, &image[..2000]).await;
    assert_eq!(status, 413, "a body longer than declared: {body}");
    let mut wrong = image.clone();
    wrong[7] ^= 0x40;
    let (status, body) = https.patch(Some(&good), 0, length, &wrong).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.sha256"),
        "{body}"
    );
    // A client that pins another certificate never sends a byte.
    let impostor = Https::client(&"ab".repeat(32))
        .patch(https.url(UID))
        .bearer_auth(&good)
        .header("Upload-Offset", 0)
        .header("Upload-Length", length)
        .body(image.clone())
        .send()
        .await;
    assert!(impostor.is_err(), "{impostor:?}");
    assert!(entries(&data.join("images")).is_empty());
    awaiting.wait_for(0).await;
    assert!(!awaiting.task.is_finished());
}

#[tokio::test]
async fn a_request_in_flight_ends_when_its_image_is_no_longer_awaited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image_bytes(1 << 20, 8);
    let digest = sha256(&image);
    let awaiting = Awaiting::start(
        importer(&dir.path().join("data"), UploadOptions::default()),
        &digest,
    )
    .await;
    let length = image.len() as u64;
    let slow =
        stream::iter(vec![Ok(Bytes::copy_from_slice(&image[..1000]))]).chain(stream::pending());
    let (appended, ()) = tokio::join!(awaiting.append(0, length, Box::pin(slow)), async {
        awaiting.wait_for(1000).await;
        // The DiscImage is gone: the agent ends the import that awaited it.
        awaiting.task.abort();
    });
    assert!(
        matches!(appended, Err(UploadError::NotAwaited)),
        "{appended:?}"
    );
}

/// A node whose disk cannot hold the upload: refused before a byte is written, nothing kept.
/// The store is on a small tmpfs in a host of its own, reached through that host's root.
#[tokio::test]
async fn an_upload_the_disk_cannot_hold_is_refused_and_keeps_nothing() {
    let sandbox = support::sandbox::Sandbox::new();
    let small = sandbox.scratch("small");
    let shown = small.display().to_string();
    sandbox.must(&["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", &shown]);
    let data = std::path::PathBuf::from(format!("/proc/{}/root{shown}/data", sandbox.pid()));
    let image = image_bytes(4 << 20, 9);
    let digest = sha256(&image);
    let awaiting = Awaiting::start(importer(&data, UploadOptions::default()), &digest).await;
    let refused = awaiting.send(0, image.len() as u64, &image).await;
    match refused {
        Err(UploadError::Space(error)) => {
            assert!(
                error.to_string().contains("not enough free space"),
                "{error}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(awaiting.held().expect("held"), Held::default());
    assert!(entries(&data.join("images")).is_empty());
    let part = data.join("uploads").join(format!("{UID}.part"));
    assert_eq!(std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0), 0);
}

/// What a node that needs the image asks for: it from the node `copy` says holds it.
fn from_peer(sha256: &str, copy: PeerCopy) -> ImportRequest {
    ImportRequest {
        source: Source::Peer(PeerSource {
            uid: UID.into(),
            name: "installer".into(),
            copies: vec![copy],
        }),
        ..request(UID, sha256)
    }
}

/// Node A receives an upload and stores it; node B, with the agents' key, fetches it from A as
/// A's status entry would say (its URL, certificate and served digest). A wrong certificate, a
/// served digest the bytes do not have, or no key: B stores nothing. A answers only a peer
/// token for that digest and the namespace that uploaded it, serves ranges (a dropped transfer
/// resumes), and serves nothing it has not hashed since its start.
#[tokio::test]
async fn another_node_fetches_a_verified_upload_from_the_node_that_holds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = image_bytes(3 << 20, 11);
    let digest = sha256(&image);
    let holder = importer(&dir.path().join("a"), UploadOptions::default());
    let https = Https::start(&holder).await;
    let awaiting = Awaiting::start(Arc::clone(&holder), &digest).await;
    let appended = awaiting.send(0, image.len() as u64, &image).await;
    assert_eq!(appended.expect("the upload"), Appended::Verified);
    let held = awaiting.stored().await;
    // What a pass of the holder's agent does once the image is Ready there.
    let offer = [(digest.clone(), "lab".to_owned())];
    holder
        .peer_offers()
        .replace(offer.iter().cloned().collect());
    let copy = PeerCopy {
        node: "a".into(),
        urls: vec![https.image_url(&digest).parse().expect("url")],
        certificate_sha256: https.fingerprint.clone(),
        served_sha256: held.served_sha256.clone(),
        format: Format::from_name(&held.format).expect("a format"),
    };
    let keys = Arc::new(Keys::default());
    keys.set(key());
    let b_data = dir.path().join("b");
    let fetcher = node(&b_data, UploadOptions::default(), Some(Arc::clone(&keys)));
    let import = async |importer: &Importer, request: ImportRequest| {
        importer
            .import(&request, &mut ProgressReporter::silent())
            .await
    };

    let impostor = PeerCopy {
        certificate_sha256: "ab".repeat(32),
        ..copy.clone()
    };
    let refused = import(&fetcher, from_peer(&digest, impostor)).await;
    assert!(
        matches!(refused, Err(ImportError::Peer(PeerError::Fetch { .. }))),
        "{refused:?}"
    );
    // A holder that says the bytes are other than they are; one that says a raw image is
    // served as other bytes than it came as.
    for format in [Format::Qcow2, Format::Raw] {
        let liar = PeerCopy {
            served_sha256: "cd".repeat(32),
            format,
            ..copy.clone()
        };
        let refused = import(&fetcher, from_peer(&digest, liar)).await;
        assert!(
            matches!(refused, Err(ImportError::Peer(PeerError::Digest { .. }))),
            "{refused:?}"
        );
    }
    let keyless = node(&dir.path().join("c"), UploadOptions::default(), None);
    let refused = import(&keyless, from_peer(&digest, copy.clone())).await;
    assert!(
        matches!(refused, Err(ImportError::Peer(PeerError::NoKey))),
        "{refused:?}"
    );
    assert!(entries(&b_data.join("images")).is_empty());
    assert!(entries(&b_data.join("tmp")).is_empty());

    let stored = import(&fetcher, from_peer(&digest, copy.clone()))
        .await
        .expect("fetched from the holder");
    assert_eq!(
        sha256(&std::fs::read(&stored.path).expect("stored")),
        digest
    );
    assert_eq!(
        (stored.sha256.as_str(), stored.format.as_str()),
        (digest.as_str(), "raw")
    );
    // Stored for the namespace whose upload proved the bytes, as on the holder.
    let lab = Requester::Namespace("lab".into());
    assert!(
        fetcher
            .store()
            .lookup(&digest, &lab)
            .expect("lookup")
            .is_some()
    );

    // What the holder answers, and to whom.
    let get = |token: Option<String>, sha256: &str, range: Option<&str>| {
        let mut request = Https::client(&https.fingerprint).get(https.image_url(sha256));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(range) = range {
            request = request.header("Range", range);
        }
        request.send()
    };
    let now = std::time::SystemTime::now();
    let peer = |sha256: &str, namespace: &str| minted(UID, sha256, namespace, Audience::Peer, now);
    let status =
        |response: reqwest::Result<reqwest::Response>| response.expect("an answer").status();
    assert_eq!(status(get(None, &digest, None).await), 401);
    let upload_token = minted(UID, &digest, "lab", Audience::Upload, now);
    assert_eq!(status(get(Some(upload_token), &digest, None).await), 401);
    let other_digest = "ef".repeat(32);
    assert_eq!(
        status(get(Some(peer(&other_digest, "lab")), &digest, None).await),
        403
    );
    assert_eq!(
        status(get(Some(peer(&other_digest, "lab")), &other_digest, None).await),
        404
    );
    assert_eq!(
        status(get(Some(peer(&digest, "elsewhere")), &digest, None).await),
        404
    );
    // Stored, but not offered (not an uploaded image, or not read since the start).
    holder.peer_offers().replace(Default::default());
    assert_eq!(
        status(get(Some(peer(&digest, "lab")), &digest, None).await),
        503
    );
    holder
        .peer_offers()
        .replace(offer.iter().cloned().collect());
    let resumed = get(Some(peer(&digest, "lab")), &digest, Some("bytes=1048576-"))
        .await
        .expect("a range");
    assert_eq!(resumed.status(), 206);
    assert_eq!(
        resumed.headers()["content-range"],
        format!("bytes 1048576-{}/{}", image.len() - 1, image.len()).as_str()
    );
    assert_eq!(
        &resumed.bytes().await.expect("the rest")[..],
        &image[1 << 20..]
    );

    // The holder started again: it offers its copy to no peer before a pass says so.
    drop(https);
    let restarted = importer(&dir.path().join("a"), UploadOptions::default());
    let https = Https::start(&restarted).await;
    let answer = Https::client(&https.fingerprint)
        .get(https.image_url(&digest))
        .bearer_auth(peer(&digest, "lab"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(answer.status(), 503);
}
