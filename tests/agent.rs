//! `discus agent` on a real control plane: agents with node identities of their own, each in a
//! host of its own (its own network namespace, /var/lib/discus and tgtd) on a private LAN with
//! the apiserver, report per node; real initiators read the images from every node.

mod support;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, PostParams};
use kube::core::DynamicObject;
use kube::discovery::ApiResource;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::control_plane::ControlPlane;
use support::network::Lan;
use support::sandbox::Sandbox;

const INITIATOR: &str = "iqn.2026-11.dev.discus:demo-client";
const DEMO_ISO_SHA256: &str = "ad0d2d0256c2a826232a63c44422745af135642c0aceaed052216215868e4795";

/// A control plane and storage nodes on one LAN.
struct Cluster {
    lan: Lan,
    plane: ControlPlane,
    client: kube::Client,
    agents: Vec<Agent>,
}

/// One storage node: a host of its own, its Node object, and its agent.
struct Agent {
    name: String,
    address: std::net::Ipv4Addr,
    sandbox: Sandbox,
    process: Option<Child>,
}

impl Cluster {
    async fn start() -> Self {
        let lan = Lan::new();
        let host = Sandbox::new();
        let address = lan.plug(&host, 10);
        let plane = ControlPlane::start_in(host, address.into())
            .await
            .expect("control plane");
        plane.install_crds().await.expect("CRDs");
        let client = plane.client().await.expect("client");
        for namespace in ["demo", "discus-system"] {
            Api::<Namespace>::all(client.clone())
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("ns"),
                )
                .await
                .expect("namespace");
        }
        Self {
            lan,
            plane,
            client,
            agents: Vec::new(),
        }
    }

    /// A storage node at `.<number>` with the demo ISO in its `/var/lib/discus/demo`, and its
    /// agent running.
    async fn add_node(&mut self, name: &str, number: u8) {
        let sandbox = Sandbox::new();
        let address = self.lan.plug(&sandbox, number);
        let demo = sandbox.data_dir().join("demo");
        std::fs::create_dir_all(&demo).expect("demo dir");
        std::fs::copy(
            support::repo().join("examples/standalone/discus-demo.iso"),
            demo.join("discus-demo.iso"),
        )
        .expect("demo iso");
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
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({
                    "status": {"addresses": [{"type": "InternalIP", "address": address.to_string()}]}
                })),
            )
            .await
            .expect("node address");
        let mut agent = Agent {
            name: name.to_owned(),
            address,
            sandbox,
            process: None,
        };
        agent.start(&self.plane.kubeconfig);
        self.agents.push(agent);
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let output = self.plane.kubectl().args(args).output().expect("kubectl");
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    async fn object(&self, kind: &str, namespace: &str, name: &str) -> Value {
        let resource = ApiResource {
            group: "discus.dev".into(),
            version: "v1alpha1".into(),
            api_version: "discus.dev/v1alpha1".into(),
            kind: kind.into(),
            plural: format!("{}s", kind.to_lowercase()).replace("accesss", "accesses"),
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &resource);
        api.get(name)
            .await
            .ok()
            .and_then(|o| serde_json::to_value(o).ok())
            .unwrap_or(Value::Null)
    }

    /// Waits until `done` holds, or fails with what the agents logged.
    async fn wait_for(&self, what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if done().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let logs: Vec<String> = self
            .agents
            .iter()
            .map(|a| format!("--- {}:\n{}", a.name, a.log()))
            .collect();
        panic!("timed out waiting for {what}\n{}", logs.join("\n"));
    }
}

impl Agent {
    fn start(&mut self, kubeconfig: &Path) {
        let log = std::fs::File::create(self.sandbox.path().join("agent.log")).expect("log");
        let child = self
            .sandbox
            .command(env!("CARGO_BIN_EXE_discus"))
            .args([
                "agent",
                "--node-name",
                &self.name,
                "--backend",
                "tgt",
                "--data-dir",
                "/var/lib/discus",
                "--file-root",
                "/var/lib/discus/demo",
                "--lease-namespace",
                "discus-system",
                "--leader-lease-seconds",
                "3",
                "--heartbeat-seconds",
                "1",
                "--node-lost-seconds",
                "4",
                "--prune-seconds",
                "4",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "discus=debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("discus agent starts");
        self.process = Some(child);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.sandbox.path().join("agent.log")).unwrap_or_default()
    }

    fn portal(&self) -> String {
        format!("{}:3260", self.address)
    }
}

fn ready(object: &Value) -> bool {
    object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// Who manages what in an object: manager → the fields it owns, as JSON text.
fn managers(object: &Value) -> Vec<(String, String)> {
    object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["manager"].as_str().unwrap_or("").to_owned(),
                m["fieldsV1"].to_string(),
            )
        })
        .collect()
}

