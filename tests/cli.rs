//! The `discus` command as users run it: `crds` matches `crds/`, `validate` accepts the examples
//! and refuses every invalid manifest with the rule's message.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use support::{discus, files_in, header, repo};

#[test]
fn crds_in_the_repository_are_what_discus_crds_prints() {
    let output = discus().arg("crds").output().expect("runs");
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).expect("utf-8");
    let checked_in =
        std::fs::read_to_string(repo().join("crds/discus.yaml")).expect("crds/discus.yaml");
    assert!(
        printed == checked_in,
        "crds/discus.yaml is stale: run `cargo run -- crds > crds/discus.yaml` and commit it"
    );
}

#[test]
fn crds_carry_the_markers_that_per_node_status_and_kubectl_need() {
    let crds = discus::api::all_crds();
    for crd in &crds {
        let json = serde_json::to_value(crd).expect("json");
        let version = &json["spec"]["versions"][0];
        let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
        assert_eq!(
            status["nodes"]["x-kubernetes-list-type"], "map",
            "{}",
            crd.spec.names.kind
        );
        assert_eq!(
            status["nodes"]["x-kubernetes-list-map-keys"],
            serde_json::json!(["node"])
        );
        assert_eq!(
            status["nodes"]["items"]["required"]
                .as_array()
                .map(|r| r.contains(&"node".into())),
            Some(true)
        );
        assert_eq!(
            status["conditions"]["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
        assert_eq!(version["subresources"]["status"], serde_json::json!({}));
        assert_eq!(
            json["spec"]["names"]["categories"],
            serde_json::json!(["discus"])
        );
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .expect("columns")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert!(
            columns.contains(&"Ready") && columns.contains(&"Age"),
            "{columns:?}"
        );
    }
    let short: Vec<_> = crds
        .iter()
        .map(|c| c.spec.names.short_names.clone().unwrap_or_default())
        .collect();
    assert_eq!(short, [vec!["dimg"], vec!["itgt"], vec!["iacc"]]);
}

#[test]
fn the_examples_are_valid() {
    let output = discus()
        .args(["validate", "-f"])
        .arg(repo().join("examples"))
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "examples are invalid:\n{stdout}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("all valid"));
}

#[test]
fn every_invalid_manifest_is_refused_with_its_rule() {
    let files = files_in("tests/manifests/invalid");
    assert!(files.len() >= 40, "one manifest per rule");
    let mut failures = Vec::new();
    for file in &files {
        let expected = header(file, "discus");
        let output = discus()
            .args(["validate", "-f"])
            .arg(file)
            .output()
            .expect("runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let prefix = format!("{}: ", file.display());
        let named = stdout.lines().all(|l| l.starts_with(&prefix));
        if output.status.code() != Some(1) || !stdout.contains(&expected) || !named {
            failures.push(format!(
                "{}: expected exit 1 and `{expected}`, got {} and:\n{stdout}",
                file.display(),
                output.status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn validate_reads_folders_recursively_and_reports_every_file() {
    let output = discus()
        .args(["validate", "-f"])
        .arg(repo().join("examples"))
        .arg(repo().join("tests/manifests/invalid"))
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let files: std::collections::BTreeSet<_> = stdout
        .lines()
        .filter_map(|l| l.split(": ").next())
        .collect();
    assert!(files.len() >= 40, "{files:?}");
}

#[test]
fn unreadable_or_broken_files_are_reported_not_panicked_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, "apiVersion: v1\nkind: [unclosed\n").expect("write");
    let output = discus()
        .args(["validate", "-f"])
        .arg(&broken)
        .arg(dir.path().join("missing.yaml"))
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let missing = dir.path().join("missing.yaml");
    assert!(
        stdout.contains(&format!("{}: cannot read", missing.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{}: not YAML", broken.display())),
        "{stdout}"
    );
}

#[test]
fn a_name_cannot_forge_a_line_of_validate_s_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("forged.yaml");
    std::fs::write(
        &file,
        "apiVersion: discus.dev/v1alpha1\nkind: DiscImage\n\
         metadata: {name: \"a\\nFORGED: all good\", namespace: \"lab\\r\"}\n\
         spec: {source: {file: {path: /a}}, sha256: 0000000000000000000000000000000000000000000000000000000000000000}\n",
    )
    .expect("write");
    let output = discus()
        .args(["validate", "--filename"])
        .arg(&file)
        .output()
        .expect("runs");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{printed}");
    assert!(
        printed.lines().all(|line| !line.starts_with("FORGED")) && !printed.contains('\r'),
        "{printed}"
    );
    assert!(printed.contains("a\\nFORGED"), "shown escaped: {printed}");
}

/// The binary has the allocator's settings of .cargo/config.toml built in (a build that missed
/// them would keep freed memory ten seconds in eight arenas: docs/performance.md). jemalloc says
/// what it runs with when asked to print its statistics at exit.
#[cfg(feature = "jemalloc")]
#[test]
fn the_allocator_runs_with_the_settings_of_the_repository() {
    let config = std::fs::read_to_string(repo().join(".cargo/config.toml")).expect("config");
    let built_in = (config.lines())
        .find_map(|line| line.strip_prefix("JEMALLOC_SYS_WITH_MALLOC_CONF = "))
        .expect("JEMALLOC_SYS_WITH_MALLOC_CONF in .cargo/config.toml");
    let output = (discus().arg("--version"))
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .expect("runs");
    assert!(output.status.success());
    let stats = String::from_utf8_lossy(&output.stderr);
    assert!(
        stats.contains(&format!("config.malloc_conf: {built_in}")),
        "jemalloc's settings, not those of .cargo/config.toml ({built_in}):\n{stats}"
    );
    // …and took them (a setting jemalloc could not read would be left at its default).
    assert!(stats.contains("opt.background_thread: true"), "{stats}");
}
