//! `discus agent` and its options.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::node_args::{NodeArgs, seconds};
use crate::agent::{self, AgentOptions};
use crate::credentials::Keys;
use crate::credentials::tls::NodeIdentity;
use crate::desired::NodeFacts;
use crate::upload::endpoint::EndpointConfig;

#[derive(Args)]
pub struct AgentArgs {
    /// The Node this agent runs on (in a DaemonSet: from the downward API, spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Watch only these namespaces (comma-separated); default: all.
    #[arg(long, env = "DISCUS_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// The namespace of the agents' Leases: the agent's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "discus-system")]
    lease_namespace: String,
    /// How long the status aggregator keeps its lease without renewing it, in seconds.
    #[arg(long, default_value = "15", value_parser = seconds)]
    leader_lease_seconds: Duration,
    /// How often this node's heartbeat is renewed, in seconds.
    #[arg(long, default_value = "10", value_parser = seconds)]
    heartbeat_seconds: Duration,
    /// A node whose heartbeat is silent this long is marked lost in status, in seconds.
    #[arg(long, default_value = "40", value_parser = seconds)]
    node_lost_seconds: Duration,
    /// A lost node's status entries are removed this long after it was marked lost, in seconds.
    #[arg(long, default_value = "300", value_parser = seconds)]
    prune_seconds: Duration,
    /// How long to wait for an answer of the apiserver before the request counts as lost and is
    /// tried again, in seconds (at least 15; watches are renewed 10 s earlier).
    #[arg(long, default_value = "70", value_parser = seconds)]
    api_timeout_seconds: Duration,
    /// /healthz fails when no sync pass has finished for this long (since the start, too), in
    /// seconds; more than --resync-seconds.
    #[arg(long, default_value = "300", value_parser = seconds)]
    stuck_after_seconds: Duration,
    /// Status that only reports progress (not Ready, failed or expired) waits this long for the
    /// next, so that a state passed through in a moment is never written; 0 writes every state
    /// (at most 60).
    #[arg(long, default_value = "2", value_parser = super::node_args::settle_seconds)]
    status_settle_seconds: Duration,
    /// Receive `discus image upload` over HTTPS on this address (for example 0.0.0.0:8443;
    /// docs/upload.md); off unless given.
    #[arg(long, env = "DISCUS_UPLOAD_LISTEN", value_name = "ADDRESS")]
    upload_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    node: NodeArgs,
}

pub fn run(args: AgentArgs) -> ExitCode {
    let resync = args.node.resync();
    let api_timeouts = match agent::ApiTimeouts::new(args.api_timeout_seconds) {
        Ok(timeouts) => timeouts,
        Err(error) => return super::fail(&format!("--api-timeout-seconds {error}")),
    };
    if args.stuck_after_seconds <= resync {
        return super::fail(&format!(
            "--stuck-after-seconds must be more than --resync-seconds ({}): a pass is due only \
             every {} seconds",
            resync.as_secs(),
            resync.as_secs()
        ));
    }
    // Labels and addresses come from the Node object, once its watch has listed it.
    let facts = NodeFacts {
        name: args.node_name,
        ..NodeFacts::default()
    };
    let node_name = facts.name.clone();
    let mut node = match args.node.config(facts, crate::desired::Policy::strict()) {
        Ok(node) => node,
        Err(error) => return super::fail(&error),
    };
    let mut upload_keys = None;
    if let Some(address) = args.upload_listen {
        let keys = Arc::new(Keys::default());
        let names: Vec<_> = Some(address.ip())
            .filter(|ip| !ip.is_unspecified())
            .into_iter()
            .collect();
        let identity = match NodeIdentity::generate(&node_name, &names) {
            Ok(identity) => identity,
            Err(error) => return super::fail(&format!("--upload-listen: {error}")),
        };
        node.upload = Some(EndpointConfig {
            address,
            identity: Arc::new(identity),
            keys: Arc::clone(&keys),
        });
        upload_keys = Some(keys);
    }
    let options = AgentOptions {
        node,
        namespaces: args
            .namespaces
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect(),
        lease_namespace: args.lease_namespace,
        lease_seconds: args.leader_lease_seconds.as_secs(),
        heartbeat: args.heartbeat_seconds,
        node_lost_after: args.node_lost_seconds,
        prune_after: args.prune_seconds,
        resync,
        api_timeouts,
        stuck_after: args.stuck_after_seconds,
        status_settle: args.status_settle_seconds,
        upload_keys,
    };
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(error) => return super::fail(&error),
    };
    match runtime.block_on(agent::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => super::fail(&error),
    }
}
