//! What a machine reading its disc through discus gets, against what the same machine would get
//! from the file itself and from a target a skilled admin set up by hand, all in the same run
//! (`cargo bench --bench datapath`). On tgt, in a host of its own (tests/support/sandbox.rs),
//! every reader is fio (tools/build-bench-tools): its libiscsi engine as the initiator, its
//! psync engine for the file.
//!
//! 1. **One initiator**: sequential 1 MiB reads (iodepth 16) and random 4 KiB reads (iodepth 32)
//!    of an image of `DISCUS_BENCH_SIZE_MIB` (default 1024), in the page cache, through
//!    - the file itself, read by one process on the node: the floor;
//!    - a target configured by hand the way tgt's documentation and a skilled admin do it: a
//!      tgtd of its own started as Debian's service starts it, one target, the same file as a
//!      read-only LUN with tgt's defaults, CHAP and an initiator ACL;
//!    - discus serving the same file to a grant with CHAP.
//!
//!    Each the median of three runs, interleaved. Goals: discus ≥ 0.8× the floor for cached
//!    sequential reads, and no worse than the hand-made target.
//! 2. **Boot storm**: `DISCUS_BENCH_STORM` (default `1,64,256`) initiators, each with a grant
//!    and CHAP secret of its own, log in at once and each reads the boot working set: the first
//!    `DISCUS_BENCH_WORKING_SET_MIB` (default 256) of the image, 64 KiB at a time, mostly in
//!    order with 10% at random (a boot: kernel and initrd in one go, then scattered files).
//!    Three readers, each starting with none of the working set in the page cache, in an order
//!    that turns from one storm size to the next: discus; the hand-made target, with as many
//!    CHAP accounts and initiator ACLs (what discus's configuration costs under a storm); and
//!    as many processes reading the same working set of the file the same way (the floor).
//!    Reported for each: all succeeded or not, each reader's time from the start to its last
//!    byte (p50, p99, max), the tgtd's CPU time and memory, where the machine's CPU went
//!    (tgtd, the readers, everything else, idle: what holds a storm back); then logins alone
//!    (as many `iscsi-inq` at once) and the image's pages in the page cache (fincore): one copy
//!    of the working set, whatever the number of initiators. Goal: all succeed; p99 ≤ 2× the
//!    floor's.
//!
//! Plots (benches/support/plot.rs): completion CDF of each storm through discus, by hand and
//! from the file, and the aggregate throughput by number of readers (the storm of 1 gives the
//! first point, in the storm's shape). `cargo test --bench datapath` runs it with 32 MiB and
//! storms of 1 and 4, so that it cannot rot.
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmarks fail by panicking

#[path = "support/mod.rs"]
mod bench_support;
#[path = "support/fio.rs"]
mod fio;
#[path = "support/plot.rs"]
mod plot;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};

use bench_support::{incompressible, median, tools};
use fio::{Job, Reads, Source};
use support::initiator::Login;
use support::manifests;
use support::serve_host::{Host, INITIATOR, PORTAL};

const IQN: &str = "iqn.2026-11.dev.discus:boot";
const HAND_IQN: &str = "iqn.2026-11.dev.discus:by-hand";
/// The hand-made target's tgtd: its own control port and portal beside discus's.
const HAND_CONTROL_PORT: &str = "3262";
const HAND_PORTAL: &str = "127.0.0.1:3262";
const PASSWORD: &str = "client-secret";
/// Where discus's target and the hand-made one answer.
const DISCUS: (&str, &str) = (PORTAL, IQN);
const BY_HAND: (&str, &str) = (HAND_PORTAL, HAND_IQN);

