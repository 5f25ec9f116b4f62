//! `discus agent` on a real control plane: agents with node identities of their own, each in a
//! host of its own (its own network namespace, /var/lib/discus and tgtd) on a private LAN with
//! the apiserver, report per node; real initiators read the images from every node. The agents
//! authenticate as the shipped ServiceAccount with the shipped roles (deploy/rbac/), and the
//! apiserver's audit log tells what they did.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::{SignedDuration, Timestamp, Unit};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::core::DynamicObject;
use kube::discovery::ApiResource;
use serde_json::{Value, json};
use support::api_front::{ApiFront, Fault};
use support::cluster::{DEMO_DIR, Kube};
use support::control_plane::ControlPlane;
use support::initiator::{self, Login};
use support::kstatus::{self, Kstatus};
use support::proxy::Proxy;
use support::sandbox::Sandbox;

const INITIATOR: &str = "iqn.2026-11.dev.discus:demo-client";
const DEMO_ISO_SHA256: &str = "ad0d2d0256c2a826232a63c44422745af135642c0aceaed052216215868e4795";
const AGENT_USER: &str = "system:serviceaccount:discus-system:discus-agent";
const DEMO_IQN: &str = "iqn.2026-11.dev.discus:demo";
/// Where every agent answers iPXE.
const BOOT_PORT: u16 = 8090;

/// A control plane and storage nodes on one LAN.
struct Cluster {
    kube: Kube,
    agents: Vec<Agent>,
}

/// One storage node: a host of its own, its Node object, and its agent.
struct Agent {
    name: String,
    address: std::net::Ipv4Addr,
    sandbox: Sandbox,
    process: Option<Child>,
}

impl std::ops::Deref for Cluster {
    type Target = Kube;
    fn deref(&self) -> &Kube {
        &self.kube
    }
}

impl std::ops::DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut Kube {
        &mut self.kube
    }
}

impl Cluster {
    async fn start() -> Self {
        Self::with(Kube::on_lan("demo").await)
    }

    fn with(kube: Kube) -> Self {
        Self {
            kube,
            agents: Vec::new(),
        }
    }

    /// A storage node at `.<number>` with the demo ISO in its `/var/lib/discus/demo`, and its
    /// agent running.
    async fn add_node(&mut self, name: &str, number: u8) {
        let kubeconfig = self.agent_kubeconfig.clone();
        self.add_node_with(name, number, &kubeconfig, &[]).await;
    }

    /// Like `add_node`, the agent with its own kubeconfig and more options.
    async fn add_node_with(&mut self, name: &str, number: u8, kubeconfig: &Path, extra: &[&str]) {
        let (sandbox, address) = self.storage_host(number);
        self.create_node(name, address).await;
        let mut agent = Agent {
            name: name.to_owned(),
            address,
            sandbox,
            process: None,
        };
        agent.start_with(kubeconfig, extra);
        self.agents.push(agent);
    }

    fn agent(&mut self, name: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|a| a.name == name)
            .expect("such an agent")
    }

    fn agent_ref(&self, name: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.name == name)
            .expect("such an agent")
    }

    /// Applies objects as a user would, with kubectl (JSON documents in one YAML stream).
    fn apply_objects(&self, objects: &[Value]) {
        let documents: Vec<String> = objects.iter().map(Value::to_string).collect();
        self.apply(&documents.join("\n---\n"));
    }

    /// Applies manifests (YAML text) as a user would, with kubectl.
    fn apply(&self, yaml: &str) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), yaml).expect("write");
        self.kubectl(&[
            "apply",
            "--server-side",
            "--field-manager=discus-test",
            "-f",
            file.path().to_str().expect("utf-8"),
        ]);
    }

    /// The nodes of an object's `status.nodes`, with their reasons.
    async fn entries(&self, kind: &str, name: &str) -> Vec<(String, Option<String>)> {
        self.object(kind, "demo", name)
            .await
            .pointer("/status/nodes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["node"].as_str().unwrap_or_default().to_owned(),
                    e["reason"].as_str().map(str::to_owned),
                )
            })
            .collect()
    }

    /// Waits until an object is Ready with an entry for each of `nodes`, and no other.
    async fn wait_ready_on(&self, kind: &str, name: &str, nodes: &[&str]) {
        let mut wanted: Vec<&str> = nodes.to_vec();
        wanted.sort_unstable();
        self.wait_for(
            &format!("{kind} {name} Ready on {wanted:?}"),
            Duration::from_secs(90),
            async || {
                let object = self.object(kind, "demo", name).await;
                // Each node's own entry must say so too: the lease holder judges over the
                // entries it has, and a node that has not reported yet is not among them.
                let entries: Vec<&Value> = object
                    .pointer("/status/nodes")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .collect();
                let mut on: Vec<&str> = entries.iter().filter_map(|e| e["node"].as_str()).collect();
                on.sort_unstable();
                let each_ready = entries.iter().all(|e| {
                    e["phase"] == "Ready"
                        || e["ready"] == json!(true)
                        || e["applied"] == json!(true)
                });
                ready(&object) && each_ready && on == wanted
            },
        )
        .await;
    }

    /// Waits until the grant's connection lists `count` portals: the lease holder adds a node's
    /// portal a moment after that node's entry says Ready (a Ready's details are coalesced).
    async fn wait_for_portals(&self, grant: &str, count: usize) {
        self.wait_for(
            &format!("InitiatorAccess {grant}'s connection with {count} portals"),
            Duration::from_secs(60),
            async || {
                let grant = self.object("InitiatorAccess", "demo", grant).await;
                (grant.pointer("/status/connection/portals"))
                    .and_then(Value::as_array)
                    .is_some_and(|p| p.len() == count)
            },
        )
        .await;
    }

    /// The Events (events.k8s.io) in the demo namespace.
    async fn events(&self) -> Vec<Value> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), "demo");
        api.list(&Default::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter_map(|e| serde_json::to_value(e).ok())
            .collect()
    }

    /// The agents' requests to the apiserver so far.
    fn agent_requests(&self) -> Vec<Value> {
        self.plane
            .audit_events()
            .into_iter()
            .filter(|e| e.pointer("/user/username") == Some(&json!(AGENT_USER)))
            .collect()
    }

    async fn object(&self, kind: &str, namespace: &str, name: &str) -> Value {
        self.api(kind, namespace)
            .get(name)
            .await
            .ok()
            .and_then(|o| serde_json::to_value(o).ok())
            .unwrap_or(Value::Null)
    }

    /// The API of one of discus's kinds in a namespace.
    fn api(&self, kind: &str, namespace: &str) -> Api<DynamicObject> {
        let resource = ApiResource {
            group: "discus.dev".into(),
            version: "v1alpha1".into(),
            api_version: "discus.dev/v1alpha1".into(),
            kind: kind.into(),
            plural: format!("{}s", kind.to_lowercase()).replace("accesss", "accesses"),
        };
        Api::namespaced_with(self.client.clone(), namespace, &resource)
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
    /// SIGKILL: no goodbye, as when a node dies. Its tgtd keeps serving.
    fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            self.sandbox.kill(&mut child);
        }
    }

    /// SIGTERM, as the kubelet stops a Pod; returns whether the agent then exited with 0.
    fn terminate(&mut self) -> bool {
        let Some(mut child) = self.process.take() else {
            return false;
        };
        for pid in support::children(child.id()) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.sandbox.kill(&mut child);
        false
    }

    /// GET on the agent's HTTP endpoints: (status code, body).
    fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()))
    }

    /// Like `get`; (0, "") while the agent does not answer (it is starting).
    fn get_or_nothing(&self, path: &str) -> (u16, String) {
        self.try_get(path).unwrap_or_default()
    }

    fn try_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect((self.address, 9464))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n",
            self.address
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    }

    fn tgtadm(&self, args: &[&str]) -> String {
        let mut all = vec!["tgtadm", "-C", "3261", "--lld", "iscsi"];
        all.extend_from_slice(args);
        self.sandbox.must(&all)
    }

    /// Starts the agent (again: its log goes on).
    fn start_with(&mut self, kubeconfig: &Path, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.sandbox.path().join("agent.log"))
            .expect("log");
        let http = format!("{}:9464", self.address);
        let boot = format!("{}:{BOOT_PORT}", self.address);
        let upload = format!("{}:8443", self.address);
        // Quick liveness: a leader replaced within seconds; nodes judged lost after 20 s of
        // silence, not 4 — on two busy cores a loaded CI run once saw 4 s pass between two of a
        // live node's heartbeats, and the lease holder marked it lost in a test about something
        // else. The test of lost nodes sets `LOST_NODES_QUICKLY` (8 s) in `extra`.
        let liveness = [
            ("--leader-lease-seconds", "3"),
            ("--heartbeat-seconds", "1"),
            ("--node-lost-seconds", "20"),
            ("--prune-seconds", "10"),
        ];
        let liveness = (liveness.into_iter())
            .filter(|(flag, _)| !extra.contains(flag))
            .flat_map(|(flag, value)| [flag, value]);
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
                DEMO_DIR,
                "--namespaces",
                "demo",
                // The demo target's IQN is not under the namespace's own default prefix.
                "--iqn-prefix",
                "demo=iqn.2026-11.dev.discus:",
                "--lease-namespace",
                "discus-system",
                "--log-format",
                "json",
                "--log-level",
                "debug",
                "--http-address",
                &http,
                "--boot-address",
                &boot,
                "--upload-listen",
                &upload,
            ])
            .args(liveness)
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
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

/// Reads LUN 0 as the demo's client (tgt: API LUN 0 is LUN 1 on the wire) and returns the
/// SHA-256 of what was read.
fn read_lun(portal: &str, iqn: &str, lun: u32, out: &Path) -> String {
    let login = Login {
        portal,
        iqn,
        lun,
        initiator: INITIATOR,
        user: "demo",
        password: "discus-demo-1",
    };
    initiator::read_lun(&login, out).unwrap_or_else(|e| panic!("{e}"))
}

fn unit_serial(portal: &str, iqn: &str) -> String {
    inquiry(portal, iqn, INITIATOR, "demo", "discus-demo-1")
}

