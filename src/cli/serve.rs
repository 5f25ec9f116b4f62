//! `discus serve` and its options.

use clap::Args;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use super::node_args::NodeArgs;
use crate::desired::NodeFacts;
use crate::standalone::{self, Outcome, ServeOptions};

#[derive(Args)]
pub struct ServeArgs {
    /// The folder of DiscImage, IscsiTarget, InitiatorAccess and Secret manifests (read again
    /// whenever it changes).
    #[arg(long)]
    manifests: PathBuf,
    /// This server's name in status (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// A node label, `key=value`, for nodeSelectors (repeatable).
    #[arg(long = "node-label", value_parser = parse_label)]
    node_labels: Vec<(String, String)>,
    /// Where targets without spec.portals listen (repeatable).
    #[arg(long = "address", default_value = "0.0.0.0")]
    addresses: Vec<IpAddr>,
    /// Sync once, write status, and exit: 0 when everything is Ready, 2 when something is not.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    node: NodeArgs,
}

fn parse_label(value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "must be key=value".to_owned())
}

fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

pub fn run(args: ServeArgs) -> ExitCode {
    let resync = args.node.resync();
    let facts = NodeFacts {
        name: args.node_name.unwrap_or_else(host_name),
        labels: args.node_labels.into_iter().collect::<BTreeMap<_, _>>(),
        addresses: args.addresses,
        // A single server's own addresses are the administrator's to allow as image sources.
        own_networks: Vec::new(),
    };
    let node = match args.node.config(facts, crate::desired::Policy::open()) {
        Ok(node) => node,
        Err(error) => return super::fail(&error),
    };
    let options = ServeOptions {
        manifests: args.manifests,
        node,
        once: args.once,
        resync,
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
