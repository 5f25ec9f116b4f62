//! The options every command that runs a storage node shares (`serve`, `agent`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::api::{quantity, rules};
use crate::boot::BootOptions;
use crate::desired::{NodeFacts, Policy};
use crate::images::FetchOptions;
use crate::images::destinations::{self, DestinationPolicy};
use crate::images::scrub::ScrubConfig;
use crate::node_runtime::{BackendChoice, NodeConfig};

#[derive(Args)]
pub struct NodeArgs {
    /// Images, status and backend state live here.
    #[arg(long, default_value = "/var/lib/discus")]
    data_dir: PathBuf,
    /// auto picks LIO where the kernel has it, else tgt.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendChoice,
    /// Allow `file` image sources under this folder (repeatable).
    #[arg(long = "file-root")]
    file_roots: Vec<PathBuf>,
    /// Allow HTTP image sources on loopback addresses.
    #[arg(long)]
    allow_loopback: bool,
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
    /// Serve /metrics, /healthz and /readyz on this address (for example 0.0.0.0:9464).
    #[arg(long, env = "DISCUS_HTTP_ADDRESS")]
    http_address: Option<std::net::SocketAddr>,
    /// Answer iPXE at http://ADDRESS/boot/ipxe with the script of the grant that boots the
    /// asking card (docs/netboot.md); off unless given (for example 0.0.0.0:8090).
    #[arg(long, value_name = "ADDRESS")]
    boot_address: Option<std::net::SocketAddr>,
    /// Boot requests one source address may make a minute; more get 429.
    #[arg(long, value_name = "N", default_value = "60")]
    boot_requests_per_minute: std::num::NonZeroU32,
    // Where image downloads may go, and how slow they may be (docs/images.md).
    /// HTTP image sources may reach only these networks (a CIDR or an address, repeatable;
    /// default: any address not denied). Loopback, link-local, unique-local IPv6, multicast and
    /// the like stay refused.
    #[arg(long = "source-allow", value_name = "CIDR", value_parser = destinations::parse_net)]
    source_allow: Vec<ipnet::IpNet>,
    /// HTTP image sources may never reach these networks (a CIDR or an address, repeatable); a
    /// denied network wins over --source-allow.
    #[arg(long = "source-deny", value_name = "CIDR", value_parser = destinations::parse_net)]
    source_deny: Vec<ipnet::IpNet>,
    /// The slowest average rate an image download or copy may have, in bytes per second (for
    /// example 1Mi), after two minutes of grace; a slower one fails and is tried again later.
    #[arg(long, value_name = "BYTES", default_value = "128Ki", value_parser = parse_rate)]
    source_min_rate: u64,
    /// How often each stored image is read again and checked against its digest, in seconds
    /// (default: weekly).
    #[arg(long, value_name = "SECONDS", default_value = "604800", value_parser = seconds)]
    scrub_interval_seconds: Duration,
    /// The most bytes a second the background scrub reads (for example 32Mi).
    #[arg(long, value_name = "BYTES", default_value = "32Mi", value_parser = parse_rate)]
    scrub_rate: u64,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// What targets may ask for (see docs/security.md). The defaults differ: `discus agent` serves
/// every namespace's users and is strict; `discus serve` serves its administrator's own folder.
#[derive(Args)]
pub struct PolicyArgs {
    /// Addresses (CIDR) targets may name in spec.portals (repeatable). Default: agent, the
    /// node's own addresses; serve, any.
    #[arg(long = "portal-address", value_name = "CIDR")]
    portal_addresses: Vec<ipnet::IpNet>,
    /// Ports targets may name in spec.portals (repeatable). Default: agent, 3260; serve, any.
    #[arg(long = "portal-port", value_name = "PORT")]
    portal_ports: Vec<u16>,
    /// NAMESPACE=PREFIX: targets in NAMESPACE (* for every namespace) may set a spec.iqn that
    /// starts with PREFIX (repeatable). Each namespace may always use its own default IQNs.
    /// Default: agent, nothing more; serve, any IQN.
    #[arg(long = "iqn-prefix", value_name = "NAMESPACE=PREFIX", value_parser = iqn_prefix)]
    iqn_prefixes: Vec<(String, String)>,
}

impl PolicyArgs {
    /// The policy: `default`, with what the options say instead.
    fn policy(self, mut policy: Policy) -> Policy {
        if !self.portal_addresses.is_empty() {
            policy.portal_addresses = Some(self.portal_addresses);
        }
        if !self.portal_ports.is_empty() {
            policy.portal_ports = self.portal_ports;
        }
        if !self.iqn_prefixes.is_empty() {
            let mut prefixes = std::collections::BTreeMap::<String, Vec<String>>::new();
            for (namespace, prefix) in self.iqn_prefixes {
                prefixes.entry(namespace).or_default().push(prefix);
            }
            policy.iqn_prefixes = Some(prefixes);
        }
        policy
    }
}

fn iqn_prefix(value: &str) -> Result<(String, String), String> {
    let (namespace, prefix) = value
        .split_once('=')
        .ok_or("must be NAMESPACE=PREFIX, for example lab=iqn.2003-01.org.example:")?;
    if namespace != "*" && rules::object_name(namespace).is_err() {
        return Err(format!("{namespace:?} is not a namespace name (or *)"));
    }
    // A prefix ends where a name's part ends, so that `lab` cannot cover `lab-prod`'s IQNs.
    if !(prefix.ends_with(':') || prefix.ends_with('.')) || prefix.len() < 6 {
        return Err(format!(
            "{prefix:?}: a prefix is the start of an IQN up to a ':' or '.', for example \
             iqn.2003-01.org.example: or iqn.2026-11.dev.discus:lab."
        ));
    }
    Ok((namespace.to_owned(), prefix.to_owned()))
}

impl NodeArgs {
    /// The node's configuration, or which option is wrong; `policy` is the command's default
    /// for what targets may ask for.
    pub fn config(self, node: NodeFacts, policy: Policy) -> Result<NodeConfig, String> {
        rules::iscsi_name(&self.iqn_authority).map_err(|e| format!("--iqn-authority {e}"))?;
        Ok(NodeConfig {
            data_dir: self.data_dir,
            backend: self.backend,
            node,
            file_roots: self.file_roots,
            fetch: FetchOptions {
                destinations: DestinationPolicy::new(
                    self.allow_loopback,
                    self.source_allow,
                    self.source_deny,
                ),
                min_average_rate: self.source_min_rate,
                ..FetchOptions::default()
            },
            iqn_authority: self.iqn_authority,
            default_max_virtual_size: self.max_virtual_size,
            tgt_control_port: self.tgt_control_port,
            prefetch_all: false,
            http_address: self.http_address,
            boot: self.boot_address.map(|address| BootOptions {
                address,
                requests_per_minute: self.boot_requests_per_minute,
            }),
            policy: self.policy.policy(policy),
            scrub: ScrubConfig {
                rate: self.scrub_rate,
                interval: self.scrub_interval_seconds,
            },
            upload: None,
            upload_off: crate::sync::UploadReception::off_in_agent(),
        })
    }