/// The unit serial number page of LUN 0 (tgt's LUN 1: its LUN 0 is the controller), as
/// `initiator` logging in with CHAP; empty when the login fails.
fn inquiry(portal: &str, iqn: &str, initiator: &str, user: &str, password: &str) -> String {
    let output = std::process::Command::new("iscsi-inq")
        .args(["-e", "1", "-c", "128", "-i", initiator])
        .arg(format!("iscsi://{user}%{password}@{portal}/{iqn}/1"))
        .output()
        .expect("iscsi-inq runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The demo of examples/standalone with the file root every node has.
fn demo_manifests() -> String {
    std::fs::read_to_string(support::repo().join("examples/standalone/demo.yaml")).expect("demo")
}

/// An InitiatorAccess in `demo` for the demo target with the demo CHAP Secret; `spec` adds to
/// (or replaces) its spec's fields.
fn grant(name: &str, initiator: &str, spec: Value) -> Value {
    let mut grant = json!({
        "apiVersion": "discus.dev/v1alpha1",
        "kind": "InitiatorAccess",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {
            "targetRef": {"name": "demo"},
            "initiatorIqn": initiator,
            "chap": {"secretRef": {"name": "demo-chap"}},
        },
    });
    if let (Some(base), Value::Object(extra)) = (grant["spec"].as_object_mut(), spec) {
        base.extend(extra);
    }
    grant
}

/// Audit events that wrote (anything but read) a resource of `group`.
fn writes_to(events: &[Value], group: &str) -> usize {
    events
        .iter()
        .filter(|e| e.pointer("/objectRef/apiGroup").and_then(Value::as_str) == Some(group))
        .filter(|e| !matches!(e["verb"].as_str(), Some("get" | "list" | "watch")))
        .count()
}

/// (apiGroup, resource[/subresource], verb) of every rule of the shipped roles (the chart's, as
/// deploy/rbac/ has them, with uploads on).
fn granted() -> std::collections::BTreeSet<support::rbac::Permission> {
    support::rbac::granted(&support::cluster::agent_rbac_with_uploads())
}

/// What the agents' requests used, as (apiGroup, resource[/subresource], verb).
fn used(requests: &[Value]) -> std::collections::BTreeSet<support::rbac::Permission> {
    support::rbac::used(requests)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_agents_serve_the_same_image_and_each_reports_its_own_node() {
    let mut cluster = Cluster::start().await;
    for (name, number) in [("node-a", 11), ("node-b", 12), ("node-c", 13)] {
        cluster.add_node(name, number).await;
    }
    let nodes = ["node-a", "node-b", "node-c"];
    cluster.apply(&demo_manifests());
    the_demo_becomes_current_on_every_node(&cluster, &nodes).await;
    each_node_reports_its_own_entries_and_the_lease_holder_writes_the_status(&cluster).await;
    each_heartbeat_carries_its_node_s_labels(&cluster).await;
    every_node_serves_the_same_disc_under_the_same_serial(&cluster);
    let password = a_generated_secret_works_on_every_node(&cluster, &nodes).await;
    a_changed_spec_is_in_progress_until_every_node_caught_up(&cluster).await;
    a_wrong_digest_stalls_and_the_rest_keeps_serving(&cluster).await;
    events_tell_what_happened_on_each_node(&cluster, &nodes).await;
    every_node_boots_a_card_through_every_node_and_tells_it(&cluster).await;
    each_agent_says_how_it_is(&cluster);
    an_image_uploaded_by_a_user_rbac_allows_is_stored_where_it_is_needed(&mut cluster).await;
    an_older_crd_is_told_and_brings_no_writes_at_rest(&cluster).await;
    let requests = nothing_is_written_at_rest(&cluster).await;
    the_agents_use_exactly_their_rights_and_never_show_a_secret(&cluster, &requests, &password)
        .await;
}

/// A user uploads an image with `discus image upload` from a host of its own, bound only by
/// the Role docs/upload.md gives; the node that needs it (and only it) receives it over HTTPS,
/// verifies and stores it. Another user, who may not read the token's Secret, is refused with
/// the rule it lacks. A run killed half-way resumes from what the node holds; a run whose node's
/// agent is killed and started again under it goes on once the node is back.
async fn an_image_uploaded_by_a_user_rbac_allows_is_stored_where_it_is_needed(
    cluster: &mut Cluster,
) {
    const SIZE: usize = 256 << 20;
    let image: Vec<u8> = (0..SIZE as u64)
        .step_by(8)
        .flat_map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 7).to_le_bytes())
        .collect();
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&image));
    let host = Sandbox::new();
    cluster.lan.as_ref().expect("a LAN").plug(&host, 50);
    let file = host.scratch("upload").join("disc.raw");
    std::fs::write(&file, &image).expect("the image file");
    cluster.kubectl(&["label", "node", "node-b", "upload-here=yes"]);
    cluster.apply_objects(&[json!({
        "apiVersion": "discus.dev/v1alpha1",
        "kind": "DiscImage",
        "metadata": {"name": "uploaded", "namespace": "demo"},
        "spec": {
            "source": {"upload": {}},
            "sha256": digest,
            "format": "raw",
            "nodeSelector": {"matchLabels": {"upload-here": "yes"}},
        },
    })]);
    let uploader = uploader_kubeconfig(cluster, "uploader", true).await;
    let bystander = uploader_kubeconfig(cluster, "bystander", false).await;
    let upload = |kubeconfig: &Path| {
        let mut command = host.command(env!("CARGO_BIN_EXE_discus"));
        command.args(["image", "upload"]).arg(&file).args([
            "--name",
            "uploaded",
            "-n",
            "demo",
            "-o",
            "json",
            "--timeout-seconds",
            "180",
            "--kubeconfig",
        ]);
        command.arg(kubeconfig);
        command
    };

    let refused = upload(&bystander).output().expect("discus image upload");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("403 Forbidden") && stderr.contains("Secret demo/uploaded-upload"),
        "{stderr}"
    );

    // Killed once the node holds a part of it…
    let uid = cluster.object("DiscImage", "demo", "uploaded").await["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_owned();
    let part = (cluster.agent_ref("node-b").sandbox.data_dir())
        .join("uploads")
        .join(format!("{uid}.part"));
    let mut first = upload(&uploader)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("discus image upload");
    let Some(_) = part_reaches(&part, 16 << 20).await else {
        panic!("the first run sent all of the image before it could be stopped");
    };
    pause(&first);
    let killed_at = std::fs::metadata(&part).expect("the part").len();
    host.kill(&mut first);
    // …it resumes from there, and goes on when the node's agent restarts under it.
    let second = upload(&uploader)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("discus image upload");
    part_reaches(&part, killed_at + (4 << 20)).await;
    // Held still while the agent restarts, so that the restart lands under its request (unless
    // every byte arrived already: then the node stores them once it is back, by itself — or,
    // on busy cores, had stored them before it was killed).
    pause(&second);
    let kubeconfig = cluster.agent_kubeconfig.clone();
    let stored = (cluster.agent_ref("node-b").sandbox.data_dir())
        .join("images")
        .join(format!("{digest}.raw"));
    let agent = cluster.agent("node-b");
    let held_at_restart = std::fs::metadata(&part).map_or(0, |m| m.len());
    let log_before_restart = agent.log().len();
    agent.kill();
    let stored_before_restart = stored.exists();
    agent.start_with(&kubeconfig, &[]);
    go_on(&second);
    let output = second.wait_with_output().expect("discus image upload");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let uploaded: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    println!("discus image upload, resumed: {uploaded}");
    assert_eq!(uploaded["sha256"], json!(digest));
    assert_eq!(uploaded["nodes"], json!(["node-b"]));
    assert!(uploaded["resumedFrom"].as_u64() > Some(0), "{uploaded}");
    // Neither the first run's bytes nor those the restarted node held were sent again.
    let size = uploaded["bytes"].as_u64().expect("bytes");
    assert!(uploaded["sentBytes"].as_u64() < Some(size), "{uploaded}");
    let restarted = cluster.agent_ref("node-b").log()[log_before_restart..].to_owned();
    let kept = restarted.lines().any(|line| {
        let resumed = line.contains("resuming an upload from what the node holds")
            && line_number(line, "\"bytes\":") >= Some(held_at_restart);
        resumed || line.contains("the upload the node holds is complete and its digest matches")
    });
    assert!(
        kept || stored_before_restart,
        "node-b kept the {held_at_restart} bytes it held:\n{restarted}"
    );
    if stored_before_restart {
        println!("the upload was stored before node-b's agent was killed: nothing to resume");
    }
    cluster
        .wait_ready_on("DiscImage", "uploaded", &["node-b"])
        .await;
    let bytes = std::fs::read(&stored).expect("stored on node-b");
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
        digest
    );
    for other in ["node-a", "node-c"] {
        let elsewhere = (cluster.agent_ref(other).sandbox.data_dir()).join("images");
        assert!(!elsewhere.join(format!("{digest}.raw")).exists(), "{other}");
    }
    // The token never shows where it should not.
    let secret = cluster.kubectl(&[
        "get",
        "secret",
        "-n",
        "demo",
        "uploaded-upload",
        "-o",
        "jsonpath={.data.token}",
    ]);
    let token = String::from_utf8(
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, secret.trim())
            .expect("base64"),
    )
    .expect("text");
    for agent in &cluster.agents {
        assert!(
            !agent.log().contains(&token),
            "{} logged the token",
            agent.name
        );
    }
    the_other_node_that_needs_it_fetches_it_from_the_node_that_holds_it(cluster, &digest).await;
}

