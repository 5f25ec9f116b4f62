//! The cluster's own networks, which image downloads must never reach: the agent runs on the
//! host's network, so without this a DiscImage's URL could make it GET node ports, pods and
//! services (the classic importer SSRF). Added to the destination policy at start.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};

use super::AgentError;

/// How long the agent keeps trying to read its Node before giving up (and being restarted).
const PATIENCE: Duration = Duration::from_secs(300);

/// This node's addresses (node ports listen on them) and pod networks, and the apiserver's
/// service address: each with why it is denied.
pub async fn read(client: &Client, node: &str) -> Result<Vec<(String, IpNet)>, AgentError> {
    let mut networks = service_address();
    let nodes: Api<Node> = Api::all(client.clone());
    // A list by name, as the agent's Node watch does: the agent may list its Node, not get it.
    let by_name = kube::api::ListParams::default().fields(&format!("metadata.name={node}"));
    let start = std::time::Instant::now();
    let mut delay = Duration::from_secs(1);
    let found = loop {
        match nodes.list(&by_name).await {
            Ok(list) => break list.items.into_iter().next(),
            Err(error) if start.elapsed() < PATIENCE => {
                tracing::warn!(%error, node, "cannot read this node's networks yet; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(error) => return Err(AgentError::Client(error)),
        }
    };
    let Some(found) = found else {
        tracing::warn!(
            node,
            "Node {node} not found: its own networks are not denied to image downloads"
        );
        return Ok(networks);
    };
    networks.extend(node_networks(&found));
    Ok(networks)
}

/// The Node's InternalIP/ExternalIP addresses and its pod CIDRs.
fn node_networks(node: &Node) -> Vec<(String, IpNet)> {
    let status = node.status.as_ref();
    let addresses = status
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .map(|ip| ("this node's own address".to_owned(), IpNet::from(ip)));
    let spec = node.spec.as_ref();
    let pods = spec
        .and_then(|s| s.pod_cidrs.clone())
        .into_iter()
        .flatten()
        .chain(spec.and_then(|s| s.pod_cidr.clone()))
        .filter_map(|cidr| cidr.parse::<IpNet>().ok())
        .map(|net| ("this node's pod network".to_owned(), net));
    addresses.chain(pods).collect()
}

/// The kubernetes Service's address, which a pod finds in its environment.
fn service_address() -> Vec<(String, IpNet)> {
    std::env::var("KUBERNETES_SERVICE_HOST")
        .ok()
        .and_then(|host| host.parse::<IpAddr>().ok())
        .map(|ip| {
            (
                "the apiserver's service address".to_owned(),
                IpNet::from(ip),
            )
        })
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_s_addresses_and_pod_networks_are_denied() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "storage-1"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "192.168.10.5"},
                {"type": "Hostname", "address": "storage-1"},
            ]},
        }))
        .expect("node");
        let nets: Vec<String> = node_networks(&node)
            .into_iter()
            .map(|(_, net)| net.to_string())
            .collect();
        assert_eq!(
            nets,
            [
                "192.168.10.5/32",
                "10.244.1.0/24",
                "fd00:10:244:1::/64",
                "10.244.1.0/24"
            ]
        );
    }
}
