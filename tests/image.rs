//! The container image, built from the repository's Dockerfile by Debian's dockerd (started and
//! stopped here, tests/support/docker.rs) the way `make image` builds it, and run: `discus
//! --version`, the labels and packages it promises, and `discus serve` as PID 1 of a privileged
//! container — on a network namespace of its own plugged into a test LAN — serving a target
//! that an initiator on the host reads; `docker stop` ends it at once and cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::docker::{Docker, IMAGE};
use support::initiator::{self, Login};
use support::network::Lan;

const DEMO_ISO_SHA256: &str = "ad0d2d0256c2a826232a63c44422745af135642c0aceaed052216215868e4795";

#[test]
fn the_dockerfile_builds_an_image_whose_discus_serves_a_target_to_a_host_initiator() {
    let docker = Docker::start();
    let took = docker.build_discus(Path::new(env!("CARGO_BIN_EXE_discus")), IMAGE);
    let size: u64 = docker
        .must(&["image", "inspect", "--format", "{{.Size}}", IMAGE])
        .trim()
        .parse()
        .expect("a size");
    println!(
        "built {IMAGE} in {took:.1?}: {:.0} MB (with this test run's discus, stripped)",
        size as f64 / 1e6
    );

    let version = docker.must(&["run", "--rm", "--network", "none", IMAGE, "--version"]);
    assert_eq!(
        version.trim(),
        concat!("discus ", env!("CARGO_PKG_VERSION"))
    );
    let labels: Value = serde_json::from_str(&docker.must(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        IMAGE,
    ]))
    .expect("labels");
    for (label, value) in [
        ("version", env!("CARGO_PKG_VERSION")),
        ("licenses", "Apache-2.0"),
        ("title", "discus"),
    ] {
        assert_eq!(
            labels[format!("org.opencontainers.image.{label}")],
            value,
            "{labels:#}"
        );
    }
    assert!(labels["org.opencontainers.image.source"].is_string());
    // What the agent runs, from Debian's packages, is there.
    docker.must(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "dpkg-query",
        IMAGE,
        "--show",
        "qemu-utils",
        "tgt",
        "kmod",
        "ca-certificates",
        "libgcc-s1",
    ]);

    serve_in_a_container(&docker);
}

/// `discus serve --backend tgt` as the container's PID 1, the demo of examples/standalone.
fn serve_in_a_container(docker: &Docker) {
    let scratch = tempfile::tempdir().expect("scratch");
    let (data, manifests) = (
        scratch.path().join("data"),
        scratch.path().join("manifests"),
    );
    std::fs::create_dir_all(data.join("demo")).expect("data");
    std::fs::create_dir_all(&manifests).expect("manifests");
    let demo = support::repo().join("examples/standalone");
    std::fs::copy(
        demo.join("discus-demo.iso"),
        data.join("demo/discus-demo.iso"),
    )
    .expect("iso");
    std::fs::copy(demo.join("demo.yaml"), manifests.join("demo.yaml")).expect("manifests");

    let name = format!("discus-serve-{}", std::process::id());
    let volume = |host: &Path, inside: &str| format!("{}:{inside}", host.display());
    docker.must(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--privileged",
        "--network",
        "none",
        "--volume",
        &volume(&data, "/var/lib/discus"),
        "--volume",
        &volume(&manifests, "/manifests:ro"),
        IMAGE,
        "serve",
        "--manifests",
        "/manifests",
        "--backend",
        "tgt",
        "--file-root",
        "/var/lib/discus/demo",
        "--node-name",
        "container",
    ]);
    // Its portal listens on 0.0.0.0:3260 of the container's network namespace, which gets an
    // address on a test LAN (the test process is .1).
    let lan = Lan::new();
    let address = lan.plug_netns(docker.pid_of(&name), 2);
    wait_ready(
        docker,
        &name,
        &data.join("status/InitiatorAccess/demo/demo-client.json"),
    );

    let out = scratch.path().join("read.iso");
    let login = Login {
        portal: &format!("{address}:3260"),
        iqn: "iqn.2026-11.dev.discus:demo",
        lun: 1, // tgt: API LUN 0 is LUN 1 on the wire
        initiator: "iqn.2026-11.dev.discus:demo-client",
        user: "demo",
        password: "discus-demo-1",
    };
    let read = initiator::read_lun(&login, &out)
        .unwrap_or_else(|e| panic!("{e}\n--- discus:\n{}", docker.must(&["logs", &name])));
    assert_eq!(read, DEMO_ISO_SHA256);

    // discus (PID 1) left no zombie behind: its tgtd and the tgtadm and qemu-img it ran.
    let top = docker.must(&["top", &name, "-eo", "pid,stat,comm"]);
    assert!(top.contains("tgtd"), "{top}");
    assert!(
        !top.lines().skip(1).any(|l| l
            .split_whitespace()
            .nth(1)
            .is_some_and(|s| s.starts_with('Z'))),
        "zombies:\n{top}"
    );
    // As PID 1 it handles SIGTERM: `docker stop` ends it at once (not after the 30 s grace),
    // with status 0.
    let stopping = Instant::now();
    docker.must(&["stop", "--time", "30", &name]);
    let stopped = stopping.elapsed();
    let code = docker.must(&["inspect", "--format", "{{.State.ExitCode}}", &name]);
    println!("docker stop took {stopped:.1?}; exit code {}", code.trim());
    assert_eq!(code.trim(), "0", "{}", docker.must(&["logs", &name]));
    assert!(
        stopped < Duration::from_secs(10),
        "docker stop took {stopped:?}"
    );
    docker.must(&["rm", &name]);
}

/// Waits until `discus serve` wrote the status file with Ready=True.
fn wait_ready(docker: &Docker, name: &str, status: &Path) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let ready = std::fs::read_to_string(status)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|s| {
                s.pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
            });
        if ready {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "{} not Ready within 90 s\n--- discus:\n{}",
        status.display(),
        docker.must(&["logs", name])
    );
}
