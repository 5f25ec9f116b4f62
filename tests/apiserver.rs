//! The API on a real kube-apiserver: the CRDs are established, the examples are accepted and
//! shown with their printer columns, and every invalid manifest is rejected with its rule's
//! message — the same manifests `discus validate` refuses (tests/cli.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use std::path::Path;
use std::process::Output;

use kube::api::{Api, Patch, PatchParams};
use support::control_plane::ControlPlane;
use support::{files_in, header, repo};

/// A control plane with the discus CRDs applied and established.
async fn plane_with_crds() -> ControlPlane {
    let plane = ControlPlane::start().await.expect("control plane");
    plane.install_crds().await.expect("CRDs");
    plane
}

fn run(plane: &ControlPlane, args: &[&str]) -> Output {
    plane.kubectl().args(args).output().expect("kubectl runs")
}

fn ok(plane: &ControlPlane, args: &[&str]) -> String {
    let output = run(plane, args);
    assert!(
        output.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

fn apply(plane: &ControlPlane, namespace: &str, file: &Path) -> Output {
    let file = file.to_str().expect("utf-8 path");
    run(
        plane,
        &[
            "apply",
            "--server-side",
            "--field-manager=discus-test",
            "-n",
            namespace,
            "-f",
            file,
        ],
    )
}

#[tokio::test]
async fn examples_are_accepted_and_kubectl_shows_the_printer_columns() {
    let plane = plane_with_crds().await;
    ok(&plane, &["create", "namespace", "lab"]);
    let examples = repo().join("examples");
    for manifests in [examples.clone(), examples.join("netboot/machines.yaml")] {
        let output = apply(&plane, "lab", &manifests);
        assert!(
            output.status.success(),
            "{}: {}",
            manifests.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // A status as an agent would write it, to see the columns filled in.
    let client = plane.client().await.expect("client");
    let images: Api<discus::api::DiscImage> = Api::namespaced(client.clone(), "lab");
    let status = serde_json::json!({
        "apiVersion": "discus.dev/v1alpha1", "kind": "DiscImage",
        "status": {
            "format": "iso", "virtualSize": "631Mi", "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                            "lastTransitionTime": "2026-11-21T12:00:00Z"}],
            "nodes": [{"node": "storage-1", "phase": "Ready"}],
        },
    });
    images
        .patch_status(
            "debian-12-netinst",
            &PatchParams::apply("discus-test").force(),
            &Patch::Apply(&status),
        )
        .await
        .expect("status accepted");
    let targets: Api<discus::api::IscsiTarget> = Api::namespaced(client, "lab");
    let status = serde_json::json!({
        "apiVersion": "discus.dev/v1alpha1", "kind": "IscsiTarget",
        "status": {"iqn": "iqn.2026-11.dev.discus:lab.debian-installer", "lunCount": 1, "readyNodes": "1/1"},
    });
    targets
        .patch_status(
            "debian-installer",
            &PatchParams::apply("discus-test").force(),
            &Patch::Apply(&status),
        )
        .await
        .expect("status accepted");

    let images = ok(&plane, &["get", "dimg", "-n", "lab"]);
    let header_line = images.lines().next().expect("header");
    assert!(
        header_line
            .split_whitespace()
            .eq(["NAME", "FORMAT", "SIZE", "READY", "AGE"]),
        "{images}"
    );
    let row = images
        .lines()
        .find(|l| l.starts_with("debian-12-netinst"))
        .expect("row");
    assert!(
        row.split_whitespace()
            .take(4)
            .eq(["debian-12-netinst", "iso", "631Mi", "True"]),
        "{images}"
    );

    let targets = ok(&plane, &["get", "itgt", "-n", "lab"]);
    assert!(
        targets
            .lines()
            .next()
            .expect("header")
            .split_whitespace()
            .eq(["NAME", "IQN", "LUNS", "NODES", "READY", "READY", "AGE"]),
        "{targets}"
    );
    let row = targets
        .lines()
        .find(|l| l.starts_with("debian-installer"))
        .expect("row");
    assert!(
        row.split_whitespace().take(4).eq([
            "debian-installer",
            "iqn.2026-11.dev.discus:lab.debian-installer",
            "1",
            "1/1"
        ]),
        "{targets}"
    );

    let grants = ok(&plane, &["get", "iacc", "-n", "lab", "-o", "wide"]);
    assert!(
        grants
            .lines()
            .next()
            .expect("header")
            .split_whitespace()
            .eq([
                "NAME",
                "TARGET",
                "INITIATOR",
                "EXPIRES",
                "READY",
                "REASON",
                "AGE"
            ]),
        "{grants}"
    );
    let row = grants
        .lines()
        .find(|l| l.starts_with("laptop-debian-installer"))
        .expect("row");
    assert!(
        row.contains("debian-installer") && row.contains("2027-01-31T18:00:00Z"),
        "{grants}"
    );

    // The category lists every kind at once.
    let everything = ok(&plane, &["get", "discus", "-n", "lab", "-o", "name"]);
    for name in [
        "discimage.discus.dev/debian-12-netinst",
        "iscsitarget.discus.dev/golden",
        "initiatoraccess.discus.dev/node001-golden",
    ] {
        assert!(everything.contains(name), "{everything}");
    }
}

#[tokio::test]
async fn every_invalid_manifest_is_rejected_with_its_rule() {
    let plane = plane_with_crds().await;
    ok(&plane, &["create", "namespace", "invalid"]);
    let mut failures = Vec::new();
    for file in files_in("tests/manifests/invalid") {
        let expected = header(&file, "apiserver");
        let output = apply(&plane, "invalid", &file);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let right = if expected == "accepts" {
            // Rules only discus can check (Secrets, IQNs across objects): the apiserver accepts.
            output.status.success()
        } else {
            !output.status.success() && stderr.contains(&expected)
        };
        if !right {
            failures.push(format!(
                "{}: expected `{expected}`, got {}: {stderr}",
                file.display(),
                output.status
            ));
        }
        // Each manifest on its own: nothing it created may hide the next one's rule.
        run(
            &plane,
            &[
                "delete",
                "-n",
                "invalid",
                "--ignore-not-found",
                "-f",
                file.to_str().expect("utf-8"),
            ],
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn immutable_fields_cannot_change() {
    let plane = plane_with_crds().await;
    ok(&plane, &["create", "namespace", "updates"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for file in files_in("tests/manifests/invalid-updates") {
        let text = std::fs::read_to_string(&file).expect("read");
        let documents: Vec<&str> = text.split("\n---\n").collect();
        let [before, after] = documents.as_slice() else {
            panic!("{} needs two documents", file.display())
        };
        let (first, second) = (
            dir.path().join("before.yaml"),
            dir.path().join("after.yaml"),
        );
        std::fs::write(&first, before).expect("write");
        std::fs::write(&second, after).expect("write");
        let created = apply(&plane, "updates", &first);
        assert!(
            created.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&created.stderr)
        );
        let changed = apply(&plane, "updates", &second);
        let stderr = String::from_utf8_lossy(&changed.stderr);
        let (message, location) = (header(&file, "apiserver"), header(&file, "at"));
        if changed.status.success() || !stderr.contains(&message) || !stderr.contains(&location) {
            failures.push(format!(
                "{}: expected `{location}` and `{message}`, got: {stderr}",
                file.display()
            ));
        }
        run(
            &plane,
            &[
                "delete",
                "-n",
                "updates",
                "--ignore-not-found",
                "-f",
                first.to_str().expect("utf-8"),
            ],
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
