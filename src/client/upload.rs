//! `discus image upload`: a local file into the cluster, verified, resumable.
//!
//! It hashes the file (one pass), declares the DiscImage with that digest (server-side apply;
//! an existing one that names another digest or another source is refused), waits until a
//! storage node awaits the upload and the lease holder minted its token, reads the token from
//! the Secret the DiscImage owns (RBAC decides who may), and sends the bytes to the node's
//! endpoint over HTTPS — accepting only the certificate whose digest the node published in
//! status. An interrupted transfer continues from what the node holds; a run started again does
//! too. It returns once the node verified and stored the image (or `--no-wait`: once the node
//! verified the bytes). The bytes go to one node: every other node that needs the image fetches
//! it from a node that holds it (`images::peers`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{ClientError, explain};
use crate::api::DiscImage;
use crate::api::disc_image::{DiscImageNodeStatus, ImageFormat, ImagePhase, NodeEndpointStatus};
use crate::credentials::tls::pinned_client;
use crate::credentials::token::token_secret_name;
use crate::desired::ObjectKey;
use crate::upload::endpoint::{LENGTH, OFFSET};

const MANAGER: &str = "discus-image-upload";
/// How often status is read while waiting.
const POLL: Duration = Duration::from_secs(1);
/// How long failed requests are tried again without progress: more than a node waits for a
/// silent request to end (which holds the upload until then).
const RETRY_WINDOW: Duration = Duration::from_secs(180);
const CHUNK: usize = 1 << 20;

pub struct UploadRequest {
    pub file: PathBuf,
    pub key: ObjectKey,
    pub format: ImageFormat,
    /// Wait until the node stored the image, not only verified its bytes.
    pub wait: bool,
    /// How long to wait for a node, a token, and the image to be ready.
    pub timeout: Duration,
    /// Print progress to stderr.
    pub progress: bool,
}

/// What an upload did.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Uploaded {
    pub namespace: String,
    pub name: String,
    pub sha256: String,
    pub bytes: u64,
    /// The nodes that verified what this run sent: by answering, or — when they restarted
    /// before they could — by storing it. None when it was Ready on a node already and no other
    /// awaited it.
    pub nodes: Vec<String>,
    /// The furthest a request of this run started into the file: more than 0 when it resumed
    /// what a node held.
    pub resumed_from: u64,
    /// The bytes this run sent (what requests cut off had read of the file included): less
    /// than `bytes` when it resumed.
    pub sent_bytes: u64,
    pub seconds: f64,
}

