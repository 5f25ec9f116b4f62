//! `discus serve` and its options.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::api::{quantity, rules};
use crate::standalone::{self, BackendChoice, Outcome, ServeOptions};

#[derive(Args)]
pub struct ServeArgs {
    /// The folder of DiscImage, IscsiTarget, InitiatorAccess and Secret manifests (read again
    /// whenever it changes).
    #[arg(long)]
    manifests: PathBuf,
    /// Images, status and backend state live here.
    #[arg(long, default_value = "/var/lib/discus")]
    data_dir: PathBuf,
    /// auto picks LIO where the kernel has it, else tgt.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendChoice,
    /// This server's name in status (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// A node label, `key=value`, for nodeSelectors (repeatable).
    #[arg(long = "node-label", value_parser = parse_label)]
    node_labels: Vec<(String, String)>,
    /// Where targets without spec.portals listen (repeatable).
    #[arg(long = "address", default_value = "0.0.0.0")]
    addresses: Vec<IpAddr>,
    /// Allow `file` image sources under this folder (repeatable).
    #[arg(long = "file-root")]
    file_roots: Vec<PathBuf>,
    /// Allow HTTP image sources on loopback addresses.
    #[arg(long)]
    allow_loopback: bool,
    /// Sync once, write status, and exit: 0 when everything is Ready, 2 when something is not.
    #[arg(long)]
    once: bool,
    /// How often to look for drift even when nothing changed, in seconds.
    #[arg(long, default_value = "30")]
    resync_seconds: u64,
    /// The prefix of default target IQNs.
    #[arg(long, default_value = crate::desired::DEFAULT_IQN_AUTHORITY)]
    iqn_authority: String,
    /// maxVirtualSize for images that do not set one.
    #[arg(long, default_value = "128Gi", value_parser = parse_size)]
    max_virtual_size: u64,
    /// The control port of discus's own tgtd.
    #[arg(long, default_value_t = crate::backend::tgt::DEFAULT_CONTROL_PORT)]
    tgt_control_port: u16,
}

fn parse_label(value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "must be key=value".to_owned())
}

fn parse_size(value: &str) -> Result<u64, String> {
    quantity::parse_bytes(&Quantity(value.to_owned())).map_err(|e| e.to_string())
}

fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

pub fn run(args: ServeArgs) -> ExitCode {
    if let Err(error) = rules::iscsi_name(&args.iqn_authority) {
        return super::fail(&format!("--iqn-authority {error}"));
    }
    let options = ServeOptions {
        manifests: args.manifests,
        data_dir: args.data_dir,
        backend: args.backend,
        node_name: args.node_name.unwrap_or_else(host_name),
        node_labels: args.node_labels.into_iter().collect::<BTreeMap<_, _>>(),
        addresses: args.addresses,
        file_roots: args.file_roots,
        allow_loopback: args.allow_loopback,
        once: args.once,
        resync: Duration::from_secs(args.resync_seconds.max(1)),
        iqn_authority: args.iqn_authority,
        default_max_virtual_size: args.max_virtual_size,
        tgt_control_port: args.tgt_control_port,
    };
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(error) => return super::fail(&error),
    };
    match runtime.block_on(standalone::serve(options)) {
        Ok(Outcome::AllReady | Outcome::Stopped) => ExitCode::SUCCESS,
        Ok(Outcome::NotAllReady) => ExitCode::from(2),
        Err(error) => super::fail(&error),
    }
}
