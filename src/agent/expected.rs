//! Which nodes should report on each object, as the lease holder sees them: the live agents
//! whose labels — carried by their heartbeats, as each agent itself last saw its Node — an
//! object's `nodeSelector` matches. The lease holder uses it for one thing: a Ready that some of
//! those nodes have not reported on yet waits a moment for them (see `coalesce`), so that the
//! object's status is written once with every node in it rather than once per node. What a
//! status says never depends on it: stale labels, or an agent too old to send them, only change
//! when a write goes out, by the settle time at most.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::coordination::v1::Lease;
use kube::core::SelectorExt;

use crate::api::iscsi_target::ValidTarget;
use crate::desired::{ObjectKey, Snapshot};

/// The annotation of a heartbeat Lease that carries its node's labels, as a JSON object.
pub const LABELS_ANNOTATION: &str = "discus.dev/node-labels";

type Labels = BTreeMap<String, String>;

/// The nodes that should report on each object.
#[derive(Debug, Default)]
pub struct Expected {
    /// Every live node whose heartbeat carries its labels.
    nodes: Vec<(String, Labels)>,
    /// By DiscImage: the nodes its `nodeSelector` selects and those of the targets using it.
    images: BTreeMap<ObjectKey, BTreeSet<String>>,
}

impl Expected {
    /// From the heartbeat Leases of the nodes `live` says are live; a Lease without readable
    /// labels adds no node (nothing waits for it).
    pub fn new<'a>(
        heartbeats: impl IntoIterator<Item = &'a Lease>,
        live: impl Fn(&str) -> bool,
        snapshot: &Snapshot<'_>,
    ) -> Self {
        let nodes: Vec<(String, Labels)> = heartbeats
            .into_iter()
            .filter_map(|lease| {
                let node = lease.spec.as_ref()?.holder_identity.clone()?;
                let labels = lease
                    .metadata
                    .annotations
                    .as_ref()?
                    .get(LABELS_ANNOTATION)?;
                Some((node, serde_json::from_str(labels).ok()?))
            })
            .filter(|(node, _)| live(node))
            .collect();
        let mut images: BTreeMap<ObjectKey, BTreeSet<String>> = BTreeMap::new();
        for (node, labels) in &nodes {
            for image in &snapshot.images {
                let Ok(valid) = &image.valid else { continue };
                if (valid.node_selector.as_ref()).is_some_and(|s| s.matches(labels)) {
                    images
                        .entry(image.key.clone())
                        .or_default()
                        .insert(node.clone());
                }
            }
            for target in &snapshot.targets {
                let Ok(valid) = &target.valid else { continue };
                if selects(valid, labels) {
                    for lun in &valid.luns {
                        let image = target.key.sibling(&lun.image);
                        images.entry(image).or_default().insert(node.clone());
                    }
                }
            }
        }
        Self { nodes, images }
    }

    pub fn image(&self, key: &ObjectKey) -> BTreeSet<String> {
        self.images.get(key).cloned().unwrap_or_default()
    }

    /// The nodes a valid target's `nodeSelector` selects.
    pub fn target(&self, snapshot: &Snapshot<'_>, key: &ObjectKey) -> BTreeSet<String> {
        let Some(valid) = snapshot.target(key).and_then(|t| t.valid.as_ref().ok()) else {
            return BTreeSet::new();
        };
        (self.nodes.iter())
            .filter(|(_, labels)| selects(valid, labels))
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// A valid grant's: its target's.
    pub fn grant(&self, snapshot: &Snapshot<'_>, key: &ObjectKey) -> BTreeSet<String> {
        let Some(valid) = snapshot.grant(key).and_then(|g| g.valid.as_ref().ok()) else {
            return BTreeSet::new();
        };
        self.target(snapshot, &key.sibling(&valid.target))
    }
}

fn selects(target: &ValidTarget, labels: &Labels) -> bool {
    (target.node_selector.as_ref()).is_none_or(|selector| selector.matches(labels))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use serde_json::{Value, json};

    use super::*;
    use crate::api::{DiscImage, InitiatorAccess, IscsiTarget};

    fn heartbeat(node: &str, labels: Option<&str>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                annotations: labels
                    .map(|l| BTreeMap::from([(LABELS_ANNOTATION.to_owned(), l.to_owned())])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.to_owned()),
                ..LeaseSpec::default()
            }),
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(kind: &str, name: &str, spec: Value) -> T {
        serde_json::from_value(json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": "lab"}, "spec": spec,
        }))
        .expect("test object")
    }

    #[test]
    fn each_object_expects_the_live_nodes_its_selector_matches() {
        let image = |name: &str, selector: Option<Value>| {
            let mut spec = json!({"source": {"http": {"url": format!("http://example.test/{name}.iso")}},
                                  "sha256": "0".repeat(64)});
            if let Some(selector) = selector {
                spec["nodeSelector"] = selector;
            }
            parse::<DiscImage>("DiscImage", name, spec)
        };
        let images = vec![
            image("disc", None),
            image("spare", Some(json!({"matchLabels": {"rack": "b"}}))),
        ];
        let targets: Vec<IscsiTarget> = vec![parse(
            "IscsiTarget",
            "t",
            json!({"luns": [{"lun": 0, "image": "disc"}], "nodeSelector": {"matchLabels": {"rack": "a"}}}),
        )];
        let grants: Vec<InitiatorAccess> = vec![parse(
            "InitiatorAccess",
            "g",
            json!({"targetRef": {"name": "t"}, "initiatorIqn": "iqn.2026-01.test.lab:m"}),
        )];
        let secrets = BTreeMap::new();
        let snapshot = Snapshot::new(&images, &targets, &grants, &secrets);
        let leases = [
            heartbeat("a1", Some(r#"{"rack":"a"}"#)),
            heartbeat("a2", Some(r#"{"rack":"a"}"#)),
            heartbeat("b1", Some(r#"{"rack":"b"}"#)),
            // Lost: expected by nobody.
            heartbeat("a3", Some(r#"{"rack":"a"}"#)),
            // Without labels, or with unreadable ones: nothing waits for it.
            heartbeat("old", None),
            heartbeat("odd", Some("rack=a")),
        ];
        let expected = Expected::new(&leases, |node| node != "a3", &snapshot);
        let key = |name: &str| ObjectKey::new("lab", name);
        let set = |nodes: &[&str]| nodes.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(expected.target(&snapshot, &key("t")), set(&["a1", "a2"]));
        assert_eq!(expected.grant(&snapshot, &key("g")), set(&["a1", "a2"]));
        assert_eq!(expected.image(&key("disc")), set(&["a1", "a2"]));
        assert_eq!(expected.image(&key("spare")), set(&["b1"]));
        assert_eq!(expected.target(&snapshot, &key("none")), set(&[]));
    }
}
