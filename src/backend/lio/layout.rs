//! Where each object lives in configfs, spelt once. The reader and the writer name every path
//! through these types — one per kind of configfs node, owning its path, as rtslib's objects do —
//! so that what discus writes is by construction where it reads.
//!
//! ```text
//! target/core/<hba>/<storage>/{control, udev_path, enable, info, wwn/vpd_unit_serial, attrib/block_size}
//! target/iscsi/<iqn>/tpgt_<tag>/{enable, param/TargetAlias, attrib/<name>, np/<portal>}
//!                               lun/lun_<n>/<link to core/<hba>/<storage>>
//!                               acls/<initiator>/{info, auth/<field>, lun_<n>/{lun → ../../lun/lun_<n>, write_protect}}
//! ```

use std::path::{Path, PathBuf};

/// The TPG discus uses in each of its targets.
pub const TPG_TAG: u16 = 1;

/// `tpgt_3` → 3.
pub fn tpg_tag(name: &str) -> Option<u16> {
    name.strip_prefix("tpgt_")?.parse().ok()
}

/// `lun_3` → 3 (a TPG's LUN, or an ACL's mapped LUN).
pub fn lun_index(name: &str) -> Option<u64> {
    name.strip_prefix("lun_")?.parse().ok()
}

/// `/sys/kernel/config/target`.
#[derive(Clone, Debug)]
pub struct Root(PathBuf);

impl Root {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The storage side: HBAs and their storage objects.
    pub fn core(&self) -> PathBuf {
        self.0.join("core")
    }

    /// The iSCSI fabric: its targets (and `discovery_auth`).
    pub fn iscsi(&self) -> PathBuf {
        self.0.join("iscsi")
    }

    pub fn hba(&self, hba: &str) -> PathBuf {
        self.core().join(hba)
    }

    pub fn storage(&self, hba: &str, name: &str) -> StorageDir {
        StorageDir(self.hba(hba).join(name))
    }

    pub fn target(&self, iqn: &str) -> PathBuf {
        self.iscsi().join(iqn)
    }

    pub fn tpg(&self, iqn: &str, tag: u16) -> TpgDir {
        TpgDir(self.target(iqn).join(format!("tpgt_{tag}")))
    }
}

/// A storage object: `core/<hba>/<name>`.
#[derive(Clone, Debug)]
pub struct StorageDir(PathBuf);

impl StorageDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// What the kernel says of it (its file, size, caching).
    pub fn info(&self) -> PathBuf {
        self.0.join("info")
    }
    /// `fd_dev_name=…,fd_dev_size=…` and the like, written once before enabling.
    pub fn control(&self) -> PathBuf {
        self.0.join("control")
    }
    pub fn udev_path(&self) -> PathBuf {
        self.0.join("udev_path")
    }
    pub fn enable(&self) -> PathBuf {
        self.0.join("enable")
    }
    pub fn unit_serial(&self) -> PathBuf {
        self.0.join("wwn/vpd_unit_serial")
    }
    pub fn block_size(&self) -> PathBuf {
        self.0.join("attrib/block_size")
    }
}

/// A target portal group: `iscsi/<iqn>/tpgt_<tag>`.
#[derive(Clone, Debug)]
pub struct TpgDir(PathBuf);

impl TpgDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn enable(&self) -> PathBuf {
        self.0.join("enable")
    }
    pub fn alias(&self) -> PathBuf {
        self.0.join("param/TargetAlias")
    }
    pub fn attribute(&self, name: &str) -> PathBuf {
        self.0.join("attrib").join(name)
    }
    pub fn portals(&self) -> PathBuf {
        self.0.join("np")
    }
    pub fn portal(&self, portal: &str) -> PathBuf {
        self.portals().join(portal)
    }
    pub fn luns(&self) -> PathBuf {
        self.0.join("lun")
    }
    pub fn lun(&self, index: u64) -> PathBuf {
        self.luns().join(format!("lun_{index}"))
    }
    /// The link in a LUN's folder to its storage object.
    pub fn lun_link(&self, index: u64) -> PathBuf {
        self.lun(index).join("discus")
    }
    pub fn acls(&self) -> PathBuf {
        self.0.join("acls")
    }
    pub fn acl(&self, initiator: &str) -> AclDir {
        AclDir(self.acls().join(initiator))
    }
}

/// One initiator's ACL: `…/acls/<initiator>`.
#[derive(Clone, Debug)]
pub struct AclDir(PathBuf);

impl AclDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// Its sessions (`Address … TCP` lines).
    pub fn info(&self) -> PathBuf {
        self.0.join("info")
    }
    /// A CHAP credential: `userid`, `password`, `userid_mutual`, `password_mutual`.
    pub fn auth(&self, field: &str) -> PathBuf {
        self.0.join("auth").join(field)
    }
    pub fn mapped_lun(&self, index: u64) -> PathBuf {
        self.0.join(format!("lun_{index}"))
    }
    /// The link in a mapped LUN's folder to the TPG's LUN.
    pub fn mapped_lun_link(&self, index: u64) -> PathBuf {
        self.mapped_lun(index).join("lun")
    }
    pub fn write_protect(&self, index: u64) -> PathBuf {
        self.mapped_lun(index).join("write_protect")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_the_kernel_s() {
        let root = Root::new("/sys/kernel/config/target");
        let tpg = root.tpg("iqn.2026-11.dev.discus:lab.boot", TPG_TAG);
        assert_eq!(
            tpg.acl("iqn.2010-04.org.ipxe:pc").write_protect(3),
            Path::new(
                "/sys/kernel/config/target/iscsi/iqn.2026-11.dev.discus:lab.boot/tpgt_1/acls/iqn.2010-04.org.ipxe:pc/lun_3/write_protect"
            )
        );
        assert_eq!(
            root.storage("fileio_3260", "discus-x").unit_serial(),
            Path::new("/sys/kernel/config/target/core/fileio_3260/discus-x/wwn/vpd_unit_serial")
        );
        assert_eq!(tpg_tag("tpgt_1"), Some(1));
        assert_eq!(lun_index("lun_12"), Some(12));
        assert_eq!(lun_index("lunx"), None);
    }
}
