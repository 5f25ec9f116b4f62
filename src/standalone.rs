//! `discus serve`: one storage server without a cluster. The same resources and the same sync
//! loop as the Kubernetes agent, read from a folder of manifests; status goes to files.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use crate::api::{self, FieldErrors};
use crate::backend::Backend;
use crate::backend::lio::{self, LioBackend};
use crate::backend::tgt::{TgtBackend, TgtConfig};
use crate::desired::{NodeFacts, ObjectKey, Settings};
use crate::images::manager::ImageManager;
use crate::images::{FetchOptions, Importer, ImporterConfig};
use crate::manifests::{self, Manifest, ObjectId};
use crate::status;
use crate::sync::{NodeReport, Pass, Resources, Syncer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Lio,
    Tgt,
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub manifests: PathBuf,
    pub data_dir: PathBuf,
    pub backend: BackendChoice,
    pub node_name: String,
    pub node_labels: BTreeMap<String, String>,
    /// Where targets without portals listen.
    pub addresses: Vec<IpAddr>,
    pub file_roots: Vec<PathBuf>,
    pub allow_loopback: bool,
    pub once: bool,
    pub resync: Duration,
    pub iqn_authority: String,
    pub default_max_virtual_size: u64,
    pub tgt_control_port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Images(#[from] crate::images::ImportError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error("{0}")]
    Setup(String),
}

/// How a `--once` run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    AllReady,
    NotAllReady,
    /// Stopped by a signal; targets keep serving.
    Stopped,
}

/// The manifests of the folder: what can be served, and what is invalid with why.
#[derive(Default)]
pub struct Loaded {
    pub resources: Resources,
    pub invalid: Vec<(ObjectId, FieldErrors)>,
    pub unreadable: Vec<String>,
}

/// One document of a file: a manifest discus reads, or why it cannot.
type Decoded = Result<(ObjectId, Manifest), (ObjectId, FieldErrors)>;

/// Modification and change times, size and inode: a file whose stamp is unchanged is not read again.
type Stamp = (std::time::SystemTime, std::time::SystemTime, u64, u64);

/// What one file held, decoded, and how to tell whether it changed since.
struct ParsedFile {
    stamp: Stamp,
    documents: Result<Vec<Decoded>, String>,
}

/// Decoded manifests by file, so that a change to one file does not parse them all again.
#[derive(Default)]
pub struct ManifestCache {
    files: BTreeMap<PathBuf, ParsedFile>,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let changed = std::time::UNIX_EPOCH
        + Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec().max(0) as u32);
    Some((meta.modified().ok()?, changed, meta.len(), meta.ino()))
}

fn parse_file(file: &Path) -> ParsedFile {
    let documents = manifests::read_documents(file)
        .map_err(|e| e.to_string())
        .map(|documents| {
            documents
                .iter()
                .filter_map(|document| {
                    let id = ObjectId::of(document);
                    match manifests::decode(document) {
                        Ok(Manifest::Other) => None,
                        Ok(manifest) => Some(Ok((id, manifest))),
                        Err(errors) => Some(Err((id, errors))),
                    }
                })
                .collect()
        });
    ParsedFile {
        stamp: stamp(file).unwrap_or((std::time::UNIX_EPOCH, std::time::UNIX_EPOCH, 0, 0)),
        documents,
    }
}

/// Reads every manifest under `folder`. Nothing in it stops the others from being read.
pub fn load(folder: &Path) -> Loaded {
    load_cached(folder, &mut ManifestCache::default())
}

