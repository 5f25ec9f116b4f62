//! Manifests for tests, built as values (never as escaped format strings) and written as the
//! YAML stream users write: one document per object.

use serde_json::{Value, json};

/// A discus object (`discus.dev/v1alpha1`) of `kind` with its spec.
pub fn discus(kind: &str, namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "discus.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// A Secret with `stringData`.
pub fn secret(namespace: &str, name: &str, data: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": data,
    })
}

/// Objects as one YAML stream (JSON is YAML), as a manifest file holds them.
pub fn yaml<'a>(objects: impl IntoIterator<Item = &'a Value>) -> String {
    let documents: Vec<String> = objects.into_iter().map(Value::to_string).collect();
    documents.join("\n---\n") + "\n"
}
