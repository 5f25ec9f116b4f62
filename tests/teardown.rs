//! `discus teardown` on tgt: after discus is gone its tgtd keeps serving (a stopped agent never
//! cuts initiators off), and teardown removes every target discus made there, and nothing else;
//! it stops discus's tgtd once that holds nothing, and starts nothing. (tests/lio.rs does the same
//! on LIO in a real kernel.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use support::cluster::demo_host;
use support::sandbox::Sandbox;

const DISCUS: &str = env!("CARGO_BIN_EXE_discus");
const DEMO_IQN: &str = "iqn.2026-11.dev.discus:demo";
const FOREIGN_IQN: &str = "iqn.2026-01.com.example:not-discus";

fn tgtadm(sandbox: &Sandbox, args: &[&str]) -> std::process::Output {
    sandbox
        .command("tgtadm")
        .args(["-C", "3261", "--lld", "iscsi"])
        .args(args)
        .output()
        .expect("tgtadm runs")
}

fn targets(sandbox: &Sandbox) -> String {
    let output = tgtadm(sandbox, &["--mode", "target", "--op", "show"]);
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn teardown(sandbox: &Sandbox, no_configfs: &str) -> String {
    // An empty configfs root: the test must never touch a LIO of the machine it runs on.
    sandbox.must(&[
        DISCUS,
        "teardown",
        "--data-dir",
        "/var/lib/discus",
        "--configfs",
        no_configfs,
    ])
}

#[test]
fn teardown_removes_what_discus_left_in_tgtd_and_nothing_else() {
    let sandbox = demo_host();
    let manifests = sandbox.scratch("manifests");
    let no_configfs = sandbox.scratch("no-configfs").display().to_string();
    std::fs::copy(
        support::repo().join("examples/standalone/demo.yaml"),
        manifests.join("demo.yaml"),
    )
    .expect("demo");
    sandbox.must(&[
        DISCUS,
        "serve",
        "--once",
        "--manifests",
        &manifests.display().to_string(),
        "--data-dir",
        "/var/lib/discus",
        "--backend",
        "tgt",
        "--address",
        "127.0.0.1",
        "--file-root",
        "/var/lib/discus/demo",
    ]);
    // discus has exited; its tgtd serves on, beside a target someone else made in it.
    let created = tgtadm(
        &sandbox,
        &[
            "--mode",
            "target",
            "--op",
            "new",
            "--tid",
            "100",
            "-T",
            FOREIGN_IQN,
        ],
    );
    assert!(created.status.success(), "{created:?}");
    let before = targets(&sandbox);
    assert!(
        before.contains(DEMO_IQN) && before.contains(FOREIGN_IQN),
        "{before}"
    );

    let said = teardown(&sandbox, &no_configfs);
    assert!(
        said.contains("lio: ") && said.contains("nothing to remove"),
        "{said}"
    );
    assert!(said.contains("tgt: removed"), "{said}");
    assert!(said.contains("keeps running"), "{said}");
    let after = targets(&sandbox);
    assert!(!after.contains(DEMO_IQN), "{said}\n{after}");
    assert!(after.contains(FOREIGN_IQN), "{after}");

    // Once nothing else is in it, teardown stops discus's tgtd; then there is nothing to do.
    let removed = tgtadm(
        &sandbox,
        &["--mode", "target", "--op", "delete", "--tid", "100"],
    );
    assert!(removed.status.success(), "{removed:?}");
    let said = teardown(&sandbox, &no_configfs);
    assert!(said.contains("stopped discus's tgtd"), "{said}");
    let gone = tgtadm(&sandbox, &["--mode", "system", "--op", "show"]);
    assert!(!gone.status.success(), "tgtd still answers");
    let said = teardown(&sandbox, &no_configfs);
    assert!(said.contains("no tgtd answers"), "{said}");
    let still = tgtadm(&sandbox, &["--mode", "system", "--op", "show"]);
    assert!(!still.status.success(), "teardown started a tgtd");
}
