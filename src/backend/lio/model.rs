//! What the kernel's LIO holds, as a typed model read from configfs.

use crate::api::chap::Password;

/// Everything under `/sys/kernel/config/target` that discus reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LioState {
    /// `core/<hba>` names (`fileio_3260`, …).
    pub hbas: Vec<String>,
    pub storage: Vec<StorageObject>,
    pub targets: Vec<LioTarget>,
    /// Targets discus made that a pass over partial input must keep (see `keep_undeclared`):
    /// not read from configfs.
    pub kept: std::collections::BTreeSet<String>,
    /// Targets discus began to make whose alias may not be written yet (from its record in the
    /// data directory, not from configfs): see `plan::owned`.
    pub unmarked: std::collections::BTreeSet<String>,
}

/// `core/<hba>/<name>`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StorageObject {
    pub hba: String,
    pub name: String,
    pub enabled: bool,
    /// The backing file (`info`: `File: …`).
    pub file: Option<String>,
    /// Bytes (`info`: `Size: …`).
    pub size: Option<u64>,
    /// `info`: `Mode: Buffered-WCE` rather than `O_DSYNC`.
    pub buffered: bool,
    /// `wwn/vpd_unit_serial`, without the `T10 VPD Unit Serial Number:` prefix.
    pub serial: String,
    pub block_size: u32,
}

/// `iscsi/<iqn>`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LioTarget {
    pub iqn: String,
    pub tpgs: Vec<Tpg>,
}

/// `iscsi/<iqn>/tpgt_<tag>`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tpg {
    pub tag: u16,
    pub enabled: bool,
    /// `param/TargetAlias`: how discus marks what it made.
    pub alias: String,
    /// `attrib/*` that discus sets, by name.
    pub attributes: Vec<(String, String)>,
    /// `np/*`: `address:port`, `[v6]:port`.
    pub portals: Vec<String>,
    pub luns: Vec<TpgLun>,
    pub acls: Vec<Acl>,
}

/// `lun/lun_<index>`, linked to a storage object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TpgLun {
    pub index: u64,
    /// `(hba, name)` of the storage object its link points at.
    pub storage: Option<(String, String)>,
}

/// `acls/<initiator>`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    pub initiator: String,
    pub userid: String,
    pub password: Option<Password>,
    pub userid_mutual: String,
    pub password_mutual: Option<Password>,
    pub mapped: Vec<MappedLun>,
    /// Addresses of the initiator's logged-in connections (`info`).
    pub sessions: Vec<String>,
}

/// `acls/<initiator>/lun_<index>`, linked to a TPG LUN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MappedLun {
    pub index: u64,
    /// The TPG LUN its link points at.
    pub tpg_lun: Option<u64>,
    pub write_protect: bool,
}

impl LioState {
    pub fn target(&self, iqn: &str) -> Option<&LioTarget> {
        self.targets.iter().find(|t| t.iqn == iqn)
    }

    pub fn storage_object(&self, name: &str) -> Option<&StorageObject> {
        self.storage.iter().find(|s| s.name == name)
    }
}

impl LioTarget {
    /// The TPG discus uses: tag 1.
    pub fn tpg(&self) -> Option<&Tpg> {
        self.tpgs.iter().find(|t| t.tag == 1)
    }
}
