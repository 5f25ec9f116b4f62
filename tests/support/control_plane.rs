//! A real Kubernetes control plane for tests: etcd and kube-apiserver built from pinned sources
//! (`tools/build-control-plane`), started on loopback with RBAC on, like controller-runtime's
//! envtest.
//!
//! `ControlPlane::start().await` gives a running apiserver, an admin kubeconfig and a client;
//! dropping it stops both processes and removes every file. The processes are started under
//! `setpriv --pdeathsig KILL`, so they die with the test process even when it is killed.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::sandbox::Sandbox;

type Error = Box<dyn std::error::Error + Send + Sync>;

const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one readiness probe of the apiserver may wait for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ControlPlane {
    dir: tempfile::TempDir,
    processes: Vec<Process>,
    /// Components stopped by `stop_component`, to start again as they were.
    stopped: Vec<(String, Vec<String>)>,
    bin: PathBuf,
    /// The host of its own it runs in, if any (it goes with the control plane).
    sandbox: Option<Sandbox>,
    /// An admin (`system:masters`) kubeconfig.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`
    pub server: String,
}

impl ControlPlane {
    /// Builds (or takes from the cache) the binaries, starts etcd and kube-apiserver, and waits
    /// until the apiserver is ready.
    pub async fn start() -> Result<Self, Error> {
        Self::start_at(None, IpAddr::from([127, 0, 0, 1]), false).await
    }

    /// Like `start`, in a sandbox of its own, serving on `address` (the sandbox's address on a
    /// test LAN), so that other sandboxes can reach it.
    pub async fn start_in(sandbox: Sandbox, address: IpAddr) -> Result<Self, Error> {
        Self::start_at(Some(sandbox), address, false).await
    }

    /// A control plane for real nodes (tests/support/node.rs), in a sandbox of its own on
    /// `address`: Pods get ServiceAccount tokens (the admission plugin is on), the apiserver
    /// reaches kubelets by their InternalIP, and kube-controller-manager (DaemonSets, the root CA
    /// for Pods, role aggregation) and kube-scheduler run beside it.
    pub async fn start_for_nodes(sandbox: Sandbox, address: IpAddr) -> Result<Self, Error> {
        let mut plane = Self::start_at(Some(sandbox), address, true).await?;
        plane.start_controllers()?;
        Ok(plane)
    }

    async fn start_at(
        sandbox: Option<Sandbox>,
        address: IpAddr,
        for_nodes: bool,
    ) -> Result<Self, Error> {
        let bin = binaries()?;
        let dir = tempfile::Builder::new()
            .prefix("discus-control-plane-")
            .tempdir()?;
        let root = dir.path().to_owned();
        let mut plane = Self {
            dir,
            processes: Vec::new(),
            stopped: Vec::new(),
            kubeconfig: root.join("admin.kubeconfig"),
            server: String::new(),
            bin,
            sandbox,
        };

        let pki = Pki::generate(&root, address)?;
        let etcd_client = plane.start_etcd(&root, address).await?;

        let port = free_port()?;
        plane.server = format!("https://{address}:{port}");
        let apiserver_log = std::fs::File::create(root.join("kube-apiserver.log"))?;
        let p = |name: &str| root.join(name).display().to_string();
        let node_args: &[String] = if for_nodes {
            &["--kubelet-preferred-address-types=InternalIP".into()]
        } else {
            &["--disable-admission-plugins=ServiceAccount".into()]
        };
        plane.spawn(
            "kube-apiserver",
            &[
                format!("--etcd-servers=http://{address}:{etcd_client}"),
                format!("--bind-address={address}"),
                format!("--advertise-address={address}"),
                format!("--secure-port={port}"),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--cert-dir={}", p("certs")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!("--service-account-issuer=https://{address}:{port}"),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--authorization-mode=RBAC".into(),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--endpoint-reconciler-type=none".into(),
                "--allow-privileged=true".into(),
                // /debug/pprof for `cargo bench --bench agent` with DISCUS_BENCH_PROFILE.
                format!(
                    "--profiling={}",
                    std::env::var_os("DISCUS_BENCH_PROFILE").is_some()
                ),
                format!("--audit-log-path={}", p("audit.log")),
                format!("--audit-policy-file={}", p("audit-policy.yaml")),
            ]
            .iter()
            .chain(node_args)
            .cloned()
            .collect::<Vec<_>>(),
            apiserver_log,
        )?;
        std::fs::write(&plane.kubeconfig, pki.kubeconfig(&plane.server))?;

        plane.wait_apiserver_ready().await?;
        Ok(plane)
    }

