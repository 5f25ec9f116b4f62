//! discus installed on a real node the ways users install it — `helm install` of charts/discus,
//! `kubectl apply --server-side -f deploy/discus.yaml` — and proven there: a real kubelet runs
//! the DaemonSet's Pod from the image the repository's Dockerfile builds, the example resources
//! applied with kubectl become Ready, an initiator on the host reads the disc through the portal
//! their status gives, `helm upgrade` rolls the Pod and a changed CRD, `helm uninstall` leaves
//! exactly what docs/install.md says, and the agent's ServiceAccount uses every permission the
//! chart grants and is refused none. The cluster: tests/support/node.rs; the node runs tgt (this
//! kernel has no LIO).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::chart::chart;
use support::docker::{Docker, IMAGE, PAUSE_IMAGE};
use support::http::{Behavior, HttpServer};
use support::initiator::{self, Login};
use support::kstatus::{self, Kstatus};
use support::node::{NODE, RealCluster, tail};

const DEMO_ISO_SHA256: &str = "ad0d2d0256c2a826232a63c44422745af135642c0aceaed052216215868e4795";
const INITIATOR: &str = "iqn.2026-11.dev.discus:demo-client";
const AGENT_USER: &str = "system:serviceaccount:discus-system:discus-agent";

/// Two clusters at once would starve each other on two cores: one test at a time.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ONE.lock().await
}

/// The image the chart's values name by default, as deploy/discus.yaml runs it.
fn default_image() -> String {
    let values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart().join("values.yaml")).expect("values"),
    )
    .expect("values");
    let repository = values["image"]["repository"].as_str().expect("repository");
    format!("{repository}:{}", env!("CARGO_PKG_VERSION"))
}

/// The node's images, built once per run: discus through the Dockerfile (also under the chart's
/// default name) and the pause image, in one `docker save` tarball.
fn images() -> &'static Path {
    static SAVED: OnceLock<PathBuf> = OnceLock::new();
    SAVED.get_or_init(|| {
        let docker = Docker::start();
        let took = docker.build_discus(Path::new(env!("CARGO_BIN_EXE_discus")), IMAGE);
        println!("built {IMAGE} in {took:.1?}");
        let default = default_image();
        docker.must(&["tag", IMAGE, &default]);
        docker.build_pause();
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-images.tar");
        docker.save(&[IMAGE, &default, PAUSE_IMAGE], &out);
        out
    })
}

/// The demo of examples/standalone, with its ISO downloaded from the test's HTTP server (a
/// cluster's agents allow no `file` sources unless told to), and its target's IQN one the
/// namespace may use by default.
fn demo_manifests(iso_url: &str) -> String {
    let demo = std::fs::read_to_string(support::repo().join("examples/standalone/demo.yaml"))
        .expect("demo");
    let from = "    file:\n      path: /var/lib/discus/demo/discus-demo.iso\n";
    let iqn = "  iqn: iqn.2026-11.dev.discus:demo\n";
    assert!(
        demo.contains(from) && demo.contains(iqn),
        "examples/standalone/demo.yaml changed"
    );
    demo.replace(from, &format!("    http:\n      url: {iso_url}\n"))
        .replace(iqn, &format!("  iqn: {DEMO_IQN}\n"))
}

/// The demo target's IQN in a cluster: under the namespace's own prefix, which the agent allows
/// by default.
const DEMO_IQN: &str = "iqn.2026-11.dev.discus:demo.demo";

/// The test's HTTP server on the LAN, serving the demo ISO.
async fn iso_server(cluster: &RealCluster) -> HttpServer {
    let server = HttpServer::start_on(cluster.lan.address(1).into()).await;
    let iso =
        std::fs::read(support::repo().join("examples/standalone/discus-demo.iso")).expect("iso");
    server.route("/discus-demo.iso", iso, Behavior::normal());
    server
}

fn apply(cluster: &RealCluster, yaml: &str) {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), yaml).expect("write");
    cluster.must_kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=discus-test",
        "-f",
        &file.path().display().to_string(),
    ]);
}

