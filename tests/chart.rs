//! The Helm chart and what is made from it, without a cluster: `helm lint`, the values schema
//! refusing bad values files by name, the README's values table, the CRDs and deploy/ being what
//! the chart renders from crds/, every agent option reachable from values, RBAC per namespace,
//! the Argo CD health checks run by Argo CD's Lua interpreter, and the GitOps examples.
//! (tests/node.rs installs the chart on a real node.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use support::chart::{chart, documents, find, helm, render, template};
use support::{files_in, header, repo};

fn text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_saphyr::from_str(&text(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn helm_lint_passes_with_the_defaults_and_with_every_option_set() {
    let all = repo().join("tests/charts/all-options.yaml");
    for extra in [
        vec![],
        vec!["--values".to_owned(), all.display().to_string()],
    ] {
        let output = helm()
            .args(["lint", "--strict"])
            .arg(chart())
            .args(&extra)
            .output()
            .expect("helm runs");
        assert!(
            output.status.success(),
            "helm lint {extra:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_values_schema_refuses_bad_values_files_and_names_the_key() {
    let files = files_in("tests/charts/bad-values");
    assert!(files.len() >= 8, "{files:?}");
    for file in files {
        let wanted = header(&file, "error");
        let output = template(&["--values", &file.display().to_string()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{} was accepted", file.display());
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                && stderr.contains(&wanted),
            "{}: wanted an error naming {wanted:?}, got: {stderr}",
            file.display()
        );
    }
}

#[test]
fn the_readme_values_table_is_values_yaml() {
    let values = yaml(&chart().join("values.yaml"));
    let schema: Value =
        serde_json::from_str(&text(&chart().join("values.schema.json"))).expect("schema");
    let mut expected = BTreeMap::new();
    flatten(&values, &schema, "", &mut expected);
    let readme = text(&chart().join("README.md"));
    let mut table = BTreeMap::new();
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = cells[0]
            .trim_start_matches("| ")
            .trim_matches('`')
            .to_owned();
        let default: Value = serde_json::from_str(cells[1].trim_matches('`'))
            .unwrap_or_else(|e| panic!("README: {key}: the default is not JSON: {e}"));
        assert!(
            cells
                .get(2)
                .is_some_and(|d| d.trim_end_matches(" |").trim().len() > 3),
            "README: {key} has no description"
        );
        table.insert(key, default);
    }
    for (key, default) in &expected {
        assert_eq!(
            table.get(key),
            Some(default),
            "charts/discus/README.md: row `{key}` must say `{default}` (values.yaml)"
        );
    }
    let extra: Vec<&String> = table
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        extra.is_empty(),
        "README rows not in values.yaml: {extra:?}"
    );
}

/// values.yaml's keys as the README lists them: one row per key, except mappings whose keys are
/// exactly those the schema declares (such as `agent`), which get a row per key inside.
fn flatten(value: &Value, schema: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    let declared: Vec<&String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().filter(|k| *k != "global").collect())
        .unwrap_or_default();
    match value.as_object() {
        Some(map)
            if !map.is_empty() && {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                let mut declared = declared.clone();
                declared.sort();
                keys == declared
            } =>
        {
            for (key, inner) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(inner, &schema["properties"][key], &path, out);
            }
        }
        _ => {
            assert!(
                !prefix.is_empty(),
                "values.yaml and values.schema.json must declare the same top-level keys"
            );
            out.insert(prefix.to_owned(), value.clone());
        }
    }
}

#[test]
fn the_chart_renders_the_crds_of_crds_and_keeps_them() {
    let crds = text(&repo().join("crds/discus.yaml"));
    assert_eq!(
        text(&chart().join("files/crds.yaml")),
        crds,
        "charts/discus/files/crds.yaml is stale: run `make crds` and commit it"
    );
    let source = documents(&crds);
    let rendered = render(&[]);
    let mut crds_rendered: Vec<Value> = find(&rendered, "CustomResourceDefinition", None)
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(crds_rendered.len(), source.len());
    for crd in &mut crds_rendered {
        let meta = crd["metadata"].as_object_mut().expect("metadata");
        assert_eq!(
            meta["annotations"]["helm.sh/resource-policy"], "keep",
            "{meta:?}"
        );
        assert_eq!(meta["labels"]["app.kubernetes.io/part-of"], "discus");
        meta.remove("annotations");
        meta.remove("labels");
    }
    assert_eq!(
        crds_rendered, source,
        "the chart changes the CRDs it renders"
    );

    let without = render(&["--set", "crds.install=false"]);
    assert!(find(&without, "CustomResourceDefinition", None).is_empty());
    let unkept = render(&["--set", "crds.keep=false"]);
    for crd in find(&unkept, "CustomResourceDefinition", None) {
        assert!(crd.pointer("/metadata/annotations").is_none(), "{crd:#}");
    }
}

#[test]
fn deploy_is_what_the_chart_renders() {
    let out = tempfile::tempdir().expect("tempdir");
    let status = Command::new(repo().join("tools/render-deploy"))
        .arg(out.path())
        .env("DISCUS_CONTROL_PLANE", support::control_plane::bin_dir())
        .status()
        .expect("tools/render-deploy runs");
    assert!(status.success(), "tools/render-deploy failed");
    for file in [
        "discus.yaml",
        "rbac/agent.yaml",
        "rbac/namespace.yaml",
        "rbac/all-namespaces.yaml",
    ] {
        assert_eq!(
            text(&out.path().join(file)),
            text(&repo().join("deploy").join(file)),
            "deploy/{file} is stale: run `make deploy` and commit it"
        );
    }
    let kustomization = yaml(&repo().join("deploy/kustomization.yaml"));
    assert_eq!(kustomization["resources"], json!(["discus.yaml"]));
}

/// `--name` of every option `discus agent --help` lists.
fn agent_options() -> Vec<String> {
    let output = support::discus()
        .args(["agent", "--help"])
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&output.stdout);
    let mut options: Vec<String> = help
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix("-h, ").unwrap_or(l);
            l.strip_prefix("--")?
                .split([' ', '=', '<'])
                .next()
                .map(str::to_owned)
        })
        .filter(|o| o != "help")
        .collect();
    options.sort();
    options.dedup();
    options
}

