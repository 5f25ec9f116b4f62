//! The desired-state core's tests, by topic. `World` builds the resources a test needs from
//! small JSON specs and computes the node's desired state from them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::*;
use crate::api::chap::SecretData;
use crate::api::{DiscImage, InitiatorAccess, IscsiTarget};

const DIGEST_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DIGEST_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const INITIATOR: &str = "iqn.1993-08.org.debian:01:host-a";

/// A cluster to compute the desired state of, built one resource at a time.
struct World {
    images: Vec<DiscImage>,
    targets: Vec<IscsiTarget>,
    grants: Vec<InitiatorAccess>,
    secrets: BTreeMap<ObjectKey, SecretData>,
    node: NodeFacts,
    ready: BTreeMap<ObjectKey, ReadyImage>,
    settings: Settings,
    now: Timestamp,
    holds: Option<Holds>,
}

fn object<T: serde::de::DeserializeOwned>(kind: &str, name: &str, spec: Value) -> T {
    serde_json::from_value(json!({
        "apiVersion": "discus.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "lab", "uid": format!("uid-{name}")},
        "spec": spec,
    }))
    .expect("fixture deserializes")
}

fn created<T: kube::Resource>(mut object: T, at: &str) -> T {
    object.meta_mut().creation_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at.parse().expect("timestamp")),
    );
    object
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("lab", name)
}

impl World {
    fn new() -> Self {
        Self {
            images: Vec::new(),
            targets: Vec::new(),
            grants: Vec::new(),
            secrets: BTreeMap::new(),
            node: NodeFacts {
                name: "storage-1".into(),
                labels: BTreeMap::from([("discus.dev/storage".into(), "true".into())]),
                addresses: vec!["10.0.0.11".parse().expect("ip")],
                own_networks: Vec::new(),
            },
            ready: BTreeMap::new(),
            settings: Settings::default(),
            now: "2026-11-21T12:00:00Z".parse().expect("now"),
            holds: Some(Holds::new()),
        }
    }

    /// An image, verified and stored on this node.
    fn ready_image(mut self, name: &str, served: &str) -> Self {
        self = self.image(name, json!({}));
        self.ready.insert(
            key(name),
            ReadyImage {
                path: PathBuf::from(format!("/var/lib/discus/images/{served}.raw")),
                size_bytes: 1 << 30,
                served_sha256: served.into(),
            },
        );
        self
    }

    fn image(mut self, name: &str, extra: Value) -> Self {
        let mut spec = json!({"source": {"http": {"url": format!("https://images.example/{name}.iso")}}, "sha256": DIGEST_A});
        merge(&mut spec, extra);
        self.images.push(object("DiscImage", name, spec));
        self
    }

    fn target(mut self, name: &str, spec: Value) -> Self {
        self.targets.push(object("IscsiTarget", name, spec));
        self
    }

    fn target_object(mut self, target: IscsiTarget) -> Self {
        self.targets.push(target);
        self
    }

    /// The usual target: LUN 0 from image `debian`, CHAP on.
    fn boot_target(self) -> Self {
        self.ready_image("debian", DIGEST_A)
            .target("boot", json!({"luns": [{"lun": 0, "image": "debian"}]}))
    }

    fn grant(mut self, name: &str, spec: Value) -> Self {
        self.grants.push(object("InitiatorAccess", name, spec));
        self
    }

    fn grant_object(mut self, grant: InitiatorAccess) -> Self {
        self.grants.push(grant);
        self
    }

    /// The usual grant: INITIATOR on `boot`, CHAP from Secret `host-a-chap`.
    fn chap_grant(self, name: &str) -> Self {
        self.secret(
            "host-a-chap",
            &[("username", "host-a"), ("password", "s3cret-s3cret")],
        )
        .grant(
            name,
            json!({
                "targetRef": {"name": "boot"},
                "initiatorIqn": INITIATOR,
                "chap": {"secretRef": {"name": "host-a-chap"}},
            }),
        )
    }

    fn secret(mut self, name: &str, pairs: &[(&str, &str)]) -> Self {
        self.secrets.insert(
            key(name),
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        );
        self
    }

    fn compute(&self) -> DesiredState {
        let snapshot = Snapshot::new(&self.images, &self.targets, &self.grants, &self.secrets);
        desired_state(&Inputs {
            snapshot: &snapshot,
            node: &self.node,
            ready: &self.ready,
            settings: &self.settings,
            now: self.now,
            holds: self.holds.as_ref(),
        })
    }
}

fn merge(base: &mut Value, extra: Value) {
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
}

fn reasons(state: &DesiredState) -> Vec<(Kind, String, Reason)> {
    state
        .problems
        .iter()
        .map(|p| (p.kind, p.key.name.clone(), p.reason))
        .collect()
}

mod access;
mod boot;
mod luns;
mod placement;
