//! The client-side commands: `discus connect`, `discus disconnect`, `discus hold` and `discus
//! client-rbac`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use kube::Api;

use crate::api::InitiatorAccess;
use crate::client::connect::{self, Connected, Machine};
use crate::client::devices::{Device, Roots};
use crate::client::list::{self, Listed};
use crate::client::open_iscsi::{self, Iscsiadm};
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
        grant_key(&self.name, &self.namespace)
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
    /// Also let the client list the namespace's grants (`discus connect --list`) by binding the
    /// chart's client ClusterRole there: it then sees every grant's initiator name and target.
    #[arg(long)]
    allow_list: bool,
    /// The chart's ClusterRole for clients (`<release>-client`), with --allow-list.
    #[arg(long, default_value = rbac::CLIENT_CLUSTER_ROLE, requires = "allow_list")]
    cluster_role: String,
}

pub fn hold(args: HoldArgs) -> ExitCode {
    finish(async {
        let key = args.grant.key()?;
        let api = client::api_client(args.grant.kubeconfig.as_deref()).await?;
        let grace = hold::grace_of(&api, &key).await?;
        let holder = args.holder.clone().unwrap_or_else(host_name);
        hold::hold(&api, &key, &holder, grace, stop_signal()).await
    })
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
    finish(async {
        let key = args.grant.key()?;
        let api = client::api_client(args.grant.kubeconfig.as_deref()).await?;
        let grants: Api<InitiatorAccess> = Api::namespaced(api, &key.namespace);
        let grant = (grants.get(&key.name).await)
            .map_err(|e| explain(&e, "get", "InitiatorAccess", &key))?;
        let options = rbac::Options {
            cluster_role: args.allow_list.then_some(args.cluster_role.as_str()),
        };
        let yaml = rbac::to_yaml(&rbac::manifests(&grant, &subject, &options)?)?;
        print!("{yaml}");
        Ok(())
    })
}

/// Runs a client command on a runtime of its own; its error is the process's.
fn finish(command: impl std::future::Future<Output = Result<(), ClientError>>) -> ExitCode {
    let result = super::runtime()
        .map_err(|e| ClientError::Connect(e.to_string()))
        .and_then(|runtime| runtime.block_on(command));
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

/// SIGINT or SIGTERM. The handlers are installed now, before anything that must be undone.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without handlers the process ends on the signal itself: the Lease then lapses
            // after its grace instead of being released.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// How `discus connect --list` prints.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ListFormat {
    Table,
    Json,
}

/// This machine as an initiator.
#[derive(Args)]
pub struct MachineArgs {
    /// This machine's initiator name; read from /etc/iscsi/initiatorname.iscsi when absent.
    #[arg(long)]
    initiator_iqn: Option<String>,
    /// Where connect writes down what it created, for disconnect.
    #[arg(long, default_value = client::STATE_DIR)]
    state_dir: PathBuf,
    /// The kubeconfig to use; otherwise as kubectl finds one.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

impl MachineArgs {
    async fn machine(&self) -> Result<Machine, ClientError> {
        let initiator = match &self.initiator_iqn {
            Some(name) => {
                crate::api::rules::iscsi_name(name)
                    .map_err(|e| ClientError::Refused(format!("--initiator-iqn {e}")))?;
                name.clone()
            }
            None => open_iscsi::local_name(open_iscsi::INITIATOR_NAME_FILE.as_ref())?,
        };
        Ok(Machine {
            api: client::api_client(self.kubeconfig.as_deref()).await?,
            iscsiadm: Iscsiadm::default(),
            roots: Roots::default(),
            state_dir: self.state_dir.clone(),
            initiator,
        })
    }
}

#[derive(Args)]
pub struct ConnectArgs {
    /// The InitiatorAccess to connect with (not with --list).
    #[arg(required_unless_present = "list")]
    name: Option<String>,
    /// Its namespace (with --list: where to look).
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// List the grants for this machine's initiator name instead.
    #[arg(long)]
    list: bool,
    /// With --list: in every namespace the caller may list.
    #[arg(short = 'A', long, requires = "list")]
    all_namespaces: bool,
    /// With --list: a table, or JSON for scripts.
    #[arg(
        short = 'o',
        long,
        value_enum,
        default_value = "table",
        requires = "list"
    )]
    output: ListFormat,
    /// Mount the first LUN read-only at this directory.
    #[arg(long, conflicts_with = "list")]
    mount: Option<PathBuf>,
    /// Keep a grant held by heartbeat: renew its Lease until interrupted, then disconnect.
    #[arg(long, conflicts_with = "list")]
    hold: bool,
    /// With --hold: who holds it; the host name by default.
    #[arg(long, requires = "hold")]
    holder: Option<String>,
    /// How long to wait for the grant to be Ready and for its block devices.
    #[arg(long, default_value_t = 60)]
    timeout_seconds: u64,
    #[command(flatten)]
    machine: MachineArgs,
}

#[derive(Args)]
pub struct DisconnectArgs {
    /// The InitiatorAccess connect connected with.
    name: String,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Where connect wrote down what it created.
    #[arg(long, default_value = client::STATE_DIR)]
    state_dir: PathBuf,
}

