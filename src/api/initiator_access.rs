//! `InitiatorAccess`: one initiator's right to one target. Without one, a target serves nobody.

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::disc_image::SecretRef;
use super::field::{FieldErrors, FieldPath};
use super::mac::MacAddress;
use super::{rules, schema};

/// Grants one initiator access to one IscsiTarget in the same namespace: an ACL with CHAP on every
/// node that serves the target, until `expiresAt`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "discus.dev",
    version = "v1alpha1",
    kind = "InitiatorAccess",
    doc = "One initiator's access to one IscsiTarget: an ACL with CHAP on every node serving the target, until expiresAt.",
    namespaced,
    status = "InitiatorAccessStatus",
    shortname = "iacc",
    category = "discus",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
    printcolumn(name = "Initiator", type_ = "string", json_path = ".spec.initiatorIqn"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.expiresAt"),
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
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.boot) || !has(self.boot.lun) || !has(self.luns) || self.boot.lun in self.luns").message("spec.boot.lun must be one of spec.luns").field_path(".boot.lun"))]
pub struct InitiatorAccessSpec {
    /// The IscsiTarget, in the same namespace.
    pub target_ref: TargetRef,
    /// The initiator's iSCSI name, as it sends it at login.
    #[schemars(schema_with = "schema::iscsi_name")]
    pub initiator_iqn: String,
    /// The LUNs the initiator may see; all of the target's LUNs when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::luns")]
    pub luns: Option<Vec<u32>>,
    /// Read-only access (the default). A grant never makes a read-only LUN writable.
    #[serde(default = "default_true")]
    pub read_only: bool,
    /// CHAP credentials; required when the target uses CHAP (its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<ChapSpec>,
    /// When the grant ends (RFC 3339). Every node then removes the ACL, which ends its sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::timestamp")]
    pub expires_at: Option<String>,
    /// Network boot: the machines that may fetch an iPXE script for this grant from the storage
    /// nodes' boot endpoint (`/boot/ipxe`). Without it, no node ever hands out a script for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSpec>,
    /// Access held by heartbeat: the grant is applied on a node only while its holder renews the
    /// Lease named after the grant, in its namespace (`discus hold`, `discus connect --hold`).
    /// Renewals silent for `graceSeconds`, as each node sees them, end access there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<HeartbeatSpec>,
}

/// The label that makes a Lease a grant's heartbeat (its value is not read): the Lease named
/// after the grant, in its namespace.
pub const GRANT_HEARTBEAT_LABEL: &str = "discus.dev/grant-heartbeat";

/// How a grant is held by its holder's renewals.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatSpec {
    /// How long a node keeps access after it last saw the Lease renewed (10 to 86400). The
    /// holder renews every third of it.
    #[schemars(schema_with = "schema::grace_seconds")]
    pub grace_seconds: u32,
}

/// Which machines boot through a grant, and from which LUN.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BootSpec {
    /// The MAC addresses of the network cards the machine boots from (iPXE's `${net0/mac}`),
    /// such as `52:54:00:12:34:56`. A card two grants on a node name boots through neither.
    #[schemars(schema_with = "schema::mac_addresses")]
    pub mac_addresses: Vec<String>,
    /// The networks the script may be fetched from (CIDR); from anywhere when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::cidrs")]
    pub source_cidrs: Option<Vec<String>>,
    /// The LUN to boot from (one of the grant's); the grant's lowest LUN when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::lun")]
    pub lun: Option<u32>,
}

