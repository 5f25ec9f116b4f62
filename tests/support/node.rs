//! A real single-node Kubernetes cluster for tests: etcd, kube-apiserver, kube-controller-manager
//! and kube-scheduler in one host of their own, and a node — containerd (Debian's) and a kubelet
//! built from the same pinned module — in another, both on a private LAN with the test process.
//! DaemonSets, Pods with ServiceAccount tokens, hostNetwork, privileged containers: what discus's
//! chart needs, on this machine, with no registry (images come from `docker save`).
//!
//! The node keeps the machine as it found it. Its processes live in the node's namespaces and die
//! with it (tests/support/sandbox.rs). Paths the kubelet and containerd insist on (/run, /var/log,
//! /var/lib) are private tmpfs there; their state is in the test's directory. Its Pods' cgroups are
//! under a cgroup of the test's own (the kubelet's `cgroupRoot`), removed afterwards. The kubelet
//! would set kernel-wide sysctls (kernel.panic_on_oops among them) that the machine does not
//! have: the node reads the values the kubelet wants from files bound over them, so it never
//! writes. The LAN has no route out: no packet leaves the machine.
//!
//! One thing a real node has is made up inside this one: kube-proxy, for the one Service a Pod
//! needs — the `kubernetes` Service's address is translated to the apiserver's by one iptables
//! rule in the node's namespace. The kernel is the machine's, without configfs or LIO: discus
//! chooses tgt there, as on any node without LIO.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::Api;

use super::control_plane::ControlPlane;
use super::network::Lan;
use super::sandbox::Sandbox;