#[test]
fn every_agent_option_is_a_value_of_the_chart() {
    let all = repo().join("tests/charts/all-options.yaml");
    let rendered = render(&["--values", &all.display().to_string()]);
    let daemonset = find(&rendered, "DaemonSet", None)[0];
    let agent = &daemonset
        .pointer("/spec/template/spec/containers/0")
        .expect("agent");
    let args: Vec<&str> = agent["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let env: Vec<&str> = agent["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    // The three options a DaemonSet sets from the Pod's own facts take them from the environment.
    let from_env = [
        ("node-name", "NODE_NAME"),
        ("lease-namespace", "POD_NAMESPACE"),
        ("namespaces", "DISCUS_NAMESPACES"),
    ];
    for option in agent_options() {
        if let Some((_, variable)) = from_env.iter().find(|(o, _)| *o == option) {
            assert!(
                env.contains(variable),
                "{option}: {variable} not in {env:?}"
            );
            continue;
        }
        let flag = format!("--{option}");
        assert!(
            args.iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}="))),
            "`discus agent {flag}` is not set by any chart value: {args:?}"
        );
    }
    assert_eq!(args[0], "agent");
    assert!(args.contains(&"--file-root=/srv/images"), "{args:?}");
    assert!(args.contains(&"--http-address=[::]:9464"), "{args:?}");
    assert!(args.contains(&"--boot-address=[::]:8090"), "{args:?}");
    assert!(args.contains(&"--upload-listen=[::]:8443"), "{args:?}");
    assert_eq!(
        agent.pointer("/ports/1"),
        Some(&json!({"name": "boot", "containerPort": 8090, "protocol": "TCP"}))
    );
    let init = daemonset
        .pointer("/spec/template/spec/initContainers/0/command")
        .expect("init");
    assert_eq!(init[0], "modprobe");
    // Probes and the security context the issue of the agent needs.
    let spec = daemonset.pointer("/spec/template/spec").expect("spec");
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(agent["securityContext"]["privileged"], true);
    assert_eq!(
        agent.pointer("/livenessProbe/httpGet/path"),
        Some(&json!("/healthz"))
    );
    assert_eq!(
        agent.pointer("/readinessProbe/httpGet/path"),
        Some(&json!("/readyz"))
    );
    assert_eq!(
        daemonset.pointer("/spec/updateStrategy/rollingUpdate/maxSurge"),
        Some(&json!(0))
    );
}

