//! `discus agent`: the storage node's agent in a cluster. The same sync loop as `discus serve`,
//! fed by watches instead of a folder; each agent reports its own node's entries, and the one
//! holding the leader lease writes what concerns every node.

mod events;
mod generated_secrets;
mod heartbeat;
mod leader;
mod liveness;
mod node_status;
mod stores;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde_json::Value;

use crate::api::{DiscImage, InitiatorAccess, IscsiTarget};
use crate::backend::Backend;
use crate::desired::{Kind, ObjectKey};
use crate::node_runtime::{self, NodeConfig, NodeLoop};
use crate::sync::{Pass, Syncer};

pub use leader::LeaderOptions;
use node_status::NodeStatusWriter;
pub use node_status::field_manager;
use stores::{Stores, Wakers};

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
    let client = Client::try_default().await?;
    node_runtime::start(options.node.clone(), AgentLoop { client, options }).await?
}

struct AgentLoop {
    client: Client,
    options: AgentOptions,
}

impl NodeLoop for AgentLoop {
    type Output = Result<(), AgentError>;

    async fn run<B: Backend + 'static>(self, syncer: Syncer<B>) -> Self::Output {
        let Self { client, options } = self;
        let node = options.node.node.name.clone();
        let wakers = Wakers::default();
        let stores = Arc::new(Stores::start(
            &client,
            &options.namespaces,
            &node,
            &options.lease_namespace,
            &wakers,
            syncer.metrics(),
        ));
        tokio::spawn(leader::run(
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
            },
        ));
        tokio::spawn(heartbeat::run(
            client.clone(),
            options.lease_namespace.clone(),
            node.clone(),
            options.heartbeat,
            options.node_lost_after,
        ));
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| AgentError::Setup(format!("cannot handle SIGTERM: {e}")))?;

        tracing::info!(%node, backend = syncer.backend().name(), "waiting for every watch to list");
        tokio::select! {
            () = stores.ready() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        }
        let metrics = Arc::clone(syncer.metrics());
        let writer = NodeStatusWriter::new(client.clone(), &node, Arc::clone(&metrics));
        let events = events::NodeEvents::new(client, &node, metrics);
        let finished = syncer.images().finished();
        let mut pass = Pass::Full;
        let mut waiting_for_node = false;
        loop {
            // Without its Node, the agent knows neither its labels nor its addresses: a pass
            // would place nothing here and tear every target down.
            match stores.node_facts() {
                Some(facts) => {
                    waiting_for_node = false;
                    syncer.set_node_facts(facts);
                    let snapshot = stores.snapshot();
                    let report = syncer
                        .sync(&snapshot.resources, Timestamp::now(), pass)
                        .await;
                    let published = writer.publish(&stores, &report).await;
                    events.observe(published.observed).await;
                    tracing::debug!(
                        targets = report.desired.targets.len(),
                        written = published.written,
                        failed = published.failed,
                        "sync pass done"
                    );
                    let next = report.next_pass(options.resync);
                    pass = Pass::Changes;
                    // Status that could not be written is tried again soon.
                    let retry = if published.failed > 0 {
                        Duration::from_secs(2)
                    } else {
                        next.after
                    };
                    tokio::select! {
                        () = wakers.sync.notified() => {
                            // Let a burst of changes (an apply of many objects) settle.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        () = finished.notified() => {}
                        () = tokio::time::sleep(retry) => {
                            if retry == next.after {
                                pass = next.pass;
                            }
                        }
                        _ = tokio::signal::ctrl_c() => return Ok(()),
                        _ = terminate.recv() => return Ok(()),
                    }
                }
                None => {
                    if !waiting_for_node {
                        tracing::warn!(%node, "Node {node} not found: serving nothing new until it exists");
                        waiting_for_node = true;
                    }
                    tokio::select! {
                        () = wakers.sync.notified() => {}
                        _ = tokio::signal::ctrl_c() => return Ok(()),
                        _ = terminate.recv() => return Ok(()),
                    }
                }
            }
        }
    }
}

/// How long a write to the apiserver may take. kube's client has no read timeout (watches are
/// long requests), and the sync loop waits for its status writes: without a bound, one answer
/// lost on the way would stop the node from reconciling, expiry included.
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

/// Server-side applies `body` to the status of one object under `manager`.
async fn apply_status(
    client: &Client,
    kind: Kind,
    key: &ObjectKey,
    manager: &str,
    body: &Value,
) -> kube::Result<()> {
    let params = PatchParams::apply(manager).force();
    bounded(async {
        match kind {
            Kind::DiscImage => patch::<DiscImage>(client, key, &params, body).await,
            Kind::IscsiTarget => patch::<IscsiTarget>(client, key, &params, body).await,
            Kind::InitiatorAccess => patch::<InitiatorAccess>(client, key, &params, body).await,
        }
    })
    .await
}

async fn patch<K>(
    client: &Client,
    key: &ObjectKey,
    params: &PatchParams,
    body: &Value,
) -> kube::Result<()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), &key.namespace)
        .patch_status(&key.name, params, &Patch::Apply(body))
        .await
        .map(drop)
}
