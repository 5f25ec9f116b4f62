//! The pass around a panic: shared state is held in locks that cannot be poisoned, so a panic
//! anywhere while the node's facts are held never makes a pass see an empty node — which would
//! place nothing here and tear down every target a `nodeSelector` placed. The backend is a table
//! in memory (the planners are tested on their own; this is about the pass), the images go
//! through the real store.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use sha2::Digest;

use super::*;
use crate::backend::{Backend, BackendError, Capabilities, Operation, Plan, Session};
use crate::boot::{BootTables, Refusal};
use crate::desired::{NodeFacts, Settings, TargetConfig};
use crate::images::manager::ImageManager;
use crate::images::{FetchOptions, Importer, ImporterConfig};
use crate::metrics::Metrics;

/// Targets by IQN, and every removal ever applied.
#[derive(Default)]
struct Table {
    targets: parking_lot::Mutex<BTreeMap<String, TargetConfig>>,
    removed: parking_lot::Mutex<Vec<String>>,
    /// A boot table and a card to ask it about while each operation is applied.
    boot_probe: Option<(BootTables, &'static str)>,
    /// What the boot table answered for the card during each operation: whether it booted.
    booted_during_apply: parking_lot::Mutex<Vec<bool>>,
    /// Initiators logged in (to any target whose ACL names them), and from where.
    logged_in: parking_lot::Mutex<Vec<(String, String)>>,
    /// Whether every reading fails.
    unreadable: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
enum TableOp {
    Put(TargetConfig),
    Remove(String),
}

impl std::fmt::Display for TableOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Put(target) => write!(f, "put {}", target.iqn),
            Self::Remove(iqn) => write!(f, "remove {iqn}"),
        }
    }
}

impl Operation for TableOp {
    fn target(&self) -> Option<&str> {
        Some(match self {
            Self::Put(target) => &target.iqn,
            Self::Remove(iqn) => iqn,
        })
    }
    fn initiator(&self) -> Option<&str> {
        None
    }
    fn revokes(&self) -> bool {
        matches!(self, Self::Remove(_))
    }
}

impl Backend for Table {
    type Observed = BTreeMap<String, TargetConfig>;
    type Op = TableOp;

    fn name(&self) -> &'static str {
        "table"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities { cdrom: false }
    }
    fn device_lun(&self, lun: u32) -> u32 {
        lun
    }
    async fn observe(&self) -> Result<Self::Observed, BackendError> {
        if self.unreadable.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(BackendError::Unreachable("unreadable".into()));
        }
        Ok(self.targets.lock().clone())
    }
    fn keep_undeclared(&self, _: &mut Self::Observed, _: &[TargetConfig]) {}
    fn plan(&self, desired: &[TargetConfig], observed: &Self::Observed) -> Plan<TableOp> {
        let mut plan = Plan::default();
        for target in desired {
            if observed.get(&target.iqn) != Some(target) {
                plan.ops.push(TableOp::Put(target.clone()));
            }
        }
        for iqn in observed.keys() {
            if !desired.iter().any(|t| &t.iqn == iqn) {
                plan.ops.push(TableOp::Remove(iqn.clone()));
            }
        }
        plan
    }
    async fn apply(&self, op: &TableOp) -> Result<(), BackendError> {
        if let Some((tables, mac)) = &self.boot_probe {
            let loopback = std::net::Ipv4Addr::LOCALHOST.into();
            let booted = (tables.script(mac, loopback, loopback, Timestamp::now())).is_ok();
            self.booted_during_apply.lock().push(booted);
        }
        match op {
            TableOp::Put(target) => {
                self.targets
                    .lock()
                    .insert(target.iqn.clone(), target.clone());
            }
            TableOp::Remove(iqn) => {
                self.targets.lock().remove(iqn);
                self.removed.lock().push(iqn.clone());
            }
        }
        Ok(())
    }
    fn backing_files(&self, observed: &Self::Observed) -> Vec<PathBuf> {
        (observed.values())
            .flat_map(|t| &t.luns)
            .map(|lun| lun.backing.path().to_owned())
            .collect()
    }
    fn sessions(&self, observed: &Self::Observed) -> Vec<Session> {
        let logged_in = self.logged_in.lock();
        (observed.values())
            .flat_map(|t| t.acls.iter().map(move |acl| (t, acl)))
            .flat_map(|(t, acl)| {
                (logged_in.iter())
                    .filter(|(initiator, _)| *initiator == acl.initiator)
                    .map(|(initiator, address)| Session {
                        target: t.iqn.clone(),
                        initiator: initiator.clone(),
                        address: Some(address.clone()),
                    })
            })
            .collect()
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("discus-sync-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A raw disc under `dir`, and a target that `nodeSelector` places on storage nodes.
fn resources(dir: &std::path::Path) -> Resources {
    let disc = dir.join("disc.raw");
    let bytes = vec![7u8; 1 << 20];
    std::fs::write(&disc, &bytes).expect("disc");
    let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    let image = serde_json::json!({
        "apiVersion": "discus.dev/v1alpha1",
        "kind": "DiscImage",
        "metadata": {"name": "disc", "namespace": "lab"},
        "spec": {"source": {"file": {"path": disc}}, "sha256": sha256, "format": "raw"},
    });
    Resources {
        images: vec![serde_json::from_value(image).expect("DiscImage")],
        targets: vec![boot_target()],
        ..Resources::default()
    }
}

/// A target on the storage nodes with the image `disc` as LUN 0.
fn boot_target() -> crate::api::IscsiTarget {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "discus.dev/v1alpha1",
        "kind": "IscsiTarget",
        "metadata": {"name": "boot", "namespace": "lab"},
        "spec": {
            "luns": [{"lun": 0, "image": "disc"}],
            "authentication": "none",
            "nodeSelector": {"matchLabels": {"discus.dev/storage": "true"}},
        },
    }))
    .expect("IscsiTarget")
}