fn main() {
    // `cargo bench` passes --bench; `cargo test --bench datapath` does not: a smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let size_mib = env_number("DISCUS_BENCH_SIZE_MIB", if full { 1024 } else { 32 });
    let working_set_mib = env_number("DISCUS_BENCH_WORKING_SET_MIB", if full { 256 } else { 8 });
    let storms: Vec<usize> = std::env::var("DISCUS_BENCH_STORM")
        .unwrap_or_else(|_| if full { "1,64,256" } else { "1,4" }.to_owned())
        .split(',')
        .filter(|n| !n.trim().is_empty()) // empty: no storm, the one initiator alone
        .map(|n| n.trim().parse().expect("DISCUS_BENCH_STORM: numbers"))
        .collect();
    let most = storms.iter().copied().max().unwrap_or(0);
    println!(
        "data path on tgt: {size_mib} MiB image, storms of {storms:?} reading {working_set_mib} MiB each"
    );

    let bench = Bench::new(size_mib, most);
    bench.one_initiator(if full { 10 } else { 2 });
    let plots: Vec<Storm> = (storms.iter().enumerate())
        .map(|(turn, &n)| bench.storm(n, working_set_mib, turn))
        .collect();
    if !plots.is_empty() {
        draw(&plots);
    }
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().parse().expect("a whole number"))
        .unwrap_or(default)
}

struct Bench {
    host: Host,
    /// The file discus serves, as stored: what the floor and the hand-made target read.
    stored: PathBuf,
    jobs: PathBuf,
    /// The host PID of the hand-made target's tgtd.
    hand_tgtd: u32,
}

impl Bench {
    /// A host with the image, discus serving it to the bench's initiator and to `storm` more,
    /// each with CHAP of its own, and a tgtd of the admin's with the same file and accounts.
    fn new(size_mib: usize, storm: usize) -> Self {
        let host = Host::new();
        let image = host.images.join("disk.raw");
        let bytes = incompressible(size_mib << 20, b"datapath");
        std::fs::write(&image, &bytes).expect("image");
        let digest = hex::encode(Sha256::digest(&bytes));
        drop(bytes);
        host.manifest("lab.yaml", &manifests_for(&image, &digest, storm));
        let start = Instant::now();
        host.converge();
        println!(
            "discus serve --once: {} grants Ready in {:.1} s",
            storm + 1,
            start.elapsed().as_secs_f64()
        );
        let stored = host.stored_image(&digest);
        let hand_tgtd = configure_by_hand(&host, &stored, storm);
        let bench = Self {
            jobs: host.sandbox.scratch("jobs"),
            host,
            stored,
            hand_tgtd,
        };
        // discus's tgtd runs with its malloc tunables (src/backend/tgt/daemon.rs); glibc rewrites
        // the variable in place at start, so /proc shows its first entry.
        let environ = std::fs::read(format!("/proc/{}/environ", bench.discus_tgtd()))
            .expect("tgtd's environment");
        assert!(
            (environ.split(|b| *b == 0))
                .any(|v| v.starts_with(b"GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4194304")),
            "discus's tgtd runs without its malloc tunables"
        );
        bench
    }

