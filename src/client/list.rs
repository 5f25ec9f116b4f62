//! `discus connect --list`: the grants for this machine's initiator name, as the caller's own
//! credentials let it see them.

use kube::api::ListParams;
use kube::{Api, Client};
use serde::Serialize;

use super::ClientError;
use crate::api::InitiatorAccess;
use crate::api::initiator_access::InitiatorAccessStatus;
use crate::desired::object_key;

/// One grant this machine may use, for `--list`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listed {
    pub namespace: String,
    pub name: String,
    pub target: String,
    pub luns: Vec<u32>,
    pub read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub ready: bool,
    pub reason: String,
}

/// The grants for this machine's initiator name, in `namespace` or in all the caller can list.
pub async fn list(
    api: &Client,
    namespace: Option<&str>,
    initiator: &str,
) -> Result<Vec<Listed>, ClientError> {
    let grants: Api<InitiatorAccess> = match namespace {
        Some(namespace) => Api::namespaced(api.clone(), namespace),
        None => Api::all(api.clone()),
    };
    let listed =
        (grants.list(&ListParams::default()).await).map_err(|e| refused_list(&e, namespace))?;
    let mut mine: Vec<Listed> = (listed.items.iter())
        .filter(|g| g.spec.initiator_iqn == initiator)
        .map(listed_grant)
        .collect();
    mine.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(mine)
}

fn listed_grant(grant: &InitiatorAccess) -> Listed {
    let key = object_key(&grant.metadata);
    let (ready, reason) = readiness(grant.status.as_ref());
    let status_luns = (grant.status.as_ref())
        .and_then(|s| s.connection.as_ref())
        .map(|c| c.luns.iter().map(|l| l.lun).collect());
    Listed {
        namespace: key.namespace,
        name: key.name,
        target: grant.spec.target_ref.name.clone(),
        luns: (grant.spec.luns.clone())
            .or(status_luns)
            .unwrap_or_default(),
        read_only: grant.spec.read_only,
        expires_at: grant.spec.expires_at.clone(),
        ready,
        reason,
    }
}

/// Whether the grant's Ready condition is true, and its reason and message.
pub(super) fn readiness(status: Option<&InitiatorAccessStatus>) -> (bool, String) {
    let ready = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) => (c.status == "True", format!("{}: {}", c.reason, c.message)),
        None => (false, "no status yet: is an agent running?".to_owned()),
    }
}

fn refused_list(error: &kube::Error, namespace: Option<&str>) -> ClientError {
    let forbidden = matches!(error, kube::Error::Api(status) if status.code == 403);
    match (forbidden, namespace) {
        (true, Some(namespace)) => ClientError::Refused(format!(
            "403 Forbidden: this client may not list InitiatorAccesses in {namespace}; \
             `discus client-rbac GRANT -n {namespace} --allow-list` binds the role that lets it"
        )),
        (true, None) => ClientError::Refused(
            "403 Forbidden: this client may not list InitiatorAccesses in every namespace (-A): \
             that takes a ClusterRoleBinding of the discus-client ClusterRole; list one namespace \
             with -n instead"
                .to_owned(),
        ),
        (false, _) => ClientError::Api(format!("cannot list InitiatorAccesses: {error}")),
    }
}