fn storage_node() -> NodeFacts {
    NodeFacts {
        name: "node-a".into(),
        labels: [("discus.dev/storage".to_owned(), "true".to_owned())].into(),
        addresses: vec![std::net::Ipv4Addr::LOCALHOST.into()],
        own_networks: Vec::new(),
    }
}

/// A syncer over a `Table`, with the real image store under `dir`.
fn syncer_over(dir: &std::path::Path, backend: Table) -> Syncer<Table> {
    let importer = Importer::new(ImporterConfig {
        upload: Default::default(),
        data_dir: dir.join("data"),
        file_roots: vec![dir.to_owned()],
        fetch: FetchOptions::default(),
        qemu: crate::images::qemu::QemuImg::default(),
        peer_keys: None,
    })
    .expect("store");
    let metrics = Arc::new(Metrics::new());
    let images = ImageManager::new(Arc::new(importer), Arc::clone(&metrics), Default::default());
    let settings = Settings {
        writable_dir: dir.join("writable"),
        ..Settings::default()
    };
    Syncer::new(backend, images, storage_node(), settings, 1 << 30, metrics)
}

/// Passes until the target is served (its image imported), or fails after a minute.
async fn serve_until_served(syncer: &Syncer<Table>, resources: &Resources) -> NodeReport {
    let finished = syncer.images().finished();
    let mut report = syncer.sync(resources, Timestamp::now(), Pass::Full).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while report.desired.targets.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "not served: {:?}",
            report.problems
        );
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), finished.notified()).await;
        report = syncer.sync(resources, Timestamp::now(), Pass::Full).await;
    }
    report
}