    /// A LUN of the target at `portal` as `iqn`, logged into with CHAP.
    fn lun<'a>(
        (portal, iqn): (&'a str, &'a str),
        initiator: &'a str,
        user: &'a str,
        password: &'a str,
    ) -> Source<'a> {
        Source::Lun(Login {
            portal,
            iqn,
            lun: 1,
            initiator,
            user,
            password,
        })
    }

    /// Runs fio on one job file in the host; its reads by job name.
    fn fio(&self, name: &str, jobs: &[Job], together: bool) -> Vec<(String, Reads)> {
        let path = self.jobs.join(format!("{name}.fio"));
        fio::job_file(&path, jobs, together);
        fio::run(self.host.sandbox.command(tools().join("fio")), &path)
    }

    /// Sequential and random reads from the floor, the hand-made target and discus, the median
    /// of three interleaved rounds; prints the table, the ratios, and how often each tgtd
    /// faulted memory in per MiB of the last round's sequential reads.
    fn one_initiator(&self, random_seconds: usize) {
        let seconds = random_seconds.to_string();
        let shapes = |source: &Source| fio::one_initiator(source, &seconds);
        let sources = [
            ("floor (the file)", Source::File(&self.stored), None),
            (
                "tgt by hand",
                Self::lun(BY_HAND, INITIATOR, "client", PASSWORD),
                Some(self.hand_tgtd),
            ),
            (
                "discus",
                Self::lun(DISCUS, INITIATOR, "client", PASSWORD),
                Some(self.discus_tgtd()),
            ),
        ];
        // Into the page cache, for every reader alike.
        std::fs::read(&self.stored).expect("warm the page cache");
        let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); sources.len()];
        // Page faults of the serving tgtd, and MiB read, in the last round's sequential reads.
        let mut faults = vec![(0u64, 0.0f64); sources.len()];
        for round in 0..3 {
            for (i, (_, source, tgtd)) in sources.iter().enumerate() {
                let [sequential, random] = shapes(source);
                let before = tgtd.map_or(0, minor_faults);
                let sequential = self.fio(&format!("sequential-{round}-{i}"), &[sequential], false);
                // The last round's, of the sequential reads: the first rounds grow the heap.
                faults[i] = (
                    tgtd.map_or(0, minor_faults) - before,
                    sequential[0].1.bytes as f64 / f64::from(1 << 20),
                );
                let random = self.fio(&format!("random-{round}-{i}"), &[random], false);
                results[i].push((
                    sequential[0].1.bytes_per_second / f64::from(1 << 20),
                    random[0].1.iops,
                ));
            }
        }
        let median =
            |i: usize, pick: fn(&(f64, f64)) -> f64| median(results[i].iter().map(pick).collect());
        println!("\none initiator, the median of 3 runs:");
        println!(
            "{:<18} {:>14} {:>14} {:>22}",
            "reader", "sequential 1M", "random 4k", "tgtd faults/MiB seq."
        );
        let per_mib = |i: usize| faults[i].0 as f64 / faults[i].1;
        for (i, (name, _, tgtd)) in sources.iter().enumerate() {
            let per_mib = tgtd.map_or("-".to_owned(), |_| format!("{:.1}", per_mib(i)));
            println!(
                "{name:<18} {:>9.0} MiB/s {:>9.0} IOPS {per_mib:>22}",
                median(i, |r| r.0),
                median(i, |r| r.1)
            );
        }
        let (floor, hand, discus) = (0, 1, 2);
        println!(
            "discus / floor: sequential {:.2} (goal >= 0.8), random {:.3}",
            median(discus, |r| r.0) / median(floor, |r| r.0),
            median(discus, |r| r.1) / median(floor, |r| r.1)
        );
        println!(
            "discus / tgt by hand: sequential {:.2}, random {:.2} (goal >= 1.0 within noise)",
            median(discus, |r| r.0) / median(hand, |r| r.0),
            median(discus, |r| r.1) / median(hand, |r| r.1)
        );
        let resident = |i: usize| sources[i].2.map_or(0.0, |pid| rss_kib(pid) as f64 / 1024.0);
        println!(
            "tgtd resident after the reads (what it kept since it started): by hand {:.0} MiB, \
             discus {:.0} MiB",
            resident(hand),
            resident(discus)
        );
    }

    /// `n` initiators at once, each reading the working set through its own grant, through
    /// discus, through the hand-made target and from the file, in an order turned by `turn`.
    fn storm(&self, n: usize, working_set_mib: usize, turn: usize) -> Storm {
        let size = format!("{working_set_mib}M");
        let shape = [
            ("rw", "randread"),
            ("percentage_random", "10"),
            ("bs", "64k"),
            ("iodepth", "4"),
            // The first working_set_mib of the image, and that many bytes in all: fio's
            // sequential share stops at the region's end, the random one may read a block twice.
            ("size", size.as_str()),
            ("io_size", size.as_str()),
        ];
        let mut order = Through::ALL;
        order.rotate_left(turn % Through::ALL.len());
        let runs: Vec<Run> = (order.iter())
            .map(|&through| self.storm_through(through, n, working_set_mib, &shape))
            .collect();
        let logins = self.logins(n);
        let storm = Storm { n, runs };
        storm.print(working_set_mib, &logins);
        for run in &storm.runs {
            let name = run.through.name();
            assert_eq!(
                run.ok, n,
                "every reader of the storm through {name} reads its working set"
            );
        }
        storm
    }

    /// One storm's readers through one `through`, the working set out of the page cache first.
    fn storm_through(
        &self,
        through: Through,
        n: usize,
        working_set_mib: usize,
        shape: &[(&'static str, &str)],
    ) -> Run {
        let tgtd = match through {
            Through::Discus => Some(self.discus_tgtd()),
            Through::ByHand => Some(self.hand_tgtd),
            Through::File => None,
        };
        drop_from_page_cache(&self.stored);
        let cpu_before = tgtd.map(cpu_seconds);
        let machine_before = MachineCpu::now();
        let jobs = (0..n).map(|i| self.storm_job(through, i, shape)).collect();
        let name = format!("storm-{n}-{}", through.tag());
        let finished = self.at_once(&name, jobs, working_set_mib);
        let machine = MachineCpu::now().since(&machine_before);
        let times: Vec<f64> = finished.iter().flatten().copied().collect();
        let makespan = times.iter().copied().fold(0.0, f64::max);
        Run {
            through,
            ok: times.len(),
            aggregate_mib_s: (n * working_set_mib) as f64 / makespan,
            times,
            tgtd: tgtd
                .zip(cpu_before)
                .map(|(pid, before)| (cpu_seconds(pid) - before, rss_kib(pid) as f64 / 1024.0)),
            machine,
            cached_mib: resident_mib(&self.stored),
        }
    }

    /// Reader `i` of a storm: its own initiator name and CHAP account, or the file.
    fn storm_job(&self, through: Through, i: usize, shape: &[(&'static str, &str)]) -> Job {
        let (initiator, user, password) = (storm_initiator(i), format!("c{i}"), password(i));
        let source = match through {
            Through::Discus => Self::lun(DISCUS, &initiator, &user, &password),
            Through::ByHand => Self::lun(BY_HAND, &initiator, &user, &password),
            Through::File => Source::File(&self.stored),
        };
        Job::new(&user, &source, shape)
    }

    /// Starts one fio per job at the same moment; each one's time from that moment to its exit,
    /// or None if it failed or read less than the working set.
    fn at_once(&self, name: &str, jobs: Vec<Job>, working_set_mib: usize) -> Vec<Option<f64>> {
        let mut running: Vec<(Child, PathBuf)> = Vec::new();
        let start = Instant::now();
        for job in jobs {
            let path = self.jobs.join(format!("{name}-{}.fio", job.name));
            fio::job_file(&path, &[job], false);
            // Into files, not pipes: a reader that says much never blocks on a full pipe.
            let output =
                |ext: &str| std::fs::File::create(path.with_extension(ext)).expect("output");
            let child = self
                .host
                .sandbox
                .command(tools().join("fio"))
                .args(["--output-format=json"])
                .arg(&path)
                .stdout(output("json"))
                .stderr(output("err"))
                .spawn()
                .expect("fio runs");
            running.push((child, path));
        }
        let mut finished = vec![None; running.len()];
        // Generous: a storm of 256 reading 256 MiB each took 146 s here.
        let deadline = Duration::from_secs(120 + (running.len() * working_set_mib) as u64 / 16);
        // Reaped in any order: each time is taken when its process is seen to have ended.
        let mut left: Vec<usize> = (0..running.len()).collect();
        let mut failures = Vec::new();
        while !left.is_empty() {
            assert!(start.elapsed() < deadline, "{name}: the storm did not end");
            left.retain(|&i| {
                let (child, path) = &mut running[i];
                match child.try_wait().expect("wait") {
                    None => true,
                    Some(status) => {
                        let elapsed = start.elapsed().as_secs_f64();
                        let out = std::fs::read_to_string(path.with_extension("json"))
                            .unwrap_or_default();
                        // fio's JSON repeats the job's options, the password among them: only
                        // its own complaints are shown.
                        let err =
                            std::fs::read_to_string(path.with_extension("err")).unwrap_or_default();
                        let read_all = status.success()
                            && fio::parse(&out)
                                .iter()
                                .all(|(_, r)| r.bytes >= (working_set_mib as u64) << 20);
                        if !read_all && failures.len() < 3 {
                            failures.push(format!("{}: {status}: {err}", path.display()));
                        }
                        finished[i] = read_all.then_some(elapsed);
                        false
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(5));
        }
        for failure in failures {
            eprintln!("{name}: a reader failed: {failure}");
        }
        finished
    }

    /// `n` logins at once (`iscsi-inq`: log in, INQUIRY, log out), each one's time.
    fn logins(&self, n: usize) -> Vec<f64> {
        let start = Instant::now();
        let mut children: Vec<Child> = (0..n)
            .map(|i| {
                // The password through libiscsi's environment variable, not the command line.
                let url = format!("iscsi://c{i}@{PORTAL}/{IQN}/1");
                self.host
                    .sandbox
                    .command("iscsi-inq")
                    .args(["-i", &storm_initiator(i), &url])
                    .env("LIBISCSI_CHAP_PASSWORD", password(i))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("iscsi-inq runs")
            })
            .collect();
        let mut times = vec![f64::NAN; n];
        let mut left: Vec<usize> = (0..n).collect();
        while !left.is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "logins did not end"
            );
            left.retain(|&i| match children[i].try_wait().expect("wait") {
                None => true,
                Some(status) => {
                    assert!(status.success(), "login {i} failed");
                    times[i] = start.elapsed().as_secs_f64();
                    false
                }
            });
            std::thread::sleep(Duration::from_millis(2));
        }
        times
    }

    /// The host PID of the tgtd discus started (its pid file in the host's data dir).
    fn discus_tgtd(&self) -> u32 {
        let inside: u32 =
            std::fs::read_to_string(self.host.sandbox.data_dir().join("tgt/tgtd.pid"))
                .expect("discus's tgtd.pid")
                .trim()
                .parse()
                .expect("a pid");
        host_pid(self.host.sandbox.pid(), inside)
    }
}

/// What a storm's readers read through.
#[derive(Clone, Copy, PartialEq)]
enum Through {
    Discus,
    ByHand,
    File,
}

impl Through {
    const ALL: [Self; 3] = [Self::Discus, Self::ByHand, Self::File];

    fn name(self) -> &'static str {
        match self {
            Self::Discus => "discus",
            Self::ByHand => "tgt by hand",
            Self::File => "the file (floor)",
        }
    }

    /// For file names.
    fn tag(self) -> &'static str {
        match self {
            Self::Discus => "discus",
            Self::ByHand => "hand",
            Self::File => "floor",
        }
    }
}

/// One storm through one `Through`.
struct Run {
    through: Through,
    /// Readers that read their whole working set.
    ok: usize,
    /// Each successful reader's time from the start to its last byte, in seconds.
    times: Vec<f64>,
    /// All readers' bytes over the time the last one took.
    aggregate_mib_s: f64,
    /// The serving tgtd's CPU seconds during the storm and its resident MiB after it.
    tgtd: Option<(f64, f64)>,
    /// Where the machine's CPU went during the storm.
    machine: MachineCpu,
    /// The image's pages in the page cache after the storm, in MiB.
    cached_mib: f64,
}

struct Storm {
    n: usize,
    /// In the order they ran.
    runs: Vec<Run>,
}

impl Storm {
    fn run(&self, through: Through) -> &Run {
        (self.runs.iter().find(|r| r.through == through)).expect("every storm reads through all")
    }

    fn print(&self, working_set_mib: usize, logins: &[f64]) {
        let n = self.n;
        println!("\nboot storm of {n} initiators, {working_set_mib} MiB each, in the order run:");
        println!(
            "  {:<18} {:>10} {:>7} {:>7} {:>7} {:>9} {:>9} {:>11}",
            "reader", "succeeded", "p50 s", "p99 s", "max s", "tgtd CPU", "tgtd MiB*", "cached MiB"
        );
        for run in &self.runs {
            let (p50, p99, max) = percentiles(&run.times);
            let (cpu, rss) = run.tgtd.map_or(("-".into(), "-".into()), |(cpu, rss)| {
                (format!("{cpu:.1} s"), format!("{rss:.0}"))
            });
            println!(
                "  {:<18} {:>10} {p50:>7.2} {p99:>7.2} {max:>7.2} {cpu:>9} {rss:>9} {:>11.0}",
                run.through.name(),
                format!("{} of {n}", run.ok),
                run.cached_mib
            );
        }
        let p99 = |through| percentiles(&self.run(through).times).1;
        let floor = p99(Through::File);
        println!(
            "  p99 / floor p99: discus {:.2} (goal <= 2), tgt by hand {:.2}; discus / by hand {:.2}",
            p99(Through::Discus) / floor,
            p99(Through::ByHand) / floor,
            p99(Through::Discus) / p99(Through::ByHand)
        );
        println!("  tgtd MiB*: resident after the storm, what it kept since it started");
        self.print_cpu(working_set_mib);
        let (l50, l99, lmax) = percentiles(logins);
        println!("  logins alone (iscsi-inq): p50 {l50:.3} s, p99 {l99:.3} s, max {lmax:.3} s");
        println!(
            "  cached MiB: the image's pages in the page cache after each storm, which starts \
             with none: one copy of the {working_set_mib} MiB working set for all {n}"
        );
    }
}

impl Storm {
    /// Where the machine's CPU went during each storm, by process.
    fn print_cpu(&self, working_set_mib: usize) {
        let cores = self.runs.first().map_or(0, |r| r.machine.cores);
        println!(
            "  CPU seconds during the storm ({cores} cores):\n  {:<18} {:>7} {:>8} {:>8} {:>8} {:>12} {:>11} {:>10}",
            "reader", "tgtd", "readers", "rest", "idle", "(softirq)", "busy s/GiB", "cores x s"
        );
        let gib = (self.n * working_set_mib) as f64 / 1024.0;
        for run in &self.runs {
            let cpu = &run.machine;
            let tgtd = run.tgtd.map_or(0.0, |(cpu, _)| cpu);
            // Busy is sampled at ticks, processes' times are exact: a small negative rest is
            // the difference between the two clocks, shown as it is.
            let rest = cpu.busy - tgtd - cpu.readers;
            println!(
                "  {:<18} {tgtd:>7.1} {:>8.1} {rest:>8.1} {:>8.1} {:>12.1} {:>11.2} {:>10.1}",
                run.through.name(),
                cpu.readers,
                cpu.idle,
                cpu.softirq,
                cpu.busy / gib,
                cpu.available
            );
        }
        println!(
            "  readers: the fio processes (the initiators, libiscsi in them, or the file's \
             readers); rest: kernel threads, the agent, everything else; softirq: the part of the \
             kernel's network and block work that ran as interrupts, inside the columns before \
             (ticks charged to whoever ran); cores x s: what busy and idle add up to, the \
             difference being the clocks' sampling"
        );
    }
}

/// CPU seconds of the whole machine (all cores, /proc/stat) and of this process's reaped
/// children — the readers, which each end before the storm does.
#[derive(Clone, Copy, Debug)]
struct MachineCpu {
    busy: f64,
    softirq: f64,
    idle: f64,
    readers: f64,
    /// Cores times the seconds from one reading to the next: what busy and idle should add to.
    available: f64,
    cores: usize,
    at: Instant,
}

impl MachineCpu {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<f64> = (stat.lines().next().unwrap_or_default().split_whitespace())
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let tick = |i: usize| ticks.get(i).copied().unwrap_or(0.0) / 100.0;
        // user nice system idle iowait irq softirq steal, in ticks of 1/100 s
        let (user, nice, system, idle, iowait) = (tick(0), tick(1), tick(2), tick(3), tick(4));
        let (irq, softirq, steal) = (tick(5), tick(6), tick(7));
        let me = std::process::id();
        let cores = (stat.lines())
            .filter(|l| l.starts_with("cpu") && l[3..].starts_with(|c: char| c.is_ascii_digit()))
            .count();
        Self {
            busy: user + nice + system + irq + softirq + steal,
            softirq: softirq + irq,
            idle: idle + iowait,
            // cutime and cstime: the reaped readers, fio's threads included.
            readers: (stat_field(me, 13) + stat_field(me, 14)) / 100.0,
            available: 0.0,
            cores,
            at: Instant::now(),
        }
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            busy: self.busy - before.busy,
            softirq: self.softirq - before.softirq,
            idle: self.idle - before.idle,
            readers: self.readers - before.readers,
            available: self.cores as f64 * (self.at - before.at).as_secs_f64(),
            cores: self.cores,
            at: self.at,
        }
    }
}