/// Like `load`, parsing again only the files that changed since the cache saw them.
pub fn load_cached(folder: &Path, cache: &mut ManifestCache) -> Loaded {
    let mut loaded = Loaded::default();
    let files = match manifests::collect_files(&[folder.to_owned()]) {
        Ok(files) => files,
        Err(error) => {
            loaded.unreadable.push(error.to_string());
            return loaded;
        }
    };
    cache.files.retain(|path, _| files.contains(path));
    let mut seen = BTreeSet::new();
    for file in files {
        let fresh = cache
            .files
            .get(&file)
            .is_some_and(|parsed| Some(parsed.stamp) == stamp(&file));
        if !fresh {
            cache.files.insert(file.clone(), parse_file(&file));
        }
        let Some(parsed) = cache.files.get(&file) else {
            continue;
        };
        let documents = match &parsed.documents {
            Ok(documents) => documents,
            Err(error) => {
                loaded.unreadable.push(error.clone());
                continue;
            }
        };
        for document in documents {
            let (id, manifest) = match document {
                Ok(decoded) => decoded,
                Err((id, errors)) => {
                    loaded.invalid.push((id.clone(), errors.clone()));
                    continue;
                }
            };
            if !seen.insert(id.clone()) {
                let mut errors = FieldErrors::new();
                errors.push(
                    api::FieldPath::root("metadata").child("name"),
                    format!(
                        "{id} is defined twice; the first definition is served ({})",
                        file.display()
                    ),
                );
                loaded.invalid.push((id.clone(), errors));
                continue;
            }
            let r = &mut loaded.resources;
            match manifest {
                Manifest::DiscImage(o) => r.images.push(o.clone()),
                Manifest::IscsiTarget(o) => r.targets.push(o.clone()),
                Manifest::InitiatorAccess(o) => r.grants.push(o.clone()),
                Manifest::Secret(o) => {
                    r.secrets.insert(
                        crate::desired::object_key(&o.metadata),
                        api::chap::secret_data(o),
                    );
                }
                Manifest::Other => {}
            }
        }
    }
    loaded
}

/// Runs `discus serve` until a signal (or, with `--once`, after one complete sync).
pub async fn serve(options: ServeOptions) -> Result<Outcome, ServeError> {
    let importer = Importer::new(ImporterConfig {
        data_dir: options.data_dir.clone(),
        file_roots: options.file_roots.clone(),
        fetch: FetchOptions {
            allow_loopback: options.allow_loopback,
            ..FetchOptions::default()
        },
        qemu: crate::images::qemu::QemuImg::default(),
    })?;
    let images = ImageManager::new(Arc::new(importer));
    let node = NodeFacts {
        name: options.node_name.clone(),
        labels: options.node_labels.clone(),
        addresses: options.addresses.clone(),
    };
    let settings = Settings {
        iqn_authority: options.iqn_authority.clone(),
        writable_dir: options.data_dir.join("writable"),
        ..Settings::default()
    };
    match choose_backend(options.backend) {
        BackendChoice::Lio => {
            let backend = LioBackend::new(PathBuf::from(lio::CONFIGFS))?;
            let syncer = Syncer::new(
                backend,
                images,
                node,
                settings,
                options.default_max_virtual_size,
            )
            .prefetch_all();
            run(syncer, &options).await
        }
        BackendChoice::Tgt | BackendChoice::Auto => {
            let mut config = TgtConfig::new(options.data_dir.join("tgt"));
            config.control_port = options.tgt_control_port;
            let backend = TgtBackend::start(config).await?;
            let syncer = Syncer::new(
                backend,
                images,
                node,
                settings,
                options.default_max_virtual_size,
            )
            .prefetch_all();
            run(syncer, &options).await
        }
    }
}

/// `auto`: LIO where the kernel has configfs target support, else tgt; the log says which and why.
fn choose_backend(choice: BackendChoice) -> BackendChoice {
    if choice != BackendChoice::Auto {
        return choice;
    }
    if lio::available() {
        tracing::info!(
            "backend: lio (the kernel has configfs target support at {})",
            lio::CONFIGFS
        );
        BackendChoice::Lio
    } else {
        tracing::info!(
            "backend: tgt ({} is absent: no target modules loaded, or configfs not mounted)",
            lio::CONFIGFS
        );
        BackendChoice::Tgt
    }
}