/// Uploads `request.file` as the DiscImage `request.key`.
pub async fn upload(client: &Client, request: &UploadRequest) -> Result<Uploaded, ClientError> {
    let started = Instant::now();
    if request.progress {
        eprintln!("hashing {}…", request.file.display());
    }
    let (sha256, bytes) = hash_file(&request.file).await?;
    let images = Api::<DiscImage>::namespaced(client.clone(), &request.key.namespace);
    declare(&images, request, &sha256).await?;
    let mut delivery = Delivery::default();
    loop {
        deliver(client, &images, request, bytes, &mut delivery).await?;
        if !request.wait {
            break;
        }
        let deadline = Instant::now() + request.timeout;
        match wait_ready(&images, &request.key, &delivery.nodes, deadline).await? {
            // A node lost what it verified (it restarted before storing it): send it again.
            Some(again) => delivery.nodes.retain(|n| n.node != again),
            None => break,
        }
    }
    let mut nodes: Vec<String> = delivery.nodes.into_iter().map(|n| n.node).collect();
    if request.wait && nodes.is_empty() && !delivery.sent_to.is_empty() {
        // No node answered, yet one stored what it received (it restarted before answering).
        nodes = stored_on(&images, &request.key, delivery.sent_to).await;
    }
    let (resumed_from, sent_bytes) = (delivery.resumed_from, delivery.sent.load(Relaxed));
    Ok(Uploaded {
        namespace: request.key.namespace.clone(),
        name: request.key.name.clone(),
        sha256,
        bytes,
        nodes,
        resumed_from,
        sent_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What an upload delivered so far.
#[derive(Default)]
struct Delivery {
    /// The nodes that verified the bytes.
    nodes: Vec<Delivered>,
    /// The nodes a request started sending to.
    sent_to: Vec<String>,
    /// The furthest a request started into the file.
    resumed_from: u64,
    /// The bytes requests read from the file and sent.
    sent: Arc<AtomicU64>,
    /// Since when requests fail without progress.
    failing_since: Option<Instant>,
}

/// A node that verified the bytes, and the certificate it had then (a new one: it restarted).
struct Delivered {
    node: String,
    certificate_sha256: String,
}

/// Sends the file to a node that awaits it, unless a node holds it already.
async fn deliver(
    client: &Client,
    images: &Api<DiscImage>,
    request: &UploadRequest,
    bytes: u64,
    delivery: &mut Delivery,
) -> Result<(), ClientError> {
    loop {
        let deadline = Instant::now() + request.timeout;
        let done: Vec<&str> = delivery.nodes.iter().map(|n| n.node.as_str()).collect();
        let awaiting = awaiting_node(images, &request.key, &done, deadline).await?;
        let Some((entry, endpoint)) = awaiting else {
            return Ok(());
        };
        let token = read_token(client, &request.key, deadline).await?;
        let mut tally = Tally {
            started: None,
            sent: Arc::clone(&delivery.sent),
        };
        let sent = send(
            &endpoint,
            &token,
            &request.file,
            bytes,
            request.progress,
            &mut tally,
        )
        .await;
        if let Some(from) = tally.started {
            delivery.resumed_from = delivery.resumed_from.max(from);
            if !delivery.sent_to.contains(&entry.node) {
                delivery.sent_to.push(entry.node.clone());
            }
        }
        match sent {
            Ok(Sent::Verified) => {
                delivery.nodes.push(Delivered {
                    node: entry.node,
                    certificate_sha256: endpoint.certificate_sha256,
                });
                delivery.failing_since = None;
            }
            Ok(Sent::Again) => delivery.failing_since = None,
            Err(Failure::Fatal(message)) => return Err(ClientError::Refused(message)),
            Err(Failure::Transient(message)) => {
                let since = *delivery.failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= RETRY_WINDOW {
                    return Err(ClientError::Api(format!(
                        "{message}; gave up after {} s without progress",
                        RETRY_WINDOW.as_secs()
                    )));
                }
                eprintln!("{message}; trying again");
                tokio::time::sleep(POLL * 2).await;
            }
        }
    }
}

/// The file's SHA-256 and size, in one pass.
async fn hash_file(path: &Path) -> Result<(String, u64), ClientError> {
    let path = path.to_owned();
    let failed = |e: std::io::Error, path: &Path| {
        ClientError::Refused(format!("cannot read {}: {e}", path.display()))
    };
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(|e| failed(e, &path))?;
        let (hash, total) = crate::images::hash_reader(file).map_err(|e| failed(e, &path))?;
        Ok((hex::encode(hash.finalize()), total))
    })
    .await
    .map_err(|e| ClientError::Api(e.to_string()))?
}

/// Declares the DiscImage, or checks that the one there is for these bytes.
async fn declare(
    images: &Api<DiscImage>,
    request: &UploadRequest,
    sha256: &str,
) -> Result<(), ClientError> {
    let key = &request.key;
    let existing = images
        .get_opt(&key.name)
        .await
        .map_err(|e| explain(&e, "get", "DiscImage", key))?;
    if let Some(image) = existing {
        if image.spec.source.upload.is_none() {
            return Err(ClientError::Refused(format!(
                "DiscImage {key} exists and its source is not an upload; choose another name"
            )));
        }
        if image.spec.sha256 != sha256 {
            return Err(ClientError::Refused(format!(
                "DiscImage {key} exists for other bytes (spec.sha256 {}); this file's SHA-256 is \
                 {sha256}. Choose another name, or delete that DiscImage first",
                image.spec.sha256
            )));
        }
        return Ok(());
    }
    let body = json!({
        "apiVersion": "discus.dev/v1alpha1",
        "kind": "DiscImage",
        "metadata": {"name": key.name, "namespace": key.namespace},
        "spec": {"source": {"upload": {}}, "sha256": sha256, "format": request.format},
    });
    images
        .patch(&key.name, &PatchParams::apply(MANAGER), &Patch::Apply(body))
        .await
        .map_err(|e| explain(&e, "create", "DiscImage", key))?;
    Ok(())
}

/// A node that awaits the upload, and where to reach it — of those, the one that holds the most
/// of it; none once a node holds the image or this run sent it to one (`done`): the others
/// fetch it from there. An error when the wait is over.
async fn awaiting_node(
    images: &Api<DiscImage>,
    key: &ObjectKey,
    done: &[&str],
    deadline: Instant,
) -> Result<Option<(DiscImageNodeStatus, NodeEndpointStatus)>, ClientError> {
    let mut last = String::from("no storage node reported it yet");
    while Instant::now() < deadline {
        let nodes = node_entries(images, key).await?;
        if !done.is_empty() || nodes.iter().any(|n| n.phase == ImagePhase::Ready) {
            return Ok(None);
        }
        let waiting = (nodes.iter().rev())
            .filter(|n| n.upload.is_some())
            .max_by_key(|n| n.bytes_done.unwrap_or(0));
        if let Some(entry) = waiting {
            let endpoint = entry.upload.clone().unwrap_or_default();
            return Ok(Some((entry.clone(), endpoint)));
        }
        if let Some(entry) = nodes.iter().find(|n| n.message.is_some()) {
            last = format!(
                "{}: {}",
                entry.node,
                entry.message.clone().unwrap_or_default()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    Err(ClientError::Api(format!(
        "no storage node awaits the upload of DiscImage {key} ({last}); is a target placing it, \
         or its nodeSelector selecting nodes, with upload enabled on them?"
    )))
}

/// Which of `nodes` hold the image, as status has it now; none if status cannot be read.
async fn stored_on(images: &Api<DiscImage>, key: &ObjectKey, nodes: Vec<String>) -> Vec<String> {
    let entries = node_entries(images, key).await.unwrap_or_default();
    let ready =
        |node: &String| (entries.iter()).any(|e| e.node == *node && e.phase == ImagePhase::Ready);
    nodes.into_iter().filter(ready).collect()
}

/// The DiscImage's entries of every node, as status has them now.
async fn node_entries(
    images: &Api<DiscImage>,
    key: &ObjectKey,
) -> Result<Vec<DiscImageNodeStatus>, ClientError> {
    let image = images
        .get(&key.name)
        .await
        .map_err(|e| explain(&e, "get", "DiscImage", key))?;
    Ok(image.status.map(|s| s.nodes).unwrap_or_default())
}

/// The DiscImage's upload token, once the lease holder minted it.
async fn read_token(
    client: &Client,
    key: &ObjectKey,
    deadline: Instant,
) -> Result<SecretString, ClientError> {
    let secrets = Api::<Secret>::namespaced(client.clone(), &key.namespace);
    let secret_key = key.sibling(&token_secret_name(&key.name));
    while Instant::now() < deadline {
        let secret = secrets
            .get_opt(&secret_key.name)
            .await
            .map_err(|e| explain(&e, "get", "Secret", &secret_key))?;
        let token = (secret.and_then(|s| s.data))
            .and_then(|d| d.get("token").cloned())
            .and_then(|t| String::from_utf8(t.0).ok());
        if let Some(token) = token {
            return Ok(SecretString::from(token));
        }
        tokio::time::sleep(POLL).await;
    }
    Err(ClientError::Api(format!(
        "no upload token in Secret {secret_key}: the agents mint it while a node awaits the upload"
    )))
}

enum Sent {
    /// Every byte arrived and matched.
    Verified,
    /// The node wants more, from where it stands.
    Again,
}

enum Failure {
    Fatal(String),
    Transient(String),
}

/// One request of an upload, as each try of `discus image upload` sends it: what the node at
/// `endpoint` does not hold yet of `file` (`length` bytes, hashed and declared), from where it
/// stands. `Ok` once the node verified every byte; the node's word otherwise. For benchmarks.
pub async fn send_once(
    endpoint: &NodeEndpointStatus,
    token: &SecretString,
    file: &Path,
    length: u64,
) -> Result<(), String> {
    let mut tally = Tally::default();
    match send(endpoint, token, file, length, false, &mut tally).await {
        Ok(Sent::Verified) => Ok(()),
        Ok(Sent::Again) => Err("the node wants more".into()),
        Err(Failure::Fatal(message) | Failure::Transient(message)) => Err(message),
    }
}

/// What one request did, whatever its end.
#[derive(Default)]
struct Tally {
    /// From where it set out, once it did.
    started: Option<u64>,
    /// Raised by every byte it read from the file and sent.
    sent: Arc<AtomicU64>,
}

/// Sends what the node does not hold yet, from where it stands.
async fn send(
    endpoint: &NodeEndpointStatus,
    token: &SecretString,
    file: &Path,
    length: u64,
    progress: bool,
    tally: &mut Tally,
) -> Result<Sent, Failure> {
    let tls = pinned_client(&endpoint.certificate_sha256)
        .map_err(|e| Failure::Fatal(format!("the node's published certificate: {e}")))?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Failure::Fatal(e.to_string()))?;
    let (url, held) = reachable(&http, &endpoint.urls, token).await?;
    // What the node holds for another length, or more than the file has: start again from 0.
    let offset = if held.bytes <= length && held.length.is_none_or(|l| l == length) {
        held.bytes
    } else {
        0
    };
    let meter = Meter::new(offset, length, progress, Arc::clone(&tally.sent));
    let body = file_stream(file, meter)
        .await
        .map_err(|e| Failure::Fatal(format!("cannot read {}: {e}", file.display())))?;
    tally.started = Some(offset);
    let response = http
        .patch(url)
        .bearer_auth(token.expose_secret())
        .header(OFFSET, offset)
        .header(LENGTH, length)
        .header(reqwest::header::CONTENT_LENGTH, length - offset)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .map_err(|e| Failure::Transient(format!("the upload was cut: {}", innermost(&e))))?;
    let status = response.status();
    let message = answer_message(response).await;
    match status.as_u16() {
        201 => Ok(Sent::Verified),
        200 | 408 => Ok(Sent::Again),
        401 | 404 | 409 | 500 | 503 => Err(Failure::Transient(format!("the node said: {message}"))),
        _ => Err(Failure::Fatal(format!(
            "the node refused the upload: {message}"
        ))),
    }
}

/// Where an upload stands on a node.
struct NodeHeld {
    bytes: u64,
    length: Option<u64>,
}

/// The first of the node's addresses that answers, and where the upload stands there.
async fn reachable<'a>(
    http: &reqwest::Client,
    urls: &'a [String],
    token: &SecretString,
) -> Result<(&'a str, NodeHeld), Failure> {
    let mut last = Failure::Transient("the node published no upload address".into());
    for url in urls {
        match held(http, url, token).await {
            Ok(held) => return Ok((url, held)),
            Err(failure) => last = failure,
        }
    }
    Err(last)
}

/// Where the upload stands on the node at `url`.
async fn held(
    http: &reqwest::Client,
    url: &str,
    token: &SecretString,
) -> Result<NodeHeld, Failure> {
    let response = http
        .head(url)
        .bearer_auth(token.expose_secret())
        .send()
        .await
        .map_err(|e| Failure::Transient(format!("cannot reach the node: {}", innermost(&e))))?;
    if !response.status().is_success() {
        return Err(Failure::Transient(format!(
            "the node answered {} to where the upload stands",
            response.status()
        )));
    }
    let number = |name: reqwest::header::HeaderName| -> Option<u64> {
        response.headers().get(name)?.to_str().ok()?.parse().ok()
    };
    let bytes = number(OFFSET)
        .ok_or_else(|| Failure::Transient("the node did not say where the upload stands".into()))?;
    Ok(NodeHeld {
        bytes,
        length: number(LENGTH),
    })
}

async fn answer_message(response: reqwest::Response) -> String {
    let body = response.bytes().await.unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned())
}

fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut error = error;
    while let Some(source) = error.source() {
        error = source;
    }
    error.to_string()
}