    pub fn resync(&self) -> Duration {
        Duration::from_secs(self.resync_seconds.max(1))
    }
}

fn parse_size(value: &str) -> Result<u64, String> {
    quantity::parse_bytes(&Quantity(value.to_owned())).map_err(|e| e.to_string())
}

fn parse_rate(value: &str) -> Result<u64, String> {
    match parse_size(value)? {
        0 => Err("must be at least 1 byte per second".to_owned()),
        rate => Ok(rate),
    }
}

/// Seconds, from 0 to 60: how long status that only reports progress may wait.
pub fn settle_seconds(value: &str) -> Result<Duration, String> {
    match value.parse::<u64>() {
        Ok(n) if n <= 60 => Ok(Duration::from_secs(n)),
        _ => Err("must be a whole number of seconds from 0 to 60".to_owned()),
    }
}

/// Seconds, at least one.
pub fn seconds(value: &str) -> Result<Duration, String> {
    match value.parse::<u64>() {
        Ok(0) | Err(_) => Err("must be a whole number of seconds, at least 1".to_owned()),
        Ok(n) => Ok(Duration::from_secs(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_iqn_prefix_ends_where_a_part_of_the_name_ends() {
        assert!(iqn_prefix("lab=iqn.2003-01.org.example:").is_ok());
        assert!(iqn_prefix("*=iqn.2026-11.dev.discus:lab.").is_ok());
        for bad in [
            "lab=",
            "lab=iqn.2026-11.dev.discus:lab",
            "lab",
            "Lab=iqn.2003-01.org.example:",
        ] {
            assert!(iqn_prefix(bad).is_err(), "{bad}");
        }
    }
}
