//! `discus agent`: the storage node's agent in a cluster. The same sync loop as `discus serve`,
//! fed by watches instead of a folder; each agent reports its own node's entries, and the one
//! holding the leader lease writes what concerns every node. Nothing here waits on the apiserver
//! without a deadline (`connection`), and the sync loop does not wait on it at all (`sync_loop`).

mod arrivals;
mod coalesce;
mod connection;
mod events;
mod expected;
mod generated_secrets;
mod heartbeat;
mod holds;
mod leader;
mod liveness;
mod node_status;
mod publisher;
mod reports;
mod retry;
mod stores;
mod sync_loop;
mod upload_tokens;
mod watch_backoff;

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::api::{DiscImage, InitiatorAccess, IscsiTarget};
use crate::backend::Backend;
use crate::desired::{Kind, ObjectKey};
use crate::node_runtime::{self, NodeConfig, NodeLoop};
use crate::sync::Syncer;

pub use connection::ApiTimeouts;
use connection::Clients;
pub use leader::LeaderOptions;
use node_status::NodeStatusWriter;
pub use node_status::field_manager;
use publisher::Publisher;
use stores::{Stores, Wakers};
use sync_loop::SyncLoop;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node: NodeConfig,
    /// Watch these namespaces only; empty: all.
    pub namespaces: Vec<String>,
    /// Where the leader and heartbeat Leases live (the agent's own namespace).
    pub lease_namespace: String,
    pub lease_seconds: u64,
    /// How often this node's heartbeat is renewed.
    pub heartbeat: Duration,
    /// A node silent this long is lost; `prune_after` later, gone.
    pub node_lost_after: Duration,
    pub prune_after: Duration,
    pub resync: Duration,
    /// How long the agent waits for an answer of the apiserver.
    pub api_timeouts: ApiTimeouts,
    /// No sync pass finished for this long (since the start, too): `/healthz` fails.
    pub stuck_after: Duration,
    /// How long status that only reports progress waits for the next (`coalesce`).
    pub status_settle: Duration,
    /// The agents' upload signing key as this agent knows it (its endpoint's too), when it
    /// receives uploads: only then does it read or make the key, and mint tokens as lease holder.
    pub upload_keys: Option<Arc<crate::credentials::Keys>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the cluster: {0}")]
    Client(#[from] kube::Error),
    #[error(transparent)]
    Node(#[from] node_runtime::SetupError),
    #[error("{0}")]
    Setup(String),
}

/// Runs the agent until SIGTERM or SIGINT; targets keep serving after it stops.
pub async fn run(options: AgentOptions) -> Result<(), AgentError> {
    // kube's TLS needs a process-wide provider; another part may have installed it already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let clients = connection::connect(options.api_timeouts, options.lease_seconds).await?;
    let mut options = options;
    // The apiserver's service address, which a pod finds in its environment; the node's own
    // networks are denied from its Node, before every pass.
    if let Some(service) = std::env::var("KUBERNETES_SERVICE_HOST")
        .ok()
        .and_then(|host| host.parse::<std::net::IpAddr>().ok())
    {
        let service = ipnet::IpNet::from(service);
        let destinations = &mut options.node.fetch.destinations;
        destinations.deny_more("the apiserver's service address", [service]);
    }
    node_runtime::start(options.node.clone(), AgentLoop { clients, options }).await?
}

struct AgentLoop {
    clients: Clients,
    options: AgentOptions,
}

impl NodeLoop for AgentLoop {
    type Output = Result<(), AgentError>;

    async fn run<B: Backend + 'static>(self, syncer: Syncer<B>) -> Self::Output {
        let Self { clients, options } = self;
        let shutdown = shutdown()?;
        syncer.metrics().expect_passes_within(options.stuck_after);
        let node = options.node.node.name.clone();
        let client = clients.main;
        let wakers = Wakers::default();
        let stores = Arc::new(Stores::start(
            &client,
            &options.namespaces,
            &node,
            &options.lease_namespace,
            &wakers,
            &options.api_timeouts,
            syncer.metrics(),
        ));
        tokio::spawn(leader::run(
            clients.lease,
            client.clone(),
            stores.clone(),
            wakers.clone(),
            LeaderOptions {
                lease_namespace: options.lease_namespace.clone(),
                identity: node.clone(),
                lease_seconds: options.lease_seconds,
                iqn_authority: options.node.iqn_authority.clone(),
                node_lost_after: options.node_lost_after,
                prune_after: options.prune_after,
                upload_keys: options.upload_keys.clone(),
                status_settle: options.status_settle,
                api_timeouts: options.api_timeouts,
            },
            Arc::clone(syncer.metrics()),
        ));
        if let Some(keys) = &options.upload_keys {
            tokio::spawn(upload_tokens::maintain_key(
                client.clone(),
                options.lease_namespace.clone(),
                Arc::clone(keys),
            ));
        }
        let node_stores = Arc::clone(&stores);
        tokio::spawn(heartbeat::run(
            client.clone(),
            options.lease_namespace.clone(),
            node.clone(),
            heartbeat::Timing {
                every: options.heartbeat,
                valid_for: options.node_lost_after,
            },
            wakers.node.clone(),
            move || node_stores.node_facts().map(|facts| facts.labels),
        ));
        tracing::info!(%node, backend = syncer.backend().name(), "waiting for every watch to list");
        let metrics = Arc::clone(syncer.metrics());
        if let Some(boot) = syncer.boot_tables() {
            tokio::spawn(events::tell(
                boot.served(),
                client.clone(),
                node.clone(),
                Arc::clone(&metrics),
            ));
        }
        tokio::spawn(events::tell(
            syncer.session_news(),
            client.clone(),
            node.clone(),
            Arc::clone(&metrics),
        ));
        let publisher = Publisher::start(
            NodeStatusWriter::new(
                client.clone(),
                &node,
                &options.lease_namespace,
                options.status_settle,
                Arc::clone(&metrics),
            ),
            events::NodeEvents::new(client, &node, metrics),
            Arc::clone(&stores),
        );
        SyncLoop {
            syncer: &syncer,
            stores: &stores,
            wakers: &wakers,
            publisher,
            resync: options.resync,
            node,
        }
        .run(shutdown)
        .await;
        Ok(())
    }
}