/// The file from `offset`, in chunks, telling progress on stderr about once a second.
async fn file_stream(
    path: &Path,
    meter: Meter,
) -> std::io::Result<impl futures::Stream<Item = std::io::Result<Vec<u8>>> + use<>> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(meter.from)).await?;
    Ok(futures::stream::try_unfold(
        (file, meter),
        |(mut file, mut meter)| async move {
            // Never past the length hashed and declared, whatever the file does meanwhile.
            let rest = meter.length.saturating_sub(meter.done);
            let mut chunk = vec![0u8; CHUNK.min(usize::try_from(rest).unwrap_or(CHUNK))];
            let n = if chunk.is_empty() {
                0
            } else {
                file.read(&mut chunk).await?
            };
            if n == 0 {
                meter.done();
                return Ok(None);
            }
            chunk.truncate(n);
            meter.add(n as u64);
            Ok(Some((chunk, (file, meter))))
        },
    ))
}

/// Progress on stderr: bytes, rate, time left.
struct Meter {
    start: Instant,
    from: u64,
    done: u64,
    length: u64,
    last: Instant,
    on: bool,
    /// Every request's bytes, for the run's tally.
    sent: Arc<AtomicU64>,
}

impl Meter {
    fn new(from: u64, length: u64, on: bool, sent: Arc<AtomicU64>) -> Self {
        Self {
            start: Instant::now(),
            from,
            done: from,
            length,
            last: Instant::now(),
            on,
            sent,
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        self.sent.fetch_add(n, Relaxed);
        if self.on && self.last.elapsed() >= Duration::from_secs(1) {
            self.last = Instant::now();
            eprintln!("{}", self.line());
        }
    }

    fn done(&self) {
        if self.on {
            eprintln!("{}", self.line());
        }
    }

    fn line(&self) -> String {
        let seconds = self.start.elapsed().as_secs_f64().max(0.001);
        let rate = (self.done - self.from) as f64 / seconds;
        let left = self.length.saturating_sub(self.done) as f64 / rate.max(1.0);
        format!(
            "{:.1} of {:.1} MiB ({:.1} MiB/s, {:.0} s left)",
            self.done as f64 / 1048576.0,
            self.length as f64 / 1048576.0,
            rate / 1048576.0,
            left
        )
    }
}

/// Waits until every node in `nodes` stored the image; a node that awaits it again with a
/// certificate other than the one it verified the bytes under (it restarted and lost them
/// before storing them) is returned, to be sent them again.
async fn wait_ready(
    images: &Api<DiscImage>,
    key: &ObjectKey,
    nodes: &[Delivered],
    deadline: Instant,
) -> Result<Option<String>, ClientError> {
    while Instant::now() < deadline {
        let entries = node_entries(images, key).await?;
        let mut ready = 0;
        for delivered in nodes {
            let node = &delivered.node;
            match entries.iter().find(|e| e.node == *node) {
                Some(e) if e.phase == ImagePhase::Ready => ready += 1,
                Some(e) if e.phase == ImagePhase::Failed => {
                    return Err(ClientError::Api(format!(
                        "node {node} received the image but did not store it: {}",
                        e.message.clone().unwrap_or_default()
                    )));
                }
                Some(e)
                    if e.upload
                        .as_ref()
                        .is_some_and(|u| u.certificate_sha256 != delivered.certificate_sha256) =>
                {
                    return Ok(Some(node.clone()));
                }
                _ => {}
            }
        }
        if ready == nodes.len() {
            return Ok(None);
        }
        tokio::time::sleep(POLL).await;
    }
    let names: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
    Err(ClientError::Api(format!(
        "the nodes {names:?} verified the upload of DiscImage {key} but have not all reported \
         it Ready"
    )))
}
