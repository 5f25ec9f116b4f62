//! Least privilege, from the apiserver's audit log: what roles grant against what a user's
//! requests used, as (apiGroup, resource[/subresource], verb).

use std::collections::BTreeSet;

use serde_json::{Value, json};

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

/// What audit events (requests) used. A server-side apply that created its object (201) needed
/// the right to create as well as to patch.
pub fn used(requests: &[Value]) -> BTreeSet<Permission> {
    let mut used = BTreeSet::new();
    for e in requests {
        let Some(resource) = e.pointer("/objectRef/resource").and_then(Value::as_str) else {
            continue;
        };
        let resource = match e.pointer("/objectRef/subresource").and_then(Value::as_str) {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_owned(),
        };
        let group = (e.pointer("/objectRef/apiGroup").and_then(Value::as_str)).unwrap_or_default();
        let Some(verb) = e["verb"].as_str() else {
            continue;
        };
        let created = verb == "patch" && e.pointer("/responseStatus/code") == Some(&json!(201));
        if created {
            used.insert((group.to_owned(), resource.clone(), "create".to_owned()));
        }
        used.insert((group.to_owned(), resource, verb.to_owned()));
    }
    used
}

/// Rights a test's cluster does not use and another test proves: deleting a node's reports,
/// which a node does when its count of shards changes and the lease holder when a node is gone
/// (`lost_nodes_are_marked_then_pruned_and_a_dead_leader_is_replaced` waits for it).
pub fn proven_elsewhere() -> BTreeSet<Permission> {
    BTreeSet::from([(String::new(), "configmaps".to_owned(), "delete".to_owned())])
}

/// Requests the apiserver refused (403).
pub fn refused(requests: &[Value]) -> Vec<&Value> {
    requests
        .iter()
        .filter(|e| e.pointer("/responseStatus/code") == Some(&Value::from(403)))
        .collect()
}