#[tokio::test]
async fn a_panic_while_the_node_s_facts_are_held_never_tears_a_target_down() {
    let dir = scratch("poison");
    let syncer = Arc::new(syncer_over(&dir, Table::default()));
    let resources = resources(&dir);

    // The first pass starts the import; once it is stored, the target is served.
    let report = serve_until_served(&syncer, &resources).await;
    let iqn = report.desired.targets[0].iqn.clone();
    assert!(syncer.backend().targets.lock().contains_key(&iqn));

    // A bug panics while it holds the node's facts (say, in the middle of updating them).
    let held = Arc::clone(&syncer);
    let panicked = std::thread::spawn(move || {
        let _facts = held.node.lock();
        panic!("a bug while the node's facts are held");
    })
    .join();
    assert!(
        panicked.is_err(),
        "the thread panicked while holding the lock"
    );

    // Every pass after it sees the node as it is, and removes nothing.
    for pass in [Pass::Full, Pass::Changes, Pass::Full] {
        let report = syncer.sync(&resources, Timestamp::now(), pass).await;
        assert_eq!(syncer.node_facts(), storage_node());
        assert!(
            report
                .served_target(&ObjectKey::new("lab", "boot"))
                .is_some()
        );
    }
    assert!(syncer.backend().targets.lock().contains_key(&iqn));
    assert_eq!(*syncer.backend().removed.lock(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A boot grant is in the boot table once its ACL is applied, with the portals other nodes
/// report; it leaves the table before the target loses the ACL.
#[tokio::test]
async fn a_boot_grant_boots_once_applied_and_stops_before_its_acl_goes() {
    const MAC: &str = "52:54:00:00:00:01";
    let dir = scratch("boot");
    let tables = BootTables::default();
    let backend = Table {
        boot_probe: Some((tables.clone(), MAC)),
        ..Table::default()
    };
    let syncer = syncer_over(&dir, backend).with_boot(tables.clone());
    let mut resources = resources(&dir);
    let grant = serde_json::json!({
        "apiVersion": "discus.dev/v1alpha1",
        "kind": "InitiatorAccess",
        "metadata": {"name": "pxe-1", "namespace": "lab"},
        "spec": {
            "targetRef": {"name": "boot"},
            "initiatorIqn": "iqn.2010-04.org.ipxe:pxe-1",
            "expiresAt": "2099-01-01T00:00:00Z",
            "boot": {"macAddresses": [MAC], "sourceCidrs": ["127.0.0.0/8"]},
        },
        "status": {"nodes": [
            {"node": "node-b", "applied": true, "connection": {"iqn": "iqn.2026-11.dev.discus:lab.boot",
             "portals": ["10.0.0.12:3260", "0.0.0.0:3260", "not-a-portal"]}},
            // Not applied there, or applied for another target: no path to this one.
            {"node": "node-c", "applied": false, "connection": {"iqn": "iqn.2026-11.dev.discus:lab.boot",
             "portals": ["10.0.0.13:3260"]}},
            {"node": "node-d", "applied": true, "connection": {"iqn": "iqn.2026-11.dev.discus:lab.other",
             "portals": ["10.0.0.14:3260"]}},
        ]},
    });
    resources.grants = vec![serde_json::from_value(grant).expect("InitiatorAccess")];
    let report = serve_until_served(&syncer, &resources).await;
    assert_eq!(report.problems, []);

    let loopback = std::net::Ipv4Addr::LOCALHOST.into();
    let now = Timestamp::now();
    let (entry, _) = tables.script(MAC, loopback, loopback, now).expect("boots");
    assert_eq!(entry.initiator, "iqn.2010-04.org.ipxe:pxe-1");
    let portals: Vec<String> = entry.portals.iter().map(ToString::to_string).collect();
    assert_eq!(portals, ["127.0.0.1:3260", "10.0.0.12:3260"]);
    let refused = |mac: &str, source: [u8; 4], now: Timestamp| {
        tables.script(mac, source.into(), loopback, now).err()
    };
    assert_eq!(
        refused("52:54:00:00:00:02", [127, 0, 0, 1], now),
        Some(Refusal::UnknownMac)
    );
    assert_eq!(refused("", [127, 0, 0, 1], now), Some(Refusal::NoMac));
    assert_eq!(refused("52:54", [127, 0, 0, 1], now), Some(Refusal::NoMac));
    assert_eq!(
        refused(MAC, [10, 1, 1, 1], now),
        Some(Refusal::SourceNotAllowed)
    );
    let later: Timestamp = "2099-01-01T00:00:00Z".parse().expect("time");
    assert_eq!(refused(MAC, [127, 0, 0, 1], later), Some(Refusal::Expired));

    // The grant goes: the pass that takes its ACL away finds it out of the boot table already.
    resources.grants.clear();
    syncer.backend().booted_during_apply.lock().clear();
    syncer.sync(&resources, Timestamp::now(), Pass::Full).await;
    assert_eq!(*syncer.backend().booted_during_apply.lock(), [false]);
    assert_eq!(refused(MAC, [127, 0, 0, 1], now), Some(Refusal::UnknownMac));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A session is told begun and ended once each, with its grant (and UID); one that began since
/// the last pass and is ended by the pass that revokes its grant is told too; a backend that
/// cannot be read ends no session.
#[tokio::test]
async fn sessions_are_told_once_with_their_grant_and_never_on_an_unread_backend() {
    const CLIENT: &str = "iqn.2026-11.dev.discus:client";
    let dir = scratch("sessions");
    let syncer = syncer_over(&dir, Table::default());
    let mut news = syncer.session_news();
    let mut resources = resources(&dir);
    let grant = serde_json::json!({
        "apiVersion": "discus.dev/v1alpha1",
        "kind": "InitiatorAccess",
        "metadata": {"name": "client", "namespace": "lab", "uid": "uid-client"},
        "spec": {"targetRef": {"name": "boot"}, "initiatorIqn": CLIENT},
    });
    resources.grants = vec![serde_json::from_value(grant).expect("InitiatorAccess")];
    serve_until_served(&syncer, &resources).await;
    let mut told = || {
        let mut all = Vec::new();
        while let Ok(change) = news.try_recv() {
            all.push((change.ended_after.is_some(), change.grant));
        }
        all
    };
    let by_client = Some(GrantRef {
        key: ObjectKey::new("lab", "client"),
        uid: Some("uid-client".into()),
    });

    // Logs in; the next pass tells it once; an unreadable backend tells nothing and keeps it.
    let from = "10.0.0.9".to_owned();
    syncer
        .backend()
        .logged_in
        .lock()
        .push((CLIENT.into(), from.clone()));
    syncer.sync(&resources, Timestamp::now(), Pass::Full).await;
    assert_eq!(told(), [(false, by_client.clone())]);
    let since = syncer
        .sync(&resources, Timestamp::now(), Pass::Full)
        .await
        .session_since;
    assert_eq!(since.len(), 1);
    syncer
        .backend()
        .unreadable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let unread = syncer.sync(&resources, Timestamp::now(), Pass::Full).await;
    assert_eq!(told(), []);
    assert_eq!(
        unread.session_since, since,
        "a failed reading ends no session"
    );
    assert_eq!(unread.sessions.len(), 1);
    syncer
        .backend()
        .unreadable
        .store(false, std::sync::atomic::Ordering::SeqCst);
    syncer.sync(&resources, Timestamp::now(), Pass::Full).await;
    assert_eq!(told(), []);

    // Out and in again between two passes; then the grant goes: the pass that revokes it reads
    // the session first, so it is told begun and ended, with the grant that admitted it.
    syncer.backend().logged_in.lock().clear();
    syncer.sync(&resources, Timestamp::now(), Pass::Full).await;
    assert_eq!(told(), [(true, by_client.clone())]);
    syncer
        .backend()
        .logged_in
        .lock()
        .push((CLIENT.into(), from));
    resources.grants.clear();
    syncer.sync(&resources, Timestamp::now(), Pass::Full).await;
    assert_eq!(told(), [(false, by_client.clone()), (true, by_client)]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An uploaded image: a target needs it, its bytes come from a client.
fn uploaded(uid: &str) -> Resources {
    let image = serde_json::json!({
        "apiVersion": "discus.dev/v1alpha1",
        "kind": "DiscImage",
        "metadata": {"name": "disc", "namespace": "lab", "uid": uid},
        "spec": {"source": {"upload": {}}, "sha256": "ab".repeat(32)},
    });
    Resources {
        images: vec![serde_json::from_value(image).expect("DiscImage")],
        targets: vec![boot_target()],
        ..Resources::default()
    }
}

#[tokio::test]
async fn an_upload_is_awaited_only_where_uploads_are_received_and_only_while_asked_for() {
    use crate::desired::Reason;
    use crate::images::Phase;
    use crate::images::manager::ImageState;
    let dir = scratch("upload");
    let uid = "0b6a2c1e-57d4-4c7e-9a55-8f3d2b1c0e9a";
    let sha256 = "ab".repeat(32);
    let resources = uploaded(uid);
    let key = ObjectKey::new("lab", "disc");

    let off = syncer_over(&dir.join("off"), Table::default());
    let report = off.sync(&resources, Timestamp::now(), Pass::Full).await;
    let problem = (report.problems.iter())
        .find(|p| p.key == key && p.reason == Reason::UploadUnavailable)
        .expect("an UploadUnavailable problem");
    assert!(
        problem.message.contains("upload endpoint is off"),
        "{problem:?}"
    );

    let receiving = Receiving {
        bound: "192.0.2.9:8443".parse().expect("address"),
        certificate_sha256: "cd".repeat(32),
    };
    let on =
        syncer_over(&dir.join("on"), Table::default()).with_uploads(UploadReception::On(receiving));
    let report = on.sync(&resources, Timestamp::now(), Pass::Full).await;
    match report.images.get(&key) {
        Some(ImageState::InProgress(progress)) => {
            assert!(matches!(progress.phase, Phase::Pending | Phase::Uploading));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        report.upload.as_ref().map(|u| u.urls.clone()),
        Some(vec!["https://192.0.2.9:8443".to_owned()])
    );
    let uploads = on.images().importer().uploads();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while uploads.held(uid, &sha256).is_err() {
        assert!(std::time::Instant::now() < deadline, "never awaited");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The DiscImage is gone: nothing is received for it any more.
    on.sync(&Resources::default(), Timestamp::now(), Pass::Full)
        .await;
    while uploads.held(uid, &sha256).is_ok() {
        assert!(std::time::Instant::now() < deadline, "still awaited");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend read whole (tgt) still tells status which targets a change left as they were: the
/// ones declared the same, not planned for, with the same sessions. A full pass says nothing.
#[tokio::test]
async fn a_change_on_a_backend_read_whole_touches_only_what_it_changed() {
    let dir = scratch("touched");
    let syncer = syncer_over(&dir, Table::default());
    let mut resources = resources(&dir);
    let mut other = boot_target();
    other.metadata.name = Some("other".into());
    resources.targets.push(other);
    let report = serve_until_served(&syncer, &resources).await;
    assert_eq!(report.desired.targets.len(), 2, "{:?}", report.problems);
    let iqn = |name: &str| report.desired.iqns[&ObjectKey::new("lab", name)].clone();
    let (boot, other) = (iqn("boot"), iqn("other"));
    let converged = syncer.sync(&resources, Timestamp::now(), Pass::Full).await;
    assert_eq!(converged.scope, None, "a full pass covers every target");

    // A grant on `boot`: only `boot` is touched.
    resources.grants = vec![
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discus.dev/v1alpha1",
            "kind": "InitiatorAccess",
            "metadata": {"name": "m1", "namespace": "lab"},
            "spec": {"targetRef": {"name": "boot"}, "initiatorIqn": "iqn.2026-12.dev.discus:m1"},
        }))
        .expect("InitiatorAccess"),
    ];
    let changed = syncer
        .sync(&resources, Timestamp::now(), Pass::Changes)
        .await;
    assert_eq!(changed.scope, Some([boot.clone()].into()));
    assert!(!changed.untouched_target(&ObjectKey::new("lab", "boot")));
    assert!(changed.untouched_target(&ObjectKey::new("lab", "other")));

    // Nothing declared changed, but a machine logged in to `boot`: its sessions are news.
    (syncer.backend().logged_in.lock())
        .push(("iqn.2026-12.dev.discus:m1".into(), "10.0.0.9".into()));
    let logged_in = syncer
        .sync(&resources, Timestamp::now(), Pass::Changes)
        .await;
    assert_eq!(logged_in.scope, Some([boot.clone()].into()));
    assert!(!logged_in.scope.as_ref().is_some_and(|s| s.contains(&other)));
    let quiet = syncer
        .sync(&resources, Timestamp::now(), Pass::Changes)
        .await;
    assert_eq!(quiet.scope, Some(BTreeSet::new()), "nothing new");

    // A second session of the same machine from the same address (another portal) is news too.
    (syncer.backend().logged_in.lock())
        .push(("iqn.2026-12.dev.discus:m1".into(), "10.0.0.9".into()));
    let twice = syncer
        .sync(&resources, Timestamp::now(), Pass::Changes)
        .await;
    assert_eq!(twice.scope, Some([boot].into()));
    let _ = std::fs::remove_dir_all(&dir);
}