pub fn connect(args: ConnectArgs) -> ExitCode {
    finish(async {
        let machine = args.machine.machine().await?;
        if args.list {
            let namespace = (!args.all_namespaces).then_some(args.namespace.as_str());
            let grants = list::list(&machine.api, namespace, &machine.initiator).await?;
            return print_list(&grants, args.output);
        }
        let key = grant_key(args.name.as_deref().unwrap_or_default(), &args.namespace)?;
        let deadline = std::time::Duration::from_secs(args.timeout_seconds);
        if args.hold {
            return connect_and_hold(&machine, &key, &args, deadline).await;
        }
        let connected = connect::connect(&machine, &key, args.mount.as_deref(), deadline).await?;
        print_connected(&key, &connected);
        Ok(())
    })
}

/// Holds the grant (renewals start first: a held grant is Ready only while renewed), connects,
/// and at SIGINT or SIGTERM (during connect too) disconnects — unmounts, logs out, removes its
/// records — and then releases the Lease. A hold that fails ends it all, with its error.
async fn connect_and_hold(
    machine: &Machine,
    key: &ObjectKey,
    args: &ConnectArgs,
    deadline: std::time::Duration,
) -> Result<(), ClientError> {
    let mut stop_requested = std::pin::pin!(stop_signal());
    let grace = hold::grace_of(&machine.api, key).await?;
    let holder = args.holder.clone().unwrap_or_else(host_name);
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let mut holding = {
        let (api, key) = (machine.api.clone(), key.clone());
        tokio::spawn(async move {
            let released = async move {
                let _ = released.await;
            };
            hold::hold(&api, &key, &holder, grace, released).await
        })
    };
    let mut hold_ended = false;
    let outcome = tokio::select! {
        connected = connect::connect(machine, key, args.mount.as_deref(), deadline) => {
            match connected {
                Ok(connected) => {
                    print_connected(key, &connected);
                    tokio::select! {
                        () = &mut stop_requested => Ok(()),
                        ended = &mut holding => Err(hold_failed(&mut hold_ended, ended)),
                    }
                }
                Err(error) => Err(error),
            }
        }
        () = &mut stop_requested => Ok(()),
        ended = &mut holding => Err(hold_failed(&mut hold_ended, ended)),
    };
    let disconnected = connect::disconnect(&machine.iscsiadm, &machine.state_dir, key).await;
    if let Ok(true) = disconnected {
        eprintln!("disconnected InitiatorAccess {key}");
    }
    let _ = release.send(());
    if !hold_ended && let Ok(Err(error)) = holding.await {
        eprintln!("warning: {error}");
    }
    outcome.and(disconnected.map(drop))
}

/// Why holding ended before it was asked to, remembering that it did.
fn hold_failed(
    ended: &mut bool,
    result: Result<Result<(), ClientError>, tokio::task::JoinError>,
) -> ClientError {
    *ended = true;
    match result {
        Ok(Err(error)) => error,
        Ok(Ok(())) => ClientError::Api("holding the grant stopped".to_owned()),
        Err(error) => ClientError::Api(format!("holding the grant failed: {error}")),
    }
}

pub fn disconnect(args: DisconnectArgs) -> ExitCode {
    finish(async {
        let key = grant_key(&args.name, &args.namespace)?;
        // Disconnecting needs no cluster: only what connect wrote down, and iscsiadm.
        if connect::disconnect(&Iscsiadm::default(), &args.state_dir, &key).await? {
            eprintln!("disconnected InitiatorAccess {key}");
        } else {
            eprintln!(
                "nothing to disconnect: discus connect made nothing for InitiatorAccess {key}"
            );
        }
        Ok(())
    })
}

fn grant_key(name: &str, namespace: &str) -> Result<ObjectKey, ClientError> {
    for (what, value) in [("name", name), ("namespace", namespace)] {
        crate::api::rules::object_name(value)
            .map_err(|e| ClientError::Refused(format!("the grant's {what}: {e}")))?;
    }
    Ok(ObjectKey::new(namespace, name))
}

fn print_list(grants: &[Listed], format: ListFormat) -> Result<(), ClientError> {
    match format {
        ListFormat::Json => {
            let json = serde_json::to_string_pretty(grants)
                .map_err(|e| ClientError::Api(e.to_string()))?;
            println!("{json}");
        }
        ListFormat::Table => {
            println!("NAMESPACE\tNAME\tTARGET\tLUNS\tREAD-ONLY\tEXPIRES\tREADY\tREASON");
            for g in grants {
                let luns: Vec<String> = g.luns.iter().map(u32::to_string).collect();
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    g.namespace,
                    g.name,
                    g.target,
                    luns.join(","),
                    g.read_only,
                    g.expires_at.as_deref().unwrap_or("-"),
                    g.ready,
                    g.reason
                );
            }
        }
    }
    Ok(())
}

/// The devices on stdout, one line per LUN (for scripts); the rest on stderr.
fn print_connected(key: &ObjectKey, connected: &Connected) {
    eprintln!(
        "connected InitiatorAccess {key} in {:.2}s",
        connected.elapsed.as_secs_f64()
    );
    for (lun, devices) in &connected.luns {
        let paths = device_paths(devices);
        eprintln!("LUN {lun}:");
        println!("{}", paths.join(" "));
    }
    if let Some(dir) = &connected.mounted {
        eprintln!("mounted read-only at {}", dir.display());
    }
}

/// The multipath device when there is one; otherwise each path's by-id link (or /dev/sdX).
fn device_paths(devices: &[Device]) -> Vec<String> {
    if let Some(multipath) = devices.iter().find_map(|d| d.multipath.clone()) {
        return vec![multipath.display().to_string()];
    }
    (devices.iter())
        .map(|d| d.by_id.as_ref().unwrap_or(&d.dev).display().to_string())
        .collect()
}
