//! Each agent's own entry in every resource's `status.nodes`: applied with a field manager that
//! belongs to its node alone, holding that one entry and nothing else, and only when it differs
//! from what the resource already says — so agents never take each other's entries and, at rest,
//! write nothing.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use kube::core::DeserializeGuard;
use kube::{Client, Resource};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::desired::{Kind, ObjectKey, object_key};
use crate::metrics::Metrics;
use crate::status;
use crate::sync::NodeReport;

use super::apply_status;
use super::events::{Observed, Summary};
use super::stores::Stores;

/// How many status writes are in flight at once.
const CONCURRENT_WRITES: usize = 16;

/// The field manager of a node's entries: a hash, because managers are limited to 128
/// characters and node names are not.
pub fn field_manager(node: &str) -> String {
    format!(
        "discus-node-{}",
        &hex::encode(Sha256::digest(node.as_bytes()))[..16]
    )
}

pub struct NodeStatusWriter {
    client: Client,
    node: String,
    manager: String,
    /// Entries written and not yet seen in the stores, so that a pass right after a write does
    /// not write the same again.
    in_flight: Mutex<HashMap<(Kind, ObjectKey), Value>>,
    metrics: Arc<Metrics>,
}

/// What one publication did, and what the node's entries say (for events).
#[derive(Debug, Default)]
pub struct Published {
    pub written: usize,
    pub failed: usize,
    pub observed: Observed,
}

impl NodeStatusWriter {
    pub fn new(client: Client, node: &str, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            node: node.to_owned(),
            manager: field_manager(node),
            in_flight: Mutex::default(),
            metrics,
        }
    }

    /// Brings this node's entry of every resource in line with the report.
    pub async fn publish(&self, stores: &Stores, report: &NodeReport) -> Published {
        let mut writes = Vec::new();
        let mut observed = Observed::default();
        let mut out = (&mut writes, &mut observed);
        self.collect(Kind::DiscImage, stores.images(), &mut out, |image| {
            (
                status::image_entry(image, report),
                image
                    .status
                    .iter()
                    .flat_map(|s| &s.nodes)
                    .find(|e| e.node == self.node)
                    .cloned(),
            )
        });
        self.collect(Kind::IscsiTarget, stores.targets(), &mut out, |target| {
            (
                status::target_entry(target, report),
                target
                    .status
                    .iter()
                    .flat_map(|s| &s.nodes)
                    .find(|e| e.node == self.node)
                    .cloned(),
            )
        });
        self.collect(Kind::InitiatorAccess, stores.grants(), &mut out, |grant| {
            (
                status::grant_entry(grant, report),
                grant
                    .status
                    .iter()
                    .flat_map(|s| &s.nodes)
                    .find(|e| e.node == self.node)
                    .cloned(),
            )
        });
        let results: Vec<bool> = futures::stream::iter(writes)
            .map(|write| self.write(write))
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;
        Published {
            written: results.iter().filter(|ok| **ok).count(),
            failed: results.iter().filter(|ok| !**ok).count(),
            observed,
        }
    }

    /// The writes one kind needs: where the wanted entry differs from the object's and from
    /// what is in flight.
    fn collect<K, E>(
        &self,
        kind: Kind,
        objects: impl Iterator<Item = Arc<DeserializeGuard<K>>>,
        (writes, observed): &mut (&mut Vec<Write>, &mut Observed),
        entries: impl Fn(&K) -> (Option<E>, Option<E>),
    ) where
        K: Resource<DynamicType = ()>,
        E: Serialize + PartialEq + Summary,
    {
        let mut in_flight = self.in_flight.lock();
        for guarded in objects {
            let Ok(object) = &guarded.0 else {
                continue;
            };
            let (wanted, current) = entries(object);
            if let Some(entry) = &wanted {
                observed.insert(kind, object, entry.state());
            }
            let key = (kind, object_key(object.meta()));
            if wanted == current {
                in_flight.remove(&key);
                continue;
            }
            let entry = wanted.and_then(|e| serde_json::to_value(e).ok());
            let body = entry.clone().unwrap_or(Value::Null);
            if in_flight.get(&key) == Some(&body) {
                continue;
            }
            writes.push(Write {
                kind: key.0,
                key: key.1,
                entry,
            });
        }
    }

    async fn write(&self, write: Write) -> bool {
        let mut body = json!({
            "apiVersion": crate::api::API_VERSION,
            "kind": write.kind.as_str(),
            "metadata": {"name": write.key.name, "namespace": write.key.namespace},
        });
        // Without the entry, the apply drops it: this manager owned it alone.
        if let Some(entry) = &write.entry {
            body["status"] = json!({"nodes": [entry]});
        }
        let result = apply_status(&self.client, write.kind, &write.key, &self.manager, &body).await;
        self.metrics
            .status_written(!matches!(&result, Err(e) if !is_not_found(e)));
        match result {
            Ok(()) => {
                self.in_flight
                    .lock()
                    .insert((write.kind, write.key), write.entry.unwrap_or(Value::Null));
                true
            }
            // Deleted meanwhile: nothing to report on.
            Err(kube::Error::Api(status)) if status.code == 404 => true,
            Err(error) => {
                tracing::warn!(kind = write.kind.as_str(), object = %write.key, %error, "cannot write this node's status entry");
                false
            }
        }
    }
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

struct Write {
    kind: Kind,
    key: ObjectKey,
    entry: Option<Value>,
}
