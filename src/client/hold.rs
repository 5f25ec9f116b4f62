//! `discus hold`: keeps a grant held by heartbeat (`spec.heartbeat`) by renewing its Lease.
//!
//! The Lease is named after the grant, in its namespace; an administrator creates it (`discus
//! client-rbac` prints it), because RBAC cannot let a client create one object by name only. The
//! holder renews it every third of the grace, and at least every 10 s: a node that restarts
//! counts renewals only from the first it sees, so frequent renewals keep that gap short. Each
//! renewal has until the next to get through, so that one lost renewal never ends access.
//! Interrupted, it releases the Lease (no renew time): every node ends access at once instead of
//! after the grace.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use super::{ClientError, explain};
use crate::api::InitiatorAccess;
use crate::api::rules;
use crate::desired::ObjectKey;

/// How long a failed renewal waits before the next try, at first (doubling up to the period).
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest time between two renewals.
const MAX_PERIOD: Duration = Duration::from_secs(10);

/// The grace of a grant held by heartbeat, read from the apiserver.
pub async fn grace_of(client: &Client, grant: &ObjectKey) -> Result<Duration, ClientError> {
    let api: Api<InitiatorAccess> = Api::namespaced(client.clone(), &grant.namespace);
    let object =
        (api.get(&grant.name).await).map_err(|e| explain(&e, "get", "InitiatorAccess", grant))?;
    let heartbeat = object.spec.heartbeat.ok_or_else(|| {
        ClientError::Refused(format!(
            "InitiatorAccess {grant} has no spec.heartbeat: its access is not held by \
             heartbeat, so there is nothing to renew"
        ))
    })?;
    rules::grace_seconds(heartbeat.grace_seconds).map_err(|e| {
        ClientError::Refused(format!(
            "InitiatorAccess {grant}: spec.heartbeat.graceSeconds {e}"
        ))
    })
}

/// Renews the grant's Lease as `holder` until `stop` resolves, then releases it. Fails when the
/// first renewal fails (a wrong grant or missing rights show at once), and when a later one is
/// refused for good (the Lease deleted, the client's rights revoked: access is ending anyway);
/// other failures are logged and tried again.
pub async fn hold(
    client: &Client,
    grant: &ObjectKey,
    holder: &str,
    grace: Duration,
    stop: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &grant.namespace);
    let every = (grace / 3).min(MAX_PERIOD);
    renew(&api, grant, holder, grace, every).await?;
    eprintln!(
        "holding InitiatorAccess {grant}: Lease renewed every {}s as {holder}",
        every.as_secs()
    );
    let mut stop = std::pin::pin!(stop);
    let mut wait = every;
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut stop => break,
        }
        wait = match renew(&api, grant, holder, grace, every).await {
            Ok(()) => {
                failures = 0;
                every
            }
            Err(refused @ ClientError::Refused(_)) => return Err(refused),
            Err(error) => {
                let retry = RETRY_FIRST.saturating_mul(1 << failures.min(16)).min(every);
                failures = failures.saturating_add(1);
                tracing::warn!(%error, retry_seconds = retry.as_secs(), "renewal failed");
                retry
            }
        };
    }
    release(&api, grant, every).await
}

async fn renew(
    api: &Api<Lease>,
    grant: &ObjectKey,
    holder: &str,
    grace: Duration,
    deadline: Duration,
) -> Result<(), ClientError> {
    let body = json!({"spec": {
        "holderIdentity": holder,
        "leaseDurationSeconds": grace.as_secs(),
        "renewTime": MicroTime(Timestamp::now()),
    }});
    patch(api, grant, &body, deadline).await
}

/// Takes the renew time away: nodes see the Lease as never renewed and end access now.
async fn release(
    api: &Api<Lease>,
    grant: &ObjectKey,
    deadline: Duration,
) -> Result<(), ClientError> {
    let body = json!({"spec": {"renewTime": null}});
    patch(api, grant, &body, deadline).await?;
    eprintln!("released InitiatorAccess {grant}");
    Ok(())
}

async fn patch(
    api: &Api<Lease>,
    grant: &ObjectKey,
    body: &serde_json::Value,
    deadline: Duration,
) -> Result<(), ClientError> {
    let patched = tokio::time::timeout(
        deadline,
        api.patch(&grant.name, &PatchParams::default(), &Patch::Merge(body)),
    )
    .await
    .map_err(|_| {
        ClientError::Api(format!(
            "no answer within {}s renewing Lease {grant}",
            deadline.as_secs()
        ))
    })?;
    match patched {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(ClientError::Refused(format!(
            "Lease {grant} not found: an administrator creates it (`discus client-rbac {} -n {}` \
             prints it); a client may renew it, not create it",
            grant.name, grant.namespace
        ))),
        Err(error) => Err(explain(&error, "patch", "Lease", grant)),
    }
}