#[test]
fn the_agent_is_bound_in_each_namespace_it_watches_or_cluster_wide() {
    let everywhere = render(&[]);
    assert_eq!(
        find(
            &everywhere,
            "ClusterRoleBinding",
            Some("discus-agent-namespaced")
        )
        .len(),
        1
    );
    assert!(find(&everywhere, "RoleBinding", Some("discus-agent-namespaced")).is_empty());

    let some = render(&["--set", "agent.namespaces={lab,builds}"]);
    assert!(find(&some, "ClusterRoleBinding", Some("discus-agent-namespaced")).is_empty());
    let bindings = find(&some, "RoleBinding", Some("discus-agent-namespaced"));
    let namespaces: Vec<&Value> = bindings
        .iter()
        .map(|b| &b["metadata"]["namespace"])
        .collect();
    assert_eq!(namespaces, [&json!("lab"), &json!("builds")]);
    for binding in bindings {
        assert_eq!(binding["roleRef"]["name"], "discus-agent-namespaced");
        assert_eq!(
            binding["subjects"][0],
            json!({"kind": "ServiceAccount", "name": "discus-agent", "namespace": "discus-system"})
        );
    }
    // People's roles join view, edit and admin.
    let view = find(&everywhere, "ClusterRole", Some("discus-view"))[0];
    let edit = find(&everywhere, "ClusterRole", Some("discus-edit"))[0];
    for label in ["view", "edit", "admin"] {
        assert_eq!(
            view["metadata"]["labels"][format!("rbac.authorization.k8s.io/aggregate-to-{label}")],
            "true"
        );
    }
    for label in ["edit", "admin"] {
        assert_eq!(
            edit["metadata"]["labels"][format!("rbac.authorization.k8s.io/aggregate-to-{label}")],
            "true"
        );
    }
    let none = render(&[
        "--set",
        "rbac.create=false",
        "--set",
        "rbac.aggregateToDefaultRoles=false",
    ]);
    assert!(
        find(&none, "ClusterRole", None).is_empty() && find(&none, "RoleBinding", None).is_empty()
    );
}

#[test]
fn monitors_are_rendered_only_when_enabled() {
    let defaults = render(&[]);
    for kind in ["ServiceMonitor", "PodMonitor", "Service"] {
        assert!(find(&defaults, kind, None).is_empty(), "{kind} by default");
    }
    let both = render(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.labels.release=prometheus",
    ]);
    assert_eq!(find(&both, "ServiceMonitor", None).len(), 1);
    let pod_monitor = find(&both, "PodMonitor", None)[0];
    assert_eq!(pod_monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        pod_monitor.pointer("/spec/podMetricsEndpoints/0/port"),
        Some(&json!("metrics"))
    );
    let service = find(&both, "Service", None)[0];
    assert_eq!(service["spec"]["clusterIP"], "None");
}

