//! Heartbeats: every agent renews a Lease of its own node, as kubelets do, so that the lease
//! holder can tell a node whose agent stopped from one that merely has nothing to say. The Lease
//! also carries the node's labels as the agent last saw them, for the lease holder to know which
//! nodes should serve what (`expected`).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::expected::LABELS_ANNOTATION;
use super::stores::HEARTBEAT_LABEL;

/// The hashed node name used in the Lease's name and label (Lease names are DNS labels; node
/// names need not fit).
pub fn node_hash(node: &str) -> String {
    hex::encode(Sha256::digest(node.as_bytes()))[..16].to_owned()
}

/// The most bytes of labels a heartbeat carries: far below the apiserver's limit on annotations
/// (256 KiB), so that no label set can make a renewal fail; every renewal goes to every agent.
const LABELS_AT_MOST: usize = 16 * 1024;

pub fn lease_name(node: &str) -> String {
    format!("discus-node-{}", node_hash(node))
}

/// Renews this node's Lease every `every` for ever, saying it stays valid for `valid_for`, with
/// the node's `labels` once known. A renewal without an answer within half of `valid_for` is
/// given up and tried again: one answer lost on the way must not make the lease holder think the
/// node is gone.
pub async fn run(
    client: Client,
    namespace: String,
    node: String,
    every: Duration,
    valid_for: Duration,
    labels: impl Fn() -> Option<BTreeMap<String, String>>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let name = lease_name(&node);
    let params = PatchParams::apply("discus-heartbeat").force();
    loop {
        let mut body = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "labels": {HEARTBEAT_LABEL: node_hash(&node)},
            },
            "spec": {
                "holderIdentity": node,
                "leaseDurationSeconds": valid_for.as_secs(),
                "renewTime": MicroTime(Timestamp::now()),
            },
        });
        // Unknown (the Node not listed yet) or too many to send with every renewal: left out,
        // which drops what an earlier renewal said (the lease holder then waits for nothing).
        let labels = labels().and_then(|l| serde_json::to_string(&l).ok());
        if let Some(labels) = labels.filter(|l| l.len() <= LABELS_AT_MOST) {
            body["metadata"]["annotations"] = json!({LABELS_ANNOTATION: labels});
        }
        let patch = Patch::Apply(&body);
        let renewal = api.patch(&name, &params, &patch);
        match tokio::time::timeout(valid_for / 2, renewal).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot renew this node's heartbeat"),
            Err(_) => tracing::warn!(
                "cannot renew this node's heartbeat: no answer from the apiserver within {}s",
                (valid_for / 2).as_secs_f32()
            ),
        }
        tokio::time::sleep(every).await;
    }
}