fn get(cluster: &RealCluster, args: &[&str]) -> Value {
    let mut all = vec!["get", "-o", "json"];
    all.extend_from_slice(args);
    let output = cluster.kubectl().args(&all).output().expect("kubectl");
    serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
}

/// Waits until `done` holds, or fails with what the agent and the kubelet said.
async fn wait_for(
    cluster: &RealCluster,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let agent = cluster
        .kubectl()
        .args([
            "logs",
            "-n",
            "discus-system",
            "daemonset/discus-agent",
            "--tail",
            "40",
        ])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default();
    panic!(
        "timed out after {timeout:?} waiting for {what}\n--- agent:\n{agent}\n--- kubelet:\n{}",
        tail(&cluster.node.log("kubelet"), 30)
    );
}

/// The agent's Pod on the node, once one is Running and Ready.
fn ready_agent_pod(cluster: &RealCluster) -> Option<Value> {
    let pods = get(
        cluster,
        &[
            "pods",
            "-n",
            "discus-system",
            "-l",
            "app.kubernetes.io/component=agent",
        ],
    );
    pods["items"]
        .as_array()?
        .iter()
        .find(|p| {
            p.pointer("/metadata/deletionTimestamp").is_none()
                && p.pointer("/status/phase") == Some(&json!("Running"))
                && p.pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
        })
        .cloned()
}

/// Waits until the agent's Pod is Running and Ready on the node, and returns it. (`helm install
/// --wait` may return before the DaemonSet controller has made the Pod.)
async fn wait_agent_ready(cluster: &RealCluster) -> Value {
    wait_for(
        cluster,
        "the agent's Pod Running and Ready",
        Duration::from_secs(180),
        || ready_agent_pod(cluster).is_some(),
    )
    .await;
    ready_agent_pod(cluster).expect("the agent's Pod")
}

/// Waits until the demo's three resources are Ready, with a connection for the grant. (Ready
/// itself, not only kstatus Current: an object nobody has written status to yet is Current.)
async fn wait_demo_ready(cluster: &RealCluster) {
    wait_for(
        cluster,
        "the demo's resources Ready",
        Duration::from_secs(180),
        || {
            [
                "discimage/discus-demo",
                "iscsitarget/demo",
                "initiatoraccess/demo-client",
            ]
            .iter()
            .map(|o| get(cluster, &["-n", "demo", o]))
            .all(|o| {
                let ready = o
                    .pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    });
                let connected = o["kind"] != "InitiatorAccess"
                    || o.pointer("/status/connection/portals/0").is_some();
                ready && connected && kstatus::compute(&o) == Kstatus::Current
            })
        },
    )
    .await;
}

