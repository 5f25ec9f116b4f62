//! Which nodes should report on each object, as the lease holder sees them: the live agents
//! whose labels — carried by their heartbeats, as each agent itself last saw its Node — an
//! object's `nodeSelector` matches. The lease holder uses it for one thing: a Ready that some of
//! those nodes have not reported on yet waits a moment for them (see `coalesce`), so that the
//! object's status is written once with every node in it rather than once per node. What a
//! status says never depends on it: stale labels, an agent too old to send them, or a node that
//! will not serve after all (a target that lost its IQN to an older one, an agent watching other
//! namespaces) only change when a write goes out, by the settle time at most.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
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
    /// From the heartbeat Leases of the nodes `live` says are live, renewed within their own
    /// validity by `now` (after a lease holder starts, every node counts as live for a while,
    /// and nodes long gone would be waited for); a Lease without readable labels adds no node.
    pub fn new<'a>(
        heartbeats: impl IntoIterator<Item = &'a Lease>,
        live: impl Fn(&str) -> bool,
        snapshot: &Snapshot<'_>,
        now: Timestamp,
    ) -> Self {
        let nodes: Vec<(String, Labels)> = (heartbeats.into_iter())
            .filter_map(|lease| labelled_node(lease, now))
            .filter(|(node, _)| live(node))
            .collect();
        let images = image_nodes(&nodes, snapshot);
        Self { nodes, images }
    }

    /// The nodes that need a DiscImage.
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

/// A heartbeat's node and labels, unless it has none readable or lapsed by `now`.
fn labelled_node(lease: &Lease, now: Timestamp) -> Option<(String, Labels)> {
    let spec = lease.spec.as_ref()?;
    let valid_for = SignedDuration::from_secs(spec.lease_duration_seconds?.into());
    if spec.renew_time.as_ref()?.0 + valid_for < now {
        return None;
    }
    let labels = lease
        .metadata
        .annotations
        .as_ref()?
        .get(LABELS_ANNOTATION)?;
    Some((
        spec.holder_identity.clone()?,
        serde_json::from_str(labels).ok()?,
    ))
}

/// By DiscImage: the nodes its `nodeSelector` selects and those of the targets using it.
fn image_nodes(
    nodes: &[(String, Labels)],
    snapshot: &Snapshot<'_>,
) -> BTreeMap<ObjectKey, BTreeSet<String>> {
    let mut images: BTreeMap<ObjectKey, BTreeSet<String>> = BTreeMap::new();
    for (node, labels) in nodes {
        let mut need = |image: ObjectKey| images.entry(image).or_default().insert(node.clone());
        for image in &snapshot.images {
            let Ok(valid) = &image.valid else { continue };
            if (valid.node_selector.as_ref()).is_some_and(|s| s.matches(labels)) {
                need(image.key.clone());
            }
        }
        for target in &snapshot.targets {
            let Ok(valid) = &target.valid else { continue };
            if selects(valid, labels) {
                for lun in &valid.luns {
                    need(target.key.sibling(&lun.image));
                }
            }
        }
    }
    images
}

fn selects(target: &ValidTarget, labels: &Labels) -> bool {
    (target.node_selector.as_ref()).is_none_or(|selector| selector.matches(labels))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    use serde_json::{Value, json};

    use super::*;
    use crate::api::{DiscImage, InitiatorAccess, IscsiTarget};

    const NOW: Timestamp = Timestamp::constant(1_800_000_000, 0);

    /// A heartbeat renewed `ago` seconds before `NOW`, valid for 40.
    fn heartbeat(node: &str, labels: Option<&str>, ago: i64) -> Lease {
        Lease {
            metadata: ObjectMeta {
                annotations: labels
                    .map(|l| BTreeMap::from([(LABELS_ANNOTATION.to_owned(), l.to_owned())])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.to_owned()),
                lease_duration_seconds: Some(40),
                renew_time: Some(MicroTime(NOW - SignedDuration::from_secs(ago))),
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
        let rack_b = json!({"matchLabels": {"rack": "b"}});
        let images = vec![
            image("disc", None),
            image("spare", Some(rack_b.clone())),
            image("both", Some(rack_b)),
        ];
        let target = |name: &str, image: &str| -> IscsiTarget {
            let spec = json!({"luns": [{"lun": 0, "image": image}],
                              "nodeSelector": {"matchLabels": {"rack": "a"}}});
            parse("IscsiTarget", name, spec)
        };
        // `both` is prefetched on rack b and served from rack a.
        let targets = vec![target("t", "disc"), target("u", "both")];
        let grants: Vec<InitiatorAccess> = vec![parse(
            "InitiatorAccess",
            "g",
            json!({"targetRef": {"name": "t"}, "initiatorIqn": "iqn.2026-01.test.lab:m"}),
        )];
        let secrets = BTreeMap::new();
        let snapshot = Snapshot::new(&images, &targets, &grants, &secrets);
        let rack_a = Some(r#"{"rack":"a"}"#);
        let leases = [
            heartbeat("a1", rack_a, 0),
            heartbeat("a2", rack_a, 39),
            heartbeat("b1", Some(r#"{"rack":"b"}"#), 5),
            // Lost: expected by nobody.
            heartbeat("a3", rack_a, 1),
            // Not renewed within its validity (a holder that just started still calls it live).
            heartbeat("a4", rack_a, 41),
            // Without labels, or with unreadable ones: nothing waits for it.
            heartbeat("old", None, 1),
            heartbeat("odd", Some("rack=a"), 1),
        ];
        let expected = Expected::new(&leases, |node| node != "a3", &snapshot, NOW);
        let key = |name: &str| ObjectKey::new("lab", name);
        let set = |nodes: &[&str]| nodes.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(expected.target(&snapshot, &key("t")), set(&["a1", "a2"]));
        assert_eq!(expected.grant(&snapshot, &key("g")), set(&["a1", "a2"]));
        assert_eq!(expected.image(&key("disc")), set(&["a1", "a2"]));
        assert_eq!(expected.image(&key("spare")), set(&["b1"]));
        assert_eq!(expected.image(&key("both")), set(&["a1", "a2", "b1"]));
        assert_eq!(expected.target(&snapshot, &key("none")), set(&[]));
    }
}