/// The node's name in the cluster.
pub const NODE: &str = "storage-1";
/// Where the node's containerd finds the pod sandbox image (as `ctr import` names it).
const SANDBOX_IMAGE: &str = "docker.io/discus-test/pause:1";
/// The kubelet wants these; the machine has others (see the module's header).
const KUBELET_SYSCTLS: [(&str, &str); 3] = [
    ("vm/overcommit_memory", "1"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
];

/// A control plane and one node on a private LAN.
pub struct RealCluster {
    pub node: Node,
    pub plane: ControlPlane,
    pub lan: Lan,
    pub client: kube::Client,
    helm_home: tempfile::TempDir,
}

impl RealCluster {
    /// Starts everything, imports `images` (a `docker save` tarball) into the node's containerd,
    /// and waits until the node is Ready.
    pub async fn start(images: &Path) -> Self {
        let started = Instant::now();
        let lan = Lan::new();
        let host = Sandbox::new();
        let address = lan.plug(&host, 10);
        let plane = ControlPlane::start_for_nodes(host, address.into())
            .await
            .expect("control plane");
        let client = plane.client().await.expect("client");
        let node = Node::start(&lan, &plane, images);
        let cluster = Self {
            node,
            plane,
            lan,
            client,
            helm_home: tempfile::tempdir().expect("helm home"),
        };
        cluster.wait_node_ready().await;
        println!(
            "a cluster with a Ready node in {:.1?} (images imported in {:.1?})",
            started.elapsed(),
            cluster.node.import_time
        );
        cluster
    }

    async fn wait_node_ready(&self) {
        let nodes: Api<KubeNode> = Api::all(self.client.clone());
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            let ready = nodes.get_opt(NODE).await.ok().flatten().is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .into_iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            if ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "node {NODE} not Ready within 180 s\n--- kubelet:\n{}\n--- containerd:\n{}",
            tail(&self.node.log("kubelet"), 60),
            tail(&self.node.log("containerd"), 30)
        );
    }

    /// `kubectl` as admin.
    pub fn kubectl(&self) -> Command {
        self.plane.kubectl()
    }

    /// `kubectl ARGS` as admin; fails the test when it fails.
    pub fn must_kubectl(&self, args: &[&str]) -> String {
        must(self.kubectl().args(args), "kubectl")
    }

    /// `helm` (built from tools/k8s) as admin, with its caches in the test's directory.
    pub fn helm(&self) -> Command {
        let mut command = Command::new(self.plane.bin().join("helm"));
        let home = self.helm_home.path();
        command
            .arg("--kubeconfig")
            .arg(self.plane.file("admin.kubeconfig"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        command
    }

    /// `helm ARGS`; fails the test when it fails.
    pub fn must_helm(&self, args: &[&str]) -> String {
        must(self.helm().args(args), "helm")
    }
}

/// The node: a host of its own with containerd and a kubelet.
pub struct Node {
    pub address: Ipv4Addr,
    sandbox: Option<Sandbox>,
    /// The cgroup under which the kubelet puts Pods (its `cgroupRoot`).
    cgroup: String,
    import_time: Duration,
    _processes: Vec<Child>,
}

impl Node {
    fn start(lan: &Lan, plane: &ControlPlane, images: &Path) -> Self {
        let sandbox = Sandbox::new();
        let address = lan.plug(&sandbox, 20);
        let cgroup = format!("discus-node-{}-{}", std::process::id(), address.octets()[2]);
        let mut node = Self {
            address,
            sandbox: None,
            cgroup,
            import_time: Duration::ZERO,
            _processes: Vec::new(),
        };
        // A /proc of the node's PID namespace: containerd's shims read their parent's there.
        sandbox.must(&["mount", "-t", "proc", "proc", "/proc"]);
        private_paths(&sandbox);
        fake_sysctls(&sandbox);
        // Shared mounts, as systemd makes them on a real node (a Pod's `HostToContainer` mounts
        // need it); the node's namespace was made private, so nothing propagates to the machine.
        sandbox.must(&["mount", "--make-rshared", "/"]);
        kube_proxy(&sandbox, lan, plane);
        make_cgroup(&node.cgroup);
        let socket = sandbox.path().join("containerd/containerd.sock");
        node._processes.push(start_containerd(&sandbox, &socket));
        let started = Instant::now();
        sandbox.must(&[
            "ctr",
            "--address",
            &socket.display().to_string(),
            "--namespace",
            "k8s.io",
            "images",
            "import",
            &images.display().to_string(),
        ]);
        node.import_time = started.elapsed();
        node._processes.push(start_kubelet(
            &sandbox,
            plane,
            &socket,
            address,
            &node.cgroup,
        ));
        node.sandbox = Some(sandbox);
        node
    }

    fn sandbox(&self) -> &Sandbox {
        self.sandbox.as_ref().expect("the node runs")
    }

    /// The log of `kubelet` or `containerd`.
    pub fn log(&self, component: &str) -> String {
        std::fs::read_to_string(self.sandbox().path().join(format!("{component}.log")))
            .unwrap_or_default()
    }

    /// The node's /var/lib/discus (discus's default data directory), as the test sees it.
    pub fn data_dir(&self) -> PathBuf {
        self.sandbox().data_dir()
    }

    /// Runs a command in the node's namespaces; fails the test when it fails.
    pub fn must(&self, args: &[&str]) -> String {
        self.sandbox().must(args)
    }

    /// The names (comm) of every process running on the node, its Pods' included.
    pub fn processes(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut pending = vec![self.sandbox().pid()];
        while let Some(pid) = pending.pop() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            names.push(comm.trim().to_owned());
            for task in std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
            {
                let children = std::fs::read_to_string(task.expect("task").path().join("children"))
                    .unwrap_or_default();
                pending.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        names
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Every process of the node goes with its sandbox; then its Pods' cgroups are empty.
        drop(self.sandbox.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && cgroup_exists(&self.cgroup) {
            super::docker::remove_cgroups(&self.cgroup);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// tmpfs over the paths containerd and the kubelet write whatever their configuration says
/// (/run/containerd, /var/lib/kubelet/device-plugins, /var/log/containers, …), and discus's
/// data directory bound again inside.
fn private_paths(sandbox: &Sandbox) {
    for path in ["/run", "/var/log", "/var/lib"] {
        sandbox.must(&["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path]);
    }
    sandbox.must(&["mkdir", "-p", "/var/lib/discus", "/run/tgtd"]);
    let data = sandbox.data_dir().display().to_string();
    sandbox.must(&["mount", "--bind", &data, "/var/lib/discus"]);
}

fn fake_sysctls(sandbox: &Sandbox) {
    let dir = sandbox.scratch("sysctl");
    for (name, value) in KUBELET_SYSCTLS {
        let file = dir.join(name.replace('/', "."));
        std::fs::write(&file, format!("{value}\n")).expect("sysctl file");
        sandbox.must(&[
            "mount",
            "--bind",
            &file.display().to_string(),
            &format!("/proc/sys/{name}"),
        ]);
    }
}

/// The `kubernetes` Service (10.0.0.1:443) leads to the apiserver, as kube-proxy would make it.
fn kube_proxy(sandbox: &Sandbox, lan: &Lan, plane: &ControlPlane) {
    let apiserver = plane.server.trim_start_matches("https://").to_owned();
    sandbox.must(&[
        "ip",
        "route",
        "add",
        "10.0.0.0/24",
        "via",
        &lan.address(10).to_string(),
    ]);
    sandbox.must(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "10.0.0.1/32",
        "-p",
        "tcp",
        "--dport",
        "443",
        "-j",
        "DNAT",
        "--to-destination",
        &apiserver,
    ]);
}

/// The Pods' cgroup in every v1 hierarchy (cpuset needs its CPUs and memory nodes set).
fn make_cgroup(name: &str) {
    let hierarchies = std::fs::read_dir("/sys/fs/cgroup").expect("/sys/fs/cgroup");
    for hierarchy in hierarchies.flatten() {
        let root = hierarchy.path();
        if root.ends_with("unified") || !root.join("cgroup.procs").exists() {
            continue;
        }
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(root.join(file)) {
                std::fs::write(dir.join(file), value.trim())
                    .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()));
            }
        }
    }
}

fn cgroup_exists(name: &str) -> bool {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .any(|h| h.path().join(name).exists())
}

fn start_containerd(sandbox: &Sandbox, socket: &Path) -> Child {
    let dir = sandbox.scratch("containerd");
    let cni = sandbox.scratch("cni");
    // Only hostNetwork Pods run here; the CRI plugin wants a network configuration to call
    // itself ready, and this one is never used.
    std::fs::write(
        cni.join("10-discus-test.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "discus-test", "plugins": [{"type": "loopback"}]}"#,
    )
    .expect("cni config");
    let d = |name: &str| dir.join(name).display().to_string();
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  # The machine's bounding set and limits (see tests/support/docker.rs): Pods asking for
  # oom_score_adj -998 would fail.
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"#,
        root = d("root"),
        state = d("state"),
        socket = socket.display(),
        opt = d("opt"),
        cni_bin = cni.join("bin").display(),
        cni_conf = cni.display(),
    );
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, config).expect("containerd config");
    let log = std::fs::File::create(sandbox.path().join("containerd.log")).expect("log");
    let mut child = sandbox
        .command("containerd")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("containerd (Debian's) starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    let address = socket.display().to_string();
    while Instant::now() < deadline {
        let up = sandbox
            .command("ctr")
            .args(["--address", &address, "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if up {
            return child;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "containerd did not answer within 60 s: {}",
        std::fs::read_to_string(sandbox.path().join("containerd.log")).unwrap_or_default()
    );
}

fn start_kubelet(
    sandbox: &Sandbox,
    plane: &ControlPlane,
    socket: &Path,
    address: Ipv4Addr,
    cgroup: &str,
) -> Child {
    let dir = sandbox.scratch("kubelet");
    let config = format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {address}
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
# The machine has cgroups v1 and no systemd.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
containerRuntimeEndpoint: unix://{socket}
failSwapOn: false
# Never evict, never delete the imported images: nothing could pull them again.
evictionHard: {{}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
makeIPTablesUtilChains: false
resolvConf: ""
podLogsDirectory: {logs}
localStorageCapacityIsolation: false
serializeImagePulls: false
"#,
        socket = socket.display(),
        logs = dir.join("pod-logs").display(),
    );
    let config_path = dir.join("config.yaml");
    std::fs::write(&config_path, config).expect("kubelet config");
    let log = std::fs::File::create(sandbox.path().join("kubelet.log")).expect("log");
    sandbox
        .command(plane.bin().join("kubelet"))
        .arg(format!("--config={}", config_path.display()))
        .arg(format!(
            "--kubeconfig={}",
            plane.file("admin.kubeconfig").display()
        ))
        .arg(format!("--root-dir={}", dir.join("root").display()))
        .arg(format!("--hostname-override={NODE}"))
        .arg(format!("--node-ip={address}"))
        .arg("--v=1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("kubelet starts")
}

fn must(command: &mut Command, what: &str) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} {:?} failed: {}{}",
        command.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The last `lines` lines of a log.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
