//! `discus agent` at scale on a real control plane (`cargo bench --bench agent`;
//! `DISCUS_BENCH_TARGETS=50` for a quick run, default 1000; `cargo test` runs it with 5 targets
//! and 5 s at rest, so that it cannot rot):
//!
//! - three agents, each in a host of its own on a private LAN with kube-apiserver and etcd, as in
//!   tests/agent.rs (the shipped RBAC, a ServiceAccount token, `--namespaces`, tgt, a file source),
//!   with the default heartbeat, lease and resync timings;
//! - one `kubectl apply --server-side` of one DiscImage, N IscsiTargets (one LUN each), 2N
//!   InitiatorAccesses (two per target, CHAP with one shared Secret), timed from the start of the
//!   apply until every object is Current in kstatus' terms (Ready=True, observedGeneration equal
//!   to generation) with an entry for each of the three nodes;
//! - each agent's resident memory at that point;
//! - once settled, a minute at rest: each agent's requests to the apiserver (from the audit log,
//!   told apart by source address), its status writes — to discus.dev objects and its reports (target: 0) — and to Leases;
//! - the baseline, in the same run: the same manifests served by `discus serve --once` with the
//!   same tgt backend in one host of its own, from start to every status file Ready.
//!
//! The ratio agent / serve is the figure to compare: on two cores, three agents, their tgtds,
//! kube-apiserver and etcd share the machine that `discus serve` has to itself. To tell where
//! the time goes, the bench also times the same apply with `--dry-run=server` before any agent
//! runs (kubectl and the apiserver's checks alone), and prints the CPU time of every process
//! involved, and of anything else on the machine, for each phase: compare runs only when that
//! last figure is small.
//!
//! Other knobs: `DISCUS_BENCH_TIMEOUT` (seconds to wait for all Ready, default 1800),
//! `DISCUS_BENCH_STATUS_SETTLE` (the agents' `--status-settle-seconds`; 0 writes every state),
//! `DISCUS_BENCH_PROFILE=<seconds>` (kube-apiserver's CPU profile over that many seconds from the
//! start of the apply, summed up with `go tool pprof`),
//! `DISCUS_BENCH_KEEP_LOGS=<folder>` (keep the agents' logs and the apiserver's audit log),
//! `DISCUS_BENCH_RUST_LOG` (the agents' `RUST_LOG`, `discus=debug` by default: keep that level,
//! the bench waits for its lines; `discus=debug,discus::agent::leader=trace` shows every
//! status write the lease holder makes, and why),
//! `DISCUS_BENCH_HEAPTRACK=<folder>` (run the lease holder under heaptrack, its profile there:
//! node-a's agent, which then takes the lease before the others start; heaptrack sees glibc's
//! allocator only, so with `--no-default-features`, which leaves jemalloc out).
//! tgtd runs 16 I/O threads per LUN, each a PID of the host's: three nodes of 1000 targets on one
//! kernel need kernel.pid_max above its default of 32768 (`sysctl -w kernel.pid_max=4194304`;
//! the bench checks first).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

#[path = "support/plot.rs"]
mod plot;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use kube::core::DynamicObject;
use kube::discovery::ApiResource;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use support::cluster::{DEMO_DIR, Kube, demo_host};
use support::kstatus::{self, Kstatus};
use support::sandbox::Sandbox;

const NAMESPACE: &str = "bench";
const AGENT_USER: &str = "system:serviceaccount:discus-system:discus-agent";
/// The agent run under heaptrack with `DISCUS_BENCH_HEAPTRACK`, the lease holder.
const PROFILED: &str = "node-a";

/// The lease holder's field manager (src/agent/leader.rs).
const LEADER_MANAGER: &str = "discus-leader";
const DEMO_ISO_SHA256: &str = "ad0d2d0256c2a826232a63c44422745af135642c0aceaed052216215868e4795";
const NODES: [(&str, u8); 3] = [("node-a", 11), ("node-b", 12), ("node-c", 13)];
/// No agent writes to discus objects for this long: settled.
const QUIET: Duration = Duration::from_secs(10);

fn main() {
    // `cargo bench` passes --bench; `cargo test --bench agent` does not: a smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let targets: usize = env_number("DISCUS_BENCH_TARGETS", if full { 1000 } else { 5 });
    let rest = Duration::from_secs(if full { 60 } else { 5 });
    let timeout = Duration::from_secs(env_number("DISCUS_BENCH_TIMEOUT", 1800) as u64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(targets, rest, timeout));
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().parse().expect("a whole number"))
        .unwrap_or(default)
}

