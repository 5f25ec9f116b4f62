//! The client side: what runs on a machine that uses discus's discs, with the user's own
//! Kubernetes credentials. The apiserver is the server: RBAC decides what a client may read, the
//! storage nodes enforce every grant. `connect` turns a grant into a block device through
//! open-iscsi (`open_iscsi`, `devices`); `hold` renews a grant's heartbeat Lease; `rbac` prints
//! the least rights a client needs.

pub mod connect;
pub mod devices;
pub mod hold;
pub mod list;
mod mount;
pub mod open_iscsi;
mod program;
pub mod rbac;
mod state;
pub mod upload;

use std::path::Path;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::agent::ApiTimeouts;
use crate::desired::ObjectKey;

/// Where `discus connect` writes down what it made, for `discus disconnect`.
pub const STATE_DIR: &str = "/var/lib/discus/connect";

/// How long a client waits for any answer of the apiserver.
pub const API_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the cluster: {0}")]
    Connect(String),
    #[error("{0}")]
    Api(String),
    #[error("{0}")]
    Refused(String),
}

/// A client with the kubeconfig at `path`, or as kubectl finds one (`KUBECONFIG`, `~/.kube`,
/// in a Pod its ServiceAccount), waiting `API_TIMEOUT` at most for each answer.
pub async fn api_client(path: Option<&Path>) -> Result<Client, ClientError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let connect = |e: &dyn std::fmt::Display| ClientError::Connect(e.to_string());
    let config = match path {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| ClientError::Connect(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| connect(&e))?
        }
        None => Config::infer().await.map_err(|e| connect(&e))?,
    };
    ApiTimeouts::default()
        .client(&config, API_TIMEOUT)
        .map_err(|e| ClientError::Connect(e.to_string()))
}

/// What a refused or failed request on `what` means for a client, with the rule it lacks.
pub fn explain(error: &kube::Error, verb: &str, what: &str, key: &ObjectKey) -> ClientError {
    match error {
        kube::Error::Api(status) if status.code == 403 => ClientError::Refused(format!(
            "403 Forbidden: this client may not {verb} {what} {key}; it needs a Role with \
             `{verb}` on it (`discus client-rbac GRANT -n {}` prints one for a grant)",
            key.namespace
        )),
        kube::Error::Api(status) if status.code == 404 => {
            ClientError::Api(format!("{what} {key} not found"))
        }
        other => ClientError::Api(format!("cannot {verb} {what} {key}: {other}")),
    }
}