fn draw(storms: &[Storm]) {
    let mut series = Vec::new();
    for storm in storms.iter().filter(|s| s.n > 1) {
        for through in Through::ALL {
            series.push(plot::Series {
                label: format!("{}: {}", storm.n, through.name()),
                points: plot::cdf(&storm.run(through).times),
            });
        }
    }
    let cdf = plot::draw(&plot::Chart {
        file: "datapath-boot-storm-cdf.svg",
        title: "Boot storm on tgt: time until each machine has its working set",
        x: "seconds from the start",
        y: "share of machines done",
        series,
    });
    let throughput = plot::draw(&plot::Chart {
        file: "datapath-throughput.svg",
        title: "Boot storm on tgt: aggregate reads by number of readers",
        x: "initiators (readers)",
        y: "MiB/s",
        series: (Through::ALL.iter())
            .map(|&through| plot::Series {
                label: through.name().into(),
                points: (storms.iter())
                    .map(|s| (s.n as f64, s.run(through).aggregate_mib_s))
                    .collect(),
            })
            .collect(),
    });
    println!("\nplots: {}, {}", cdf.display(), throughput.display());
}

/// tgtd as Debian's tgt.service starts it (`tgtd -f`, its defaults), and the target an admin
/// writes with tgtadm (as /etc/tgt/targets.conf would make it): the LUN with tgt's default
/// backing store (rdwr, buffered), read-only, and for the bench's initiator and each of
/// `storm` more a CHAP account and an initiator ACL. Returns the tgtd's host PID.
fn configure_by_hand(host: &Host, stored: &Path, storm: usize) -> u32 {
    let sandbox = &host.sandbox;
    let log = std::fs::File::create(sandbox.path().join("tgtd-by-hand.log")).expect("log");
    let nsenter = sandbox
        .command("tgtd")
        .args(["-f", "-C", HAND_CONTROL_PORT, "--iscsi"])
        .arg(format!("portal={HAND_PORTAL}"))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("tgtd runs");
    let nsenter_pid = nsenter.id();
    std::mem::forget(nsenter); // it ends with the sandbox
    let tgtadm = ["tgtadm", "-C", HAND_CONTROL_PORT, "--lld", "iscsi"];
    wait_until(
        Duration::from_secs(30),
        "the hand-made tgtd answers",
        || {
            (sandbox.command(tgtadm[0]).args(&tgtadm[1..]))
                .args(["--mode", "target", "--op", "show"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        },
    );
    // Each command: its words, then the one value that may hold anything.
    let admin = |words: &str, value: &str| {
        let mut args = tgtadm.to_vec();
        args.extend(words.split_whitespace());
        args.push(value);
        let status = (sandbox.command(args[0]).args(&args[1..]))
            .stdout(Stdio::null())
            .status()
            .expect("tgtadm runs");
        // Not the command line: one of them holds the password.
        assert!(status.success(), "tgtadm {words} … failed");
    };
    admin("--mode target --op new --tid 1 -T", HAND_IQN);
    admin(
        "--mode logicalunit --op new --tid 1 --lun 1 -b",
        &stored.display().to_string(),
    );
    admin(
        "--mode logicalunit --op update --tid 1 --lun 1 --params",
        "readonly=1",
    );
    let account = |initiator: &str, user: &str, password: &str| {
        admin(
            &format!("--mode account --op new --user {user} --password"),
            password,
        );
        admin("--mode account --op bind --tid 1 --user", user);
        admin(
            "--mode target --op bind --tid 1 --initiator-name",
            initiator,
        );
    };
    account(INITIATOR, "client", PASSWORD);
    for i in 0..storm {
        account(&storm_initiator(i), &format!("c{i}"), &password(i));
    }
    // nsenter forks for the PID namespace: tgtd is its one child.
    *support::children(nsenter_pid).first().expect("tgtd's PID")
}

fn storm_initiator(i: usize) -> String {
    format!("iqn.2026-11.dev.discus:storm-{i}")
}

fn password(i: usize) -> String {
    format!("storm-pw-{i:05}")
}

/// The image, the target with it as LUN 0, the bench's grant, and `storm` more grants, each
/// with a CHAP Secret of its own.
fn manifests_for(image: &Path, digest: &str, storm: usize) -> String {
    let mut objects = vec![
        support::serve_host::raw_image("disk", image, digest),
        manifests::discus(
            "IscsiTarget",
            "lab",
            "boot",
            json!({"iqn": IQN, "luns": [{"lun": 0, "image": "disk"}]}),
        ),
    ];
    let mut grant = |name: &str, initiator: &str, user: &str, password: &str| {
        let secret = format!("{name}-chap");
        objects.push(manifests::discus(
            "InitiatorAccess",
            "lab",
            name,
            json!({"targetRef": {"name": "boot"}, "initiatorIqn": initiator,
                   "chap": {"secretRef": {"name": secret}}}),
        ));
        objects.push(manifests::secret(
            "lab",
            &secret,
            json!({"username": user, "password": password}),
        ));
    };
    grant("client", INITIATOR, "client", PASSWORD);
    for i in 0..storm {
        grant(
            &format!("c{i}"),
            &storm_initiator(i),
            &format!("c{i}"),
            &password(i),
        );
    }
    manifests::yaml(&objects)
}

fn wait_until(deadline: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn percentiles(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at =
        |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1];
    (at(0.5), at(0.99), at(1.0))
}

/// Drops a file's pages from the page cache (POSIX_FADV_DONTNEED, through GNU dd).
fn drop_from_page_cache(path: &Path) {
    let status = std::process::Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status()
        .expect("dd runs");
    assert!(status.success(), "dd iflag=nocache");
}

/// How much of a file is in the page cache, in MiB (util-linux's fincore).
fn resident_mib(path: &Path) -> f64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .unwrap_or(0.0)
        / f64::from(1 << 20)
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS")
}

/// Minor page faults of a process, its threads included.
fn minor_faults(pid: u32) -> u64 {
    stat_field(pid, 7) as u64
}

/// User and system CPU time of a process (its threads included), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    (stat_field(pid, 11) + stat_field(pid, 12)) / 100.0
}

/// Field `i` of /proc/<pid>/stat after the command's name (0: state), as a number; 0 if
/// unreadable.
fn stat_field(pid: u32, i: usize) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.split(' ').nth(i))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The host PID of the process that is `inside` in the PID namespace of `holder`'s sandbox.
fn host_pid(holder: u32, inside: u32) -> u32 {
    let ns = std::fs::read_link(format!("/proc/{holder}/ns/pid")).expect("pid namespace");
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != Some(ns.clone()) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let ns_pids = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .unwrap_or_default();
        if ns_pids.split_whitespace().last() == Some(&inside.to_string()) {
            return pid;
        }
    }
    panic!("no process {inside} in the sandbox")
}
