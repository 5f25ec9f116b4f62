//! fio, built with its libiscsi engine (tools/build-bench-tools), driven from job files: what the
//! data-path benchmarks read with, and what they compare against. A job file, not the command
//! line, carries the CHAP password, so it is never in a process list.
#![allow(clippy::expect_used, dead_code)] // benchmarks fail by panicking; not every bench uses all

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Where a job reads: a LUN through libiscsi, or a local file (the floor).
#[derive(Clone)]
pub enum Source {
    Lun {
        portal: String,
        iqn: String,
        /// The LUN as the target numbers it (tgt's first LUN is 1, LIO's 0).
        lun: u32,
        initiator: String,
        user: String,
        password: String,
    },
    File(PathBuf),
}

/// One fio job: a name, where it reads, and its options (`rw`, `bs`, `iodepth`, …).
pub struct Job {
    pub name: String,
    pub source: Source,
    pub options: Vec<(&'static str, String)>,
}

impl Job {
    pub fn new(name: &str, source: &Source, options: &[(&'static str, &str)]) -> Self {
        Self {
            name: name.to_owned(),
            source: source.clone(),
            options: options.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
        }
    }

    fn section(&self) -> String {
        let mut text = format!("[{}]\n", self.name);
        match &self.source {
            Source::Lun {
                portal,
                iqn,
                lun,
                initiator,
                user,
                password,
            } => {
                let _ = writeln!(text, "ioengine=libiscsi\ninitiator={initiator}");
                // fio splits file names at ':': every one is escaped.
                let url = format!("iscsi://{user}%{password}@{portal}/{iqn}/{lun}");
                let _ = writeln!(text, "filename={}", url.replace(':', "\\:"));
            }
            // Buffered reads of the file as a program on the node would make them, from the
            // page cache as it is (fio would otherwise drop the file's pages first).
            Source::File(path) => {
                let _ = writeln!(
                    text,
                    "ioengine=psync\ninvalidate=0\nfilename={}",
                    path.display()
                );
            }
        }
        for (key, value) in &self.options {
            let _ = writeln!(text, "{key}={value}");
        }
        text
    }
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
        text.push_str(&job.section());
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
