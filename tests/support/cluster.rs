//! A control plane ready for discus agents, shared by the agent tests and the agent bench: the
//! CRDs, a namespace for the resources, `discus-system`, the shipped RBAC bound there (and the
//! clients' ClusterRole), the
//! agents' ServiceAccount token, and storage-node hosts on a private LAN.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use super::control_plane::ControlPlane;
use super::network::Lan;
use super::sandbox::Sandbox;

/// Where each storage host keeps the demo ISO, allowed as a `file` source root.
pub const DEMO_DIR: &str = "/var/lib/discus/demo";

pub struct Kube {
    /// The LAN of the storage nodes' hosts, when they run in hosts of their own.
    pub lan: Option<Lan>,
    pub plane: ControlPlane,
    /// An admin client.
    pub client: kube::Client,
    /// The agents' credentials: the shipped ServiceAccount's token.
    pub agent_kubeconfig: PathBuf,
}

impl Kube {
    /// A control plane in a host of its own at `.10` of a new LAN, prepared for resources in
    /// `namespace`.
    pub async fn on_lan(namespace: &str) -> Self {
        let lan = Lan::new();
        let host = Sandbox::new();
        let address = lan.plug(&host, 10);
        let plane = ControlPlane::start_in(host, IpAddr::from(address))
            .await
            .expect("control plane");
        Self::prepare(plane, Some(lan), namespace).await
    }

    /// CRDs, the namespaces, the shipped RBAC and the agents' ServiceAccount token.
    pub async fn prepare(plane: ControlPlane, lan: Option<Lan>, namespace: &str) -> Self {
        plane.install_crds().await.expect("CRDs");
        let client = plane.client().await.expect("client");
        for name in [namespace, "discus-system"] {
            Api::<Namespace>::all(client.clone())
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns"),
                )
                .await
                .expect("namespace");
        }
        let mut kube = Self {
            lan,
            plane,
            client,
            agent_kubeconfig: PathBuf::new(),
        };
        let rbac = super::repo().join("deploy/rbac");
        // The agents' roles as deploy/rbac/agent.yaml has them, with the rights uploads need:
        // the test agents receive uploads.
        let agent_rbac = tempfile::NamedTempFile::new().expect("temp file");
        let list = json!({"apiVersion": "v1", "kind": "List", "items": agent_rbac_with_uploads()});
        std::fs::write(agent_rbac.path(), list.to_string()).expect("write");
        kube.kubectl(&["apply", "-f", &agent_rbac.path().display().to_string()]);
        kube.kubectl(&[
            "apply",
            "-f",
            &rbac.join("client.yaml").display().to_string(),
        ]);
        kube.kubectl(&[
            "apply",
            "-n",
            namespace,
            "-f",
            &rbac.join("namespace.yaml").display().to_string(),
        ]);
        kube.agent_kubeconfig = kube
            .plane
            .service_account_kubeconfig("discus-system", "discus-agent")
            .await
            .expect("service account token");
        kube
    }

    /// A storage node's host at `.<number>` of the LAN, with the demo ISO in `DEMO_DIR`.
    pub fn storage_host(&self, number: u8) -> (Sandbox, Ipv4Addr) {
        let sandbox = demo_host();
        let address = self.lan.as_ref().expect("a LAN").plug(&sandbox, number);
        (sandbox, address)
    }

    /// A Node object, labelled as a storage node, with its InternalIP.
    pub async fn create_node(&self, name: &str, address: Ipv4Addr) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"discus.dev/storage": "true"}},
                }))
                .expect("node"),
            )
            .await
            .expect("create node");
        nodes
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "status": {"addresses": [{"type": "InternalIP", "address": address.to_string()}]}
                })),
            )
            .await
            .expect("node address");
    }

    /// Which agent holds the leader Lease.
    pub async fn leader(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "discus-system");
        leases
            .get_opt("discus-leader")
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
            .filter(|h| !h.is_empty())
    }

    /// The nodes that have reports (ConfigMaps labelled `discus.dev/report`) in discus-system.
    pub async fn reporting_nodes(&self) -> std::collections::BTreeSet<String> {
        let reports: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.client.clone(), "discus-system");
        let listed = reports
            .list(&kube::api::ListParams::default().labels("discus.dev/report"))
            .await;
        (listed.into_iter().flat_map(|l| l.items))
            .filter_map(|r| r.data?.remove("node"))
            .collect()
    }

    /// `kubectl` as admin; fails the caller when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let output = self.plane.kubectl().args(args).output().expect("kubectl");
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// The agents' roles (templates/agent-rbac.yaml, which deploy/rbac/agent.yaml renders with the
/// defaults), with `upload.enabled`.
pub fn agent_rbac_with_uploads() -> Vec<serde_json::Value> {
    super::chart::render(&[
        "--set",
        "upload.enabled=true",
        "--show-only",
        "templates/agent-rbac.yaml",
    ])
}

/// A host of its own with the demo ISO in `DEMO_DIR`.
pub fn demo_host() -> Sandbox {
    let sandbox = Sandbox::new();
    let demo = sandbox.data_dir().join("demo");
    std::fs::create_dir_all(&demo).expect("demo dir");
    std::fs::copy(
        super::repo().join("examples/standalone/discus-demo.iso"),
        demo.join("discus-demo.iso"),
    )
    .expect("demo iso");
    sandbox
}