    /// etcd on ports found free; returns its client port. Tests start clusters side by side, so a
    /// port found free can be taken before etcd binds it: when etcd exits for that, it starts
    /// again on other ports. Any other failure says what etcd logged.
    async fn start_etcd(&mut self, root: &Path, address: IpAddr) -> Result<u16, Error> {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let (client, peer) = (free_port()?, free_port()?);
            let log = std::fs::File::create(root.join("etcd.log"))?;
            self.spawn(
                "etcd",
                &[
                    "--name=discus-test".into(),
                    format!("--data-dir={}", root.join("etcd").display()),
                    format!("--listen-client-urls=http://{address}:{client}"),
                    format!("--advertise-client-urls=http://{address}:{client}"),
                    format!("--listen-peer-urls=http://{address}:{peer}"),
                    format!("--initial-advertise-peer-urls=http://{address}:{peer}"),
                    format!("--initial-cluster=discus-test=http://{address}:{peer}"),
                    "--unsafe-no-fsync=true".into(),
                    "--log-level=warn".into(),
                ],
                log,
            )?;
            let start = Instant::now();
            while start.elapsed() < START_TIMEOUT {
                if etcd_ready(address, client).await.is_some() {
                    return Ok(client);
                }
                let exited = (self.processes.last_mut())
                    .and_then(|etcd| etcd.child.try_wait().ok().flatten());
                if exited.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let logged = self.log("etcd");
            if let Some(mut etcd) = self.processes.pop() {
                self.kill(&mut etcd);
            }
            if attempt == ATTEMPTS || !logged.contains("address already in use") {
                return Err(format!(
                    "etcd was not ready after {:?} (attempt {attempt}); it logged:\n{}",
                    start.elapsed(),
                    tail(&logged, 20)
                )
                .into());
            }
            let _ = std::fs::remove_dir_all(root.join("etcd"));
        }
        Err("etcd: no attempt left".into())
    }