async fn run<B: Backend>(syncer: Syncer<B>, options: &ServeOptions) -> Result<Outcome, ServeError> {
    let (changes_tx, mut changes) = tokio::sync::mpsc::unbounded_channel::<()>();
    let _watcher = watch_folder(&options.manifests, changes_tx);
    let finished = syncer.images().finished();
    let status_dir = options.data_dir.join("status");
    let mut previous = read_statuses(&status_dir);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ServeError::Setup(format!("cannot handle SIGTERM: {e}")))?;
    tracing::info!(backend = syncer.backend().name(), manifests = %options.manifests.display(), "serving");
    let mut cache = ManifestCache::default();
    let mut pass = Pass::Full;
    loop {
        let loaded = load_cached(&options.manifests, &mut cache);
        for problem in &loaded.unreadable {
            tracing::warn!("{problem}");
        }
        let now = Timestamp::now();
        let started = std::time::Instant::now();
        let report = syncer.sync(&loaded.resources, now, pass).await;
        tracing::debug!(
            targets = report.desired.targets.len(),
            unsettled = report.unsettled.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sync pass done"
        );
        let written = write_statuses(&status_dir, &loaded, &report, &previous, now);
        let all_ready = written.values().all(|object| {
            object
                .pointer("/status/conditions")
                .and_then(|c| {
                    serde_json::from_value::<
                        Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
                    >(c.clone())
                    .ok()
                })
                .is_some_and(|c| status::is_ready(&c))
        }) && loaded.unreadable.is_empty();
        previous = written;
        let importing = report
            .images
            .values()
            .any(|i| matches!(i, crate::images::manager::ImageState::InProgress(_)));
        if options.once && !importing {
            return Ok(if all_ready {
                Outcome::AllReady
            } else {
                Outcome::NotAllReady
            });
        }
        // Sleep until something changes: the folder, an import, the clock of a grant, or drift
        // worth correcting.
        let expiry = report.desired.next_expiry.map(|at| {
            let wait = at.duration_since(Timestamp::now());
            Duration::try_from(wait).unwrap_or(Duration::ZERO) + Duration::from_millis(10)
        });
        let wake = expiry.map_or(options.resync, |d| d.min(options.resync));
        // A change reads only what it touches; the periodic pass reads everything, for drift.
        pass = Pass::Changes;
        tokio::select! {
            _ = changes.recv() => {
                // Let an editor finish writing before reading again.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while changes.try_recv().is_ok() {}
            }
            () = finished.notified() => {}
            () = tokio::time::sleep(wake) => {
                if expiry.is_none_or(|e| e >= options.resync) {
                    pass = Pass::Full;
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(Outcome::Stopped),
            _ = terminate.recv() => return Ok(Outcome::Stopped),
        }
    }
}

fn watch_folder(
    folder: &Path,
    changes: tokio::sync::mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = changes.send(());
        }
    })
    .map_err(|e| tracing::warn!(%e, "cannot watch the manifest folder; re-reading it periodically"))
    .ok()?;
    watcher
        .watch(folder, notify::RecursiveMode::Recursive)
        .map_err(
            |e| tracing::warn!(%e, "cannot watch the manifest folder; re-reading it periodically"),
        )
        .ok()?;
    Some(watcher)
}

/// `status/<Kind>/<namespace>/<name>.json`
fn status_path(dir: &Path, kind: &str, key: &ObjectKey) -> PathBuf {
    dir.join(kind)
        .join(&key.namespace)
        .join(format!("{}.json", key.name))
}

fn read_statuses(dir: &Path) -> BTreeMap<PathBuf, Value> {
    let mut statuses = BTreeMap::new();
    let Ok(files) = manifests::collect_files(&[dir.to_owned()]) else {
        return statuses;
    };
    for file in files {
        if let Some(value) = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            statuses.insert(file, value);
        }
    }
    statuses
}

fn document(kind: &str, key: &ObjectKey, status: Value) -> Value {
    json!({
        "apiVersion": api::API_VERSION,
        "kind": kind,
        "metadata": {"name": key.name, "namespace": key.namespace},
        "status": status,
    })
}