async fn run(targets: usize, rest: Duration, timeout: Duration) {
    let bench_started = Instant::now();
    check_pid_space(targets);
    let yaml = manifests(targets);
    let objects = 1 + 3 * targets;
    eprintln!(
        "{targets} targets, {} grants, {objects} discus objects",
        2 * targets
    );

    // The baseline first, on a quiet machine: one host serving everything from a folder.
    let (machine_before, serve_cpu_before) =
        (machine_busy(), cpu_seconds(std::process::id(), true));
    let serve = baseline(&yaml, objects);
    let serve_cpu = cpu_seconds(std::process::id(), true) - serve_cpu_before;
    let serve_machine = machine_busy() - machine_before;
    eprintln!(
        "baseline: discus serve --once took {:.2} s",
        serve.as_secs_f64()
    );

    let mut cluster = Cluster::start().await;
    // What the apply alone costs, before any agent runs: kubectl and the apiserver's checks.
    let dry_run = cluster.apply_timed(&yaml, true);
    eprintln!(
        "kubectl apply --dry-run=server, no agents: {:.2} s",
        dry_run.as_secs_f64()
    );
    // And stored, where no agent looks: what the apply costs with nobody else writing.
    let cpu_alone_start = cpu_snapshot(&cluster);
    let alone = cluster.apply_alone(targets);
    let cpu_alone = cpu_used(&cpu_alone_start, &cpu_snapshot(&cluster));
    eprintln!(
        "kubectl apply in a namespace no agent watches: {:.2} s",
        alone.as_secs_f64()
    );
    for (name, number) in NODES {
        cluster.add_node(name, number).await;
        // Slowed by heaptrack, it would seldom win the lease from the others.
        if name == PROFILED && std::env::var_os("DISCUS_BENCH_HEAPTRACK").is_some() {
            cluster.wait_for_agents_idle().await;
        }
    }
    cluster.wait_for_agents_idle().await;
    let leader = cluster.leader().await;

    let readiness = Readiness::watch(&cluster.client, targets).await;
    let cpu_start = cpu_snapshot(&cluster);
    let profile = cluster.profile_apiserver();
    let started = Instant::now();
    let apply_started = Timestamp::now();
    let apply_took = cluster.apply_timed(&yaml, false);
    eprintln!(
        "applied {} documents in {:.2} s",
        objects + 1,
        apply_took.as_secs_f64()
    );
    let kubectl_writes = cluster.kubectl_writes(apply_started);
    eprintln!("  {kubectl_writes}");
    let took = cluster.wait_all_ready(&readiness, started, timeout).await;
    let cpu_ready = cpu_snapshot(&cluster);
    let rss: Vec<Memory> = cluster.agents.iter().map(Agent::memory).collect();
    eprintln!(
        "all {objects} objects Current on {} nodes after {:.2} s",
        NODES.len(),
        took.as_secs_f64()
    );
    for (agent, memory) in cluster.agents.iter().zip(&rss) {
        eprintln!(
            "{}: RSS {:.1} MiB (of which {:.1} MiB its own, the rest its binary; peak {:.1} MiB), \
             {:.1} s of CPU so far",
            agent.name,
            memory.rss_mib(),
            memory.anon_mib(),
            memory.peak_mib(),
            memory.cpu_seconds
        );
    }

    if let Some(profile) = profile {
        profile.report();
    }
    // Settle, then a minute at rest.
    let settled_after = cluster.settle().await;
    eprintln!(
        "settled {:.1} s after all Ready; at rest for {} s",
        settled_after.as_secs_f64(),
        rest.as_secs()
    );
    let cold_start = cluster.status_writes(apply_started, Timestamp::now());
    let plotted = cold_start.plot(targets, took);
    let cpu_rest = cpu_snapshot(&cluster);
    let rest_start = Timestamp::now();
    tokio::time::sleep(rest).await;
    let rest_end = Timestamp::now();
    let cpu_end = cpu_snapshot(&cluster);
    let still_ready = readiness.ready_count();
    let at_rest = cluster.at_rest(rest_start, rest_end);
    let rss_after: Vec<Memory> = cluster.agents.iter().map(Agent::memory).collect();
    let leader_now = cluster.leader().await;
    cluster.check_alive();

    let minutes = (rest_end.duration_since(rest_start)).as_secs_f64() / 60.0;
    let per_agent = |f: &dyn Fn(&RestCounts) -> f64| {
        at_rest
            .iter()
            .map(|c| format!("{:.0}", f(c)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let discus_writes: usize = at_rest.iter().map(|c| c.discus_writes).sum();
    println!();
    println!(
        "| targets | grants | agents | serve --once (baseline) | agents, apply to all Ready | ratio | kubectl apply alone (server dry run, no agents) | ratio | kubectl apply alone (stored, no agents) | ratio | of which kubectl apply | status writes per object per node | RSS per agent at all Ready, of which heap (MiB) | requests per agent per minute at rest | discus writes at rest | Lease writes per agent per minute |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {targets} | {} | {} | {:.2} s | {:.2} s | {:.2} | {:.2} s | {:.2} | {:.2} s | {:.2} | {:.2} s | {:.2} | {} | {} | {discus_writes} | {} |",
        2 * targets,
        NODES.len(),
        serve.as_secs_f64(),
        took.as_secs_f64(),
        took.as_secs_f64() / serve.as_secs_f64(),
        dry_run.as_secs_f64(),
        took.as_secs_f64() / dry_run.as_secs_f64(),
        alone.as_secs_f64(),
        took.as_secs_f64() / alone.as_secs_f64(),
        apply_took.as_secs_f64(),
        cold_start.per_object_per_node(objects),
        rss.iter()
            .map(|m| format!("{:.1} ({:.1})", m.rss_mib(), m.anon_mib()))
            .collect::<Vec<_>>()
            .join(" / "),
        per_agent(&|c| c.requests as f64 / minutes),
        per_agent(&|c| c.lease_writes as f64 / minutes),
    );
    println!();
    println!(
        "Agents in order {}; leader at the start {}, at the end {}.",
        NODES.map(|(n, _)| n).join(", "),
        leader.as_deref().unwrap_or("none"),
        leader_now.as_deref().unwrap_or("none"),
    );
    for (((agent, counts), memory), before) in cluster
        .agents
        .iter()
        .zip(&at_rest)
        .zip(&rss_after)
        .zip(&rss)
    {
        let what: Vec<String> = counts
            .by_request
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        println!(
            "- {} ({}): {:.1} s of CPU until all Ready, {:.1} s since; RSS {:.1} MiB after the rest \
             (peak {:.1} MiB); {} requests in {:.0} s at rest: {}",
            agent.name,
            agent.address,
            before.cpu_seconds,
            memory.cpu_seconds - before.cpu_seconds,
            memory.rss_mib(),
            memory.peak_mib(),
            counts.requests,
            minutes * 60.0,
            if what.is_empty() {
                "none".to_owned()
            } else {
                what.join(", ")
            }
        );
    }
    println!(
        "- CPU seconds from the start of the apply to all Ready ({:.0} s on {} cores): {}",
        took.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_used(&cpu_start, &cpu_ready)
    );
    println!(
        "- CPU seconds of the same apply stored where no agent watches ({:.0} s): {cpu_alone}",
        alone.as_secs_f64()
    );
    println!("- the apply: {kubectl_writes}");
    println!(
        "- status writes from the apply until settled: {}",
        cold_start.summary(&cluster.agents, objects)
    );
    println!("- plot: {}", plotted.display());
    println!(
        "- CPU seconds during the rest: {}",
        cpu_used(&cpu_rest, &cpu_end)
    );
    println!(
        "- objects still Current after the rest: {still_ready} of {objects}; settled {:.1} s after all Ready",
        settled_after.as_secs_f64()
    );
    println!(
        "- baseline: discus serve --once used {serve_cpu:.1} CPU seconds (its tgtd not counted); \
         the whole machine {serve_machine:.1} in those {:.0} s",
        serve.as_secs_f64()
    );
    println!(
        "- whole bench: {:.0} s",
        bench_started.elapsed().as_secs_f64()
    );
    if leader != leader_now {
        for agent in &cluster.agents {
            println!(
                "- {}, its leader lease:\n```\n{}\n```",
                agent.name,
                agent.log_lines_matching(&["leader"]).join("\n")
            );
        }
    }
    if let Some(dir) = std::env::var_os("DISCUS_BENCH_KEEP_LOGS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("log folder");
        for agent in &cluster.agents {
            std::fs::write(dir.join(format!("{}.log", agent.name)), agent.log()).expect("log");
        }
        std::fs::copy(cluster.kube.plane.audit_log(), dir.join("audit.log")).expect("audit log");
        println!("- agent logs kept in {}", dir.display());
    }
    for agent in &cluster.agents {
        let errors = agent.log_lines_matching(&["WARN", "ERROR"]);
        if !errors.is_empty() {
            println!(
                "- {} logged {} warnings or errors; the last:\n```\n{}\n```",
                agent.name,
                errors.len(),
                errors[errors.len().saturating_sub(5)..].join("\n")
            );
        }
    }
    assert_eq!(discus_writes, 0, "writes to discus objects at rest");
}

/// Every thread takes a PID of the host's, and tgtd runs 16 I/O threads per LUN: three nodes on
/// one kernel need some 3 × 16 × N of them, more than the 32768 of a kernel.pid_max left at its
/// default. (On real nodes, each tgtd has a host to itself, and systemd raises pid_max.)
fn check_pid_space(targets: usize) {
    let needed = NODES.len() * 17 * targets + 4096;
    let pid_max: usize = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("a number");
    assert!(
        pid_max >= needed,
        "{} tgtds with {targets} LUNs each need some {needed} PIDs (16 I/O threads per LUN), and \
         kernel.pid_max is {pid_max}: raise it (sysctl -w kernel.pid_max=4194304) or lower \
         DISCUS_BENCH_TARGETS",
        NODES.len()
    );
}

/// The manifests: one DiscImage, one CHAP Secret, `n` targets of one LUN, two grants each.
fn manifests(n: usize) -> String {
    manifests_in(NAMESPACE, n)
}

/// The manifests, in `namespace`.
fn manifests_in(namespace: &str, n: usize) -> String {
    let mut yaml = format!(
        "apiVersion: discus.dev/v1alpha1\nkind: DiscImage\nmetadata: {{name: bench-demo, namespace: {namespace}}}\n\
         spec: {{source: {{file: {{path: {DEMO_DIR}/discus-demo.iso}}}}, sha256: {DEMO_ISO_SHA256}, format: iso}}\n\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: bench-chap, namespace: {namespace}}}\n\
         type: Opaque\nstringData: {{username: bench, password: bench-secret-1}}\n"
    );
    for i in 1..=n {
        yaml.push_str(&format!(
            "---\napiVersion: discus.dev/v1alpha1\nkind: IscsiTarget\nmetadata: {{name: t-{i:04}, namespace: {namespace}}}\n\
             spec: {{iqn: 'iqn.2026-11.dev.discus:bench-{i:04}', luns: [{{lun: 0, image: bench-demo}}]}}\n"
        ));
        for g in ["a", "b"] {
            yaml.push_str(&format!(
                "---\napiVersion: discus.dev/v1alpha1\nkind: InitiatorAccess\nmetadata: {{name: g-{i:04}-{g}, namespace: {namespace}}}\n\
                 spec: {{targetRef: {{name: t-{i:04}}}, initiatorIqn: 'iqn.2026-11.dev.discus:client-{i:04}-{g}', \
                 chap: {{secretRef: {{name: bench-chap}}}}}}\n"
            ));
        }
    }
    yaml
}

/// `discus serve --once` of the same manifests on tgt, in a host of its own: how long it takes
/// until it exits with every status Ready.
fn baseline(yaml: &str, objects: usize) -> Duration {
    let sandbox = demo_host();
    let folder = sandbox.scratch("manifests");
    std::fs::write(folder.join("bench.yaml"), yaml).expect("manifests");
    let log = sandbox.path().join("serve.log");
    let started = Instant::now();
    let output = sandbox
        .command(env!("CARGO_BIN_EXE_discus"))
        .args([
            "serve",
            "--once",
            "--backend",
            "tgt",
            "--data-dir",
            "/var/lib/discus",
        ])
        .args(["--file-root", DEMO_DIR, "--node-name", "baseline"])
        .args(["--address", "127.0.0.1", "--manifests"])
        .arg(&folder)
        .env("RUST_LOG", "discus=debug")
        .output()
        .expect("discus serve runs");
    let took = started.elapsed();
    std::fs::write(&log, &output.stderr).expect("serve log");
    let ready = ready_status_files(&sandbox.data_dir().join("status"));
    assert!(
        output.status.success() && ready == objects,
        "discus serve --once: {} with {ready} of {objects} status files Ready\n{}",
        output.status,
        tail(&String::from_utf8_lossy(&output.stderr), 40)
    );
    took
}

/// How many status files (`status/<Kind>/<namespace>/<name>.json`) say Ready=True.
fn ready_status_files(dir: &Path) -> usize {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "json") {
                found.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
        .filter(ready)
        .count()
}

/// A control plane and storage nodes on one LAN, as in tests/agent.rs.
struct Cluster {
    kube: Kube,
    agents: Vec<Agent>,
    audit: AuditTail,
}

/// One storage node: a host of its own, its Node object, and its agent.
struct Agent {
    name: String,
    address: Ipv4Addr,
    sandbox: Sandbox,
    process: Child,
}

impl std::ops::Deref for Cluster {
    type Target = Kube;
    fn deref(&self) -> &Kube {
        &self.kube
    }
}

impl Cluster {
    async fn start() -> Self {
        let kube = Kube::on_lan(NAMESPACE).await;
        let audit = AuditTail::new(kube.plane.audit_log());
        Self {
            kube,
            agents: Vec::new(),
            audit,
        }
    }

    /// A storage node at `.<number>` with the demo ISO in its `/var/lib/discus/demo`, and its
    /// agent running with the default timings.
    async fn add_node(&mut self, name: &str, number: u8) {
        let (sandbox, address) = self.storage_host(number);
        self.create_node(name, address).await;
        let log = std::fs::File::create(sandbox.path().join("agent.log")).expect("log");
        // The lease holder's agent under heaptrack, when asked (its RSS then includes heaptrack's).
        let heaptrack = (std::env::var_os("DISCUS_BENCH_HEAPTRACK"))
            .filter(|_| name == PROFILED)
            .map(|dir| PathBuf::from(dir).join(name));
        assert!(
            heaptrack.is_none() || !cfg!(feature = "jemalloc"),
            "heaptrack sees glibc's allocator only: run the bench with --no-default-features"
        );
        let mut command = match &heaptrack {
            Some(output) => {
                let mut command = sandbox.command("heaptrack");
                command
                    .arg("-o")
                    .arg(output)
                    .arg(env!("CARGO_BIN_EXE_discus"));
                command
            }
            None => sandbox.command(env!("CARGO_BIN_EXE_discus")),
        };
        let process = command
            .args(["agent", "--node-name", name, "--backend", "tgt"])
            .args(["--data-dir", "/var/lib/discus", "--file-root", DEMO_DIR])
            .args([
                "--namespaces",
                NAMESPACE,
                "--iqn-prefix",
                &format!("{NAMESPACE}=iqn.2026-11.dev.discus:"),
                "--lease-namespace",
                "discus-system",
            ])
            .args(
                std::env::var("DISCUS_BENCH_STATUS_SETTLE")
                    .map(|seconds| format!("--status-settle-seconds={seconds}")),
            )
            .env("KUBECONFIG", &self.agent_kubeconfig)
            // Debug adds one line per sync pass, which the bench waits for.
            .env(
                "RUST_LOG",
                std::env::var("DISCUS_BENCH_RUST_LOG").unwrap_or("discus=debug".into()),
            )
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("discus agent starts");
        self.agents.push(Agent {
            name: name.to_owned(),
            address,
            sandbox,
            process,
        });
    }

    /// Every agent has listed its watches and made a first (empty) pass, and a leader holds the
    /// lease.
    async fn wait_for_agents_idle(&mut self) {
        let start = Instant::now();
        loop {
            self.check_alive();
            if self
                .agents
                .iter()
                .all(|a| a.log().contains("sync pass done"))
                && self.leader().await.is_some()
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the agents did not start\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The manifests applied to a namespace of their own, which no agent watches; how long it
    /// took. (They stay: there is no namespace controller to delete them.)
    fn apply_alone(&self, targets: usize) -> Duration {
        let namespace = format!("{NAMESPACE}-alone");
        let created = (self.plane.kubectl())
            .args(["create", "namespace", &namespace])
            .output()
            .expect("kubectl");
        assert!(created.status.success(), "kubectl create namespace");
        self.apply_timed(&manifests_in(&namespace, targets), false)
    }

    /// `kubectl apply --server-side` of the manifests; how long it took.
    /// With `dry_run`, the apiserver checks every object (schema, CEL rules) and stores none.
    fn apply_timed(&self, yaml: &str, dry_run: bool) -> Duration {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), yaml).expect("write");
        let started = Instant::now();
        let output = self
            .plane
            .kubectl()
            .args([
                "apply",
                "--server-side",
                "--field-manager=discus-bench",
                if dry_run {
                    "--dry-run=server"
                } else {
                    "--dry-run=none"
                },
                "-f",
            ])
            .arg(file.path())
            .output()
            .expect("kubectl");
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "kubectl apply: {stderr}");
        // Client-side throttling would make this a measure of kubectl's rate limiter.
        for line in stderr.lines().filter(|l| l.contains("throttling")) {
            eprintln!("kubectl: {line}");
        }
        took
    }

    /// How the apiserver answered kubectl's writes since `since`: count, total and slowest time.
    fn kubectl_writes(&mut self, since: Timestamp) -> String {
        self.audit.read();
        let mut latencies: Vec<Duration> = self
            .audit
            .events
            .values()
            .filter(|e| {
                e.user_agent.starts_with("kubectl") && e.verb == "patch" && e.received >= since
            })
            .map(|e| e.latency)
            .collect();
        latencies.sort();
        let total: Duration = latencies.iter().sum();
        format!(
            "{} patches by kubectl, {:.1} s in the apiserver in all (median {:.1} ms, slowest {:.1} ms)",
            latencies.len(),
            total.as_secs_f64(),
            latencies
                .get(latencies.len() / 2)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        )
    }

    /// Waits until every object is Current on every node; how long since `started`.
    async fn wait_all_ready(
        &mut self,
        readiness: &Readiness,
        started: Instant,
        timeout: Duration,
    ) -> Duration {
        let mut last_report = Instant::now();
        let mut complete: BTreeMap<&str, Duration> = BTreeMap::new();
        loop {
            let counts = readiness.counts();
            for (kind, (ready, total)) in &counts {
                if ready == total && !complete.contains_key(kind) {
                    complete.insert(kind, started.elapsed());
                    eprintln!(
                        "  every {kind} ({total}) Current after {:.2} s",
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            if complete.len() == counts.len() {
                return started.elapsed();
            }
            self.check_alive();
            if last_report.elapsed() > Duration::from_secs(15) {
                last_report = Instant::now();
                eprintln!(
                    "  {:.0} s: {}",
                    started.elapsed().as_secs_f64(),
                    counts
                        .iter()
                        .map(|(k, (r, t))| format!("{k} {r}/{t}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if started.elapsed() > timeout {
                let stuck = readiness.not_ready(5);
                panic!(
                    "not every object Current after {timeout:?}: {counts:?}\nsome not Current:\n{}\n{}",
                    stuck.join("\n"),
                    self.logs()
                );
            }
            tokio::select! {
                () = readiness.changed.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Waits until no agent has written status (objects or reports) for `QUIET` (at most five minutes);
    /// how long that took.
    async fn settle(&mut self) -> Duration {
        let start = Instant::now();
        let quiet = SignedDuration::try_from(QUIET).expect("quiet");
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.audit.read();
            let last_write = self
                .audit
                .events
                .values()
                .filter(|e| e.is_status_write())
                .map(|e| e.received)
                .max();
            let quiet_since = last_write.map(|t| Timestamp::now().duration_since(t));
            if start.elapsed() >= QUIET && quiet_since.is_none_or(|q| q >= quiet) {
                return start.elapsed();
            }
            if start.elapsed() > Duration::from_secs(300) {
                eprintln!("the agents still write to discus objects after 5 minutes");
                return start.elapsed();
            }
        }
    }

    /// What each agent asked of the apiserver between `from` and `to`.
    fn at_rest(&mut self, from: Timestamp, to: Timestamp) -> Vec<RestCounts> {
        self.audit.read();
        self.agents
            .iter()
            .map(|agent| {
                let ip = agent.address.to_string();
                let mut counts = RestCounts::default();
                for event in self.audit.events.values().filter(|e| {
                    e.user == AGENT_USER && e.source == ip && e.received >= from && e.received < to
                }) {
                    counts.requests += 1;
                    if event.is_status_write() {
                        counts.discus_writes += 1;
                    }
                    if event.is_write() && event.group == "coordination.k8s.io" {
                        counts.lease_writes += 1;
                    }
                    *counts
                        .by_request
                        .entry(format!(
                            "{} {}{} ({})",
                            event.verb, event.resource, event.subresource, event.code
                        ))
                        .or_default() += 1;
                }
                counts
            })
            .collect()
    }

    /// With `DISCUS_BENCH_PROFILE=<seconds>`, kube-apiserver's CPU profile over that many
    /// seconds from now (its /debug/pprof, through kubectl as the admin).
    fn profile_apiserver(&self) -> Option<Profile> {
        let seconds: u64 = std::env::var("DISCUS_BENCH_PROFILE").ok()?.parse().ok()?;
        let path = std::env::temp_dir().join(format!(
            "discus-bench-apiserver-{}.pprof",
            std::process::id()
        ));
        let file = std::fs::File::create(&path).expect("profile file");
        let process = (self.plane.kubectl())
            .args([
                "get",
                "--raw",
                &format!("/debug/pprof/profile?seconds={seconds}"),
            ])
            .stdout(file)
            .spawn()
            .expect("kubectl");
        Some(Profile { path, process })
    }

    /// The agents' writes to discus objects between `from` and `to`.
    fn status_writes(&mut self, from: Timestamp, to: Timestamp) -> StatusWrites {
        self.audit.read();
        let mut writes = StatusWrites {
            by_agent: vec![(0, 0); self.agents.len()],
            ..StatusWrites::default()
        };
        let mut per_entry: HashMap<(&str, &str, &str), usize> = HashMap::new();
        let since = |e: &Request| e.received.duration_since(from).as_secs_f64();
        for event in self.audit.events.values() {
            if event.received < from || event.received >= to {
                continue;
            }
            if event.user_agent.starts_with("kubectl") && event.verb == "patch" {
                writes.kubectl.push(since(event));
            }
            if !event.is_status_write() {
                continue;
            }
            let ip = event.source.as_str();
            let Some(agent) = self.agents.iter().position(|a| a.address.to_string() == ip) else {
                continue;
            };
            let counts = &mut writes.by_agent[agent];
            if event.manager == LEADER_MANAGER {
                counts.1 += 1;
            } else {
                counts.0 += 1;
            }
            *per_entry
                .entry((&event.resource, &event.object, &event.manager))
                .or_default() += 1;
            writes.times.push(since(event));
        }
        for count in per_entry.values() {
            *writes.repeats.entry(*count).or_default() += 1;
        }
        writes
    }

    /// Fails with the logs if an agent has exited.
    fn check_alive(&mut self) {
        let mut dead = Vec::new();
        for agent in &mut self.agents {
            if let Ok(Some(status)) = agent.process.try_wait() {
                dead.push(format!("{} exited: {status}", agent.name));
            }
        }
        assert!(dead.is_empty(), "{}\n{}", dead.join("\n"), self.logs());
    }

    fn logs(&self) -> String {
        let mut logs: Vec<String> = self
            .agents
            .iter()
            .map(|a| {
                format!(
                    "--- {} (agent.log, last 40 lines):\n{}",
                    a.name,
                    tail(&a.log(), 40)
                )
            })
            .collect();
        logs.push(format!(
            "--- kube-apiserver (last 20 lines):\n{}",
            tail(&self.plane.log("kube-apiserver"), 20)
        ));
        logs.join("\n")
    }
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(self.sandbox.path().join("agent.log")).unwrap_or_default()
    }

    fn log_lines_matching(&self, levels: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| levels.iter().any(|level| l.contains(level)))
            .map(str::to_owned)
            .collect()
    }

    /// The host PID of the agent itself: nsenter's child, or under heaptrack, that script's.
    fn pid(&self) -> u32 {
        let nsenter = self.process.id();
        let child = (children(nsenter).into_iter().next()).expect("the agent runs under nsenter");
        if comm(child) != "heaptrack" {
            return child;
        }
        (children(child).into_iter())
            .find(|p| comm(*p) == "discus")
            .expect("the agent runs under heaptrack")
    }

    /// The agent's tgtds (one, unless it had to start another).
    fn tgtds(&self) -> Vec<u32> {
        children(self.pid())
            .into_iter()
            .filter(|p| comm(*p) == "tgtd")
            .collect()
    }

    /// The memory of the agent itself, not of the nsenter in front of it.
    fn memory(&self) -> Memory {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
        };
        assert_eq!(comm(pid), "discus", "pid {pid} is the agent");
        Memory {
            rss_kib: field("VmRSS:"),
            anon_kib: field("RssAnon:"),
            peak_kib: field("VmHWM:"),
            cpu_seconds: cpu_seconds(pid, false),
        }
    }
}

/// The children of every thread of a process.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|task| {
            std::fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The CPU time a process has used (user and system), with `reaped` that of its children it
/// has waited for instead.
fn cpu_seconds(pid: u32, reaped: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's `(…)`: state is field 0, utime 11, stime 12, cutime 13, cstime 14, in
    // clock ticks (100 a second on Linux).
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let first = if reaped { 13 } else { 11 };
    fields.iter().skip(first).take(2).sum::<u64>() as f64 / 100.0
}

/// The CPU time each process of the bench has used so far, by role.
fn cpu_snapshot(cluster: &Cluster) -> BTreeMap<String, f64> {
    let mut cpu = BTreeMap::new();
    let plane_dir = cluster
        .plane
        .audit_log()
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let name = comm(pid);
        if name != "kube-apiserver" && name != "etcd" {
            continue;
        }
        let cmdline = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.contains(&plane_dir) {
            cpu.insert(name, cpu_seconds(pid, false));
        }
    }
    for agent in &cluster.agents {
        cpu.insert(
            format!("{} agent", agent.name),
            cpu_seconds(agent.pid(), false),
        );
        cpu.insert(
            format!("{} tgtadm (the agent's reaped children)", agent.name),
            cpu_seconds(agent.pid(), true),
        );
        cpu.insert(
            format!("{} tgtd", agent.name),
            agent
                .tgtds()
                .into_iter()
                .map(|p| cpu_seconds(p, false))
                .sum(),
        );
    }
    cpu.insert(MACHINE.into(), machine_busy());
    cpu.insert(
        "bench (its watches)".into(),
        cpu_seconds(std::process::id(), false),
    );
    cpu.insert(
        "kubectl (reaped children)".into(),
        cpu_seconds(std::process::id(), true),
    );
    cpu
}

const MACHINE: &str = "the whole machine";

/// CPU seconds the whole machine has been busy (not idle, not waiting for I/O) since it booted.
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user already)
    [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|i| ticks.get(*i).copied().unwrap_or(0))
        .sum::<u64>() as f64
        / 100.0
}

/// CPU seconds used between two snapshots, as text, with what other processes of the machine
/// used meanwhile.
fn cpu_used(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let used = |k: &str, v: f64| v - before.get(k).copied().unwrap_or(0.0);
    let ours: Vec<(String, f64)> = after
        .iter()
        .filter(|(k, _)| *k != MACHINE)
        .map(|(k, v)| (k.clone(), used(k, *v)))
        .collect();
    let machine = after.get(MACHINE).map_or(0.0, |v| used(MACHINE, *v));
    let others = machine - ours.iter().map(|(_, v)| v).sum::<f64>();
    let mut parts: Vec<String> = ours.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
    parts.push(format!(
        "anything else on the machine {:.1}",
        others.max(0.0)
    ));
    parts.join(", ")
}

/// What an agent has used so far.
struct Memory {
    rss_kib: u64,
    /// Of which the process's own (heap, stacks), not pages of its binary.
    anon_kib: u64,
    peak_kib: u64,
    cpu_seconds: f64,
}

impl Memory {
    fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    fn anon_mib(&self) -> f64 {
        self.anon_kib as f64 / 1024.0
    }

    fn peak_mib(&self) -> f64 {
        self.peak_kib as f64 / 1024.0
    }
}

/// kube-apiserver's CPU profile, being taken.
struct Profile {
    path: PathBuf,
    process: Child,
}

impl Profile {
    /// Waits for the profile, and prints where the apiserver's time went (`go tool pprof`).
    fn report(mut self) {
        assert!(
            self.process.wait().expect("kubectl").success(),
            "the apiserver's profile"
        );
        let top = std::process::Command::new("go")
            .args(["tool", "pprof", "-top", "-cum", "-nodecount=40"])
            .arg(&self.path)
            .output()
            .expect("go tool pprof");
        println!(
            "- kube-apiserver's CPU profile ({}), by cumulative time:\n```\n{}```",
            self.path.display(),
            String::from_utf8_lossy(&top.stdout)
        );
    }
}

/// The agents' writes to discus objects in a span of time.
#[derive(Default)]
struct StatusWrites {
    /// Per agent: writes of its node's entries (its reports), and of status as the lease holder.
    by_agent: Vec<(usize, usize)>,
    /// How many (object, field manager) pairs were written once, twice, …
    repeats: BTreeMap<usize, usize>,
    /// Each write's time since the span began, in seconds.
    times: Vec<f64>,
    /// kubectl's patches in the same span, likewise.
    kubectl: Vec<f64>,
}

impl StatusWrites {
    fn total(&self) -> usize {
        self.by_agent.iter().map(|(n, l)| n + l).sum()
    }

    /// Every agent write (entries and aggregates) per object and node.
    fn per_object_per_node(&self, objects: usize) -> f64 {
        self.total() as f64 / (objects * NODES.len()) as f64
    }

    fn summary(&self, agents: &[Agent], objects: usize) -> String {
        let by_agent: Vec<String> = agents
            .iter()
            .zip(&self.by_agent)
            .map(|(a, (entries, top))| {
                format!(
                    "{} {entries} of its reports ({:.3} per object) and {top} as lease holder",
                    a.name,
                    *entries as f64 / objects as f64
                )
            })
            .collect();
        let repeats: Vec<String> = (self.repeats.iter())
            .map(|(times, pairs)| format!("{pairs} written {times}×"))
            .collect();
        format!(
            "{} in all, {:.2} per object per node; {}; per object and field manager: {}",
            self.total(),
            self.per_object_per_node(objects),
            by_agent.join(", "),
            repeats.join(", ")
        )
    }

    /// Writes per second over the cold start, with kubectl's patches beside them.
    fn plot(&self, targets: usize, all_ready: Duration) -> PathBuf {
        let until = self
            .times
            .iter()
            .chain(&self.kubectl)
            .fold(all_ready.as_secs_f64(), |a, b| a.max(*b));
        let width = (until / 60.0).max(1.0);
        let ready = all_ready.as_secs_f64();
        plot::draw(&plot::Chart {
            file: &format!(
                "agent-cold-start-{targets}{}.svg",
                std::env::var("DISCUS_BENCH_STATUS_SETTLE")
                    .map(|s| format!("-settle-{s}"))
                    .unwrap_or_default()
            ),
            title: &format!(
                "Cold start of {targets} targets and {} grants on three agents: all Ready after {ready:.0} s",
                2 * targets
            ),
            x: "seconds since the start of kubectl apply",
            y: "writes per second",
            series: vec![
                plot::Series {
                    label: "kubectl apply (patches)".to_owned(),
                    points: plot::rate(&self.kubectl, width, until),
                },
                plot::Series {
                    label: "agents' status writes".to_owned(),
                    points: plot::rate(&self.times, width, until),
                },
            ],
        })
    }
}

#[derive(Default)]
struct RestCounts {
    requests: usize,
    discus_writes: usize,
    lease_writes: usize,
    by_request: BTreeMap<String, usize>,
}

/// The apiserver's audit log, read as it grows: each request once (its last stage).
struct AuditTail {
    path: PathBuf,
    offset: u64,
    events: HashMap<String, Request>,
}

struct Request {
    user: String,
    /// The first source address.
    source: String,
    received: Timestamp,
    /// From received to the last stage.
    latency: Duration,
    user_agent: String,
    verb: String,
    group: String,
    resource: String,
    /// `/<subresource>`, or empty.
    subresource: String,
    /// `namespace/name` of the object.
    object: String,
    /// The `fieldManager` of an apply, or empty.
    manager: String,
    code: i64,
}

impl Request {
    fn is_write(&self) -> bool {
        !matches!(self.verb.as_str(), "get" | "list" | "watch")
    }

    /// A write of status: to a discus object, or to a node's report of its entries.
    fn is_status_write(&self) -> bool {
        self.user == AGENT_USER
            && self.is_write()
            && (self.group == "discus.dev" || self.resource == "configmaps")
    }
}

impl AuditTail {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            offset: 0,
            events: HashMap::new(),
        }
    }

    /// Reads the complete lines written since the last read.
    fn read(&mut self) {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return;
        };
        file.seek(SeekFrom::Start(self.offset)).expect("seek");
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).expect("audit log");
        let Some(end) = bytes.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        self.offset += end as u64 + 1;
        for line in bytes[..end].split(|b| *b == b'\n') {
            let Ok(event) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            let text = |pointer: &str| {
                event
                    .pointer(pointer)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let Ok(received) = text("/requestReceivedTimestamp").parse::<Timestamp>() else {
                continue;
            };
            let latency = text("/stageTimestamp")
                .parse::<Timestamp>()
                .ok()
                .and_then(|done| Duration::try_from(done.duration_since(received)).ok())
                .unwrap_or_default();
            let subresource = text("/objectRef/subresource");
            let uri = text("/requestURI");
            let manager = uri
                .split(['?', '&'])
                .find_map(|p| p.strip_prefix("fieldManager="))
                .unwrap_or_default()
                .to_owned();
            self.events.insert(
                text("/auditID"),
                Request {
                    user: text("/user/username"),
                    source: text("/sourceIPs/0"),
                    received,
                    latency,
                    user_agent: text("/userAgent"),
                    verb: text("/verb"),
                    group: text("/objectRef/apiGroup"),
                    resource: text("/objectRef/resource"),
                    subresource: if subresource.is_empty() {
                        subresource
                    } else {
                        format!("/{subresource}")
                    },
                    object: format!(
                        "{}/{}",
                        text("/objectRef/namespace"),
                        text("/objectRef/name")
                    ),
                    manager,
                    code: event
                        .pointer("/responseStatus/code")
                        .and_then(Value::as_i64)
                        .unwrap_or_default(),
                },
            );
        }
    }
}

/// Which discus objects are Current on every node, kept up to date by watches of the bench's own
/// (as the admin, so they are not counted as the agents').
struct Readiness {
    /// kind → name → Current on every node
    state: Arc<Mutex<BTreeMap<&'static str, BTreeMap<String, bool>>>>,
    expected: BTreeMap<&'static str, usize>,
    changed: Arc<tokio::sync::Notify>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Readiness {
    async fn watch(client: &kube::Client, targets: usize) -> Self {
        let state: Arc<Mutex<BTreeMap<&'static str, BTreeMap<String, bool>>>> = Arc::default();
        let changed = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        let expected: BTreeMap<&'static str, usize> = [
            ("DiscImage", 1),
            ("IscsiTarget", targets),
            ("InitiatorAccess", 2 * targets),
        ]
        .into();
        for (kind, plural) in [
            ("DiscImage", "discimages"),
            ("IscsiTarget", "iscsitargets"),
            ("InitiatorAccess", "initiatoraccesses"),
        ] {
            let resource = ApiResource {
                group: "discus.dev".into(),
                version: "v1alpha1".into(),
                api_version: "discus.dev/v1alpha1".into(),
                kind: kind.into(),
                plural: plural.into(),
            };
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), NAMESPACE, &resource);
            let state = state.clone();
            let changed = changed.clone();
            state.lock().expect("state").insert(kind, BTreeMap::new());
            tasks.push(tokio::spawn(async move {
                let mut events = watcher(api, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let mut state = state.lock().expect("state");
                    let objects = state.entry(kind).or_default();
                    match event {
                        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                            let name = o.metadata.name.clone().unwrap_or_default();
                            let value = serde_json::to_value(&o).unwrap_or(Value::Null);
                            objects.insert(name, current_on_every_node(&value));
                        }
                        watcher::Event::Delete(o) => {
                            objects.remove(&o.metadata.name.clone().unwrap_or_default());
                        }
                        watcher::Event::Init | watcher::Event::InitDone => {}
                    }
                    drop(state);
                    changed.notify_one();
                }
            }));
        }
        Self {
            state,
            expected,
            changed,
            _tasks: tasks,
        }
    }

    /// kind → (Current, expected)
    fn counts(&self) -> BTreeMap<&'static str, (usize, usize)> {
        let state = self.state.lock().expect("state");
        self.expected
            .iter()
            .map(|(kind, expected)| {
                let ready = state
                    .get(kind)
                    .map(|o| o.values().filter(|r| **r).count())
                    .unwrap_or_default();
                (*kind, (ready, *expected))
            })
            .collect()
    }

    fn ready_count(&self) -> usize {
        self.counts().values().map(|(r, _)| r).sum()
    }

    fn not_ready(&self, at_most: usize) -> Vec<String> {
        let state = self.state.lock().expect("state");
        state
            .iter()
            .flat_map(|(kind, objects)| {
                objects
                    .iter()
                    .filter(|(_, r)| !**r)
                    .map(move |(name, _)| format!("{kind} {name}"))
            })
            .take(at_most)
            .collect()
    }
}

/// Current in kstatus' terms (Ready=True, observedGeneration equal to generation), with an entry
/// for each node.
fn current_on_every_node(object: &Value) -> bool {
    let generation = object.pointer("/metadata/generation");
    let observed = object.pointer("/status/observedGeneration");
    let nodes = object
        .pointer("/status/nodes")
        .and_then(Value::as_array)
        .map(Vec::len)
        .unwrap_or_default();
    ready(object)
        && generation.is_some()
        && generation == observed
        && kstatus::compute(object) == Kstatus::Current
        && nodes == NODES.len()
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

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
