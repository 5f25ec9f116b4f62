//! Least privilege, from the apiserver's audit log: what roles grant against what a user's
//! requests used, as (apiGroup, resource[/subresource], verb).

use std::collections::BTreeSet;

use serde_json::Value;

pub type Permission = (String, String, String);

/// Every permission the Roles and ClusterRoles among `documents` grant.
pub fn granted(documents: &[Value]) -> BTreeSet<Permission> {
    let mut granted = BTreeSet::new();
    for document in documents
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("ClusterRole" | "Role")))
    {
        for rule in document["rules"].as_array().into_iter().flatten() {
            let each = |key: &str| -> Vec<String> {
                rule[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap_or_default().to_owned())
                    .collect()
            };
            for group in each("apiGroups") {
                for resource in each("resources") {
                    for verb in each("verbs") {
                        granted.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    granted
}

/// What audit events (requests) used.
pub fn used(requests: &[Value]) -> BTreeSet<Permission> {
    requests
        .iter()
        .filter_map(|e| {
            let resource = e.pointer("/objectRef/resource")?.as_str()?;
            let resource = match e.pointer("/objectRef/subresource").and_then(Value::as_str) {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.to_owned(),
            };
            Some((
                e.pointer("/objectRef/apiGroup")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                resource,
                e["verb"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// Requests the apiserver refused (403).
pub fn refused(requests: &[Value]) -> Vec<&Value> {
    requests
        .iter()
        .filter(|e| e.pointer("/responseStatus/code") == Some(&Value::from(403)))
        .collect()
}
