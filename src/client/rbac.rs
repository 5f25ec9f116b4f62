//! `discus client-rbac`: the least rights one client needs for one grant, as manifests an
//! administrator applies.
//!
//! A Role limited by `resourceNames` to the grant, its CHAP Secret and its heartbeat Lease, so
//! that one client can never read another's secret; when asked (`--allow-list`), a binding of the
//! chart's client ClusterRole (`get`, `list`, `watch` of InitiatorAccesses) in the grant's
//! namespace for `discus connect --list`, which shows the client every grant's initiator name
//! there; and, for a grant held by heartbeat, the Lease itself: RBAC cannot let a client create
//! one object by name, so the administrator creates it and the client only renews it.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::ClientError;
use crate::api::InitiatorAccess;
use crate::api::initiator_access::GRANT_HEARTBEAT_LABEL;
use crate::api::rules;
use crate::desired::object_key;

/// The default name of the chart's ClusterRole for clients.
pub const CLIENT_CLUSTER_ROLE: &str = "discus-client";

/// Who the rights are for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    ServiceAccount { namespace: String, name: String },
    User(String),
    Group(String),
}

impl Subject {
    /// `namespace:name`, as `kubectl create rolebinding --serviceaccount` takes it.
    pub fn service_account(text: &str) -> Result<Self, String> {
        let (namespace, name) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?}: must be namespace:name"))?;
        for part in [namespace, name] {
            rules::object_name(part).map_err(|e| format!("{text:?}: {part:?} {e}"))?;
        }
        Ok(Self::ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    fn to_json(&self) -> Value {
        match self {
            Self::ServiceAccount { namespace, name } => {
                json!({"kind": "ServiceAccount", "name": name, "namespace": namespace})
            }
            Self::User(name) => {
                json!({"kind": "User", "name": name, "apiGroup": "rbac.authorization.k8s.io"})
            }
            Self::Group(name) => {
                json!({"kind": "Group", "name": name, "apiGroup": "rbac.authorization.k8s.io"})
            }
        }
    }
}

/// What to grant beyond the grant's own objects.
#[derive(Clone, Debug, Default)]
pub struct Options<'a> {
    /// Bind this ClusterRole (the chart's client role) in the grant's namespace, for
    /// `discus connect --list`.
    pub cluster_role: Option<&'a str>,
}

/// The manifests, in the order to apply them.
pub fn manifests(
    grant: &InitiatorAccess,
    subject: &Subject,
    options: &Options<'_>,
) -> Result<Vec<Value>, ClientError> {
    let key = object_key(&grant.metadata);
    rules::object_name(&key.name)
        .map_err(|e| ClientError::Refused(format!("InitiatorAccess name {e}")))?;
    let role = role_name(&key.name);
    let meta = |name: &str| {
        json!({
            "name": name,
            "namespace": key.namespace,
            "labels": {"app.kubernetes.io/part-of": "discus", "app.kubernetes.io/component": "client"},
            "annotations": {"discus.dev/grant": key.name},
        })
    };
    let mut rules = vec![json!({
        "apiGroups": ["discus.dev"], "resources": ["initiatoraccesses"],
        "resourceNames": [key.name], "verbs": ["get", "watch"],
    })];
    if let Some(chap) = &grant.spec.chap {
        rules.push(json!({
            "apiGroups": [""], "resources": ["secrets"],
            "resourceNames": [chap.secret_ref.name], "verbs": ["get"],
        }));
    }
    let held = grant.spec.heartbeat.is_some();
    if held {
        rules.push(json!({
            "apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
            "resourceNames": [key.name], "verbs": ["get", "patch", "update"],
        }));
    }
    let mut objects = vec![
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(&role), "rules": rules}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(&role),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [subject.to_json()],
        }),
    ];
    if let Some(cluster_role) = options.cluster_role {
        objects.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": meta(&format!("{role}-list")),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
            "subjects": [subject.to_json()],
        }));
    }
    if held {
        let mut lease = meta(&key.name);
        lease["labels"][GRANT_HEARTBEAT_LABEL] = json!("");
        objects.push(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": lease, "spec": {},
        }));
    }
    Ok(objects)
}

