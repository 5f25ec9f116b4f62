//! The Helm chart (charts/discus) as the tests see it: `helm` built from tools/k8s, run offline
//! with its caches in a directory of the test's, and the chart rendered into documents.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

/// The chart's directory.
pub fn chart() -> PathBuf {
    super::repo().join("charts/discus")
}

/// `helm`, with nothing written outside the test's own directory.
pub fn helm() -> Command {
    static HOME: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let home = HOME.get_or_init(|| tempfile::tempdir().expect("helm home"));
    let mut command = Command::new(super::control_plane::bin_dir().join("helm"));
    command
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"));
    command
}

/// `helm template discus charts/discus -n discus-system ARGS`, as it ran.
pub fn template(args: &[&str]) -> Output {
    helm()
        .args(["template", "discus"])
        .arg(chart())
        .args(["--namespace", "discus-system"])
        .args(args)
        .output()
        .expect("helm runs")
}

/// The documents the chart renders with `args`; fails the test when it does not render.
pub fn render(args: &[&str]) -> Vec<Value> {
    let output = template(args);
    assert!(
        output.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    documents(&String::from_utf8_lossy(&output.stdout))
}

/// The non-empty documents of a multi-document YAML text.
pub fn documents(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .expect("YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// The documents of `kind` (and `name`, if given).
pub fn find<'a>(documents: &'a [Value], kind: &str, name: Option<&str>) -> Vec<&'a Value> {
    documents
        .iter()
        .filter(|d| d["kind"] == kind)
        .filter(|d| name.is_none_or(|n| d.pointer("/metadata/name") == Some(&Value::from(n))))
        .collect()
}