/// Resolves on SIGTERM (the kubelet stopping the Pod) or SIGINT.
fn shutdown() -> Result<impl Future<Output = ()>, AgentError> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Setup(format!("cannot handle SIGTERM: {e}")))?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// How long a write to the apiserver may take in all. The client's read deadline bounds each
/// attempt; this bounds the whole, retries of kube's client (on 429, 503, 504) included, so that
/// the publisher and the lease holder go on to newer work.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one request to the apiserver within `WRITE_TIMEOUT`.
async fn bounded<T>(request: impl Future<Output = kube::Result<T>>) -> kube::Result<T> {
    tokio::time::timeout(WRITE_TIMEOUT, request)
        .await
        .unwrap_or_else(|_| {
            Err(kube::Error::Service(
                format!("no answer from the apiserver within {WRITE_TIMEOUT:?}").into(),
            ))
        })
}

/// A status (or one node's entry) as the JSON written. Thousands are kept at a cold start —
/// planned, and in flight until the store shows them — where a parsed `serde_json::Value` took
/// several times the memory; they are compared as text (the same value is always written the
/// same way: struct fields in order, a `Value`'s keys sorted).
pub type StatusBody = Box<RawValue>;

/// `value` as a status body; `None` (said in the log) when it cannot be written at all, which
/// must not read as "nothing to say" (that write would drop all its manager owned).
pub fn status_body(value: &impl Serialize) -> Option<StatusBody> {
    serde_json::value::to_raw_value(value)
        .inspect_err(
            |error| tracing::error!(%error, "a status that cannot be serialized is not written"),
        )
        .ok()
}

/// Merge-patches one object's status with `status` as `manager`; the object's resourceVersion
/// after it.
async fn patch_status(
    client: &Client,
    kind: Kind,
    key: &ObjectKey,
    manager: &str,
    status: &RawValue,
) -> kube::Result<Option<String>> {
    let body = &StatusPatch { status };
    let params = PatchParams {
        field_manager: Some(manager.to_owned()),
        ..PatchParams::default()
    };
    bounded(async {
        match kind {
            Kind::DiscImage => merge::<DiscImage>(client, key, &params, body).await,
            Kind::IscsiTarget => merge::<IscsiTarget>(client, key, &params, body).await,
            Kind::InitiatorAccess => merge::<InitiatorAccess>(client, key, &params, body).await,
        }
    })
    .await
}

/// A merge patch of an object's status.
#[derive(Debug, Serialize)]
struct StatusPatch<'a> {
    status: &'a RawValue,
}

async fn merge<K>(
    client: &Client,
    key: &ObjectKey,
    params: &PatchParams,
    body: &StatusPatch<'_>,
) -> kube::Result<Option<String>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), &key.namespace)
        .patch_status(&key.name, params, &Patch::Merge(body))
        .await
        .map(|object| object.meta().resource_version.clone())
}

/// The JSON merge patch (RFC 7396) that turns `current` into `wanted`: what changed, and a null
/// for each field dropped; a list is replaced whole.
fn merge_patch(current: &serde_json::Value, wanted: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let (Value::Object(current), Value::Object(wanted)) = (current, wanted) else {
        return wanted.clone();
    };
    let changed = wanted
        .iter()
        .filter_map(|(field, value)| match current.get(field) {
            Some(was) if was == value => None,
            Some(was) => Some((field.clone(), merge_patch(was, value))),
            None => Some((field.clone(), value.clone())),
        });
    let dropped = (current.keys())
        .filter(|field| !wanted.contains_key(*field))
        .map(|field| (field.clone(), Value::Null));
    Value::Object(changed.chain(dropped).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_merge_patch_says_what_changed_drops_what_went_and_replaces_lists_whole() {
        let current =
            json!({"same": 1, "inner": {"kept": 1, "gone": 2}, "list": [1, 2], "old": "x"});
        let wanted = json!({"same": 1, "inner": {"kept": 2}, "list": [2], "new": 3});
        let patch = merge_patch(&current, &wanted);
        assert_eq!(
            patch,
            json!({"inner": {"kept": 2, "gone": null}, "list": [2], "new": 3, "old": null})
        );
        assert_eq!(merge_patch(&wanted, &wanted), json!({}));
        assert_eq!(merge_patch(&json!({}), &wanted), wanted);
    }
}