fn default_true() -> bool {
    true
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    #[schemars(schema_with = "schema::object_name")]
    pub name: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ChapSpec {
    /// The Secret with `username` and `password` (12 to 16 characters) and, for mutual CHAP,
    /// `mutualUsername` and `mutualPassword`.
    pub secret_ref: SecretRef,
    /// Mutual CHAP: the target proves itself to the initiator too.
    #[serde(default)]
    pub mutual: bool,
    /// Let discus create the Secret with strong random values when it does not exist.
    #[serde(default)]
    pub generate_secret: bool,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InitiatorAccessStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling`, `Stalled` and `Expired`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// What the initiator needs to connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<Connection>,
    /// For a grant held by heartbeat: its Lease's holder and last renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<HeartbeatStatus>,
    /// One entry per storage node, as that node's agent reported it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["node".into()]))]
    pub nodes: Vec<AccessNodeStatus>,
}

/// A held grant's Lease as the lease holder last saw it (each node judges renewals on its own).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatStatus {
    /// The Lease's `holderIdentity`; absent while no Lease is seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The Lease's last `renewTime`, on the holder's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// The target's IQN.
    pub iqn: String,
    /// Every portal of every node serving the target, `address:port`.
    #[serde(default)]
    pub portals: Vec<String>,
    /// The LUNs this initiator sees.
    #[serde(default)]
    pub luns: Vec<ConnectionLun>,
    /// For a grant with a boot block: the URLs of the nodes' boot endpoints that hand its
    /// machines their script (`http://<node>:<port>/boot/ipxe`; iPXE adds `?mac=`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boot_urls: Vec<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionLun {
    pub lun: u32,
    /// The LUN number to connect to, when it differs from `lun` (on tgt, `lun` + 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_lun: Option<u32>,
    pub read_only: bool,
    /// The SCSI unit serial number the LUN presents on every node (VPD page 0x80): how a
    /// client finds its block device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccessNodeStatus {
    pub node: String,
    /// The generation of the spec this entry describes: the last its node applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub applied: bool,
    /// Once applied: how to reach the target on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<Connection>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<SessionStatus>,
    /// Why it is not ready on this node (a condition reason: `ImageNotReady`, `BackendLimit`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SessionStatus {
    /// The initiator's address.
    pub address: String,
    /// When the session was first seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// An InitiatorAccess spec that passed every rule.
#[derive(Clone, Debug)]
pub struct ValidGrant {
    pub target: String,
    pub initiator: String,
    pub luns: Option<Vec<u32>>,
    pub read_only: bool,
    pub chap: Option<ChapSpec>,
    pub expires_at: Option<Timestamp>,
    pub boot: Option<ValidBoot>,
    /// `spec.heartbeat.graceSeconds`: held by heartbeat, with this grace.
    pub heartbeat: Option<std::time::Duration>,
}

/// A boot block that passed every rule: addresses normalised, networks parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidBoot {
    pub macs: Vec<MacAddress>,
    pub sources: Vec<IpNet>,
    pub lun: Option<u32>,
}

impl InitiatorAccessSpec {
    pub fn validate(&self) -> Result<ValidGrant, FieldErrors> {
        let spec = FieldPath::root("spec");
        let mut errors = FieldErrors::new();
        errors.check(
            &spec.child("targetRef").child("name"),
            rules::object_name(&self.target_ref.name),
        );
        errors.check(
            &spec.child("initiatorIqn"),
            rules::iscsi_name(&self.initiator_iqn),
        );
        if let Some(luns) = &self.luns {
            let path = spec.child("luns");
            for (i, lun) in luns.iter().enumerate() {
                errors.check(&path.index(i), rules::lun(*lun));
                if luns[..i].contains(lun) {
                    errors.push(path.index(i), format!("LUN {lun} is listed twice"));
                }
            }
        }
        if let Some(chap) = &self.chap {
            errors.check(
                &spec.child("chap").child("secretRef").child("name"),
                rules::object_name(&chap.secret_ref.name),
            );
        }
        let expires_at = self
            .expires_at
            .as_deref()
            .and_then(|t| errors.check(&spec.child("expiresAt"), rules::timestamp(t)));
        let boot =
            (self.boot.as_ref()).map(|boot| boot.validate(self, &spec.child("boot"), &mut errors));
        let heartbeat = (self.heartbeat.as_ref()).and_then(|h| {
            let path = spec.child("heartbeat").child("graceSeconds");
            errors.check(&path, rules::grace_seconds(h.grace_seconds))
        });
        errors.into_result(ValidGrant {
            target: self.target_ref.name.clone(),
            initiator: self.initiator_iqn.clone(),
            luns: self.luns.clone(),
            read_only: self.read_only,
            chap: self.chap.clone(),
            expires_at,
            boot,
            heartbeat,
        })
    }
}

impl BootSpec {
    fn validate(
        &self,
        grant: &InitiatorAccessSpec,
        path: &FieldPath,
        errors: &mut FieldErrors,
    ) -> ValidBoot {
        let macs_path = path.child("macAddresses");
        if self.mac_addresses.is_empty() {
            errors.push(macs_path.clone(), "must name at least one MAC address");
        }
        let mut macs: Vec<MacAddress> = Vec::new();
        for (i, text) in self.mac_addresses.iter().enumerate() {
            let Some(mac) = errors.check(&macs_path.index(i), rules::mac_address(text)) else {
                continue;
            };
            if macs.contains(&mac) {
                errors.push(macs_path.clone(), rules::RuleError::MacTwice.to_string());
            }
            macs.push(mac);
        }
        let sources_path = path.child("sourceCidrs");
        if self.source_cidrs.as_ref().is_some_and(Vec::is_empty) {
            errors.push(
                sources_path.clone(),
                "must name at least one network; leave sourceCidrs out to allow any",
            );
        }
        let sources = (self.source_cidrs.iter().flatten().enumerate())
            .filter_map(|(i, text)| errors.check(&sources_path.index(i), rules::cidr(text)))
            .collect();
        if let Some(lun) = self.lun {
            let lun_path = path.child("lun");
            errors.check(&lun_path, rules::lun(lun));
            if grant.luns.as_ref().is_some_and(|luns| !luns.contains(&lun)) {
                errors.push(lun_path, format!("LUN {lun} is not one of spec.luns"));
            }
        }
        ValidBoot {
            macs,
            sources,
            lun: self.lun,
        }
    }
}
