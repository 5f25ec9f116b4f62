//! The block devices of a target's LUN on this machine, found in sysfs: every iSCSI session to
//! the target, and under it the SCSI devices with the unit serial number the storage nodes
//! present for the LUN (VPD page 0x80), so that a device of another target or image is never
//! taken for it. The serial, not the LUN number, says which: tgt presents LUN n as n + 1 and LIO
//! as n, and one target may be served by both. Without a serial in status, the LUN number does.
//! Without udev there is no `/dev/disk/by-id`: sysfs is always there.

use std::path::{Path, PathBuf};

/// One device of the LUN: one per portal logged in to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// `/dev/sdX`.
    pub dev: PathBuf,
    /// A `/dev/disk/by-id/…` link to it, when udev made one.
    pub by_id: Option<PathBuf>,
    /// The device-mapper device that holds it (dm-multipath), as `/dev/mapper/<name>`.
    pub multipath: Option<PathBuf>,
}

/// Where the kernel's views are: `/sys` and `/dev` on a real machine.
#[derive(Clone, Debug)]
pub struct Roots {
    pub sys: PathBuf,
    pub dev: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

/// Which LUN: by its unit serial (on any LUN number), or by number.
#[derive(Clone, Copy, Debug)]
pub enum Wanted<'a> {
    Serial(&'a str),
    Number(u32),
}

/// The running devices of the `wanted` LUN of `target`.
pub fn find(roots: &Roots, target: &str, wanted: Wanted<'_>) -> Vec<Device> {
    let mut devices = Vec::new();
    for session in children(&roots.sys.join("class/iscsi_session")) {
        if read_trimmed(&session.join("targetname")).as_deref() != Some(target) {
            continue;
        }
        for (number, block) in running_blocks(&session.join("device")) {
            let Some(name) = block.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            let sys_block = roots.sys.join("block").join(&name);
            let it = match wanted {
                Wanted::Serial(serial) => unit_serial(&sys_block).as_deref() == Some(serial),
                Wanted::Number(lun) => number == lun,
            };
            if it {
                devices.push(Device {
                    dev: roots.dev.join(&name),
                    by_id: by_id(&roots.dev, &name),
                    multipath: multipath(roots, &sys_block),
                });
            }
        }
    }
    devices.sort_by(|a, b| a.dev.cmp(&b.dev));
    devices
}

/// The block devices of the running SCSI devices `H:C:T:L` under a session, with their LUN.
fn running_blocks(session_device: &Path) -> Vec<(u32, PathBuf)> {
    children(session_device)
        .into_iter()
        .filter(|t| {
            t.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("target"))
        })
        .flat_map(|target| children(&target))
        .filter(|d| read_trimmed(&d.join("state")).as_deref() == Some("running"))
        .filter_map(|d| {
            let name = d.file_name()?.to_string_lossy().into_owned();
            let lun = name.rsplit(':').next()?.parse().ok()?;
            Some(
                children(&d.join("block"))
                    .into_iter()
                    .map(move |b| (lun, b)),
            )
        })
        .flatten()
        .collect()
}

/// The unit serial number of a SCSI disk (VPD page 0x80: four bytes of header, then ASCII).
fn unit_serial(sys_block: &Path) -> Option<String> {
    let page = std::fs::read(sys_block.join("device/vpd_pg80")).ok()?;
    let serial = page.get(4..)?;
    Some(
        String::from_utf8_lossy(serial)
            .trim_matches(['\0', ' '])
            .to_owned(),
    )
}

fn by_id(dev: &Path, name: &str) -> Option<PathBuf> {
    let target = dev.join(name);
    let mut links: Vec<PathBuf> = children(&dev.join("disk/by-id"))
        .into_iter()
        .filter(|link| std::fs::canonicalize(link).is_ok_and(|t| t == target))
        .collect();
    // `wwn-…` and `scsi-…` name the LUN on every path alike; prefer them.
    links.sort_by_key(|l| {
        !l.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("wwn-"))
    });
    links.into_iter().next()
}

/// The dm-multipath device holding a path, if one does (another device-mapper holder — LVM,
/// dm-crypt — is not it).
fn multipath(roots: &Roots, sys_block: &Path) -> Option<PathBuf> {
    let holder = children(&sys_block.join("holders"))
        .into_iter()
        .find(|holder| {
            read_trimmed(&holder.join("dm/uuid")).is_some_and(|uuid| uuid.starts_with("mpath-"))
        })?;
    let name = read_trimmed(&holder.join("dm/name"))?;
    Some(roots.dev.join("mapper").join(name))
}

fn children(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs with one session to `target`, LUN 0 and LUN 1 on sdb and sdc, sdb held by dm-0.
    fn sysfs(root: &Path, target: &str) -> Roots {
        let sys = root.join("sys");
        let session = sys.join("class/iscsi_session/session1");
        let write = |path: PathBuf, content: &[u8]| {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, content).expect("write");
        };
        write(session.join("targetname"), format!("{target}\n").as_bytes());
        for (lun, name, serial) in [(0, "sdb", "discus-aaaa"), (1, "sdc", "discus-bbbb")] {
            let scsi = session.join(format!("device/target2:0:0/2:0:0:{lun}"));
            write(scsi.join("state"), b"running\n");
            std::fs::create_dir_all(scsi.join("block").join(name)).expect("mkdir");
            let mut page = vec![0, 0x80, 0, serial.len() as u8];
            page.extend(serial.as_bytes());
            write(sys.join("block").join(name).join("device/vpd_pg80"), &page);
        }
        write(sys.join("block/sdb/holders/dm-0/dm/name"), b"mpatha\n");
        write(
            sys.join("block/sdb/holders/dm-0/dm/uuid"),
            b"mpath-36001405abc\n",
        );
        // An LVM volume on sdc is no multipath device.
        write(sys.join("block/sdc/holders/dm-1/dm/name"), b"vg-lv\n");
        write(sys.join("block/sdc/holders/dm-1/dm/uuid"), b"LVM-abc\n");
        Roots {
            sys,
            dev: root.join("dev"),
        }
    }

    #[test]
    fn the_lun_s_device_is_found_by_serial_on_any_number_or_by_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = sysfs(dir.path(), "iqn.2026-11.dev.discus:demo");
        let target = "iqn.2026-11.dev.discus:demo";
        let found = find(&roots, target, Wanted::Serial("discus-aaaa"));
        assert_eq!(
            found,
            [Device {
                dev: roots.dev.join("sdb"),
                by_id: None,
                multipath: Some(roots.dev.join("mapper/mpatha")),
            }]
        );
        let sdc = &find(&roots, target, Wanted::Serial("discus-bbbb"))[0];
        assert_eq!((&sdc.dev, &sdc.multipath), (&roots.dev.join("sdc"), &None));
        assert_eq!(
            find(&roots, target, Wanted::Number(1))[0].dev,
            roots.dev.join("sdc")
        );
        // Another image, another target, a LUN that is not there: nothing.
        assert!(find(&roots, target, Wanted::Serial("discus-cccc")).is_empty());
        assert!(find(&roots, "iqn.2026-11.dev.discus:other", Wanted::Number(0)).is_empty());
        assert!(find(&roots, target, Wanted::Number(2)).is_empty());
    }
}