    /// Applies the discus CRDs (server-side, as users should) and waits until they are
    /// established.
    pub async fn install_crds(&self) -> Result<(), Error> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        use kube::api::{Api, Patch, PatchParams};
        use kube::runtime::wait::{await_condition, conditions};
        let crds: Api<CustomResourceDefinition> = Api::all(self.client().await?);
        for crd in discus::api::all_crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            crds.patch(
                &name,
                &PatchParams::apply("discus-test").force(),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(|e| format!("{name} rejected: {e}"))?;
            tokio::time::timeout(
                Duration::from_secs(30),
                await_condition(crds.clone(), &name, conditions::is_crd_established()),
            )
            .await
            .map_err(|_| format!("{name} not established in time"))??;
        }
        Ok(())
    }

    /// A client with the admin kubeconfig.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// `kubectl` (of the same version as the apiserver) with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(self.bin.join("kubectl"));
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }

    /// The apiserver's audit log: one JSON event per line, every request at metadata level.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// Every request of the audit log so far, once each (at its last stage).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.audit_log()).unwrap_or_default();
        let mut events: Vec<serde_json::Value> = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for event in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let id = event["auditID"].as_str().unwrap_or_default().to_owned();
            match seen.get(&id) {
                Some(&index) => events[index] = event,
                None => {
                    seen.insert(id, events.len());
                    events.push(event);
                }
            }
        }
        events
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/name` (created if missing)
    /// with a bound token from the TokenRequest API, as a Pod's projected token would.
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<PathBuf, Error> {
        use k8s_openapi::api::authentication::v1::TokenRequest;
        use k8s_openapi::api::core::v1::ServiceAccount;
        use kube::api::{Api, PostParams};
        let client = self.client().await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, namespace);
        if accounts.get_opt(name).await?.is_none() {
            let account: ServiceAccount = serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "namespace": namespace}}),
            )?;
            accounts.create(&PostParams::default(), &account).await?;
        }
        let request: TokenRequest = serde_json::from_value(
            serde_json::json!({"spec": {"audiences": [], "expirationSeconds": 3600}}),
        )?;
        let token = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await?
            .status
            .ok_or("TokenRequest answered without a token")?
            .token;
        let ca = std::fs::read_to_string(self.dir.path().join("ca.crt"))?;
        use base64::Engine;
        let path = self
            .dir
            .path()
            .join(format!("{namespace}-{name}.kubeconfig"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
                 certificate-authority-data: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\n\
                 contexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\n    \
                 namespace: {namespace}\ncurrent-context: test\n",
                self.server,
                base64::engine::general_purpose::STANDARD.encode(ca),
            ),
        )?;
        Ok(path)
    }

    /// kube-controller-manager and kube-scheduler, as admin, beside the apiserver. Neither serves
    /// HTTPS (`--secure-port=0`) nor elects a leader: one of each per test cluster.
    fn start_controllers(&mut self) -> Result<(), Error> {
        let root = self.dir.path().to_owned();
        let p = |name: &str| root.join(name).display().to_string();
        let log = std::fs::File::create(root.join("kube-controller-manager.log"))?;
        self.spawn(
            "kube-controller-manager",
            &[
                format!("--kubeconfig={}", p("admin.kubeconfig")),
                format!("--root-ca-file={}", p("ca.crt")),
                format!("--service-account-private-key-file={}", p("sa.key")),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--use-service-account-credentials=false".into(),
            ],
            log,
        )?;
        let log = std::fs::File::create(root.join("kube-scheduler.log"))?;
        self.spawn(
            "kube-scheduler",
            &[
                format!("--kubeconfig={}", p("admin.kubeconfig")),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
            ],
            log,
        )
    }

    /// A file of the control plane's directory (`ca.crt`, `admin.kubeconfig`, …).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The directory of the cluster binaries (kubelet, helm, …).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The log of a component (`etcd`, `kube-apiserver`), to show when a test fails.
    pub fn log(&self, component: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{component}.log")))
            .unwrap_or_default()
    }

    fn spawn(&mut self, name: &str, args: &[String], log: std::fs::File) -> Result<(), Error> {
        let mut command = match &self.sandbox {
            Some(sandbox) => sandbox.command(self.bin.join(name)),
            None => {
                let mut command = Command::new("setpriv");
                command
                    .args(["--pdeathsig", "KILL", "--"])
                    .arg(self.bin.join(name));
                command
            }
        };
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        self.processes.push(Process {
            name: name.to_owned(),
            args: args.to_vec(),
            child,
        });
        Ok(())
    }

    /// Kills one of the processes: in a sandbox, the program itself, not only the nsenter in
    /// front of it (which would leave the program running).
    fn kill(&self, process: &mut Process) {
        match &self.sandbox {
            Some(sandbox) => sandbox.kill(&mut process.child),
            None => {
                let _ = process.child.kill();
                let _ = process.child.wait();
            }
        }
    }
}

/// A process of the control plane, and how it was started.
struct Process {
    name: String,
    args: Vec<String>,
    child: Child,
}

impl ControlPlane {
    /// Stops kube-apiserver and etcd, as an outage would; clients get connection errors.
    pub fn stop(&mut self) {
        let mut processes = std::mem::take(&mut self.processes);
        for process in processes.iter_mut().rev() {
            self.kill(process);
        }
        self.processes = processes;
    }

    /// Stops one component (`kube-apiserver`, `etcd`), as a crash would (SIGKILL);
    /// `start_component` starts it again with the same arguments: the same address and port,
    /// the same data.
    pub fn stop_component(&mut self, name: &str) {
        let index = (self.processes.iter().position(|p| p.name == name))
            .unwrap_or_else(|| panic!("no {name} runs"));
        let mut process = self.processes.remove(index);
        self.kill(&mut process);
        self.stopped.push((process.name, process.args));
    }

    /// Starts a stopped component again (its log goes on) and waits until the apiserver is
    /// ready, which it is only with etcd.
    pub async fn start_component(&mut self, name: &str) -> Result<(), Error> {
        let index = (self.stopped.iter().position(|(n, _)| n == name))
            .ok_or_else(|| format!("{name} was not stopped"))?;
        let (name, args) = self.stopped.remove(index);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))?;
        self.spawn(&name, &args, log)?;
        self.wait_apiserver_ready().await
    }

    /// Waits until `/readyz` answers `ok`. When it does not in time, or the apiserver exits, the
    /// error says what `/readyz?verbose` answered last (which check fails) and what the apiserver
    /// logged.
    async fn wait_apiserver_ready(&mut self) -> Result<(), Error> {
        let client = self.client().await?;
        let start = Instant::now();
        let mut last_answer = String::from("no answer yet");
        while start.elapsed() < START_TIMEOUT {
            let request = http::Request::get("/readyz?verbose").body(Vec::new())?;
            // One probe must not outlast the deadline: an unanswered request is an answer too.
            let probe = tokio::time::timeout(PROBE_TIMEOUT, client.request_text(request)).await;
            match probe {
                Ok(Ok(answer)) if answer.trim_end().ends_with("readyz check passed") => {
                    return Ok(());
                }
                Ok(Ok(answer)) => last_answer = answer,
                Ok(Err(e)) => last_answer = e.to_string(),
                Err(_) => last_answer = format!("no answer within {PROBE_TIMEOUT:?}"),
            }
            let apiserver = self
                .processes
                .iter_mut()
                .find(|p| p.name == "kube-apiserver");
            if let Some(status) = apiserver.and_then(|p| p.child.try_wait().ok().flatten()) {
                last_answer = format!("kube-apiserver exited ({status})");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let failing: Vec<&str> = (last_answer.lines())
            .filter(|line| !line.starts_with("[+]"))
            .collect();
        Err(format!(
            "kube-apiserver was not ready after {:?}; /readyz said:\n{}\nit logged last:\n{}",
            start.elapsed(),
            failing.join("\n"),
            tail(&self.log("kube-apiserver"), 30),
        )
        .into())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The apiserver first, so that it does not log etcd's disappearance.
        self.stop();
    }
}

/// The directory of the test clusters' binaries (tools/build-control-plane); fails the test when
/// they cannot be built.
pub fn bin_dir() -> PathBuf {
    binaries().unwrap_or_else(|e| panic!("the test cluster binaries: {e}"))
}

/// The directory with kube-apiserver, kubectl, etcd and the rest: `$DISCUS_CONTROL_PLANE`, or
/// whatever `tools/build-control-plane` builds or finds in its cache (once per test process).
fn binaries() -> Result<PathBuf, Error> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_binaries().map_err(|e| e.to_string()))
        .clone()
        .map_err(Into::into)
}

fn build_binaries() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os("DISCUS_CONTROL_PLANE") {
        let dir = PathBuf::from(dir);
        if !dir.join("kube-apiserver").is_file() || !dir.join("etcd").is_file() {
            return Err(format!(
                "DISCUS_CONTROL_PLANE={:?} holds no kube-apiserver and etcd: unset it, or run tools/build-control-plane",
                dir
            )
            .into());
        }
        return Ok(dir);
    }
    let script = super::repo().join("tools/build-control-plane");
    let output = Command::new(&script).stderr(Stdio::inherit()).output()?;
    if !output.status.success() {
        return Err(format!("{} failed ({})", script.display(), output.status).into());
    }
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn etcd_ready(address: IpAddr, port: u16) -> Option<()> {
    let mut stream = tokio::net::TcpStream::connect(SocketAddr::from((address, port)))
        .await
        .ok()?;
    stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.starts_with("HTTP/1.0 200").then_some(())
}

/// The last `lines` lines of a log.
fn tail(log: &str, lines: usize) -> String {
    let last: Vec<&str> = log.lines().rev().take(lines).collect();
    last.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// The certificates and keys of a throwaway cluster: a CA, the apiserver's serving certificate,
/// an admin client certificate and the service-account signing key.
struct Pki {
    ca_pem: String,
    admin_cert_pem: String,
    admin_key_pem: String,
}

impl Pki {
    fn generate(dir: &Path, address: IpAddr) -> Result<Self, Error> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = name(&[(DnType::CommonName, "discus-test-ca")]);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        // rustls needs the IP SAN to accept https://127.0.0.1.
        let mut serving = CertificateParams::new(vec!["localhost".to_owned()])?;
        serving
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        if !address.is_loopback() {
            serving.subject_alt_names.push(SanType::IpAddress(address));
        }
        // A qemu guest with user networking reaches the host's loopback at 10.0.2.2; Pods reach
        // the apiserver at the `kubernetes` Service's address, the first of the service range.
        for ip in [[10, 0, 2, 2], [10, 0, 0, 1]] {
            serving
                .subject_alt_names
                .push(SanType::IpAddress(ip.into()));
        }
        serving.distinguished_name = name(&[(DnType::CommonName, "kube-apiserver")]);
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving.signed_by(&serving_key, &ca)?;

        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin.distinguished_name = name(&[
            (DnType::OrganizationName, "system:masters"),
            (DnType::CommonName, "admin"),
        ]);
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_key = KeyPair::generate()?;
        let admin_cert = admin.signed_by(&admin_key, &ca)?;

        let sa_key = KeyPair::generate()?;
        for (file, content) in [
            ("ca.crt", ca.pem()),
            ("apiserver.crt", serving_cert.pem()),
            ("apiserver.key", serving_key.serialize_pem()),
            ("sa.key", sa_key.serialize_pem()),
            ("sa.pub", sa_key.public_key_pem()),
            ("audit-policy.yaml", AUDIT_POLICY.to_owned()),
        ] {
            std::fs::write(dir.join(file), content)?;
        }
        Ok(Self {
            ca_pem: ca.pem(),
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
        })
    }

    fn kubeconfig(&self, server: &str) -> String {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    \
             certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    \
             client-key-data: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n    \
             namespace: default\ncurrent-context: test\n",
            b64(&self.ca_pem),
            b64(&self.admin_cert_pem),
            b64(&self.admin_key_pem),
        )
    }
}

fn name(parts: &[(DnType, &str)]) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    for (kind, value) in parts {
        name.push(kind.clone(), *value);
    }
    name
}

/// Records every request at metadata level, so tests can count who did what.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
- level: Metadata\n";
