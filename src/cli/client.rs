//! The client-side commands: `discus hold` and `discus client-rbac`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use kube::Api;

use crate::api::InitiatorAccess;
use crate::client::rbac::{self, Subject};
use crate::client::{self, ClientError, explain, hold};
use crate::desired::ObjectKey;

/// Where a client finds its cluster and its grant.
#[derive(Args)]
pub struct GrantArgs {
    /// The InitiatorAccess.
    name: String,
    /// Its namespace.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// The kubeconfig to use; otherwise as kubectl finds one (KUBECONFIG, ~/.kube/config, a
    /// Pod's ServiceAccount).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

impl GrantArgs {
    fn key(&self) -> Result<ObjectKey, ClientError> {
        for (what, name) in [("name", &self.name), ("namespace", &self.namespace)] {
            crate::api::rules::object_name(name)
                .map_err(|e| ClientError::Refused(format!("the grant's {what}: {e}")))?;
        }
        Ok(ObjectKey::new(&self.namespace, &self.name))
    }
}

#[derive(Args)]
pub struct HoldArgs {
    #[command(flatten)]
    grant: GrantArgs,
    /// Who holds the grant, as the Lease and the grant's status show it; this machine's host
    /// name when absent.
    #[arg(long)]
    holder: Option<String>,
}

#[derive(Args)]
#[group(id = "subject", required = true, multiple = false)]
pub struct ClientRbacArgs {
    #[command(flatten)]
    grant: GrantArgs,
    /// The client's ServiceAccount, as namespace:name.
    #[arg(long, group = "subject")]
    service_account: Option<String>,
    /// The client's user name.
    #[arg(long, group = "subject")]
    user: Option<String>,
    /// The client's group.
    #[arg(long, group = "subject")]
    group: Option<String>,
    /// The chart's ClusterRole for clients (`<release>-client`).
    #[arg(long, default_value = rbac::CLIENT_CLUSTER_ROLE)]
    cluster_role: String,
}

pub fn hold(args: HoldArgs) -> ExitCode {
    finish(
        super::runtime()
            .map_err(|e| ClientError::Connect(e.to_string()))
            .and_then(|rt| {
                rt.block_on(async {
                    let key = args.grant.key()?;
                    let api = client::api_client(args.grant.kubeconfig.as_deref()).await?;
                    let grace = hold::grace_of(&api, &key).await?;
                    let holder = args.holder.clone().unwrap_or_else(host_name);
                    hold::hold(&api, &key, &holder, grace, stop_signal()).await
                })
            }),
    )
}

pub fn client_rbac(args: ClientRbacArgs) -> ExitCode {
    let subject = match (&args.service_account, &args.user, &args.group) {
        (Some(sa), _, _) => Subject::service_account(sa),
        (_, Some(user), _) => Ok(Subject::User(user.clone())),
        (_, _, Some(group)) => Ok(Subject::Group(group.clone())),
        _ => Err("name the client: --service-account, --user or --group".to_owned()),
    };
    let subject = match subject {
        Ok(subject) => subject,
        Err(why) => return super::fail(&why),
    };
    finish(
        super::runtime()
            .map_err(|e| ClientError::Connect(e.to_string()))
            .and_then(|rt| {
                rt.block_on(async {
                    let key = args.grant.key()?;
                    let api = client::api_client(args.grant.kubeconfig.as_deref()).await?;
                    let grants: Api<InitiatorAccess> = Api::namespaced(api, &key.namespace);
                    let grant = (grants.get(&key.name).await)
                        .map_err(|e| explain(&e, "get", "InitiatorAccess", &key))?;
                    let yaml =
                        rbac::to_yaml(&rbac::manifests(&grant, &subject, &args.cluster_role)?)?;
                    print!("{yaml}");
                    Ok(())
                })
            }),
    )
}

fn finish(result: Result<(), ClientError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => super::fail(&error),
    }
}

/// This machine's host name, as the kernel has it.
fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process ends on the signal itself: the Lease then lapses
        // after its grace instead of being released.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
