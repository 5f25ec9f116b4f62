//! The desired state of one storage node, computed from the resources (pure).
//!
//! Input: every DiscImage, IscsiTarget and InitiatorAccess, the Secrets they name, this node's
//! facts, and the images verified and stored on this node. Output: the complete set of targets the
//! node must serve — portals, LUNs with their backing files, ACLs with CHAP and mapped LUNs — and a
//! problem for every resource that cannot be served here, with the reason.
//!
//! Access is denied by default: a target without an InitiatorAccess has no ACL, and nothing else
//! lets an initiator in.

mod grants;
mod holds;
mod policy;
mod problem;
mod snapshot;
mod targets;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;

pub use holds::{Hold, Holds};
pub use policy::Policy;
pub use problem::{Kind, ObjectKey, Problem, Reason};
pub use snapshot::{Checked, Snapshot, wake_for_expiry};

use crate::api::chap::ChapCredentials;
use crate::api::iscsi_target::{DeviceType, Portal};

/// What the agent knows about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The addresses to listen on when a target names no portal (a Node's InternalIPs).
    pub addresses: Vec<IpAddr>,
    /// Every address of the node and its pod networks: never an image source (in a cluster,
    /// node ports listen on those addresses).
    pub own_networks: Vec<ipnet::IpNet>,
}

/// Agent settings the desired state depends on.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The prefix of default IQNs: `<authority>:<namespace>.<name>`.
    pub iqn_authority: String,
    /// Whether the backend can present a LUN as a CD/DVD drive (tgt can, LIO cannot).
    pub cdrom_supported: bool,
    /// Where writable copies of images live.
    pub writable_dir: PathBuf,
    /// What targets may ask for.
    pub policy: Policy,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            iqn_authority: DEFAULT_IQN_AUTHORITY.to_owned(),
            cdrom_supported: false,
            writable_dir: PathBuf::from("/var/lib/discus/writable"),
            policy: Policy::open(),
        }
    }
}

pub const DEFAULT_IQN_AUTHORITY: &str = "iqn.2026-11.dev.discus";

/// An image verified and stored on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyImage {
    /// The raw file that is served.
    pub path: PathBuf,
    pub size_bytes: u64,
    /// The SHA-256 of the raw bytes served.
    pub served_sha256: String,
}

/// Everything the desired state is computed from.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    /// Everything declared, validated.
    pub snapshot: &'a Snapshot<'a>,
    pub node: &'a NodeFacts,
    /// DiscImages verified and stored on this node, by namespace and name.
    pub ready: &'a BTreeMap<ObjectKey, ReadyImage>,
    pub settings: &'a Settings,
    pub now: Timestamp,
    /// Whether each grant held by heartbeat is held now, as this node judged it; `None` where
    /// nothing watches heartbeats (`discus serve`).
    pub holds: Option<&'a Holds>,
}

/// The node's complete desired configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Every target to serve, ordered by IQN.
    pub targets: Vec<TargetConfig>,
    /// Every resource that cannot be served here, and why.
    pub problems: Vec<Problem>,
    /// Grants past their `expiresAt`.
    pub expired: Vec<ObjectKey>,
    /// The next moment a grant expires, so a sync can be scheduled for it.
    pub next_expiry: Option<Timestamp>,
    /// When the first held grant lapses unless renewed, for the same reason.
    pub next_lapse: Option<std::time::Instant>,
    /// The IQN every valid IscsiTarget is (or would be) served under, placed here or not.
    pub iqns: BTreeMap<ObjectKey, String>,
    /// The DiscImages this node needs: those of the targets placed on it, and those whose
    /// `nodeSelector` selects it.
    pub needed_images: BTreeSet<ObjectKey>,
    /// The grants with an ACL here that machines may boot through, by grant. Apart from the
    /// targets: how a machine finds its grant never changes what the target holds.
    pub boots: BTreeMap<ObjectKey, BootConfig>,
}

/// How a machine boots through a grant (`spec.boot`), resolved against its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootConfig {
    /// The cards that may ask for the grant's script; each names one grant on a node.
    pub macs: Vec<crate::api::mac::MacAddress>,
    /// Where the request may come from; anywhere when empty.
    pub sources: Vec<ipnet::IpNet>,
    /// The LUN to boot from, one of the ACL's.
    pub lun: u32,
    pub expires_at: Option<Timestamp>,
}

/// One target as the backend must hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetConfig {
    pub iqn: String,
    /// The IscsiTarget it comes from.
    pub owner: ObjectKey,
    pub portals: Vec<Portal>,
    /// Whether every login must authenticate with CHAP.
    pub chap_required: bool,
    /// Ordered by LUN number.
    pub luns: Vec<LunConfig>,
    /// One per granted initiator, ordered by initiator name.
    pub acls: Vec<AclConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunConfig {
    pub lun: u32,
    /// The DiscImage behind it.
    pub image: ObjectKey,
    pub backing: Backing,
    pub size_bytes: u64,
    /// The SCSI unit serial number: derived from the served digest, so every node serving the
    /// same image presents the same device.
    pub serial: String,
    pub read_only: bool,
    pub block_size: Option<u32>,
    pub device_type: DeviceType,
}

/// The file behind a LUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// The verified image itself, shared by every read-only LUN that serves it.
    Image(PathBuf),
    /// A writable copy of the image, private to one LUN of one target on this node, so that
    /// writes never reach the verified image. Made from `seed` when it does not exist.
    WritableCopy { seed: PathBuf, path: PathBuf },
}

impl Backing {
    /// The file the backend serves.
    pub fn path(&self) -> &std::path::Path {
        match self {
            Self::Image(path) | Self::WritableCopy { path, .. } => path,
        }
    }
}

/// One initiator's access to a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AclConfig {
    pub initiator: String,
    /// The InitiatorAccess it comes from.
    pub grant: ObjectKey,
    pub chap: Option<ChapCredentials>,
    /// Ordered by LUN number.
    pub luns: Vec<MappedLun>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedLun {
    pub lun: u32,
    pub read_only: bool,
}

/// Computes the node's desired state. Pure: the same inputs give the same output.
pub fn desired_state(inputs: &Inputs<'_>) -> DesiredState {
    let mut state = DesiredState::default();
    let images = targets::index_images(inputs, &mut state);
    let served = targets::resolve(inputs, &images, &mut state);
    grants::resolve(inputs, &served, &mut state);
    state.next_expiry = inputs.snapshot.next_expiry(inputs.now);
    state.targets.sort_by(|a, b| a.iqn.cmp(&b.iqn));
    state
}

/// The key of an object: its namespace (`default` when absent, as kubectl does) and name.
pub fn object_key(meta: &ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default(),
    )
}
