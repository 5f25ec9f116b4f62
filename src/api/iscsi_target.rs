//! `IscsiTarget`: one iSCSI target, its LUNs, and the storage nodes that serve it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::core::Selector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::field::{FieldErrors, FieldPath};
use super::{rules, schema};

const IMMUTABLE_IQN: &str = "is immutable once set: initiators and boot configurations know the target by it; create a new IscsiTarget";

/// An iSCSI target served by every storage node its `nodeSelector` matches, with the same IQN and
/// the same LUN serials everywhere, so multipath and iPXE see one device. Nobody may log in
/// until an InitiatorAccess grants it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "discus.dev",
    version = "v1alpha1",
    kind = "IscsiTarget",
    doc = "An iSCSI target: LUNs backed by DiscImages, served by the storage nodes its nodeSelector matches. Nobody may log in until an InitiatorAccess grants it.",
    namespaced,
    status = "IscsiTargetStatus",
    shortname = "itgt",
    category = "discus",
    printcolumn(name = "IQN", type_ = "string", json_path = ".status.iqn"),
    printcolumn(name = "LUNs", type_ = "integer", json_path = ".status.lunCount"),
    printcolumn(
        name = "Nodes Ready",
        type_ = "string",
        json_path = ".status.readyNodes"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(oldSelf.iqn) || (has(self.iqn) && self.iqn == oldSelf.iqn)").message(IMMUTABLE_IQN).field_path(".iqn"))]
#[serde(rename_all = "camelCase")]
pub struct IscsiTargetSpec {
    /// The target's iSCSI name. Defaults to `<agent IQN authority>:<namespace>.<name>`.
    /// Immutable once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::iscsi_name")]
    pub iqn: Option<String>,

    /// The LUNs, each backed by a DiscImage in the same namespace. LUN numbers are unique.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["lun".into()]))]
    pub luns: Vec<LunSpec>,

    /// The storage nodes that serve this target; every node the agent runs on when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// Where to listen. Defaults to each node's InternalIP addresses on port 3260.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["address".into(), "port".into()]))]
    pub portals: Vec<PortalSpec>,

    /// `chap` (the default) or `none`. With `none`, any initiator named by an InitiatorAccess logs
    /// in without a secret: an explicit, visible choice.
    #[serde(default)]
    pub authentication: Authentication,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.deviceType) || self.deviceType != 'cdrom' || !has(self.blockSize) || self.blockSize == 2048").message("a cdrom LUN has 2048-byte blocks: leave blockSize out or set it to 2048"))]
#[serde(rename_all = "camelCase")]
pub struct LunSpec {
    /// The LUN number, 0 to 255.
    #[schemars(schema_with = "schema::lun")]
    pub lun: u32,
    /// The name of a DiscImage in the same namespace.
    #[schemars(schema_with = "schema::object_name")]
    pub image: String,
    /// Serve the LUN read-only (the default). A writable LUN gets its own copy of the image.
    #[serde(default = "default_true")]
    pub read_only: bool,
    /// Logical block size in bytes: 512, 1024, 2048 or 4096. The backend's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::block_size")]
    pub block_size: Option<u32>,
    /// `disk` (the default) or `cdrom`. `cdrom` needs the tgt backend: the kernel's LIO presents
    /// disks only.
    #[serde(default)]
    pub device_type: DeviceType,
}

fn default_true() -> bool {
    true
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortalSpec {
    /// An IPv4 or IPv6 address of the storage node, or a wildcard (`0.0.0.0`, `::`).
    #[schemars(schema_with = "schema::ip_address")]
    pub address: String,
    /// The TCP port; 3260 by default.
    #[serde(default = "default_port")]
    #[schemars(schema_with = "schema::port")]
    pub port: u32,
}

fn default_port() -> u32 {
    u32::from(rules::DEFAULT_ISCSI_PORT)
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Authentication {
    #[default]
    Chap,
    None,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    #[default]
    Disk,
    Cdrom,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IscsiTargetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The effective IQN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iqn: Option<String>,
    /// Every portal on every node, `address:port`, for discovery and multipath.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub portals: Vec<String>,
    /// The number of LUNs (a printer column cannot count a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lun_count: Option<i32>,
    /// Nodes serving the target out of nodes that should, for example `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_nodes: Option<String>,
    /// One entry per storage node, as that node's agent reported it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["node".into()]))]
    pub nodes: Vec<TargetNodeStatus>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TargetNodeStatus {
    pub node: String,
    /// The generation of the spec this entry describes: the last its node applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub portals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub luns: Vec<LunStatus>,
    #[serde(default)]
    pub sessions: i32,
    /// Why it is not ready on this node (a condition reason: `ImageNotReady`, `BackendLimit`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LunStatus {
    pub lun: u32,
    /// The LUN number initiators see, when it differs from `lun` (tgt's LUN 0 is its controller,
    /// so API LUN n is tgt LUN n + 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_lun: Option<u32>,
    /// The SCSI unit serial number, the same on every node serving the same image.
    pub serial: String,
    pub size: Quantity,
}

/// A portal as the backends take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Portal {
    pub address: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for Portal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// A LUN spec that passed every rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidLun {
    pub lun: u32,
    pub image: String,
    pub read_only: bool,
    pub block_size: Option<u32>,
    pub device_type: DeviceType,
}

/// An IscsiTarget spec that passed every rule.
#[derive(Clone, Debug)]
pub struct ValidTarget {
    pub iqn: Option<String>,
    pub luns: Vec<ValidLun>,
    pub node_selector: Option<Selector>,
    pub portals: Vec<Portal>,
    pub authentication: Authentication,
}

impl IscsiTargetSpec {
    pub fn validate(&self) -> Result<ValidTarget, FieldErrors> {
        let spec = FieldPath::root("spec");
        let mut errors = FieldErrors::new();
        if let Some(iqn) = &self.iqn {
            errors.check(&spec.child("iqn"), rules::iscsi_name(iqn));
        }

        let luns_path = spec.child("luns");
        if self.luns.is_empty() {
            errors.push(luns_path.clone(), "must list at least one LUN");
        }
        let mut seen = BTreeSet::new();
        let mut luns = Vec::new();
        for (i, lun) in self.luns.iter().enumerate() {
            let path = luns_path.index(i);
            let mut lun_errors = FieldErrors::new();
            lun_errors.check(&path.child("lun"), rules::lun(lun.lun));
            if !seen.insert(lun.lun) {
                lun_errors.push(
                    path.child("lun"),
                    format!(
                        "LUN {} is listed twice: LUN numbers are unique within a target",
                        lun.lun
                    ),
                );
            }
            lun_errors.check(&path.child("image"), rules::object_name(&lun.image));
            if let Some(size) = lun.block_size {
                lun_errors.check(&path.child("blockSize"), rules::block_size(size));
                if lun.device_type == DeviceType::Cdrom && size != 2048 {
                    lun_errors.push(
                        path.child("blockSize"),
                        "a cdrom LUN has 2048-byte blocks: leave blockSize out or set it to 2048",
                    );
                }
            }
            if lun_errors.is_empty() {
                luns.push(ValidLun {
                    lun: lun.lun,
                    image: lun.image.clone(),
                    read_only: lun.read_only,
                    block_size: lun.block_size,
                    device_type: lun.device_type,
                });
            }
            errors.extend(lun_errors);
        }

        let mut portals = Vec::new();
        let portals_path = spec.child("portals");
        for (i, portal) in self.portals.iter().enumerate() {
            let path = portals_path.index(i);
            let address = errors.check(&path.child("address"), rules::ip_address(&portal.address));
            let port = errors.check(&path.child("port"), rules::port(portal.port));
            if let (Some(address), Some(port)) = (address, port) {
                let portal = Portal { address, port };
                if portals.contains(&portal) {
                    errors.push(path, format!("portal {portal} is listed twice"));
                } else {
                    portals.push(portal);
                }
            }
        }
        let node_selector = super::label_selector(
            self.node_selector.as_ref(),
            &spec.child("nodeSelector"),
            &mut errors,
        );
        errors.into_result(ValidTarget {
            iqn: self.iqn.clone(),
            luns,
            node_selector,
            portals,
            authentication: self.authentication,
        })
    }

    /// What may not change once set, for `discus serve` which has no apiserver to ask.
    pub fn immutable_changes(&self, old: &IscsiTargetSpec) -> FieldErrors {
        let mut errors = FieldErrors::new();
        if old.iqn.is_some() && self.iqn != old.iqn {
            errors.push(FieldPath::root("spec").child("iqn"), IMMUTABLE_IQN);
        }
        errors
    }
}