/// Reads the demo disc through the first portal of the grant's `status.connection`.
fn read_demo(cluster: &RealCluster) -> String {
    let grant = get(cluster, &["-n", "demo", "initiatoraccess/demo-client"]);
    let connection = &grant["status"]["connection"];
    let portal = connection["portals"][0].as_str().expect("a portal");
    assert_eq!(
        portal,
        format!("{}:3260", cluster.node.address),
        "{connection:#}"
    );
    let lun = connection["luns"][0]["deviceLun"]
        .as_u64()
        .expect("deviceLun") as u32;
    let iqn = connection["iqn"].as_str().expect("iqn");
    let scratch = tempfile::tempdir().expect("tempdir");
    let login = Login {
        portal,
        iqn,
        lun,
        initiator: INITIATOR,
        user: "demo",
        password: "discus-demo-1",
    };
    initiator::read_lun(&login, &scratch.path().join("demo.iso")).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether an initiator logs in and reads the demo LUN's inquiry data (a quick probe).
fn serves(portal: &str) -> bool {
    std::process::Command::new("iscsi-inq")
        .args(["-i", INITIATOR])
        .arg(format!("iscsi://demo%discus-demo-1@{portal}/{DEMO_IQN}/1"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_installs_discus_on_a_real_node_that_serves_a_disc_through_upgrades_and_uninstall() {
    let _one = one_at_a_time().await;
    let cluster = RealCluster::start(images()).await;
    cluster.must_kubectl(&["label", "node", NODE, "discus.dev/storage=true"]);
    cluster.must_kubectl(&["create", "namespace", "demo"]);
    let chart_dir = chart().display().to_string();

    let installing = Instant::now();
    let said = cluster.must_helm(&[
        "install",
        "discus",
        &chart_dir,
        "--namespace",
        "discus-system",
        "--create-namespace",
        "--set",
        "image.repository=discus-test/discus",
        "--set",
        "agent.namespaces={demo}",
        "--wait",
        "--timeout",
        "5m",
    ]);
    let pod = wait_agent_ready(&cluster).await;
    println!(
        "helm install to the agent Ready: {:.1?}",
        installing.elapsed()
    );
    // NOTES.txt tells what to do next.
    let notes = said
        .split_once("NOTES:")
        .map(|(_, n)| n)
        .unwrap_or_default();
    for next in [
        "kubectl label node <node> discus.dev/storage=true",
        "rollout status daemonset/discus-agent",
        "(demo)",
        "kubectl get dimg,itgt,iacc",
    ] {
        assert!(notes.contains(next), "NOTES lack {next:?}:\n{notes}");
    }
    assert_eq!(pod.pointer("/spec/nodeName"), Some(&json!(NODE)));
    assert_eq!(
        pod.pointer("/spec/serviceAccountName"),
        Some(&json!("discus-agent"))
    );
    assert_eq!(pod.pointer("/spec/hostNetwork"), Some(&json!(true)));

    // The example resources, applied as a user would, become Ready; an initiator reads the disc.
    let server = iso_server(&cluster).await;
    let applying = Instant::now();
    apply(&cluster, &demo_manifests(&server.url("/discus-demo.iso")));
    wait_demo_ready(&cluster).await;
    println!("demo Ready {:.1?} after kubectl apply", applying.elapsed());
    assert_eq!(read_demo(&cluster), DEMO_ISO_SHA256);

    exercise_every_permission(&cluster).await;
    upgrade_rolls_the_agent(&cluster, &chart_dir).await;
    upgrade_changes_a_crd(&cluster).await;
    assert_eq!(read_demo(&cluster), DEMO_ISO_SHA256);

    // Least privilege, against the chart's RBAC: nothing refused, nothing granted but unused.
    let requests: Vec<Value> = cluster
        .plane
        .audit_events()
        .into_iter()
        .filter(|e| e.pointer("/user/username") == Some(&json!(AGENT_USER)))
        .collect();
    let refused = support::rbac::refused(&requests);
    assert!(refused.is_empty(), "refused requests: {refused:#?}");
    let rendered = support::chart::render(&[
        "--set",
        "agent.namespaces={demo}",
        "--show-only",
        "templates/agent-rbac.yaml",
    ]);
    let granted = support::rbac::granted(&rendered);
    let mut used = support::rbac::used(&requests);
    used.extend(support::rbac::proven_elsewhere());
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "granted but never used: {unused:?}\nused: {used:?}"
    );

    uninstall_leaves_what_the_docs_say(&cluster).await;
    drop(server);
}

/// What the agent does only now and then: a generated CHAP Secret (secrets create), and a grant
/// moved off its target and back twice (the node's Event about that, repeated, is a series:
/// events patch).
async fn exercise_every_permission(cluster: &RealCluster) {
    let grant = |target: &str| {
        format!(
            "apiVersion: discus.dev/v1alpha1\nkind: InitiatorAccess\nmetadata: {{name: generated, namespace: demo}}\n\
             spec: {{targetRef: {{name: {target}}}, initiatorIqn: 'iqn.2026-11.dev.discus:generated', \
             chap: {{secretRef: {{name: generated-chap}}, generateSecret: true}}}}\n"
        )
    };
    for target in ["demo", "gone", "demo", "gone", "demo"] {
        apply(cluster, &grant(target));
        wait_for(
            cluster,
            &format!("the generated grant on {target}"),
            Duration::from_secs(60),
            || {
                let object = get(cluster, &["-n", "demo", "initiatoraccess/generated"]);
                let applied = object.pointer("/status/nodes/0/applied") == Some(&json!(true));
                let applied = applied == (target == "demo");
                applied
                    && object.pointer("/status/observedGeneration")
                        == object.pointer("/metadata/generation")
            },
        )
        .await;
    }
    // The lease holder tells each arrival as an Event of its own (applied three times); the
    // node tells what it made of the missing target, the second time as a series.
    wait_for(
        cluster,
        "the Applied events and the node's series",
        Duration::from_secs(30),
        || {
            let events = get(cluster, &["events.events.k8s.io", "-n", "demo"]);
            let on_grant: Vec<&Value> = (events["items"].as_array().into_iter().flatten())
                .filter(|e| e.pointer("/regarding/name") == Some(&json!("generated")))
                .collect();
            let applied = (on_grant.iter())
                .filter(|e| e["reason"] == "Applied")
                .count();
            let series = (on_grant.iter()).any(|e| {
                e.pointer("/series/count")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    >= 2
            });
            applied >= 3 && series
        },
    )
    .await;
}

/// `helm upgrade` with a changed value rolls the agent's Pod; initiators are without service
/// from the old Pod's end (tgtd lives in it) until the new one has synced.
async fn upgrade_rolls_the_agent(cluster: &RealCluster, chart_dir: &str) {
    let before = ready_agent_pod(cluster).expect("the agent");
    let portal = format!("{}:3260", cluster.node.address);
    let probes: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (probes, stop, portal) = (Arc::clone(&probes), Arc::clone(&stop), portal.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ok = serves(&portal);
                probes.lock().expect("probes").push((Instant::now(), ok));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let upgrading = Instant::now();
    cluster.must_helm(&[
        "upgrade",
        "discus",
        chart_dir,
        "--namespace",
        "discus-system",
        "--reuse-values",
        "--set",
        "agent.logLevel=debug",
        "--wait",
        "--timeout",
        "5m",
    ]);
    let upgraded = upgrading.elapsed();
    // `helm upgrade --wait` may return before the DaemonSet has replaced the Pod.
    let replaced = || {
        ready_agent_pod(cluster)
            .filter(|p| p.pointer("/metadata/uid") != before.pointer("/metadata/uid"))
    };
    wait_for(
        cluster,
        "a new agent Pod Ready",
        Duration::from_secs(180),
        || replaced().is_some(),
    )
    .await;
    let rolled = upgrading.elapsed();
    wait_for(
        cluster,
        "the target served again",
        Duration::from_secs(60),
        || serves(&portal),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    prober.join().expect("prober");
    let after = replaced().expect("the agent after the upgrade");
    let args = after
        .pointer("/spec/containers/0/args")
        .expect("args")
        .to_string();
    assert!(args.contains("--log-level=debug"), "{args}");
    let probes = probes.lock().expect("probes");
    let outage = longest_outage(&probes);
    println!(
        "helm upgrade --wait: {upgraded:.1?}, the new Pod Ready after {rolled:.1?}; initiators without service for {outage:.1?} ({} probes)",
        probes.len()
    );
    assert!(
        outage > Duration::ZERO,
        "tgtd lives in the Pod: a restart must interrupt it"
    );
}

/// The longest run of failed probes, from the last success before it to the first after.
fn longest_outage(probes: &[(Instant, bool)]) -> Duration {
    let mut longest = Duration::ZERO;
    let mut last_ok: Option<Instant> = None;
    let mut failing = false;
    for &(at, ok) in probes {
        match (ok, failing) {
            (true, true) => {
                if let Some(since) = last_ok {
                    longest = longest.max(at - since);
                }
                failing = false;
                last_ok = Some(at);
            }
            (true, false) => last_ok = Some(at),
            (false, _) => failing = true,
        }
    }
    longest
}

/// `helm upgrade` to a chart whose CRD changed changes the CRD in the cluster (Helm would never
/// upgrade a chart's crds/ folder).
async fn upgrade_changes_a_crd(cluster: &RealCluster) {
    let copy = tempfile::tempdir().expect("tempdir");
    let changed = copy.path().join("discus");
    let status = std::process::Command::new("cp")
        .args(["-r"])
        .arg(chart())
        .arg(&changed)
        .status()
        .expect("cp");
    assert!(status.success());
    let crds_path = changed.join("files/crds.yaml");
    let crds = std::fs::read_to_string(&crds_path).expect("crds");
    let marker = "    kind: DiscImage\n    plural: discimages\n";
    assert!(crds.contains("  names:\n    categories:\n    - discus\n") && crds.contains(marker));
    std::fs::write(
        &crds_path,
        crds.replacen(
            "    categories:\n    - discus\n    kind: DiscImage",
            "    categories:\n    - discus\n    - discs\n    kind: DiscImage",
            1,
        ),
    )
    .expect("crds");
    cluster.must_helm(&[
        "upgrade",
        "discus",
        &changed.display().to_string(),
        "--namespace",
        "discus-system",
        "--reuse-values",
        "--wait",
        "--timeout",
        "5m",
    ]);
    let crd = get(cluster, &["crd", "discimages.discus.dev"]);
    assert_eq!(
        crd.pointer("/spec/names/categories"),
        Some(&json!(["discus", "discs"])),
        "{crd:#}"
    );
    wait_for(
        cluster,
        "the new category served",
        Duration::from_secs(30),
        || {
            cluster
                .kubectl()
                .args(["get", "discs", "-n", "demo", "-o", "name"])
                .output()
                .is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).contains("discimage.discus.dev/discus-demo")
                })
        },
    )
    .await;
}

/// `helm uninstall`: the agent and its RBAC go; the CRDs, the resources, the Leases, the node's
/// reports and the generated Secret stay; on the node no process of discus's is left (tgtd lived in the Pod), the
/// portal is closed, and the data directory keeps the images. `discus teardown` from a
/// `kubectl debug node` Pod — docs/install.md's way to clear a node — finds nothing left to remove.
async fn uninstall_leaves_what_the_docs_say(cluster: &RealCluster) {
    cluster.must_helm(&[
        "uninstall",
        "discus",
        "--namespace",
        "discus-system",
        "--wait",
        "--timeout",
        "5m",
    ]);
    wait_for(
        cluster,
        "the agent's Pod gone",
        Duration::from_secs(90),
        || {
            get(cluster, &["pods", "-n", "discus-system"])["items"]
                .as_array()
                .is_some_and(Vec::is_empty)
        },
    )
    .await;
    for gone in [
        vec!["daemonset/discus-agent", "-n", "discus-system"],
        vec!["serviceaccount/discus-agent", "-n", "discus-system"],
        vec!["clusterrole/discus-agent"],
        vec!["clusterrole/discus-edit"],
        vec!["rolebinding/discus-agent-namespaced", "-n", "demo"],
    ] {
        assert!(get(cluster, &gone).is_null(), "{gone:?} is still there");
    }
    let crds = get(cluster, &["crds"]);
    let names: Vec<&str> = crds["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.pointer("/metadata/name").and_then(Value::as_str))
        .filter(|n| n.ends_with(".discus.dev"))
        .collect();
    assert_eq!(names.len(), 3, "the CRDs stay: {names:?}");
    for kept in [
        vec!["-n", "demo", "discimage/discus-demo"],
        vec!["-n", "demo", "iscsitarget/demo"],
        vec!["-n", "demo", "initiatoraccess/demo-client"],
        vec!["-n", "demo", "secret/generated-chap"],
        vec!["-n", "discus-system", "lease/discus-leader"],
    ] {
        assert!(!get(cluster, &kept).is_null(), "{kept:?} should stay");
    }
    let reports = get(
        cluster,
        &[
            "configmaps",
            "-n",
            "discus-system",
            "-l",
            "discus.dev/report",
        ],
    );
    let reports = reports["items"].as_array().map_or(0, Vec::len);
    assert!(reports > 0, "the node's reports should stay");

    let processes = cluster.node.processes();
    assert!(
        !processes.iter().any(|p| p == "tgtd" || p == "discus"),
        "left on the node: {processes:?}"
    );
    assert!(
        std::net::TcpStream::connect_timeout(
            &format!("{}:3260", cluster.node.address)
                .parse()
                .expect("address"),
            Duration::from_secs(2)
        )
        .is_err(),
        "the portal still accepts connections"
    );
    let data = cluster.node.data_dir();
    let mut left: Vec<String> = walk(&data)
        .iter()
        .map(|p| p.strip_prefix(&data).expect("under").display().to_string())
        .collect();
    left.sort();
    println!("left in the node's /var/lib/discus: {left:?}");
    assert!(
        left.iter()
            .any(|p| p.starts_with("images/") && p.ends_with(".raw")),
        "{left:?}"
    );
    assert!(left.iter().any(|p| p == "tgt/owned.json"), "{left:?}");

    // The documented way to clear a node, on this one: nothing is left to remove.
    cluster.must_kubectl(&[
        "debug",
        &format!("node/{NODE}"),
        "--profile=sysadmin",
        &format!("--image={IMAGE}"),
        "--image-pull-policy=IfNotPresent",
        "--",
        "discus",
        "teardown",
        "--configfs",
        "/host/sys/kernel/config",
        "--data-dir",
        "/host/var/lib/discus",
    ]);
    let debugger = || {
        get(cluster, &["pods", "-n", "default"])["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| {
                p.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.starts_with("node-debugger-"))
            })
            .cloned()
            .unwrap_or(Value::Null)
    };
    wait_for(
        cluster,
        "the teardown Pod done",
        Duration::from_secs(90),
        || debugger().pointer("/status/phase") == Some(&json!("Succeeded")),
    )
    .await;
    let pod = debugger()["metadata"]["name"]
        .as_str()
        .expect("the debug Pod")
        .to_owned();
    let said = cluster.must_kubectl(&["logs", &pod]);
    assert!(
        said.contains("lio: ") && said.contains("tgt: no tgtd answers"),
        "{said}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_apply_of_deploy_installs_discus_on_a_fresh_cluster() {
    let _one = one_at_a_time().await;
    let cluster = RealCluster::start(images()).await;
    cluster.must_kubectl(&["label", "node", NODE, "discus.dev/storage=true"]);
    let applying = Instant::now();
    cluster.must_kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &support::repo()
            .join("deploy/discus.yaml")
            .display()
            .to_string(),
    ]);
    cluster.must_kubectl(&[
        "rollout",
        "status",
        "daemonset/discus-agent",
        "-n",
        "discus-system",
        "--timeout=300s",
    ]);
    let pod = wait_agent_ready(&cluster).await;
    println!(
        "kubectl apply to the agent Ready: {:.1?}",
        applying.elapsed()
    );
    assert_eq!(
        pod.pointer("/spec/containers/0/image"),
        Some(&json!(default_image()))
    );

    cluster.must_kubectl(&["create", "namespace", "demo"]);
    let server = iso_server(&cluster).await;
    apply(&cluster, &demo_manifests(&server.url("/discus-demo.iso")));
    wait_demo_ready(&cluster).await;
    assert_eq!(read_demo(&cluster), DEMO_ISO_SHA256);

    // Namespace users get discus's resources through the built-in roles (aggregation).
    cluster.must_kubectl(&[
        "create",
        "rolebinding",
        "jane",
        "--clusterrole=edit",
        "--user=jane",
        "-n",
        "demo",
    ]);
    cluster.must_kubectl(&[
        "create",
        "rolebinding",
        "joe",
        "--clusterrole=view",
        "--user=joe",
        "-n",
        "demo",
    ]);
    let can = |user: &str, verb: &str| {
        cluster
            .kubectl()
            .args([
                "auth",
                "can-i",
                verb,
                "initiatoraccesses.discus.dev",
                "-n",
                "demo",
                "--as",
                user,
            ])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "yes")
    };
    wait_for(
        &cluster,
        "edit and view to include discus's resources",
        Duration::from_secs(60),
        || can("jane", "create") && can("joe", "list"),
    )
    .await;
    assert!(!can("joe", "create"), "view must not write");
    drop(server);
}