/// Stops the program a sandbox's `command` started. nsenter, which waits for it, stops too once
/// it sees it stopped: that is waited for, or a `go_on` could reach nsenter first, and nsenter
/// would then stop for good.
/// Waits until the upload's part on a node holds `bytes` at least, and returns its length then,
/// or `None` once it is gone from `uploads/` after it was seen (every byte arrived). Looks
/// every 10 ms: over loopback an upload moves tens of megabytes between two looks of
/// `Cluster::wait_for`.
async fn part_reaches(part: &Path, bytes: u64) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = false;
    loop {
        match std::fs::metadata(part) {
            Ok(held) if held.len() >= bytes => return Some(held.len()),
            Ok(_) => seen = true,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && seen => return None,
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "{} did not reach {bytes} bytes within 120 s",
            part.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn pause(child: &std::process::Child) {
    let program = support::children(child.id());
    for &pid in &program {
        assert!(support::signal_pid(pid, "STOP"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let running = |pid: u32| process_state(pid).is_some_and(|s| s != 'Z');
    while process_state(child.id()) != Some('T') && program.iter().any(|&pid| running(pid)) {
        assert!(
            Instant::now() < deadline,
            "nsenter never stopped with its program"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lets a `pause`d program go on: nsenter, once continued, continues its program.
fn go_on(child: &std::process::Child) {
    assert!(support::signal(child, "CONT"));
    for pid in support::children(child.id()) {
        assert!(support::signal_pid(pid, "CONT"));
    }
}

/// A process's state (`R`, `S`, `T`, `Z`…), if it is there.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// The number after `key` in a log line.
fn line_number(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// node-c comes to need the uploaded image: it fetches it from node-b (which holds the verified
/// copy), not from the user; an initiator reads the same bytes under the same serial from both.
async fn the_other_node_that_needs_it_fetches_it_from_the_node_that_holds_it(
    cluster: &Cluster,
    digest: &str,
) {
    const IQN: &str = "iqn.2026-11.dev.discus:uploaded";
    cluster.kubectl(&["label", "node", "node-c", "upload-here=yes"]);
    cluster.apply_objects(&[
        json!({
            "apiVersion": "discus.dev/v1alpha1",
            "kind": "IscsiTarget",
            "metadata": {"name": "uploaded", "namespace": "demo"},
            "spec": {
                "iqn": IQN,
                "luns": [{"lun": 0, "image": "uploaded"}],
                "nodeSelector": {"matchLabels": {"upload-here": "yes"}},
            },
        }),
        json!({
            "apiVersion": "discus.dev/v1alpha1",
            "kind": "InitiatorAccess",
            "metadata": {"name": "uploaded-client", "namespace": "demo"},
            "spec": {
                "targetRef": {"name": "uploaded"},
                "initiatorIqn": INITIATOR,
                "chap": {"secretRef": {"name": "demo-chap"}},
            },
        }),
    ]);
    cluster
        .wait_ready_on("DiscImage", "uploaded", &["node-b", "node-c"])
        .await;
    cluster
        .wait_ready_on("IscsiTarget", "uploaded", &["node-b", "node-c"])
        .await;
    let fetched = cluster.agent_ref("node-c").log();
    assert!(
        fetched.contains("stored an uploaded image fetched from another node")
            && fetched.contains("node-b"),
        "node-c did not fetch it from node-b"
    );
    let image = cluster.object("DiscImage", "demo", "uploaded").await;
    let entries = image["status"]["nodes"].as_array().expect("entries");
    for entry in entries {
        assert_eq!(entry["servedSha256"], json!(digest), "{entry}");
        assert!(entry["peer"]["certificateSha256"].is_string(), "{entry}");
    }
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut serials = Vec::new();
    for node in ["node-b", "node-c"] {
        let portal = cluster.agent_ref(node).portal();
        let out = scratch.path().join(node);
        assert_eq!(read_lun(&portal, IQN, 1, &out), digest, "{node}");
        let inquiry = unit_serial(&portal, IQN);
        let serial = (inquiry.lines())
            .find(|l| l.contains("Unit Serial Number"))
            .unwrap_or_default()
            .to_owned();
        assert!(!serial.is_empty(), "{node}: {inquiry}");
        serials.push(serial);
    }
    serials.dedup();
    assert_eq!(serials.len(), 1, "{serials:?}");
    // The peer tokens node-c minted never show either (a JWT's header starts so).
    for agent in &cluster.agents {
        assert!(
            !agent.log().contains("eyJ"),
            "{} logged a token",
            agent.name
        );
    }
    cluster.kubectl(&["label", "node", "node-c", "upload-here-"]);
    cluster.kubectl(&[
        "delete",
        "-n",
        "demo",
        "iscsitarget/uploaded",
        "initiatoraccess/uploaded-client",
    ]);
}

/// A ServiceAccount in `demo` with the Role docs/upload.md gives (without the token's Secret
/// unless `secret`), and a kubeconfig of its token.
async fn uploader_kubeconfig(cluster: &Cluster, name: &str, secret: bool) -> std::path::PathBuf {
    let mut rules = vec![json!({
        "apiGroups": ["discus.dev"], "resources": ["discimages"], "verbs": ["get", "create", "patch"],
    })];
    if secret {
        rules.push(json!({
            "apiGroups": [""], "resources": ["secrets"],
            "resourceNames": ["uploaded-upload"], "verbs": ["get"],
        }));
    }
    cluster.apply_objects(&[
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": "demo"}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": "demo"}, "rules": rules,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": "demo"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "demo"}],
        }),
    ]);
    cluster
        .plane
        .service_account_kubeconfig("demo", name)
        .await
        .expect("a token")
}

async fn the_demo_becomes_current_on_every_node(cluster: &Cluster, nodes: &[&str]) {
    for (kind, name) in [
        ("DiscImage", "discus-demo"),
        ("IscsiTarget", "demo"),
        ("InitiatorAccess", "demo-client"),
    ] {
        cluster.wait_ready_on(kind, name, nodes).await;
        let object = cluster.object(kind, "demo", name).await;
        assert_eq!(kstatus::compute(&object), Kstatus::Current, "{object:#}");
    }
}

/// Each node reports its own entries, in ConfigMaps of its own, and the lease holder alone
/// writes the status: every node's entry and the conditions merged from them.
async fn each_node_reports_its_own_entries_and_the_lease_holder_writes_the_status(
    cluster: &Cluster,
) {
    let reports: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), "discus-system");
    let listed = reports
        .list(&ListParams::default().labels("discus.dev/report"))
        .await
        .expect("the nodes' reports");
    for agent in &cluster.agents {
        let manager = discus::agent::field_manager(&agent.name);
        let own: Vec<&ConfigMap> = (listed.items.iter())
            .filter(|r| r.data.as_ref().and_then(|d| d.get("node")) == Some(&agent.name))
            .collect();
        assert!(!own.is_empty(), "{} has no report", agent.name);
        for report in own {
            let value = serde_json::to_value(report).expect("a report");
            let owners: Vec<String> = managers(&value).into_iter().map(|(m, _)| m).collect();
            assert_eq!(owners, std::slice::from_ref(&manager), "{value:#}");
            let entries: Vec<Value> =
                serde_json::from_str(value["data"]["entries"].as_str().unwrap_or("[]"))
                    .expect("entries");
            assert!(
                (entries.iter()).all(|e| e["entry"]["node"] == agent.name.as_str()),
                "{entries:#?}"
            );
        }
    }
    let target = cluster.object("IscsiTarget", "demo", "demo").await;
    let status_writers: Vec<String> = (target.pointer("/metadata/managedFields"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| m["subresource"] == "status")
        .map(|m| m["manager"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(status_writers, ["discus-leader"], "{target:#}");
    let entries = target.pointer("/status/nodes").and_then(Value::as_array);
    assert_eq!(
        entries.map(Vec::len),
        Some(cluster.agents.len()),
        "{target:#}"
    );
    cluster.wait_for_portals("demo-client", 3).await;
}

/// Every agent's heartbeat Lease carries its Node's labels, from which the lease holder knows
/// which nodes should serve what (so that a Ready waits for them).
async fn each_heartbeat_carries_its_node_s_labels(cluster: &Cluster) {
    let wanted = json!({"discus.dev/storage": "true"});
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let labels = heartbeat_labels(cluster).await;
        let carried = |agent: &str| {
            labels
                .get(agent)
                .is_some_and(|l| l.as_ref() == Some(&wanted))
        };
        if cluster.agents.iter().all(|agent| carried(&agent.name)) {
            return;
        }
        assert!(Instant::now() < deadline, "heartbeats: {labels:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The labels each node's heartbeat Lease carries (`None`: none readable).
async fn heartbeat_labels(cluster: &Cluster) -> BTreeMap<String, Option<Value>> {
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), "discus-system");
    let listed = leases
        .list(&ListParams::default().labels("discus.dev/heartbeat"))
        .await
        .expect("heartbeat Leases");
    (listed.items.iter())
        .filter_map(|lease| {
            let node = lease.spec.as_ref()?.holder_identity.clone()?;
            let labels = (lease.metadata.annotations.as_ref())
                .and_then(|a| a.get("discus.dev/node-labels"))
                .and_then(|l| serde_json::from_str(l).ok());
            Some((node, labels))
        })
        .collect()
}

/// A real initiator reads the image from every node (tgt: API LUN 0 is LUN 1 on the wire), and
/// sees the same LUN serial.
fn every_node_serves_the_same_disc_under_the_same_serial(cluster: &Cluster) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut serials = Vec::new();
    for agent in &cluster.agents {
        let out = scratch.path().join(format!("{}.iso", agent.name));
        assert_eq!(
            read_lun(&agent.portal(), DEMO_IQN, 1, &out),
            DEMO_ISO_SHA256,
            "{}",
            agent.name
        );
        let inquiry = unit_serial(&agent.portal(), DEMO_IQN);
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

const GENERATED: &str = "iqn.2026-11.dev.discus:generated";

/// The grant whose CHAP Secret discus generates, on `target`.
fn generated_grant(target: &str) -> Value {
    grant(
        "generated",
        GENERATED,
        json!({
            "targetRef": {"name": target},
            "chap": {"secretRef": {"name": "generated-chap"}, "generateSecret": true},
        }),
    )
}

/// A grant with generateSecret gets a random CHAP Secret of its own, owned by the grant, which
/// works on every node. Returns the password.
async fn a_generated_secret_works_on_every_node(cluster: &Cluster, nodes: &[&str]) -> String {
    cluster.apply_objects(&[generated_grant("demo")]);
    cluster
        .wait_ready_on("InitiatorAccess", "generated", nodes)
        .await;
    let secret =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(cluster.client.clone(), "demo")
            .get("generated-chap")
            .await
            .expect("the generated Secret");
    let owner = &secret.metadata.owner_references.as_ref().expect("an owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("InitiatorAccess", "generated")
    );
    let value = |key: &str| {
        String::from_utf8(secret.data.as_ref().expect("data")[key].0.clone()).expect("utf-8")
    };
    let (user, password) = (value("username"), value("password"));
    assert_eq!(password.len(), 16);
    for agent in &cluster.agents {
        let inquiry = inquiry(&agent.portal(), DEMO_IQN, GENERATED, &user, &password);
        assert!(
            inquiry.contains("Unit Serial Number"),
            "{}: {inquiry}",
            agent.name
        );
    }
    let wrong = inquiry(
        &cluster.agents[0].portal(),
        DEMO_IQN,
        GENERATED,
        &user,
        "wrong-password-1",
    );
    assert!(!wrong.contains("Unit Serial Number"), "{wrong}");
    password
}

/// kstatus: a spec change is not Current until every node has applied it — in every version of
/// the object stored from the change on (a watch from the version before it sees each), not only
/// in the one a read happens to find.
async fn a_changed_spec_is_in_progress_until_every_node_caught_up(cluster: &Cluster) {
    let api = cluster.api("InitiatorAccess", "demo");
    let before = api.get("demo-client").await.expect("the grant");
    let version = before.metadata.resource_version.expect("a resourceVersion");
    let params = WatchParams::default().fields("metadata.name=demo-client");
    let mut versions = api.watch(&params, &version).await.expect("a watch").boxed();
    cluster.apply_objects(&[grant(
        "demo-client",
        INITIATOR,
        json!({"expiresAt": "2099-01-01T00:00:00Z"}),
    )]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut states = Vec::new();
    while states.last() != Some(&Kstatus::Current) {
        let event = tokio::time::timeout_at(deadline, versions.next())
            .await
            .unwrap_or_else(|_| panic!("not Current within 60 s; seen {states:?}"))
            .expect("the watch ended")
            .expect("a watch event");
        let WatchEvent::Modified(object) = event else {
            continue;
        };
        let object = serde_json::to_value(object).expect("JSON");
        // A status write about the spec before (sessions ending, say) may still come.
        if object.pointer("/metadata/generation") != Some(&json!(2)) {
            continue;
        }
        let state = kstatus::compute(&object);
        if state == Kstatus::Current {
            let applied: Vec<&Value> = (object.pointer("/status/nodes").and_then(Value::as_array))
                .into_iter()
                .flatten()
                .filter_map(|entry| entry.get("observedGeneration"))
                .collect();
            assert_eq!(
                applied,
                [&json!(2); 3],
                "Current before every node applied it: {object:#}"
            );
        }
        states.push(state);
    }
}

/// A spec only a person can fix (the bytes do not match the digest) ends Failed (Stalled), and
/// the rest keeps serving.
async fn a_wrong_digest_stalls_and_the_rest_keeps_serving(cluster: &Cluster) {
    cluster.apply_objects(&[
        json!({
            "apiVersion": "discus.dev/v1alpha1",
            "kind": "DiscImage",
            "metadata": {"name": "wrong-digest", "namespace": "demo"},
            "spec": {
                "source": {"file": {"path": "/var/lib/discus/demo/discus-demo.iso"}},
                "format": "iso",
                "sha256": "0".repeat(64),
            },
        }),
        json!({
            "apiVersion": "discus.dev/v1alpha1",
            "kind": "IscsiTarget",
            "metadata": {"name": "broken", "namespace": "demo"},
            "spec": {
                "iqn": "iqn.2026-11.dev.discus:broken",
                "luns": [{"lun": 0, "image": "wrong-digest"}],
            },
        }),
    ]);
    cluster
        .wait_for(
            "the wrong digest Stalled",
            Duration::from_secs(60),
            async || {
                let image = cluster.object("DiscImage", "demo", "wrong-digest").await;
                kstatus::compute(&image) == Kstatus::Failed
            },
        )
        .await;
    let image = cluster.object("DiscImage", "demo", "wrong-digest").await;
    let stalled = image
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "Stalled"))
        .cloned()
        .unwrap_or_default();
    assert!(
        stalled["message"]
            .as_str()
            .unwrap_or_default()
            .contains("ad0d2d02"),
        "the message gives the digest found: {stalled:#}"
    );
    for (kind, name) in [("IscsiTarget", "demo"), ("InitiatorAccess", "demo-client")] {
        let object = cluster.object(kind, "demo", name).await;
        assert_eq!(kstatus::compute(&object), Kstatus::Current, "{object:#}");
    }
}

/// Events tell what happened on each node. A grant pointed at a target that cannot be served and
/// back is revoked and applied again: the repeat joins the first one's series.
/// A boot block on the demo grant: each node's script logs in to the target through every
/// node (this one first), and each script served is an Event on the grant.
async fn every_node_boots_a_card_through_every_node_and_tells_it(cluster: &Cluster) {
    const CARD: &str = "52:54:00:b0:07:01";
    cluster.kubectl(&[
        "patch",
        "initiatoraccess",
        "demo-client",
        "-n",
        "demo",
        "--type",
        "merge",
        "-p",
        &json!({"spec": {"boot": {"macAddresses": [CARD]}}}).to_string(),
    ]);
    for agent in &cluster.agents {
        let url = format!("http://{}:{BOOT_PORT}/boot/ipxe?mac={CARD}", agent.address);
        let others: Vec<String> = (cluster.agents.iter())
            .filter(|a| a.name != agent.name)
            .map(|a| format!("iscsi:{}::3260:1:{DEMO_IQN}", a.address))
            .collect();
        let own = format!("sanboot iscsi:{}::3260:1:{DEMO_IQN}", agent.address);
        let mut script = String::new();
        cluster
            .wait_for(
                &format!("{}'s script through every node", agent.name),
                Duration::from_secs(60),
                async || {
                    let output = Command::new("curl")
                        .args(["-s", "--max-time", "10", &url])
                        .output()
                        .expect("curl runs");
                    script = String::from_utf8_lossy(&output.stdout).into_owned();
                    let sanboot = script.lines().find(|l| l.starts_with("sanboot"));
                    sanboot.is_some_and(|l| {
                        l.starts_with(&own) && others.iter().all(|o| l.contains(o))
                    })
                },
            )
            .await;
        assert!(
            script.contains(&format!("set initiator-iqn {INITIATOR}\n")),
            "{script}"
        );
    }
    // Status says where its machines get their script: every node's endpoint.
    let mut urls: Vec<Value> = (cluster.agents.iter())
        .map(|a| json!(format!("http://{}:{BOOT_PORT}/boot/ipxe", a.address)))
        .collect();
    urls.sort_by_key(ToString::to_string);
    cluster
        .wait_for(
            "every node's boot URL in the grant's status",
            Duration::from_secs(60),
            async || {
                let grant = cluster
                    .object("InitiatorAccess", "demo", "demo-client")
                    .await;
                grant.pointer("/status/connection/bootUrls") == Some(&json!(urls))
            },
        )
        .await;
    cluster
        .wait_for(
            "an Event for each script served",
            Duration::from_secs(30),
            async || {
                let events = cluster.events().await;
                cluster.agents.iter().all(|agent| {
                    events.iter().any(|e| {
                        e.pointer("/regarding/name") == Some(&json!("demo-client"))
                            && e["reason"] == "BootScriptServed"
                            && e["note"].as_str().is_some_and(|n| {
                                n.contains(&format!("node {} ", agent.name)) && n.contains(CARD)
                            })
                    })
                })
            },
        )
        .await;
}

async fn events_tell_what_happened_on_each_node(cluster: &Cluster, nodes: &[&str]) {
    for target in ["broken", "demo", "broken", "demo"] {
        cluster.apply_objects(&[generated_grant(target)]);
        cluster
            .wait_for(
                &format!("the grant on {target} seen by every node"),
                Duration::from_secs(30),
                async || {
                    let grant = cluster.object("InitiatorAccess", "demo", "generated").await;
                    let applied = grant
                        .pointer("/status/nodes")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter(|e| e["applied"] == json!(target == "demo"))
                        .count();
                    grant.pointer("/status/observedGeneration")
                        == grant.pointer("/metadata/generation")
                        && applied == nodes.len()
                },
            )
            .await;
    }
    // Events are published after the status they follow: give the last ones a moment. The
    // lease holder tells each arrival once the grant is Ready, naming the nodes: three times
    // (applied, and applied again after each flip back from the broken target) for each node.
    cluster
        .wait_for(
            "the last Applied events",
            Duration::from_secs(10),
            async || {
                let events = cluster.events().await;
                let applied = arrivals(&events, "generated", "Applied");
                nodes.iter().all(|node| applied.get(*node) == Some(&3))
            },
        )
        .await;
    // What docs/agent.md tells users to run finds them.
    let listed = cluster.kubectl(&[
        "get",
        "events",
        "-n",
        "demo",
        "--field-selector",
        "reportingComponent=discus.dev/agent",
        "-o",
        "name",
    ]);
    assert!(listed.lines().count() >= 3 * nodes.len(), "{listed}");
    let events = cluster.events().await;
    let told = |object: &str, reason: &str, node: &str| {
        events.iter().find(|e| {
            e.pointer("/regarding/name") == Some(&json!(object))
                && e["reason"] == reason
                && e["reportingInstance"] == node
        })
    };
    // The lease holder told the cold start's arrivals, several nodes in one Event (a node it
    // did not know yet when the others settled comes in an Event of its own), and every node
    // is named.
    for (object, reason) in [("demo", "Served"), ("discus-demo", "Verified")] {
        let told = arrival_notes(&events, object, reason);
        assert!(
            told.iter().any(|named| named.len() > 1),
            "{object} {reason} on several nodes at once: {told:?}"
        );
        let named: std::collections::BTreeSet<&str> =
            told.iter().flatten().map(String::as_str).collect();
        assert_eq!(named, nodes.iter().copied().collect(), "{told:?}");
    }
    for &node in nodes {
        let failed = told("wrong-digest", "ImportFailed", node).expect("ImportFailed");
        assert_eq!(failed["type"], "Warning");
        let revoked = told("generated", "Revoked", node).expect("Revoked");
        assert_eq!(
            revoked.pointer("/series/count"),
            Some(&json!(2)),
            "{revoked:#}"
        );
    }
}

/// The nodes each of the lease holder's `reason` Events on `object` names, from notes such as
/// "served on nodes node-a, node-b".
fn arrival_notes(events: &[Value], object: &str, reason: &str) -> Vec<Vec<String>> {
    let notes = (events.iter())
        .filter(|e| e.pointer("/regarding/name") == Some(&json!(object)) && e["reason"] == reason)
        .filter_map(|e| e["note"].as_str());
    let nodes = |note: &str| {
        let (_, nodes) = note.split_once(" on node")?;
        let nodes = nodes
            .strip_prefix("s ")
            .or_else(|| nodes.strip_prefix(' '))?;
        Some(nodes.split(", ").map(str::to_owned).collect())
    };
    notes.filter_map(nodes).collect()
}

/// How many of the lease holder's `reason` Events on `object` name each node.
fn arrivals(events: &[Value], object: &str, reason: &str) -> BTreeMap<String, usize> {
    let mut named = BTreeMap::new();
    for node in arrival_notes(events, object, reason).into_iter().flatten() {
        *named.entry(node).or_insert(0) += 1;
    }
    named
}

/// Each agent says how it is: ready, healthy, and what it did, for Prometheus.
fn each_agent_says_how_it_is(cluster: &Cluster) {
    for agent in &cluster.agents {
        assert_eq!(agent.get("/readyz").0, 200, "{}", agent.name);
        assert_eq!(agent.get("/healthz").0, 200, "{}", agent.name);
        let (code, metrics) = agent.get("/metrics");
        assert_eq!(code, 200);
        for family in [
            "discus_sync_passes_total{pass=\"full\"}",
            "discus_sync_duration_seconds_bucket",
            "discus_backend_operations_total{backend=\"tgt\",result=\"ok\"}",
            "discus_targets ",
            "discus_images{state=\"ready\"} 1",
            "discus_images{state=\"failed\"} 1",
            "discus_problems{kind=\"DiscImage\",reason=\"ImportFailed\"} 1",
            "discus_status_writes_total",
            "discus_events_total",
        ] {
            assert!(
                metrics.contains(family),
                "{}: {family} in\n{metrics}",
                agent.name
            );
        }
        assert!(metrics.contains("discus_status_writes_total{to=\"report\"}"));
    }
    // The objects' status, by the lease holder (it may have moved: one at least).
    let object_writes = "discus_status_writes_total{to=\"object\"}";
    assert!(
        (cluster.agents.iter()).any(|agent| agent.get("/metrics").1.contains(object_writes)),
        "no agent counts status writes to objects"
    );
}

/// No churn: once settled, a minute with nothing changing costs no write to discus objects.
/// (Heartbeat Leases are renewed every second in this test, and counted apart.) Returns every
/// request the agents made.
async fn nothing_is_written_at_rest(cluster: &Cluster) -> Vec<Value> {
    cluster
        .wait_for(
            "the agents to settle",
            Duration::from_secs(60),
            async || {
                let before = writes_to(&cluster.agent_requests(), "discus.dev");
                tokio::time::sleep(Duration::from_secs(5)).await;
                writes_to(&cluster.agent_requests(), "discus.dev") == before
            },
        )
        .await;
    let (discus_before, leases_before) = {
        let requests = cluster.agent_requests();
        (
            writes_to(&requests, "discus.dev"),
            writes_to(&requests, "coordination.k8s.io"),
        )
    };
    tokio::time::sleep(Duration::from_secs(60)).await;
    let requests = cluster.agent_requests();
    let discus_writes = writes_to(&requests, "discus.dev") - discus_before;
    let lease_writes = writes_to(&requests, "coordination.k8s.io") - leases_before;
    println!(
        "at rest for 60 s: {discus_writes} writes to discus objects, {lease_writes} Lease renewals"
    );
    assert_eq!(discus_writes, 0, "writes at rest");

    requests
}

/// A CRD older than the agents (installed with `crds.install: false` and not upgraded): here the
/// grants' without their nodes' `observedGeneration`, which the apiserver then drops from every
/// status written. The lease holder tells so in its log and stops writing what never shows (for
/// 10 minutes at a time): the check of writes at rest that follows would fail on a write every
/// 15 s.
async fn an_older_crd_is_told_and_brings_no_writes_at_rest(cluster: &Cluster) {
    let crd = (discus::api::all_crds().into_iter())
        .find(|crd| crd.spec.names.kind == "InitiatorAccess")
        .expect("the InitiatorAccess CRD");
    let mut crd = serde_json::to_value(crd).expect("JSON");
    let entry = "/spec/versions/0/schema/openAPIV3Schema/properties/status/properties/nodes/items/properties";
    (crd.pointer_mut(entry).and_then(Value::as_object_mut))
        .and_then(|properties| properties.remove("observedGeneration"))
        .expect("the entries' observedGeneration in the CRD");
    cluster.apply_objects(&[crd]);
    // A new generation of the grant: each node reports it applied, and the apiserver drops that.
    cluster.apply_objects(&[grant(
        "demo-client",
        INITIATOR,
        json!({"expiresAt": "2098-01-01T00:00:00Z"}),
    )]);
    cluster
        .wait_for(
            "the grant Current at its new generation, the entries' observedGeneration dropped",
            Duration::from_secs(60),
            async || {
                let grant = cluster
                    .object("InitiatorAccess", "demo", "demo-client")
                    .await;
                let generation = grant.pointer("/metadata/generation");
                let entries = (grant.pointer("/status/nodes").and_then(Value::as_array))
                    .cloned()
                    .unwrap_or_default();
                kstatus::compute(&grant) == Kstatus::Current
                    && grant.pointer("/status/observedGeneration") == generation
                    && entries.len() == 3
                    && entries
                        .iter()
                        .all(|e| e.get("observedGeneration").is_none())
            },
        )
        .await;
    let warning = "the apiserver keeps less of these objects' status than was written";
    cluster
        .wait_for(
            "the lease holder's warning",
            Duration::from_secs(90),
            async || {
                cluster
                    .agents
                    .iter()
                    .any(|agent| agent.log().contains(warning))
            },
        )
        .await;
}

/// Least privilege: nothing the agents asked for was refused, and every permission the shipped
/// roles grant was used. Logs are JSON, one object per line, and no CHAP secret is in them or in
/// any event.
async fn the_agents_use_exactly_their_rights_and_never_show_a_secret(
    cluster: &Cluster,
    requests: &[Value],
    password: &str,
) {
    let refused: Vec<&Value> = requests
        .iter()
        .filter(|e| e.pointer("/responseStatus/code") == Some(&json!(403)))
        .collect();
    assert!(refused.is_empty(), "refused requests: {refused:#?}");
    for agent in &cluster.agents {
        let log = agent.log();
        for line in log.lines() {
            let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(
                entry["level"].is_string() && entry["timestamp"].is_string(),
                "{line}"
            );
        }
        for secret in ["discus-demo-1", password] {
            assert!(!log.contains(secret), "{} logged a CHAP secret", agent.name);
        }
    }
    let events = serde_json::to_string(&cluster.events().await).expect("json");
    assert!(!events.contains("discus-demo-1") && !events.contains(password));
    let mut used = used(requests);
    used.extend(support::rbac::proven_elsewhere());
    let unused: Vec<_> = granted().difference(&used).cloned().collect();
    assert!(
        unused.is_empty(),
        "granted but never used: {unused:?}\nused: {used:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_nodes_are_marked_then_pruned_and_a_dead_leader_is_replaced() {
    let mut cluster = Cluster::start().await;
    let kubeconfig = cluster.agent_kubeconfig.clone();
    for (name, number) in [("node-a", 21), ("node-b", 22), ("node-c", 23)] {
        (cluster.add_node_with(name, number, &kubeconfig, &LOST_NODES_QUICKLY)).await;
    }
    cluster.apply(&demo_manifests());
    cluster
        .wait_ready_on("IscsiTarget", "demo", &["node-a", "node-b", "node-c"])
        .await;
    let leader = cluster.leader().await.expect("a leader");
    let follower = ["node-a", "node-b", "node-c"]
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower")
        .to_owned();

    // A follower dies: its entry is marked NodeLost, then removed; the others stay Ready.
    cluster.agent(&follower).kill();
    cluster
        .wait_for(
            "the dead follower's entry marked",
            Duration::from_secs(30),
            async || {
                cluster
                    .entries("IscsiTarget", "demo")
                    .await
                    .iter()
                    .any(|(n, r)| *n == follower && r.as_deref() == Some("NodeLost"))
            },
        )
        .await;
    let live: Vec<&str> = ["node-a", "node-b", "node-c"]
        .into_iter()
        .filter(|n| *n != follower)
        .collect();
    cluster.wait_ready_on("IscsiTarget", "demo", &live).await;
    cluster
        .wait_ready_on("InitiatorAccess", "demo-client", &live)
        .await;

    // The leader dies: another agent takes the lease and prunes the dead leader's entries.
    let started = Instant::now();
    cluster.agent(&leader).kill();
    cluster
        .wait_for("a new leader", Duration::from_secs(30), async || {
            cluster.leader().await.is_some_and(|l| l != leader)
        })
        .await;
    println!("a new leader after {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(3 + 3 + 5),
        "within the lease time"
    );
    let survivor: Vec<&str> = live.iter().copied().filter(|n| *n != leader).collect();
    cluster
        .wait_ready_on("IscsiTarget", "demo", &survivor)
        .await;
    // Once gone, the dead nodes' reports are deleted by the lease holder.
    cluster
        .wait_for(
            "the dead nodes' reports deleted",
            Duration::from_secs(60),
            async || {
                let reporting = cluster.reporting_nodes().await;
                !reporting.contains(&follower) && !reporting.contains(&leader)
            },
        )
        .await;

    // Deleting a target is never blocked by dead nodes, and the live node stops serving it.
    cluster.kubectl(&[
        "delete",
        "-n",
        "demo",
        "iscsitarget",
        "demo",
        "--wait=false",
    ]);
    cluster
        .wait_for("the target gone", Duration::from_secs(10), async || {
            cluster
                .object("IscsiTarget", "demo", "demo")
                .await
                .is_null()
        })
        .await;
    let survivor = survivor[0].to_owned();
    cluster
        .wait_for(
            "the live node to stop serving it",
            Duration::from_secs(30),
            async || {
                !cluster
                    .agent_ref(&survivor)
                    .tgtadm(&["--mode", "target", "--op", "show"])
                    .contains(DEMO_IQN)
            },
        )
        .await;

    a_heartbeat_carries_new_labels_long_before_its_next_renewal(&mut cluster, &kubeconfig).await;
}

/// An agent starts before its Node is listed, so its first heartbeat carries no labels; it
/// renews within a second when it learns them, and again when the Node is relabelled — not a
/// heartbeat interval later (a minute here), during which the lease holder would not count the
/// node among those an object waits for. (The relabel proves it whatever the start's timing.)
async fn a_heartbeat_carries_new_labels_long_before_its_next_renewal(
    cluster: &mut Cluster,
    kubeconfig: &Path,
) {
    let slow = ["--heartbeat-seconds", "60", "--node-lost-seconds", "180"];
    cluster.add_node_with("node-d", 24, kubeconfig, &slow).await;
    let carried = async |wanted: Value| {
        let labels = heartbeat_labels(cluster).await;
        labels.get("node-d") == Some(&Some(wanted))
    };
    // The agent's start (a debug build, on busy cores) is not what is timed: its first renewal is.
    let started = Duration::from_secs(90);
    (cluster.wait_for("node-d's heartbeat", started, async || {
        heartbeat_labels(cluster).await.contains_key("node-d")
    }))
    .await;
    let storage = json!({"discus.dev/storage": "true"});
    let within = Duration::from_secs(20);
    (cluster.wait_for("node-d's labels in its heartbeat", within, async || {
        carried(storage.clone()).await
    }))
    .await;
    cluster.kubectl(&["label", "node", "node-d", "rack=r2"]);
    let relabelled = json!({"discus.dev/storage": "true", "rack": "r2"});
    (cluster.wait_for("node-d's new label in its heartbeat", within, async || {
        carried(relabelled.clone()).await
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expiring_grant_ends_its_sessions_on_time_on_every_node() {
    let mut cluster = Cluster::start().await;
    for (name, number) in [("node-a", 31), ("node-b", 32)] {
        cluster.add_node(name, number).await;
    }
    let expiring = "iqn.2026-11.dev.discus:expiring";
    let expires_at =
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(25);
    cluster.apply(&demo_manifests());
    let at = expires_at
        .round(k8s_openapi::jiff::Unit::Second)
        .expect("round");
    cluster.apply_objects(&[grant(
        "expiring",
        expiring,
        json!({"expiresAt": at.to_string()}),
    )]);
    cluster
        .wait_ready_on("InitiatorAccess", "expiring", &["node-a", "node-b"])
        .await;
    let mut sessions = sessions_on_every_node(&cluster, expiring);
    cluster
        .wait_for(
            "a session on every node",
            Duration::from_secs(20),
            async || cluster.agents.iter().all(|a| session_on(a, expiring)),
        )
        .await;
    // libiscsi keeps trying to log in again, refused: the session in tgtd is what ends.
    cluster
        .wait_for("the sessions to end", Duration::from_secs(60), async || {
            cluster.agents.iter().all(|a| !session_on(a, expiring))
        })
        .await;
    for session in &mut sessions {
        let _ = session.kill();
        let _ = session.wait();
    }
    let ended = k8s_openapi::jiff::Timestamp::now();
    let late = ended.duration_since(expires_at);
    println!("sessions ended {late} after expiresAt");
    assert!(late.as_secs() < 10, "ended {late} after expiresAt");
    cluster
        .wait_for("the grant Expired", Duration::from_secs(20), async || {
            let grant = cluster.object("InitiatorAccess", "demo", "expiring").await;
            grant
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|c| {
                    c.iter().any(|c| {
                        c["type"] == "Ready" && c["status"] == "False" && c["reason"] == "Expired"
                    })
                })
        })
        .await;
    // The other grant never noticed.
    let grant = cluster
        .object("InitiatorAccess", "demo", "demo-client")
        .await;
    assert!(ready(&grant), "{grant:#}");
    // Who connected when: every node told each session's start and end on the grant (by its
    // UID, which `kubectl describe` looks for).
    let uid = cluster
        .object("InitiatorAccess", "demo", "expiring")
        .await
        .pointer("/metadata/uid")
        .cloned()
        .expect("uid");
    cluster
        .wait_for(
            "LoggedIn and LoggedOut from every node",
            Duration::from_secs(30),
            async || {
                let events = cluster.events().await;
                cluster.agents.iter().all(|agent| {
                    ["LoggedIn", "LoggedOut"].iter().all(|reason| {
                        events.iter().any(|e| {
                            e.pointer("/regarding/name") == Some(&json!("expiring"))
                                && e.pointer("/regarding/uid") == Some(&uid)
                                && e["reason"] == *reason
                                && e["note"].as_str().is_some_and(|n| {
                                    n.starts_with(&format!("{expiring} logged "))
                                        && n.contains(&format!(" on node {}", agent.name))
                                        && n.contains(" from ")
                                })
                        })
                    })
                })
            },
        )
        .await;
    let events = cluster.events().await;
    assert!(
        !events
            .iter()
            .any(|e| e.to_string().contains("discus-demo-1")),
        "a secret in an Event"
    );

    // An agent stopped as the kubelet stops a Pod exits cleanly and leaves its targets serving.
    let node_b = cluster.agent("node-b");
    assert!(
        node_b.terminate(),
        "exit status 0 on SIGTERM:\n{}",
        node_b.log()
    );
    let still = unit_serial(&cluster.agent_ref("node-b").portal(), DEMO_IQN);
    assert!(still.contains("Unit Serial Number"), "{still}");
}

/// Access held by heartbeat: a grant applied on every node only while its holder renews its
/// Lease, with the least rights `discus client-rbac` prints; silence ends the sessions within
/// the grace on every node, a renewal brings access back, a release ends it at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_held_grant_lives_by_its_holder_s_heartbeat_on_every_node() {
    let mut cluster = Cluster::start().await;
    for (name, number) in [("node-a", 81), ("node-b", 82)] {
        cluster.add_node(name, number).await;
    }
    let held = "iqn.2026-11.dev.discus:held";
    let grace = Duration::from_secs(12);
    cluster.apply(&demo_manifests());
    cluster.apply_objects(&[
        grant("held", held, json!({"heartbeat": {"graceSeconds": grace.as_secs()}})),
        grant("other", "iqn.2026-11.dev.discus:other", json!({"chap": {"secretRef": {"name": "other-chap"}}})),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "other-chap", "namespace": "demo"},
               "stringData": {"username": "other", "password": "other-secret-1"}}),
    ]);
    // The client's rights, as an administrator grants them.
    let rbac = support::discus()
        .args([
            "client-rbac",
            "held",
            "-n",
            "demo",
            "--service-account",
            "demo:client-a",
            "--kubeconfig",
        ])
        .arg(cluster.plane.file("admin.kubeconfig"))
        .output()
        .expect("client-rbac");
    assert!(
        rbac.status.success(),
        "{}",
        String::from_utf8_lossy(&rbac.stderr)
    );
    cluster.apply(&String::from_utf8_lossy(&rbac.stdout));
    let client = cluster
        .plane
        .service_account_kubeconfig("demo", "client-a")
        .await
        .expect("token");
    // Nobody renews yet: not applied, and every node says why.
    cluster
        .wait_for(
            "the held grant not applied, with why",
            Duration::from_secs(60),
            async || {
                let entries = cluster.entries("InitiatorAccess", "held").await;
                entries.len() == 2
                    && entries
                        .iter()
                        .all(|(_, r)| r.as_deref() == Some("HeartbeatLapsed"))
            },
        )
        .await;
    assert!(!acl_on(cluster.agent_ref("node-a"), held));

    let mut holder = hold(&client);
    let started = Instant::now();
    cluster
        .wait_ready_on("InitiatorAccess", "held", &["node-a", "node-b"])
        .await;
    println!(
        "held grant applied on every node {:?} after `discus hold` started",
        started.elapsed()
    );
    let status = cluster.object("InitiatorAccess", "demo", "held").await;
    assert_eq!(
        status.pointer("/status/heartbeat/holder"),
        Some(&json!("client-a")),
        "{status:#}"
    );
    // The client's Role reads its own Secret, never another client's.
    let kubectl = |args: &[&str]| {
        cluster
            .plane
            .kubectl()
            .arg("--kubeconfig")
            .arg(&client)
            .args(args)
            .output()
            .expect("kubectl")
    };
    assert!(
        kubectl(&["get", "secret", "-n", "demo", "demo-chap"])
            .status
            .success()
    );
    let refused = kubectl(&["get", "secret", "-n", "demo", "other-chap"]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Forbidden"),
        "{refused:?}"
    );

    let mut sessions = sessions_on_every_node(&cluster, held);
    cluster
        .wait_for(
            "a session on every node",
            Duration::from_secs(20),
            async || cluster.agents.iter().all(|a| session_on(a, held)),
        )
        .await;
    // The holder dies without a word: access ends within the grace and a pass on every node.
    let _ = holder.kill();
    let _ = holder.wait();
    let last_renewal = renew_time(&cluster, "held");
    cluster
        .wait_for(
            "the sessions to end",
            grace + Duration::from_secs(30),
            async || cluster.agents.iter().all(|a| !session_on(a, held)),
        )
        .await;
    let revoked = Timestamp::now().duration_since(last_renewal);
    println!(
        "heartbeat revocation: sessions ended on every node {revoked:#} after the last renewal (grace {grace:?})"
    );
    let past_grace = revoked - SignedDuration::try_from(grace).expect("grace");
    assert!(
        past_grace > SignedDuration::from_millis(-100) && past_grace < SignedDuration::from_secs(5),
        "ended {past_grace:#} past the grace"
    );
    cluster
        .wait_for(
            "Ready False: HeartbeatLapsed",
            Duration::from_secs(20),
            async || {
                let grant = cluster.object("InitiatorAccess", "demo", "held").await;
                // At rest, as its holder wants: not in progress (kstatus Current).
                condition(&grant, "Ready") == Some(("False".into(), "HeartbeatLapsed".into()))
                    && condition(&grant, "Reconciling").is_none_or(|(status, _)| status == "False")
            },
        )
        .await;
    // Renewals again: access comes back, and libiscsi, trying all along, logs in again.
    let mut holder = hold(&client);
    cluster
        .wait_for(
            "sessions again on every node",
            Duration::from_secs(40),
            async || cluster.agents.iter().all(|a| session_on(a, held)),
        )
        .await;
    // Stopped as a person stops it: released, access ends at once.
    let released = Instant::now();
    assert!(support::signal(&holder, "TERM"));
    let status = holder.wait().expect("hold exits");
    assert!(status.success(), "discus hold exits cleanly on SIGTERM");
    cluster
        .wait_for(
            "the sessions to end on release",
            Duration::from_secs(20),
            async || cluster.agents.iter().all(|a| !session_on(a, held)),
        )
        .await;
    println!(
        "release: sessions ended on every node {:?} after SIGTERM",
        released.elapsed()
    );
    assert!(released.elapsed() < grace, "{:?}", released.elapsed());
    for session in &mut sessions {
        let _ = session.kill();
        let _ = session.wait();
    }
    // The other grant never noticed.
    assert!(ready(
        &cluster.object("InitiatorAccess", "demo", "other").await
    ));
}

/// The renew time of a grant's Lease (on this machine's clock: the holder runs here).
fn renew_time(cluster: &Cluster, grant: &str) -> Timestamp {
    let time = cluster.kubectl(&[
        "get",
        "lease",
        "-n",
        "demo",
        grant,
        "-o",
        "jsonpath={.spec.renewTime}",
    ]);
    time.trim().parse().expect("a renew time")
}

/// `discus hold held` with a client's kubeconfig.
fn hold(kubeconfig: &Path) -> Child {
    support::discus()
        .args([
            "hold",
            "held",
            "-n",
            "demo",
            "--holder",
            "client-a",
            "--kubeconfig",
        ])
        .arg(kubeconfig)
        .spawn()
        .expect("discus hold starts")
}

/// libiscsi sessions of `initiator` on every node, logging in again whenever refused.
fn sessions_on_every_node(cluster: &Cluster, initiator: &str) -> Vec<Child> {
    (cluster.agents.iter())
        .map(|agent| {
            std::process::Command::new("iscsi-perf")
                .args(["-i", initiator, "-t", "300"])
                .arg(format!(
                    "iscsi://demo%discus-demo-1@{}/{DEMO_IQN}/1",
                    agent.portal()
                ))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("iscsi-perf runs")
        })
        .collect()
}

fn session_on(agent: &Agent, initiator: &str) -> bool {
    agent
        .tgtadm(&["--mode", "target", "--op", "show"])
        .contains(initiator)
}

/// A condition's status and reason.
fn condition(object: &Value, kind: &str) -> Option<(String, String)> {
    let conditions = object.pointer("/status/conditions")?.as_array()?;
    let c = conditions.iter().find(|c| c["type"] == kind)?;
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
    ))
}

/// Every agent enforces `expiresAt` on its own clock: access ends on time even when the
/// apiserver is gone.
#[tokio::test(flavor = "multi_thread")]
async fn access_ends_on_time_while_the_apiserver_is_down() {
    let mut cluster = Cluster::start().await;
    cluster.add_node("node-a", 41).await;
    let expiring = "iqn.2026-11.dev.discus:expiring";
    let held = "iqn.2026-11.dev.discus:held";
    let grace = Duration::from_secs(12);
    let expires_at = Timestamp::now() + SignedDuration::from_secs(20);
    let expires_at = expires_at.round(Unit::Second).expect("round");
    cluster.apply(&demo_manifests());
    cluster.apply_objects(&[
        grant(
            "expiring",
            expiring,
            json!({"expiresAt": expires_at.to_string()}),
        ),
        grant(
            "held",
            held,
            json!({"heartbeat": {"graceSeconds": grace.as_secs()}}),
        ),
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "held", "namespace": "demo",
                            "labels": {"discus.dev/grant-heartbeat": ""}}}),
    ]);
    let mut holder = hold(&cluster.plane.file("admin.kubeconfig"));
    for name in ["expiring", "held"] {
        cluster
            .wait_ready_on("InitiatorAccess", name, &["node-a"])
            .await;
    }
    let mut sessions = sessions_on_every_node(&cluster, expiring);
    sessions.extend(sessions_on_every_node(&cluster, held));
    let agent = cluster.agent_ref("node-a");
    cluster
        .wait_for("the sessions", Duration::from_secs(20), async || {
            session_on(agent, expiring) && session_on(agent, held)
        })
        .await;

    // The holder goes on trying to renew; nothing gets through.
    let last_renewal = renew_time(&cluster, "held");
    cluster.plane.stop();
    let agent = cluster.agent_ref("node-a");
    let start = Instant::now();
    let mut ended: [Option<Timestamp>; 2] = [None, None];
    while ended.iter().any(Option::is_none) {
        for (initiator, end) in [expiring, held].into_iter().zip(&mut ended) {
            if end.is_none() && !session_on(agent, initiator) {
                *end = Some(Timestamp::now());
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "a session outlived its grant:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let [Some(expired), Some(lapsed)] = ended else {
        unreachable!("the loop ends when both ended")
    };
    let late = expired.duration_since(expires_at);
    println!("with the apiserver down, the session ended {late:#} after expiresAt");
    assert!(
        (-1..10).contains(&late.as_secs()),
        "ended {late} after expiresAt"
    );
    let lapse = lapsed.duration_since(last_renewal);
    println!(
        "with the apiserver down, the held grant's session ended {lapse:#} after the last renewal (grace {grace:?})"
    );
    let past_grace = lapse - SignedDuration::try_from(grace).expect("grace");
    assert!(
        past_grace > SignedDuration::from_millis(-100) && past_grace < SignedDuration::from_secs(5),
        "ended {past_grace:#} past the grace"
    );
    let _ = holder.kill();
    let _ = holder.wait();
    for session in &mut sessions {
        let _ = session.kill();
        let _ = session.wait();
    }
    // The demo client, which has no expiry, still gets in.
    let portal = cluster.agents[0].portal();
    assert!(unit_serial(&portal, DEMO_IQN).contains("Unit Serial Number"));
}

/// An answer of the apiserver lost on the way (a connection silent for good, no reset) stalls
/// nothing: grants still end on the agent's clock while every answer is lost, a deletion made
/// meanwhile is applied once the network is back, and an agent that starts while its lists get
/// no answer says so on /healthz, then recovers (before the fix, it waited for ever).
#[tokio::test(flavor = "multi_thread")]
async fn lost_answers_from_the_apiserver_stall_nothing_and_access_still_ends() {
    let mut cluster = Cluster::start().await;
    let upstream: SocketAddr = cluster
        .plane
        .server
        .trim_start_matches("https://")
        .parse()
        .expect("the apiserver's address");
    let host = cluster.lan.as_ref().expect("a LAN").address(1);
    let proxy = Proxy::start(SocketAddr::from((host, 0)), upstream).await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let kubeconfig = scratch.path().join("proxied.kubeconfig");
    let original = std::fs::read_to_string(&cluster.agent_kubeconfig).expect("kubeconfig");
    std::fs::write(
        &kubeconfig,
        original.replace(
            &format!("server: {}", cluster.plane.server),
            &format!(
                "server: https://{}\n    tls-server-name: localhost",
                proxy.address()
            ),
        ),
    )
    .expect("kubeconfig");
    let options = [
        "--api-timeout-seconds",
        "15",
        "--resync-seconds",
        "5",
        "--stuck-after-seconds",
        "20",
    ];
    cluster
        .add_node_with("node-a", 51, &kubeconfig, &options)
        .await;
    let revoked = "iqn.2026-11.dev.discus:revoked";
    cluster.apply(&demo_manifests());
    cluster.apply_objects(&[grant("revoked", revoked, json!({}))]);
    cluster
        .wait_ready_on("InitiatorAccess", "revoked", &["node-a"])
        .await;
    let first_expiry = (k8s_openapi::jiff::Timestamp::now()
        + k8s_openapi::jiff::SignedDuration::from_secs(45))
    .round(k8s_openapi::jiff::Unit::Second)
    .expect("round");
    let second_expiry = first_expiry + k8s_openapi::jiff::SignedDuration::from_secs(5);
    let expiring = [
        ("first", "iqn.2026-11.dev.discus:first", first_expiry),
        ("second", "iqn.2026-11.dev.discus:second", second_expiry),
    ];
    for (name, initiator, at) in expiring {
        cluster.apply_objects(&[grant(name, initiator, json!({"expiresAt": at.to_string()}))]);
    }
    cluster
        .wait_for(
            "both expiring grants applied",
            Duration::from_secs(30),
            async || {
                expiring
                    .iter()
                    .all(|(_, initiator, _)| acl_on(cluster.agent_ref("node-a"), initiator))
            },
        )
        .await;

    // The watches were renewed every 5 s so far (the apiserver ends them 10 s before the
    // client's read deadline): none of them timed out. (A resource version too old to resume
    // from is the apiserver's answer, and the watch lists again.)
    let log = cluster.agent_ref("node-a").log();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("watch failed") && !l.contains("too old resource version"))
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");

    // Every answer is lost from now on; meanwhile a grant is deleted.
    proxy.blackhole();
    let lead = first_expiry.duration_since(k8s_openapi::jiff::Timestamp::now());
    assert!(
        lead.as_secs() >= 5,
        "the setup took too long: {lead} before the first expiry"
    );
    cluster.kubectl(&["delete", "-n", "demo", "initiatoraccess", "revoked"]);
    // Each grant ends on time, although the status of the first cannot be written.
    let agent = cluster.agent_ref("node-a");
    for (name, initiator, at) in expiring {
        let start = Instant::now();
        while acl_on(agent, initiator) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "grant {name} outlived its expiry:\n{}",
                agent.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let late = k8s_openapi::jiff::Timestamp::now().duration_since(at);
        println!("with every answer lost, grant {name} ended {late} after expiresAt");
        assert!(
            (-1..10).contains(&late.as_secs()),
            "grant {name} ended {late} after expiresAt:\n{}",
            agent.log()
        );
    }
    // The sync loop is not stuck: it enforces what it knows.
    let (code, body) = agent.get("/healthz");
    assert_eq!(code, 200, "{body}");

    // The network is back; the dead connections stay dead until the agent gives up on them.
    let accepted = proxy.accepted();
    proxy.restore();
    let restored = Instant::now();
    cluster
        .wait_for(
            "the deleted grant revoked once answers arrive",
            Duration::from_secs(90),
            async || !acl_on(cluster.agent_ref("node-a"), revoked),
        )
        .await;
    println!(
        "the grant deleted while every answer was lost was revoked {:?} after the network came back",
        restored.elapsed()
    );
    assert!(
        proxy.accepted() > accepted,
        "the agent opened new connections"
    );
    cluster
        .wait_for(
            "the expired grants' status",
            Duration::from_secs(90),
            async || {
                let mut all = true;
                for (name, _, _) in expiring {
                    let grant = cluster.object("InitiatorAccess", "demo", name).await;
                    all &= grant
                        .pointer("/status/conditions")
                        .and_then(Value::as_array)
                        .is_some_and(|c| c.iter().any(|c| c["reason"] == "Expired"));
                }
                all
            },
        )
        .await;

    // An agent that starts while every answer is lost — its requests reach the apiserver, the
    // answers never come back — cannot list: it does nothing, and once it has waited longer
    // than the bound, /healthz says so and why. It lists as soon as answers arrive again.
    proxy.lose_answers();
    let agent = cluster.agent("node-a");
    agent.kill();
    agent.start_with(&kubeconfig, &options);
    cluster
        .wait_for(
            "/healthz to fail with why",
            Duration::from_secs(90),
            async || {
                let (code, body) = cluster.agent_ref("node-a").get_or_nothing("/healthz");
                let why = code == 503 && body.contains("waiting for watches to list");
                if why {
                    println!(
                        "/healthz while the agent cannot list: {code} {}",
                        body.trim()
                    );
                }
                why
            },
        )
        .await;
    assert!(
        acl_on(cluster.agent_ref("node-a"), INITIATOR),
        "targets keep serving"
    );
    proxy.restore();
    cluster
        .wait_for(
            "/healthz to recover",
            Duration::from_secs(120),
            async || cluster.agent_ref("node-a").get_or_nothing("/healthz").0 == 200,
        )
        .await;
    cluster.apply_objects(&[grant("late", "iqn.2026-11.dev.discus:late", json!({}))]);
    cluster
        .wait_ready_on("InitiatorAccess", "late", &["node-a"])
        .await;
}

/// Nodes judged lost after 8 s of silence and their entries removed 4 s later: for the test of
/// lost nodes, whose agents are killed on purpose (its deadlines are 30 s and more).
const LOST_NODES_QUICKLY: [&str; 4] = ["--node-lost-seconds", "8", "--prune-seconds", "4"];

/// The agent's options in the API fault tests: watches renewed every 5 s (so that a watch that
/// stalls shows soon), a full pass every 5 s, and nodes judged lost as in production (after
/// 40 s): the lease holder judges heartbeats by its own watch, and with the other tests' 20 s, a
/// watch failing that long would have it mark live nodes lost and back, rewriting status all
/// along.
const FAULT_OPTIONS: [&str; 8] = [
    "--api-timeout-seconds",
    "15",
    "--resync-seconds",
    "5",
    "--node-lost-seconds",
    "40",
    "--prune-seconds",
    "300",
];

/// What one fault cost, as measured.
#[derive(Default)]
struct FaultResult {
    label: &'static str,
    /// Requests per second while it lasted, in all and once the checks were done (its later
    /// part: what a lasting fault costs).
    rate: f64,
    late_rate: f64,
    counts: support::api_front::Counts,
    /// How late the grant that expired meanwhile ended on the node.
    expiry_late: k8s_openapi::jiff::SignedDuration,
    /// From the fault's end until a grant created and one deleted meanwhile were applied…
    applied_after: Duration,
    /// …and until their status (and the expired grant's) said so.
    status_after: Duration,
}

/// Answers of 503, 429 (with Retry-After), 500, and watches ended by 410 Gone, given by a front
/// between the agent and the real apiserver (tests/support/api_front.rs): while each lasts,
/// targets keep serving and a grant ends on time on the node's clock; a watch that ends with
/// 410 lists again (a grant created meanwhile is applied while the 410s go on); afterwards, what
/// changed meanwhile is applied and its status written; and the agent's request rate stays
/// bounded, compared with the same agent's with healthy answers, in the same run.
#[tokio::test(flavor = "multi_thread")]
async fn answers_of_429_5xx_and_410_stall_nothing_and_bring_no_storm() {
    let mut cluster = Cluster::start().await;
    let front = front_before_the_apiserver(&cluster).await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let kubeconfig = front.kubeconfig(&cluster.agent_kubeconfig, scratch.path());
    cluster
        .add_node_with("node-a", 61, &kubeconfig, &FAULT_OPTIONS)
        .await;
    cluster.apply(&demo_manifests());
    cluster
        .wait_ready_on("InitiatorAccess", "demo-client", &["node-a"])
        .await;
    let healthy = the_healthy_request_rate(&cluster, &front).await;
    let answer = |code, retry_after| Fault::Answer { code, retry_after };
    // 410 first: its relists are due within a second only while the watches' backoff is fresh
    // (a watch that failed recently waits longer: up to 10 s).
    let faults = [
        ("410 Gone on every watch", Fault::Gone, 16),
        ("503", answer(503, None), 24),
        ("429, Retry-After: 5", answer(429, Some(5)), 18),
        ("500", answer(500, None), 16),
    ];
    let mut results = Vec::new();
    for (n, (label, fault, seconds)) in faults.into_iter().enumerate() {
        let hold = Duration::from_secs(seconds);
        let result = a_fault_stalls_nothing(&cluster, &front, n, label, fault, hold).await;
        results.push(result);
    }
    println!("healthy, at rest: {healthy:.2} requests/s");
    println!(
        "| fault | requests/s (× healthy) | later part (× healthy) | reads / watches / status writes / other writes | expiry late by | applied after | status after |"
    );
    for r in &results {
        let c = &r.counts;
        println!(
            "| {} | {:.2} ({:.1}×) | {:.2} ({:.1}×) | {} / {} / {} / {} | {} | {:.1?} | {:.1?} |",
            r.label,
            r.rate,
            r.rate / healthy,
            r.late_rate,
            r.late_rate / healthy,
            c.reads,
            c.watches,
            c.status_writes,
            c.writes,
            r.expiry_late,
            r.applied_after,
            r.status_after,
        );
    }
    // No storm: while a fault lasts, the agent asks no more often than about when all is well
    // (its watches back off, a request is repeated only when the server says when); at the
    // start, what failed is tried again. And no stall: what changed meanwhile is applied within
    // the watches' longest wait (10 s), a Retry-After (5 s here) and a list, and status
    // written soon after.
    for r in &results {
        assert!(
            r.applied_after < Duration::from_secs(25) && r.status_after < Duration::from_secs(45),
            "{}: applied {:?} and status written {:?} after the fault",
            r.label,
            r.applied_after,
            r.status_after
        );
        assert!(
            r.late_rate <= 2.0 * healthy,
            "{}: {:.2} requests/s while the fault lasts, {healthy:.2} when healthy",
            r.label,
            r.late_rate
        );
        assert!(
            r.rate <= 3.0 * healthy,
            "{}: {:.2} requests/s during the fault, {healthy:.2} when healthy",
            r.label,
            r.rate
        );
    }
}

/// A front on the test's own address on the LAN, before the cluster's apiserver.
async fn front_before_the_apiserver(cluster: &Cluster) -> ApiFront {
    let upstream: SocketAddr = cluster
        .plane
        .server
        .trim_start_matches("https://")
        .parse()
        .expect("the apiserver's address");
    let host = cluster.lan.as_ref().expect("a LAN").address(1);
    let ca = cluster.plane.file("ca.crt");
    ApiFront::start(SocketAddr::from((host, 0)), upstream, &ca).await
}

/// The agent's requests per second at rest with healthy answers, once nothing is left to write.
async fn the_healthy_request_rate(cluster: &Cluster, front: &ApiFront) -> f64 {
    let mut last = front.counts();
    let mut quiet_since = Instant::now();
    cluster
        .wait_for(
            "no status write for 5 s",
            Duration::from_secs(60),
            async || {
                let now = front.counts();
                if now.status_writes != last.status_writes {
                    quiet_since = Instant::now();
                }
                last = now;
                quiet_since.elapsed() >= Duration::from_secs(5)
            },
        )
        .await;
    // A measurement window, not a wait for anything.
    let window = Duration::from_secs(16);
    let before = front.counts();
    tokio::time::sleep(window).await;
    let counts = front.counts().since(&before);
    println!("healthy, at rest: {counts:?} in {window:?}");
    counts.total() as f64 / window.as_secs_f64()
}

fn fault_grant(what: &str, n: usize) -> (String, String) {
    (
        format!("{what}-{n}"),
        format!("iqn.2026-11.dev.discus:{what}-{n}"),
    )
}

/// Before fault `n`: a grant that expires some seconds from now (while the fault lasts) and one
/// to delete while it lasts, both applied. Busy cores can make applying them slow: when less
/// than 2 s are left before the expiry once they are, that grant is deleted and another one
/// applied with a longer lead, at most `hold` less 8 s.
async fn grants_before_a_fault(
    cluster: &Cluster,
    n: usize,
    label: &str,
    hold: Duration,
) -> Expiring {
    let (revoked, revoked_iqn) = fault_grant("revoked", n);
    cluster.apply_objects(&[grant(&revoked, &revoked_iqn, json!({}))]);
    let agent = cluster.agent_ref("node-a");
    let longest = hold.as_secs().saturating_sub(8).max(10);
    let mut lead_seconds = 10;
    for attempt in 0.. {
        let what = if attempt == 0 {
            "expiring".to_owned()
        } else {
            format!("expiring-again{attempt}")
        };
        let (expiring, expiring_iqn) = fault_grant(&what, n);
        let setup = Instant::now();
        let expires_at = (Timestamp::now() + SignedDuration::from_secs(lead_seconds as i64))
            .round(Unit::Second)
            .expect("round");
        cluster.apply_objects(&[grant(
            &expiring,
            &expiring_iqn,
            json!({"expiresAt": expires_at.to_string()}),
        )]);
        cluster
            .wait_for(
                &format!("{label}: the grants applied before the fault"),
                Duration::from_secs(30),
                async || acl_on(agent, &expiring_iqn) && acl_on(agent, &revoked_iqn),
            )
            .await;
        let lead = expires_at.duration_since(Timestamp::now());
        if lead.as_secs() >= 2 {
            return Expiring {
                name: expiring,
                iqn: expiring_iqn,
                at: expires_at,
            };
        }
        assert!(
            lead_seconds < longest,
            "{label}: applying the grants took {:?} even with a lead of {lead_seconds} s",
            setup.elapsed()
        );
        println!(
            "{label}: applying took {:?}; again with a longer lead",
            setup.elapsed()
        );
        cluster.kubectl(&["delete", "initiatoraccess", "-n", "demo", &expiring]);
        lead_seconds = (setup.elapsed().as_secs() * 3 / 2 + 3).clamp(lead_seconds + 1, longest);
    }
    unreachable!("the loop returns or fails")
}

/// The grant that expires while a fault lasts.
struct Expiring {
    name: String,
    iqn: String,
    at: Timestamp,
}

/// During fault `n`: one grant deleted, one created (with kubectl, as admin: not through the
/// front).
fn changes_during_a_fault(cluster: &Cluster, n: usize) {
    let (revoked, _) = fault_grant("revoked", n);
    let (added, added_iqn) = fault_grant("added", n);
    cluster.kubectl(&["delete", "-n", "demo", "initiatoraccess", &revoked]);
    cluster.apply_objects(&[grant(&added, &added_iqn, json!({}))]);
}

/// While the fault lasts, the expiring grant ends on time on the node's clock, and the steady
/// grant keeps reading from the target. Returns how late the grant ended.
async fn the_grant_expires_on_time(
    cluster: &Cluster,
    expiring: &Expiring,
    label: &str,
) -> SignedDuration {
    let agent = cluster.agent_ref("node-a");
    let (expiring_iqn, expires_at) = (&expiring.iqn, expiring.at);
    cluster
        .wait_for(
            &format!("{label}: the grant to expire"),
            Duration::from_secs(60),
            async || !acl_on(agent, expiring_iqn),
        )
        .await;
    let late = Timestamp::now().duration_since(expires_at);
    println!("{label}: the grant ended {late} after expiresAt");
    assert!(
        (-1..5).contains(&late.as_secs()),
        "{label}: the grant ended {late} after expiresAt:\n{}",
        agent.log()
    );
    assert!(acl_on(agent, INITIATOR), "{label}: the steady grant stays");
    let serial = unit_serial(&agent.portal(), DEMO_IQN);
    assert!(
        serial.contains("Unit Serial Number"),
        "{label}: the target serves: {serial}"
    );
    late
}

/// Once the fault is over (at `over`): the grant created meanwhile is applied and the deleted
/// one revoked, and status says so, the expired grant's included. Returns how long each took.
async fn status_catches_up(
    cluster: &Cluster,
    n: usize,
    expiring: &Expiring,
    label: &str,
    over: Instant,
) -> (Duration, Duration) {
    let agent = cluster.agent_ref("node-a");
    let ((added, added_iqn), (_, revoked_iqn)) =
        (fault_grant("added", n), fault_grant("revoked", n));
    cluster
        .wait_for(
            &format!("{label}: the changes applied afterwards"),
            Duration::from_secs(90),
            async || acl_on(agent, &added_iqn) && !acl_on(agent, &revoked_iqn),
        )
        .await;
    let applied = over.elapsed();
    cluster
        .wait_ready_on("InitiatorAccess", &added, &["node-a"])
        .await;
    let expiring = &expiring.name;
    cluster
        .wait_for(
            &format!("{label}: the expired grant's status"),
            Duration::from_secs(90),
            async || {
                let grant = cluster.object("InitiatorAccess", "demo", expiring).await;
                grant
                    .pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|c| c.iter().any(|c| c["reason"] == "Expired"))
            },
        )
        .await;
    let status = over.elapsed();
    println!("{label}: applied {applied:.1?}, status written {status:.1?} after the fault");
    (applied, status)
}

/// Fault `n` from the front for `hold`, with the grants' changes around it; counts the agent's
/// requests meanwhile.
async fn a_fault_stalls_nothing(
    cluster: &Cluster,
    front: &ApiFront,
    n: usize,
    label: &'static str,
    fault: Fault,
    hold: Duration,
) -> FaultResult {
    let expiring = grants_before_a_fault(cluster, n, label, hold).await;
    let start = Instant::now();
    let before = front.counts();
    front.set(fault);
    changes_during_a_fault(cluster, n);
    let expiry_late = the_grant_expires_on_time(cluster, &expiring, label).await;
    if fault == Fault::Gone {
        // Lists still answer, and each 410 is followed by one, which brings the changes in.
        let agent = cluster.agent_ref("node-a");
        let ((_, added_iqn), (_, revoked_iqn)) =
            (fault_grant("added", n), fault_grant("revoked", n));
        cluster
            .wait_for(
                &format!("{label}: changes applied by lists while it lasts"),
                start + hold - Instant::now(),
                async || acl_on(agent, &added_iqn) && !acl_on(agent, &revoked_iqn),
            )
            .await;
    }
    // The rest of the fault: the later part's rate is what a lasting fault costs.
    let (checked, at_checked) = (Instant::now(), front.counts());
    let end = start + hold;
    assert!(
        end > checked + Duration::from_secs(4),
        "{label}: the checks took {:?} of the fault's {hold:?}",
        checked - start
    );
    tokio::time::sleep_until(end.into()).await;
    let after = front.counts();
    front.set(Fault::None);
    let over = Instant::now();
    let counts = after.since(&before);
    println!("{label}: {counts:?} in {hold:?}");
    let (applied_after, status_after) = status_catches_up(cluster, n, &expiring, label, over).await;
    FaultResult {
        label,
        rate: counts.total() as f64 / hold.as_secs_f64(),
        late_rate: after.since(&at_checked).total() as f64 / (end - checked).as_secs_f64(),
        counts,
        expiry_late,
        applied_after,
        status_after,
    }
}

/// The apiserver restarted — killed, then started again on the same address and port with the
/// same etcd — and then etcd restarted (same ports, same data): while each is down, targets keep
/// serving and a grant ends on time on the node's clock; once it is back, so are the agent's
/// watches: a grant created and one deleted right then are applied, and status is written.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_rides_out_apiserver_and_etcd_restarts() {
    let mut cluster = Cluster::start().await;
    let kubeconfig = cluster.agent_kubeconfig.clone();
    cluster
        .add_node_with("node-a", 62, &kubeconfig, &FAULT_OPTIONS)
        .await;
    cluster.apply(&demo_manifests());
    cluster
        .wait_ready_on("InitiatorAccess", "demo-client", &["node-a"])
        .await;
    let mut results = Vec::new();
    for (n, component) in ["kube-apiserver", "etcd"].into_iter().enumerate() {
        let down = Duration::from_secs(12);
        results.push(a_restart_stalls_nothing(&mut cluster, n, component, down).await);
    }
    println!("| restarted | expiry late by | applied after | status after |");
    for r in &results {
        println!(
            "| {} | {} | {:.1?} | {:.1?} |",
            r.label, r.expiry_late, r.applied_after, r.status_after
        );
    }
    // Within the watches' longest wait (10 s) and a list; status once the lease holder is back,
    // whose election backs off up to 30 s.
    for r in &results {
        assert!(
            r.applied_after < Duration::from_secs(30) && r.status_after < Duration::from_secs(60),
            "{}: applied {:?} and status written {:?} after the restart",
            r.label,
            r.applied_after,
            r.status_after
        );
    }
}

/// `component` down for `down`, then started again; a grant expires while it is down, one is
/// deleted and one created as soon as it is back (nobody can while it is down).
async fn a_restart_stalls_nothing(
    cluster: &mut Cluster,
    n: usize,
    component: &'static str,
    down: Duration,
) -> FaultResult {
    let expiring = grants_before_a_fault(cluster, n, component, down).await;
    let start = Instant::now();
    cluster.plane.stop_component(component);
    let expiry_late = the_grant_expires_on_time(cluster, &expiring, component).await;
    tokio::time::sleep_until((start + down).into()).await;
    if let Err(error) = cluster.plane.start_component(component).await {
        panic!(
            "{component} again: {error}\n{}",
            cluster.plane.log(component)
        );
    }
    let over = Instant::now();
    changes_during_a_fault(cluster, n);
    let (applied_after, status_after) =
        status_catches_up(cluster, n, &expiring, component, over).await;
    FaultResult {
        label: component,
        expiry_late,
        applied_after,
        status_after,
        ..FaultResult::default()
    }
}

/// Whether tgtd on an agent's node has an ACL (or a session) for `initiator`.
fn acl_on(agent: &Agent, initiator: &str) -> bool {
    agent
        .tgtadm(&["--mode", "target", "--op", "show"])
        .contains(initiator)
}

/// The whole product path once: kubectl on the host, the agent inside a guest running Debian's
/// kernel with real LIO, talking to the host's apiserver with the shipped RBAC, and a real
/// initiator reading what it serves.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_in_a_real_kernel_serves_what_kubectl_applied_through_lio() {
    let plane = ControlPlane::start().await.expect("control plane");
    let cluster = Cluster::with(Kube::prepare(plane, None, "demo").await);
    let vm = tokio::task::spawn_blocking(support::lio_vm::LioVm::boot)
        .await
        .expect("the guest boots");
    // The guest reaches the host's loopback, where the apiserver listens, at 10.0.2.2.
    let kubeconfig = std::fs::read_to_string(&cluster.agent_kubeconfig)
        .expect("kubeconfig")
        .replace("https://127.0.0.1:", "https://10.0.2.2:");
    std::fs::write(vm.share().join("kubeconfig"), kubeconfig).expect("kubeconfig for the guest");
    std::fs::copy(
        support::repo().join("examples/standalone/discus-demo.iso"),
        vm.share().join("images/discus-demo.iso"),
    )
    .expect("the image");
    cluster
        .create_node("lio-node", std::net::Ipv4Addr::new(10, 0, 2, 15))
        .await;
    vm.must(
        "KUBECONFIG=/host/kubeconfig discus agent --node-name lio-node --backend lio \
         --data-dir /var/lib/discus --file-root /host/images --namespaces demo \
         --iqn-prefix demo=iqn.2026-11.dev.discus: --lease-namespace discus-system --log-level debug > /host/agent.log 2>&1 &",
    );
    cluster.apply(&demo_manifests().replace(
        "/var/lib/discus/demo/discus-demo.iso",
        "/host/images/discus-demo.iso",
    ));
    // Read on the host: the guest may be too busy to answer.
    let guest_log = || {
        let log = std::fs::read_to_string(vm.share().join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    };
    for (kind, name) in [
        ("DiscImage", "discus-demo"),
        ("IscsiTarget", "demo"),
        ("InitiatorAccess", "demo-client"),
    ] {
        let start = Instant::now();
        loop {
            let object = cluster.object(kind, "demo", name).await;
            if ready(&object) && kstatus::compute(&object) == Kstatus::Current {
                break;
            }
            if start.elapsed() > Duration::from_secs(180) {
                let (_, state) = vm.sh(
                    "ps; for p in $(pidof discus qemu-img); do echo \"$p $(cat /proc/$p/cmdline | tr '\\0' ' ')\"; \
                     for t in /proc/$p/task/*; do echo \"  $t $(cat $t/wchan) $(cut -d' ' -f3 $t/stat)\"; done; done; \
                     ls -la /var/lib/discus /var/lib/discus/tmp /var/lib/discus/images; uptime",
                );
                panic!(
                    "{kind} {name} not Ready: {object:#}\n{}\nguest: {state}",
                    guest_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // Real LIO: LUN 0 is LUN 0; the read-only grant is write-protected by the kernel.
    let configfs = vm.must(
        "cat /sys/kernel/config/target/iscsi/iqn.2026-11.dev.discus:demo/tpgt_1/acls/iqn.2026-11.dev.discus:demo-client/lun_0/write_protect",
    );
    assert_eq!(configfs.trim(), "1");
    let out = tempfile::tempdir().expect("tempdir");
    let login = Login {
        portal: &vm.portal(),
        iqn: DEMO_IQN,
        lun: 0,
        initiator: INITIATOR,
        user: "demo",
        password: "discus-demo-1",
    };
    let read = initiator::read_lun(&login, &out.path().join("lun0.iso"))
        .unwrap_or_else(|e| panic!("{e}\n{}", guest_log()));
    assert_eq!(read, DEMO_ISO_SHA256);
    let target = cluster.object("IscsiTarget", "demo", "demo").await;
    assert_eq!(
        target.pointer("/status/nodes/0/portals/0"),
        Some(&json!("10.0.2.15:3260")),
        "{target:#}"
    );
    a_client_connects_with_open_iscsi(&cluster, &vm).await;
}

const GUEST_IQN: &str = "iqn.2026-11.dev.discus:guest";
const GUEST_PASSWORD: &str = "guest-secret-1";
const GUEST_MUTUAL_PASSWORD: &str = "target-secret-2";

/// The guest as a client too, of two storage nodes: its own LIO, and a second agent in it
/// serving through tgt at a second address. `discus connect` with open-iscsi, as a
/// ServiceAccount bound by the Role `discus client-rbac` prints, logs in through both portals in
/// status, finds both paths' devices by serial (tgt and LIO number the LUN differently), mounts
/// one; disconnect leaves nothing behind.
async fn a_client_connects_with_open_iscsi(cluster: &Cluster, vm: &support::lio_vm::LioVm) {
    cluster
        .create_node("tgt-node", std::net::Ipv4Addr::new(10, 0, 2, 16))
        .await;
    vm.must(
        "ip addr add 10.0.2.16/24 dev eth0 && KUBECONFIG=/host/kubeconfig discus agent \
         --node-name tgt-node --backend tgt --data-dir /var/lib/discus-tgt --file-root /host/images \
         --namespaces demo --iqn-prefix demo=iqn.2026-11.dev.discus: \
         --lease-namespace discus-system > /host/agent-tgt.log 2>&1 &",
    );
    let secret = |name: &str, data: Value| {
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": name, "namespace": "demo"}, "stringData": data})
    };
    cluster.apply_objects(&[
        secret("guest-chap", json!({"username": "guest", "password": GUEST_PASSWORD,
                                    "mutualUsername": "lio-node", "mutualPassword": GUEST_MUTUAL_PASSWORD})),
        grant("guest", GUEST_IQN, json!({"chap": {"secretRef": {"name": "guest-chap"}, "mutual": true}})),
        secret("other-chap", json!({"username": "other", "password": "other-secret-1"})),
        grant("other", "iqn.2026-11.dev.discus:other", json!({"chap": {"secretRef": {"name": "other-chap"}}})),
    ]);
    let rbac = support::discus()
        .args([
            "client-rbac",
            "guest",
            "-n",
            "demo",
            "--service-account",
            "demo:guest",
        ])
        .args(["--allow-list", "--kubeconfig"])
        .arg(cluster.plane.file("admin.kubeconfig"))
        .output()
        .expect("client-rbac");
    assert!(
        rbac.status.success(),
        "{}",
        String::from_utf8_lossy(&rbac.stderr)
    );
    cluster.apply(&String::from_utf8_lossy(&rbac.stdout));
    cluster
        .wait_ready_on("InitiatorAccess", "guest", &["lio-node", "tgt-node"])
        .await;
    // Not waited for: the lease holder's connection may list one portal yet; connect takes
    // both nodes' from their own entries.
    let kubeconfig = cluster
        .plane
        .service_account_kubeconfig("demo", "guest")
        .await
        .expect("token");
    let kubeconfig = std::fs::read_to_string(kubeconfig)
        .expect("kubeconfig")
        .replace("https://127.0.0.1:", "https://10.0.2.2:");
    std::fs::write(vm.share().join("client.kubeconfig"), kubeconfig).expect("kubeconfig");
    vm.must(&format!(
        "echo InitiatorName={GUEST_IQN} > /etc/iscsi/initiatorname.iscsi && iscsid"
    ));
    let client = "--kubeconfig /host/client.kubeconfig";

    let listed = vm.must(&format!("discus connect {client} --list -n demo -o json"));
    let listed: Value = serde_json::from_str(&listed).unwrap_or_else(|e| panic!("{e}: {listed}"));
    let names: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(names, ["guest"], "{listed:#}");

    // Every iscsiadm command line, as it runs: never a secret (connect's own has none).
    std::fs::write(
        vm.share().join("iscsiadm"),
        "#!/bin/sh\necho \"$@\" >> /tmp/iscsiadm-args\nexec /sbin/iscsiadm \"$@\"\n",
    )
    .expect("wrapper");
    vm.must("cp /host/iscsiadm /bin/iscsiadm && chmod 755 /bin/iscsiadm");
    let connected = vm.must(&format!(
        "discus connect {client} guest -n demo --mount /mnt/disc --timeout-seconds 120"
    ));
    let arguments = vm.must("cat /tmp/iscsiadm-args");
    assert!(arguments.contains("--login"), "{arguments}");
    for secret in [GUEST_PASSWORD, GUEST_MUTUAL_PASSWORD] {
        assert!(
            !arguments.contains(secret) && !connected.contains(secret),
            "{secret} shown"
        );
    }
    // The records hold the secrets, readable by root only, and start by hand only.
    let modes = vm.must("find /etc/iscsi/nodes -type f -exec stat -c %a {} \\;");
    assert_eq!(modes.lines().collect::<Vec<_>>(), ["600", "600"], "{modes}");
    let records = vm.must("find /etc/iscsi/nodes -type f | xargs cat");
    assert_eq!(
        records.matches("node.startup = manual").count(),
        2,
        "{records}"
    );
    let options = vm.must("grep ' /mnt/disc ' /proc/mounts");
    assert!(options.contains(" ro,nosuid,nodev,noexec"), "{options}");
    println!(
        "discus connect in the guest (TCG): {}",
        connected
            .lines()
            .find(|l| l.starts_with("connected"))
            .unwrap_or(&connected)
    );
    // One line per LUN: both paths (no multipathd here), each the whole image.
    let devices: Vec<&str> = (connected.lines())
        .find(|l| l.starts_with("/dev/"))
        .unwrap_or_else(|| panic!("no device printed: {connected}"))
        .split(' ')
        .collect();
    assert_eq!(devices.len(), 2, "{connected}");
    for device in devices {
        let digest = vm.must(&format!("sha256sum {device}"));
        assert!(digest.starts_with(DEMO_ISO_SHA256), "{digest}");
    }
    assert_eq!(vm.must("ls /mnt/disc").trim(), "README.TXT");
    // Again: nothing changes.
    let records = || vm.must("find /etc/iscsi/nodes -type f | sort | xargs cat");
    let before = records();
    vm.must(&format!(
        "discus connect {client} guest -n demo --mount /mnt/disc"
    ));
    assert_eq!(records(), before);
    assert_eq!(vm.must("iscsiadm -m session | wc -l").trim(), "2");

    // Another client's Secret: refused, and the error names the rule.
    let (code, refused) = vm.sh(&format!(
        "discus connect {client} other -n demo --initiator-iqn iqn.2026-11.dev.discus:other \
         --state-dir /tmp/other"
    ));
    assert_ne!(code, 0);
    assert!(
        refused.contains("403 Forbidden") && refused.contains("Secret demo/other-chap"),
        "{refused}"
    );

    vm.must("discus disconnect guest -n demo");
    let (code, sessions) = vm.sh("iscsiadm -m session");
    assert_eq!(code, 21, "no session left: {sessions}");
    assert_eq!(vm.must("find /etc/iscsi/nodes -type f | wc -l").trim(), "0");
    let (mounted, _) = vm.sh("grep -q ' /mnt/disc ' /proc/mounts");
    assert_ne!(mounted, 0, "unmounted");
    let left = vm.must("ls -A /var/lib/discus/connect");
    assert!(left.lines().all(|f| f.ends_with(".lock")), "{left}");
    let again = vm.must("discus disconnect guest -n demo");
    assert!(again.contains("nothing to disconnect"), "{again}");

    // A record another tool made is neither used nor removed.
    vm.must("iscsiadm -m node -o new -T iqn.2026-11.dev.discus:demo -p 10.0.2.15:3260 >/dev/null");
    let (code, refused) = vm.sh(&format!("discus connect {client} guest -n demo"));
    assert_ne!(code, 0);
    assert!(
        refused.contains("exists that discus connect did not make"),
        "{refused}"
    );
    assert_eq!(vm.must("find /etc/iscsi/nodes -type f | wc -l").trim(), "1");
    vm.must("iscsiadm -m node -o delete -T iqn.2026-11.dev.discus:demo -p 10.0.2.15:3260");
    connect_holds_a_held_grant_until_stopped(cluster, vm).await;
}

/// `discus connect --hold`: renewals first (the grant is applied only while renewed), then the
/// connection; SIGTERM disconnects and only then releases.
async fn connect_holds_a_held_grant_until_stopped(cluster: &Cluster, vm: &support::lio_vm::LioVm) {
    cluster.kubectl(&["delete", "iacc", "-n", "demo", "guest"]);
    cluster.apply_objects(&[grant(
        "guest-held",
        GUEST_IQN,
        json!({"chap": {"secretRef": {"name": "guest-chap"}, "mutual": true},
               "heartbeat": {"graceSeconds": 30}}),
    )]);
    let rbac = support::discus()
        .args([
            "client-rbac",
            "guest-held",
            "-n",
            "demo",
            "--service-account",
            "demo:guest",
        ])
        .arg("--kubeconfig")
        .arg(cluster.plane.file("admin.kubeconfig"))
        .output()
        .expect("client-rbac");
    assert!(
        rbac.status.success(),
        "{}",
        String::from_utf8_lossy(&rbac.stderr)
    );
    cluster.apply(&String::from_utf8_lossy(&rbac.stdout));
    vm.must(
        "discus connect --kubeconfig /host/client.kubeconfig --hold guest-held -n demo \
         --timeout-seconds 120 > /tmp/hold.log 2>&1 & echo $! > /tmp/hold.pid",
    );
    let log = || vm.must("cat /tmp/hold.log");
    let start = Instant::now();
    while !log().contains("connected InitiatorAccess demo/guest-held") {
        assert!(start.elapsed() < Duration::from_secs(180), "{}", log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A session for every record it made: one per node that had applied the grant when it
    // turned Ready (the grant is applied only once held, so the other node may come later).
    let sessions = vm.must("iscsiadm -m session | wc -l");
    let records = vm.must("find /etc/iscsi/nodes -type f | wc -l");
    assert_eq!(
        sessions.trim(),
        records.trim(),
        "{sessions} sessions, {records} records"
    );
    assert_ne!(sessions.trim(), "0");
    vm.must("kill -TERM $(cat /tmp/hold.pid)");
    while !log().contains("released InitiatorAccess demo/guest-held") {
        assert!(start.elapsed() < Duration::from_secs(240), "{}", log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = log();
    let (disconnected, released) = (
        log.find("disconnected InitiatorAccess")
            .expect("disconnected"),
        log.find("released InitiatorAccess").expect("released"),
    );
    assert!(disconnected < released, "disconnect before release:\n{log}");
    let (code, _) = vm.sh("iscsiadm -m session");
    assert_eq!(code, 21, "no session left");
    assert_eq!(vm.must("find /etc/iscsi/nodes -type f | wc -l").trim(), "0");
}

/// What tgtd on an agent's node holds.
fn held(agent: &Agent) -> support::serve_host::Tgtd {
    support::serve_host::Tgtd::parse(
        &agent.tgtadm(&["--mode", "target", "--op", "show"]),
        &agent.tgtadm(&["--mode", "account", "--op", "show"]),
    )
}

fn chaos_client(c: usize) -> String {
    format!("iqn.2026-11.dev.discus:chaos-{c}")
}

/// The chaos grants' Secret with this round's password.
fn chaos_secret(password: &str) -> Value {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "chaos-chap", "namespace": "demo"},
        "data": {"username": b64("chaos"), "password": b64(password)},
    })
}

/// Kills the agent after a random number of backend operations since `mark` (a length of its
/// log), or after a random time; a pass that ends first is killed as it ends.
async fn strike_agent(agent: &mut Agent, mark: usize, rng: &mut support::chaos::Rng) {
    if rng.below(4) == 0 {
        tokio::time::sleep(Duration::from_millis(rng.below(2_000))).await;
    } else {
        let ops = 1 + rng.below(6) as usize;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let log = agent.log();
            let since = log.get(mark..).unwrap_or("");
            let done = since.matches("discus::sync::reconcile").count();
            if done >= ops || since.contains("sync pass done") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    agent.kill();
}

/// Crash anywhere, as an agent: `discus agent` is killed (SIGKILL) at random moments while grants
/// come and go and their password rotates through the apiserver, and started again. Right after
/// each kill, tgtd admits nobody neither the old nor the new declaration names, and a target
/// that admits anyone has a CHAP account bound; after the restart the node holds exactly what is
/// declared, the new password works, status says Ready, and the demo client's session keeps its
/// I_T nexus through every kill.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_anywhere_never_admits_more_and_always_converges() {
    let (kills, mut rng) = support::chaos::plan("agent (tgt)", 10);
    let mut cluster = Cluster::start().await;
    cluster.add_node("node-a", 71).await;
    cluster.apply(&demo_manifests());
    cluster.apply_objects(&[chaos_secret("chaos-000000")]);
    cluster
        .wait_ready_on("InitiatorAccess", "demo-client", &["node-a"])
        .await;
    let portal = cluster.agent_ref("node-a").portal();
    let steady = support::initiator::steady_session(
        std::process::Command::new("iscsi-perf"),
        INITIATOR,
        &format!("iscsi://demo%discus-demo-1@{portal}/{DEMO_IQN}/1"),
    );
    cluster
        .wait_for("the steady session", Duration::from_secs(30), async || {
            held(cluster.agent_ref("node-a"))
                .nexus
                .contains_key(INITIATOR)
        })
        .await;
    let steady_nexus = held(cluster.agent_ref("node-a")).nexus[INITIATOR].clone();
    let admitted = |granted: &std::collections::BTreeSet<usize>| {
        let mut all: std::collections::BTreeSet<String> =
            granted.iter().map(|c| chaos_client(*c)).collect();
        all.insert(INITIATOR.to_owned());
        all
    };

    let mut granted = std::collections::BTreeSet::new();
    // Kills that left the node short of the new declaration.
    let mut interrupted = 0;
    for round in 1..=kills {
        let now: std::collections::BTreeSet<usize> = (0..3).filter(|_| rng.below(2) == 0).collect();
        let password = format!("chaos-{round:06}");
        let mark = cluster.agent_ref("node-a").log().len();
        let mut objects = vec![chaos_secret(&password)];
        objects.extend(now.iter().map(|c| {
            grant(
                &format!("chaos-{c}"),
                &chaos_client(*c),
                json!({"chap": {"secretRef": {"name": "chaos-chap"}}}),
            )
        }));
        cluster.apply_objects(&objects);
        for gone in granted.difference(&now) {
            cluster.kubectl(&[
                "delete",
                "-n",
                "demo",
                "initiatoraccess",
                &format!("chaos-{gone}"),
            ]);
        }
        strike_agent(cluster.agent("node-a"), mark, &mut rng).await;

        let allowed: std::collections::BTreeSet<String> =
            admitted(&granted).union(&admitted(&now)).cloned().collect();
        let tgtd = held(cluster.agent_ref("node-a"));
        let (acls, accounts, _) = tgtd.targets.get(DEMO_IQN).cloned().unwrap_or_default();
        assert!(
            acls.is_subset(&allowed),
            "round {round}: admitted beyond both declarations: {acls:?}"
        );
        assert!(
            acls.is_empty() || !accounts.is_empty(),
            "round {round}: ACLs without CHAP"
        );
        interrupted += usize::from(acls != admitted(&now));

        let kubeconfig = cluster.agent_kubeconfig.clone();
        cluster.agent("node-a").start_with(&kubeconfig, &[]);
        let want = admitted(&now);
        let logs_in = |c: &usize, password: &str| {
            inquiry(&portal, DEMO_IQN, &chaos_client(*c), "chaos", password)
                .contains("Unit Serial Number")
        };
        cluster
            .wait_for(
                "exactly the declared grants, with the new password",
                Duration::from_secs(90),
                async || {
                    let tgtd = held(cluster.agent_ref("node-a"));
                    tgtd.targets.get(DEMO_IQN).is_some_and(|t| t.0 == want)
                        && now.iter().all(|c| logs_in(c, &password))
                },
            )
            .await;
        let old = format!("chaos-{:06}", round - 1);
        for c in 0..3 {
            assert!(
                !logs_in(&c, &old),
                "round {round}: the old password still works"
            );
        }
        for c in &now {
            cluster
                .wait_ready_on("InitiatorAccess", &format!("chaos-{c}"), &["node-a"])
                .await;
        }
        assert_eq!(
            held(cluster.agent_ref("node-a")).nexus.get(INITIATOR),
            Some(&steady_nexus),
            "round {round}: the steady session"
        );
        granted = now;
    }
    support::initiator::end_steady_session(steady);
    println!(
        "agent chaos: {kills} kills survived, {interrupted} of them before the change was applied"
    );
}