#[test]
fn argo_cd_health_checks_pass_their_cases() {
    let argo = support::control_plane::bin_dir().join("argo-health");
    let mut cases = 0;
    for kind in ["DiscImage", "IscsiTarget", "InitiatorAccess"] {
        let dir = repo().join("deploy/argocd/discus.dev").join(kind);
        let tests = yaml(&dir.join("health_test.yaml"));
        let mut covered = Vec::new();
        for case in tests["tests"].as_array().expect("tests") {
            let input = dir.join(case["inputPath"].as_str().expect("inputPath"));
            let object = yaml(&input);
            assert_eq!(object["kind"], kind, "{}", input.display());
            let mut run = Command::new(&argo)
                .arg(dir.join("health.lua"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("argo-health runs");
            use std::io::Write;
            run.stdin
                .take()
                .expect("stdin")
                .write_all(object.to_string().as_bytes())
                .expect("write");
            let output = run.wait_with_output().expect("argo-health");
            assert!(
                output.status.success(),
                "{}: {}",
                input.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            let health: Value = serde_json::from_slice(&output.stdout).expect("health JSON");
            assert_eq!(health, case["healthStatus"], "{kind}: {}", input.display());
            covered.push(
                input
                    .file_stem()
                    .expect("stem")
                    .to_string_lossy()
                    .into_owned(),
            );
            cases += 1;
        }
        for wanted in [
            "ready",
            "progressing",
            "stalled",
            "no-status",
            "old-generation",
        ] {
            assert!(
                covered.iter().any(|c| c == wanted),
                "{kind} has no `{wanted}` case"
            );
        }
    }
    assert!(cases >= 16);
    // The argocd-cm example carries these very scripts.
    let cm = yaml(&repo().join("examples/gitops/argocd/argocd-cm.yaml"));
    for kind in ["DiscImage", "IscsiTarget", "InitiatorAccess"] {
        let script = text(
            &repo()
                .join("deploy/argocd/discus.dev")
                .join(kind)
                .join("health.lua"),
        );
        assert_eq!(
            cm["data"][format!("resource.customizations.health.discus.dev_{kind}")],
            script,
            "examples/gitops/argocd/argocd-cm.yaml must carry deploy/argocd/discus.dev/{kind}/health.lua as it is"
        );
    }
}

#[test]
fn the_gitops_examples_install_the_chart_with_values_it_accepts() {
    let dir = repo().join("examples/gitops");
    let application = yaml(&dir.join("argocd/application.yaml"));
    assert_eq!(
        application.pointer("/spec/source/path"),
        Some(&json!("charts/discus"))
    );
    let release = documents(&text(&dir.join("flux/helmrelease.yaml")));
    let helm_release = release
        .iter()
        .find(|d| d["kind"] == "HelmRelease")
        .expect("HelmRelease");
    assert_eq!(
        helm_release.pointer("/spec/chart/spec/chart"),
        Some(&json!("./charts/discus"))
    );
    for values in [
        application
            .pointer("/spec/source/helm/valuesObject")
            .expect("valuesObject"),
        helm_release.pointer("/spec/values").expect("values"),
    ] {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(file.path(), values.to_string()).expect("write");
        render(&["--values", &file.path().display().to_string()]);
    }
    for document in documents(&text(&dir.join("flux/kustomization.yaml"))) {
        let path = document
            .pointer("/spec/path")
            .and_then(Value::as_str)
            .expect("path");
        if document.pointer("/spec/sourceRef/name") == Some(&json!("discus")) {
            assert!(
                repo().join(path).join("kustomization.yaml").exists(),
                "{path}"
            );
        }
    }
}

#[test]
fn versions_agree() {
    let version = env!("CARGO_PKG_VERSION");
    let chart_yaml = yaml(&chart().join("Chart.yaml"));
    assert_eq!(chart_yaml["appVersion"], version, "Chart.yaml appVersion");
    assert!(
        text(&repo().join("Dockerfile")).contains(&format!("ARG VERSION={version}\n")),
        "the Dockerfile's VERSION default must be {version}"
    );
}
