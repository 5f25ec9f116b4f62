//! Heartbeats: every agent renews a Lease of its own node, as kubelets do, so that the lease
//! holder can tell a node whose agent stopped from one that merely has nothing to say. The Lease
//! also carries the node's labels as the agent last saw them, for the lease holder to know which
//! nodes should serve what (`expected`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::time::Instant;

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

/// How often a heartbeat is renewed, and how long each renewal says it stays valid.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub every: Duration,
    pub valid_for: Duration,
}

/// Renews this node's Lease every `timing.every` for ever, saying it stays valid for
/// `timing.valid_for`, with the node's `labels` once known — and within a second when they
/// change from what the last renewal carried (`node_changed` wakes it): an agent starts before its Node is
/// listed, and the lease holder should not wait a whole interval to know which nodes serve what.
/// A renewal without an answer within half of `valid_for` is given up and tried again: one
/// answer lost on the way must not make the lease holder think the node is gone.
pub async fn run(
    client: Client,
    namespace: String,
    node: String,
    timing: Timing,
    node_changed: Arc<Notify>,
    labels: impl Fn() -> Option<BTreeMap<String, String>>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let carried = || carried_labels(labels());
    loop {
        let carrying = carried();
        let renewed = renew(&api, &node, timing.valid_for, carrying.as_deref()).await;
        // What the Lease says, as far as this agent knows: after a failure, any change renews.
        let stands = renewed.then_some(carrying);
        let changed = || Some(carried()) != stands;
        until_due(timing.every, &node_changed, changed).await;
    }
}

/// Renewals for a change of labels come this far apart at least: a controller that relabels a
/// node in several patches makes one or two, not a burst (each goes to every agent's watch).
const EARLY_AT_MOST: Duration = Duration::from_secs(1);

/// Until the next renewal is due, counted from the one just made: `every` from now, or — a
/// moment from now at least — once `node_changed` wakes it and the labels have `changed`.
async fn until_due(every: Duration, node_changed: &Notify, changed: impl Fn() -> bool) {
    let renewed_at = Instant::now();
    let next = renewed_at + every;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => return,
            () = node_changed.notified() => if changed() {
                tokio::time::sleep_until(next.min(renewed_at + EARLY_AT_MOST)).await;
                return;
            },
        }
    }
}

/// The labels as a renewal carries them: unknown (the Node not listed yet) or too many to send
/// with every renewal are left out, which drops what an earlier renewal said (the lease holder
/// then waits for nothing).
fn carried_labels(labels: Option<BTreeMap<String, String>>) -> Option<String> {
    let labels = labels.and_then(|l| serde_json::to_string(&l).ok());
    labels.filter(|l| l.len() <= LABELS_AT_MOST)
}

/// One renewal, given up after half of `valid_for` (said in the log, as a failure is); whether
/// it was made.
async fn renew(api: &Api<Lease>, node: &str, valid_for: Duration, labels: Option<&str>) -> bool {
    let name = lease_name(node);
    let mut body = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "labels": {HEARTBEAT_LABEL: node_hash(node)},
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": valid_for.as_secs(),
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    if let Some(labels) = labels {
        body["metadata"]["annotations"] = json!({LABELS_ANNOTATION: labels});
    }
    let params = PatchParams::apply("discus-heartbeat").force();
    let patch = Patch::Apply(&body);
    let renewal = api.patch(&name, &params, &patch);
    match tokio::time::timeout(valid_for / 2, renewal).await {
        Ok(Ok(_)) => return true,
        Ok(Err(error)) => tracing::warn!(%error, "cannot renew this node's heartbeat"),
        Err(_) => tracing::warn!(
            "cannot renew this node's heartbeat: no answer from the apiserver within {}s",
            (valid_for / 2).as_secs_f32()
        ),
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    const EVERY: Duration = Duration::from_secs(10);

    /// How long `until_due` waits, with a wake at `woken` and the labels changed or not by then.
    async fn waited(woken: Duration, changed: bool) -> Duration {
        let node_changed = Notify::new();
        let differs = AtomicBool::new(false);
        let started = Instant::now();
        let wait = until_due(EVERY, &node_changed, || differs.load(Ordering::SeqCst));
        let wake = async {
            tokio::time::sleep(woken).await;
            differs.store(changed, Ordering::SeqCst);
            node_changed.notify_one();
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = wait => {}
            () = wake => {}
        }
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn new_labels_are_renewed_within_a_second_and_a_wake_without_them_waits_on() {
        // Labels known 100 ms after a renewal: the next one a second after the last.
        let new_labels = waited(Duration::from_millis(100), true).await;
        assert_eq!(new_labels, EARLY_AT_MOST);
        // Known later than that: at once.
        assert_eq!(
            waited(Duration::from_secs(3), true).await,
            Duration::from_secs(3)
        );
        // A wake that changes nothing (an address, a relist): the interval.
        assert_eq!(waited(Duration::from_secs(3), false).await, EVERY);
    }
}