/// Writes every resource's status (atomically, and only when it changed) and removes the files
/// of resources that are gone. Returns what the folder now holds.
fn write_statuses(
    dir: &Path,
    loaded: &Loaded,
    report: &NodeReport,
    previous: &BTreeMap<PathBuf, Value>,
    now: Timestamp,
) -> BTreeMap<PathBuf, Value> {
    let mut current = BTreeMap::new();
    let r = &loaded.resources;
    let mut put = |kind: &str, key: ObjectKey, status: &dyn Fn(Option<&Value>) -> Value| {
        let path = status_path(dir, kind, &key);
        let value = status(previous.get(&path).and_then(|v| v.get("status")));
        current.insert(path, document(kind, &key, value));
    };
    fn previous_of<T: serde::de::DeserializeOwned>(value: Option<&Value>) -> Option<T> {
        value.and_then(|v| serde_json::from_value(v.clone()).ok())
    }
    for image in &r.images {
        put("DiscImage", status::key_of(image), &|old| {
            let entries = status::image_entry(image, report).into_iter().collect();
            json!(status::image_status(
                image,
                entries,
                report,
                previous_of(old).as_ref(),
                now
            ))
        });
    }
    for target in &r.targets {
        put("IscsiTarget", status::key_of(target), &|old| {
            let entries = status::target_entry(target, report).into_iter().collect();
            json!(status::target_status(
                target,
                entries,
                report,
                previous_of(old).as_ref(),
                now
            ))
        });
    }
    for grant in &r.grants {
        put("InitiatorAccess", status::key_of(grant), &|old| {
            let entries = status::grant_entry(grant, report).into_iter().collect();
            json!(status::grant_status(
                grant,
                entries,
                report,
                previous_of(old).as_ref(),
                now
            ))
        });
    }
    for (id, errors) in &loaded.invalid {
        if !matches!(
            id.kind.as_str(),
            "DiscImage" | "IscsiTarget" | "InitiatorAccess"
        ) {
            tracing::warn!("{id}: {errors}");
            continue;
        }
        let path = status_path(dir, &id.kind, &id.key);
        let message = errors.to_string();
        let old: Option<Value> = previous.get(&path).cloned();
        let since = old
            .as_ref()
            .and_then(|v| {
                v.pointer("/status/conditions/0/lastTransitionTime")
                    .cloned()
            })
            .filter(|_| {
                old.as_ref()
                    .and_then(|v| v.pointer("/status/conditions/0/message"))
                    == Some(&json!(message))
            })
            .unwrap_or_else(|| json!(now.to_string()));
        let condition = |kind: &str| json!({"type": kind, "status": "True", "reason": "InvalidSpec", "message": message, "lastTransitionTime": since});
        let mut ready = condition("Ready");
        ready["status"] = json!("False");
        current.insert(
            path,
            document(
                &id.kind,
                &id.key,
                json!({"conditions": [ready, condition("Stalled")]}),
            ),
        );
    }
    for (path, object) in &current {
        if previous.get(path) != Some(object) {
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| {
                    crate::fsutil::write_replace(
                        path,
                        &serde_json::to_vec_pretty(object).unwrap_or_default(),
                    )
                });
            if let Err(error) = written {
                tracing::warn!(path = %path.display(), %error, "cannot write status");
            }
        }
    }
    for path in previous.keys() {
        if !current.contains_key(path) {
            let _ = std::fs::remove_file(path);
        }
    }
    current
}

/// `discus status`: every resource's status, as a table.
pub fn status_table(data_dir: &Path) -> String {
    let statuses = read_statuses(&data_dir.join("status"));
    let mut rows = vec![
        ["RESOURCE", "READY", "REASON", "PORTALS", "SESSIONS"]
            .map(String::from)
            .to_vec(),
    ];
    for object in statuses.values() {
        let text = |pointer: &str| {
            object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let ready = object
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .cloned()
            .unwrap_or_default();
        let kind = text("/kind");
        let portals = match kind.as_str() {
            "IscsiTarget" => object.pointer("/status/portals"),
            "InitiatorAccess" => object.pointer("/status/connection/portals"),
            _ => None,
        }
        .and_then(Value::as_array)
        .map(|p| {
            p.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
        let nodes = object
            .pointer("/status/nodes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let sessions = match kind.as_str() {
            "IscsiTarget" => nodes
                .iter()
                .filter_map(|n| n["sessions"].as_i64())
                .sum::<i64>()
                .to_string(),
            "InitiatorAccess" => nodes
                .iter()
                .filter_map(|n| n["sessions"].as_array())
                .map(Vec::len)
                .sum::<usize>()
                .to_string(),
            _ => String::new(),
        };
        rows.push(vec![
            format!(
                "{kind}/{}/{}",
                text("/metadata/namespace"),
                text("/metadata/name")
            ),
            ready["status"].as_str().unwrap_or("Unknown").to_owned(),
            ready["reason"].as_str().unwrap_or("").to_owned(),
            portals,
            sessions,
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The messages of every resource that is not Ready, for `discus status` to explain.
pub fn not_ready_messages(data_dir: &Path) -> Vec<String> {
    read_statuses(&data_dir.join("status"))
        .values()
        .filter_map(|object| {
            let ready = object
                .pointer("/status/conditions")
                .and_then(Value::as_array)?
                .iter()
                .find(|c| c["type"] == "Ready")?
                .clone();
            (ready["status"] != "True").then(|| {
                format!(
                    "{}/{}/{}: {}",
                    object["kind"].as_str().unwrap_or(""),
                    object
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    object
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    ready["message"].as_str().unwrap_or("")
                )
            })
        })
        .collect()
}