fn read_lun(portal: &str, iqn: &str, out: &Path) -> String {
    let options = format!(
        "driver=iscsi,transport=tcp,portal={portal},target={iqn},lun=1,user=demo,password=discus-demo-1,initiator-name={INITIATOR}"
    );
    let output = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw", "--image-opts", &options])
        .arg(out)
        .output()
        .expect("qemu-img runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    hex::encode(Sha256::digest(std::fs::read(out).expect("read back")))
}

fn unit_serial(portal: &str, iqn: &str) -> String {
    // tgt's LUN 0 is its controller: API LUN 0 is LUN 1 on the wire.
    let output = std::process::Command::new("iscsi-inq")
        .args(["-e", "1", "-c", "128", "-i", INITIATOR])
        .arg(format!("iscsi://demo%discus-demo-1@{portal}/{iqn}/1"))
        .output()
        .expect("iscsi-inq runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_agents_serve_the_same_image_and_each_reports_its_own_node() {
    let mut cluster = Cluster::start().await;
    for (name, number) in [("node-a", 11), ("node-b", 12), ("node-c", 13)] {
        cluster.add_node(name, number).await;
    }
    let demo = support::repo().join("examples/standalone/demo.yaml");
    cluster.kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=discus-test",
        "-f",
        demo.to_str().expect("utf-8"),
    ]);

    for (kind, name) in [
        ("DiscImage", "discus-demo"),
        ("IscsiTarget", "demo"),
        ("InitiatorAccess", "demo-client"),
    ] {
        cluster
            .wait_for(
                &format!("{kind} {name} Ready on three nodes"),
                Duration::from_secs(90),
                async || {
                    let object = cluster.object(kind, "demo", name).await;
                    ready(&object)
                        && object
                            .pointer("/status/nodes")
                            .and_then(Value::as_array)
                            .is_some_and(|n| n.len() == 3)
                },
            )
            .await;
    }

    // Each node's entry is its own manager's, and only the lease holder writes the conditions.
    let target = cluster.object("IscsiTarget", "demo", "demo").await;
    let owners = managers(&target);
    for agent in &cluster.agents {
        let manager = discus::agent::field_manager(&agent.name);
        let owned: Vec<&(String, String)> = owners.iter().filter(|(m, _)| *m == manager).collect();
        assert_eq!(owned.len(), 1, "{manager}: {owners:#?}");
        assert!(
            owned[0]
                .1
                .contains(&format!("{{\\\"node\\\":\\\"{}\\\"}}", agent.name)),
            "{owned:?}"
        );
        for other in cluster.agents.iter().filter(|o| o.name != agent.name) {
            assert!(
                !owned[0].1.contains(&other.name),
                "{manager} owns {}'s entry",
                other.name
            );
        }
        assert!(!owned[0].1.contains("conditions"), "{owned:?}");
    }
    assert!(
        owners
            .iter()
            .any(|(m, f)| m == "discus-leader" && f.contains("conditions")),
        "{owners:#?}"
    );
    let grant = cluster
        .object("InitiatorAccess", "demo", "demo-client")
        .await;
    let portals = grant
        .pointer("/status/connection/portals")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    assert_eq!(portals.len(), 3, "{grant:#}");

    // A real initiator reads the image from every node (tgt: API LUN 0 is LUN 1 on the wire),
    // and sees the same LUN serial.
    let iqn = "iqn.2026-11.dev.discus:demo";
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut serials = Vec::new();
    for agent in &cluster.agents {
        let out = scratch.path().join(format!("{}.iso", agent.name));
        assert_eq!(
            read_lun(&agent.portal(), iqn, &out),
            DEMO_ISO_SHA256,
            "{}",
            agent.name
        );
        let inquiry = unit_serial(&agent.portal(), iqn);
        let serial = inquiry
            .lines()
            .find(|l| l.contains("Unit Serial Number"))
            .unwrap_or_default()
            .to_owned();
        assert!(!serial.is_empty(), "{inquiry}");
        serials.push(serial);
    }
    serials.dedup();
    assert_eq!(serials.len(), 1, "{serials:?}");
}
