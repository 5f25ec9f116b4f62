//! fio, built with its libiscsi engine (tools/build-bench-tools), driven from job files: what the
//! data-path benchmarks read with, and what they compare against. A job file, not the command
//! line, carries the CHAP password, so it is never in a process list.
#![allow(clippy::expect_used, dead_code)] // benchmarks fail by panicking; not every bench uses all

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::support::initiator::Login;

/// Where a job reads: a LUN through libiscsi (`Login::lun` as the target numbers it: tgt's
/// first is 1, LIO's 0), or a local file (the floor).
pub enum Source<'a> {
    Lun(Login<'a>),
    File(&'a Path),
}

/// One fio job: its name and its section of the job file, rendered from where it reads and its
/// options (`rw`, `bs`, `iodepth`, …).
pub struct Job {
    pub name: String,
    section: String,
}

impl Job {
    pub fn new(name: &str, source: &Source<'_>, options: &[(&'static str, &str)]) -> Self {
        let mut section = format!("[{name}]\n");
        match source {
            Source::Lun(Login {
                portal,
                iqn,
                lun,
                initiator,
                user,
                password,
            }) => {
                let _ = writeln!(section, "ioengine=libiscsi\ninitiator={initiator}");
                // fio splits file names at ':': every one is escaped.
                let url = format!("iscsi://{user}%{password}@{portal}/{iqn}/{lun}");
                let _ = writeln!(section, "filename={}", url.replace(':', "\\:"));
            }
            // Buffered reads of the file as a program on the node would make them, from the
            // page cache as it is (fio would otherwise drop the file's pages first).
            Source::File(path) => {
                let _ = writeln!(
                    section,
                    "ioengine=psync\ninvalidate=0\nfilename={}",
                    path.display()
                );
            }
        }
        for (key, value) in options {
            let _ = writeln!(section, "{key}={value}");
        }
        Self {
            name: name.to_owned(),
            section,
        }
    }
}

/// The one-initiator reads: sequential 1 MiB reads of the whole LUN or file, then `seconds` of
/// random 4 KiB reads, each at the queue depth an initiator would use.
pub fn one_initiator(source: &Source<'_>, seconds: &str) -> [Job; 2] {
    [
        Job::new(
            "sequential",
            source,
            &[("rw", "read"), ("bs", "1M"), ("iodepth", "16")],
        ),
        Job::new(
            "random",
            source,
            &[
                ("rw", "randread"),
                ("bs", "4k"),
                ("iodepth", "32"),
                ("time_based", "1"),
                ("runtime", seconds),
            ],
        ),
    ]
}

/// Runs `fio` (a command with no arguments yet, wherever it is to run) on the job file at
/// `path`; the reads of each job by name. Panics with fio's errors if it fails.
pub fn run(mut fio: std::process::Command, path: &Path) -> Vec<(String, Reads)> {
    let output = fio
        .arg("--output-format=json")
        .arg(path)
        .output()
        .expect("fio runs");
    assert!(
        output.status.success(),
        "fio {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    parse(&String::from_utf8_lossy(&output.stdout))
}

/// Writes `jobs` as a job file (mode 0600) at `path`, each job after the previous one ends
/// (`stonewall`) unless `together`.
pub fn job_file(path: &Path, jobs: &[Job], together: bool) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::from("[global]\nthread\ngroup_reporting=0\n");
    if !together {
        text.push_str("stonewall\n");
    }
    for job in jobs {
        text.push_str(&job.section);
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("job file");
    std::io::Write::write_all(&mut file, text.as_bytes()).expect("job file");
}

/// What fio measured for one job's reads.
#[derive(Debug, Clone, Copy)]
pub struct Reads {
    pub bytes: u64,
    pub bytes_per_second: f64,
    pub iops: f64,
    pub p99_latency_ms: f64,
}

/// The reads of each job, by name, from fio's JSON output.
pub fn parse(json: &str) -> Vec<(String, Reads)> {
    // fio may print notes before the JSON document.
    let start = json.find('{').expect("fio printed JSON");
    let report: Value = serde_json::from_str(&json[start..]).expect("fio's JSON");
    let jobs = report["jobs"].as_array().expect("jobs");
    jobs.iter()
        .map(|job| {
            let read = &job["read"];
            let number = |v: &Value| v.as_f64().unwrap_or(0.0);
            let reads = Reads {
                bytes: read["io_bytes"].as_u64().unwrap_or(0),
                bytes_per_second: number(&read["bw_bytes"]),
                iops: number(&read["iops"]),
                p99_latency_ms: number(&read["clat_ns"]["percentile"]["99.000000"]) / 1e6,
            };
            (job["jobname"].as_str().unwrap_or("").to_owned(), reads)
        })
        .collect()
}
