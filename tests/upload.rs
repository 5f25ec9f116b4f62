//! Uploads into a node's real store: an import whose source is an upload awaits the bytes a
//! client appends, verifies them against the DiscImage's digest and stores them like a download;
//! what the node holds survives a restart and the upload resumes from it; every refused append
//! leaves nothing that could be served.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use discus::api::disc_image::ImageFormat;
use discus::images::upload::{Appended, Held, UploadError};
use discus::images::{
    FetchOptions, ImportError, ImportRequest, Importer, ImporterConfig, ProgressReporter,
    Requester, StoredImage, UploadOptions, qemu::QemuImg,
};

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
    Arc::new(
        Importer::new(ImporterConfig {
            data_dir: data.to_owned(),
            file_roots: Vec::new(),
            fetch: FetchOptions::default(),
            upload,
            qemu: QemuImg::default(),
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
        let (job, request) = (Arc::clone(&importer), request(UID, sha256));
        let task =
            tokio::spawn(
                async move { job.import(&request, &mut ProgressReporter::silent()).await },
            );
        let awaiting = Self {
            importer,
            task,
            sha256: sha256.to_owned(),
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
