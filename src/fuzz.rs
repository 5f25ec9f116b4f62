//! Every parser of untrusted input, as one entry point each that takes raw bytes: what the
//! coverage-guided fuzzers in `fuzz/` drive, and what `tests/fuzz_corpora.rs` replays from the
//! checked-in corpora on every CI run. None may panic, on any input; none may allocate without
//! bound (each parser bounds what it reads).
//!
//! Untrusted here means written by someone other than the node's administrator: manifests (a
//! tenant, a GitOps repository), images and HTTP answers (an image server), and what the target
//! software prints (tgtd, configfs — trusted programs, but a misread state must fail loudly, never
//! make the planner act on nonsense).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::jiff::Timestamp;

use crate::api::disc_image::ImageFormat;
use crate::desired::{self, Inputs, NodeFacts, Settings, Snapshot};
use crate::manifests::{self, Manifest};

/// A fuzz target: its name (the folder of its corpus) and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, in the order `fuzz/` lists them.
pub const TARGETS: [Target; 7] = [
    ("manifests", manifests),
    ("tgt_show", tgt_show),
    ("lio_info", lio_info),
    ("image_header", image_header),
    ("content_range", content_range),
    ("quantity", quantity),
    ("timestamp", timestamp),
];

/// Manifest text → YAML documents → typed resources → their rules → a node's desired state.
pub fn manifests(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(documents) = manifests::parse_documents(text) else {
        return;
    };
    let (mut images, mut targets, mut grants, mut secrets) =
        (Vec::new(), Vec::new(), Vec::new(), BTreeMap::new());
    for document in &documents {
        let Ok(manifest) = manifests::decode(document) else {
            continue;
        };
        let _ = manifest.spec_errors();
        match manifest {
            Manifest::DiscImage(o) => images.push(o),
            Manifest::IscsiTarget(o) => targets.push(o),
            Manifest::InitiatorAccess(o) => grants.push(o),
            Manifest::Secret(secret) => {
                let key = desired::object_key(&secret.metadata);
                secrets.insert(key, crate::api::chap::secret_data(&secret));
            }
            Manifest::Other => {}
        }
    }
    let snapshot = Snapshot::new(&images, &targets, &grants, &secrets);
    let node = NodeFacts {
        name: "fuzz".into(),
        labels: BTreeMap::from([("discus.dev/storage".into(), "true".into())]),
        addresses: vec![std::net::Ipv4Addr::new(10, 0, 0, 1).into()],
        own_networks: Vec::new(),
    };
    let _ = desired::desired_state(&Inputs {
        snapshot: &snapshot,
        node: &node,
        ready: &BTreeMap::new(),
        settings: &Settings::default(),
        now: Timestamp::UNIX_EPOCH,
        holds: None,
    });
}

/// What `tgtadm --op show` prints, read as targets, accounts and portals.
pub fn tgt_show(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::backend::tgt::read::parse_targets(&text);
    let _ = crate::backend::tgt::read::parse_accounts(&text);
    let _ = crate::backend::tgt::read::parse_portals(&text);
}

/// What configfs's `info` files say: a storage object's backing file, an ACL's sessions.
pub fn lio_info(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::backend::lio::read::storage_info(&text);
    let _ = crate::backend::lio::read::session_addresses(&text);
}

/// An image's first bytes: the format detected, and the checks of formats that can name other
/// files (qcow2, VHDX, VMDK), against every declared format.
pub fn image_header(data: &[u8]) {
    for declared in [
        ImageFormat::Auto,
        ImageFormat::Raw,
        ImageFormat::Qcow2,
        ImageFormat::Vhdx,
        ImageFormat::Vmdk,
    ] {
        let _ = crate::images::inspect::inspect(data, declared);
    }
}

/// An HTTP `Content-Range` answer to a resumed download.
pub fn content_range(data: &[u8]) {
    let _ = crate::images::fetch::parse_content_range(&String::from_utf8_lossy(data));
}

/// A byte size as a Kubernetes quantity (`maxVirtualSize`).
pub fn quantity(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    let _ = crate::api::quantity::parse_bytes(&Quantity(text));
}

/// A grant's `expiresAt`.
pub fn timestamp(data: &[u8]) {
    let _ = crate::api::rules::timestamp(&String::from_utf8_lossy(data));
}