/// `discus-client-<grant>`, or with a hash of the grant's name in place of a name too long.
fn role_name(grant: &str) -> String {
    let name = format!("discus-client-{grant}");
    // Room for "-list" in the binding's name.
    if name.len() + 5 <= rules::DNS_SUBDOMAIN_MAX_BYTES {
        name
    } else {
        let hash = hex::encode(Sha256::digest(grant.as_bytes()));
        format!("discus-client-{}", &hash[..16])
    }
}

/// The manifests as one multi-document YAML stream.
pub fn to_yaml(objects: &[Value]) -> Result<String, ClientError> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        let yaml = serde_saphyr::to_string(object)
            .map_err(|e| ClientError::Api(format!("cannot render YAML: {e}")))?;
        out.push_str(&yaml);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(spec: Value) -> InitiatorAccess {
        serde_json::from_value(json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "InitiatorAccess",
            "metadata": {"name": "web-1", "namespace": "lab"},
            "spec": spec,
        }))
        .expect("grant")
    }

    fn rule_of<'a>(objects: &'a [Value], resource: &str) -> Option<&'a Value> {
        objects[0]["rules"]
            .as_array()?
            .iter()
            .find(|r| r["resources"][0] == resource)
    }

    #[test]
    fn a_client_may_read_its_own_grant_secret_and_lease_and_nothing_else_by_name() {
        let held = grant(json!({
            "targetRef": {"name": "debian"}, "initiatorIqn": "iqn.2026-11.dev.discus:web-1",
            "chap": {"secretRef": {"name": "web-1-chap"}}, "heartbeat": {"graceSeconds": 30},
        }));
        let subject = Subject::service_account("clients:web-1").expect("subject");
        let options = Options {
            cluster_role: Some(CLIENT_CLUSTER_ROLE),
        };
        let objects = manifests(&held, &subject, &options).expect("manifests");
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(kinds, ["Role", "RoleBinding", "RoleBinding", "Lease"]);
        assert_eq!(objects[0]["metadata"]["name"], "discus-client-web-1");
        let secret = rule_of(&objects, "secrets").expect("secret rule");
        assert_eq!(secret["resourceNames"], json!(["web-1-chap"]));
        assert_eq!(secret["verbs"], json!(["get"]));
        let lease = rule_of(&objects, "leases").expect("lease rule");
        assert_eq!(lease["resourceNames"], json!(["web-1"]));
        assert!(
            !lease["verbs"]
                .as_array()
                .expect("verbs")
                .contains(&json!("create"))
        );
        // Every rule names its objects.
        for rule in objects[0]["rules"].as_array().expect("rules") {
            assert!(
                rule["resourceNames"]
                    .as_array()
                    .is_some_and(|n| n.len() == 1),
                "{rule}"
            );
        }
        assert_eq!(
            objects[1]["subjects"][0],
            json!({"kind": "ServiceAccount", "name": "web-1", "namespace": "clients"})
        );
        assert_eq!(objects[2]["roleRef"]["name"], CLIENT_CLUSTER_ROLE);
        assert_eq!(objects[3]["metadata"]["labels"][GRANT_HEARTBEAT_LABEL], "");
        let yaml = to_yaml(&objects).expect("yaml");
        assert_eq!(yaml.matches("---\n").count(), 4);
    }

    #[test]
    fn without_chap_or_heartbeat_there_is_no_secret_rule_and_no_lease() {
        let plain = grant(
            json!({"targetRef": {"name": "debian"}, "initiatorIqn": "iqn.2026-11.dev.discus:web-1"}),
        );
        let objects = manifests(&plain, &Subject::User("alice".into()), &Options::default())
            .expect("manifests");
        // Without --allow-list, no binding that shows other grants.
        assert_eq!(objects.len(), 2);
        assert!(rule_of(&objects, "secrets").is_none() && rule_of(&objects, "leases").is_none());
    }

    #[test]
    fn a_service_account_is_namespace_and_name() {
        assert!(Subject::service_account("web-1").is_err());
        assert!(Subject::service_account("clients:Web_1").is_err());
        assert!(role_name(&"a".repeat(250)).len() <= 253 - 5);
    }
}
