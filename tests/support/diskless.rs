//! The diskless fleet of the network-boot tests: four machines (SeaBIOS and OVMF, each booting
//! the ISO or the raw disc, two with mutual CHAP), the discs and grants they boot with, and the
//! check of what each booted system read from its iBFT. Shared by the tgt boot test
//! (tests/netboot.rs) and the LIO one, which runs in the guest tests/lio.rs already boots.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::manifests;
use super::netboot::{self, Firmware, ImageKind, NetbootMachine};

/// One diskless machine of the boot test: its firmware, the disc it boots, its card, and
/// whether its grant uses mutual CHAP.
pub struct Machine {
    pub firmware: Firmware,
    pub kind: ImageKind,
    pub card: &'static str,
    pub mutual: bool,
}

impl Machine {
    pub fn name(&self) -> String {
        format!("{}-{}", self.firmware.name(), self.kind.name())
    }

    pub fn initiator(&self) -> String {
        format!("iqn.2010-04.org.ipxe:{}", self.name())
    }

    /// Its grant, boot block (for requests from `sources`) and CHAP Secret.
    pub fn manifests(&self, sources: &str) -> [Value; 2] {
        let name = self.name();
        let mut secret = json!({"username": name, "password": format!("{name}-pw12")});
        if self.mutual {
            secret["mutualUsername"] = json!(format!("{}-target", self.kind.name()));
            secret["mutualPassword"] = json!("target $ pw #1");
        }
        let grant = manifests::discus(
            "InitiatorAccess",
            "lab",
            &name,
            json!({
                "targetRef": {"name": self.kind.name()},
                "initiatorIqn": self.initiator(),
                "chap": {"secretRef": {"name": format!("{name}-chap")}, "mutual": self.mutual},
                "boot": {"macAddresses": [self.card], "sourceCidrs": [sources]},
            }),
        );
        [
            grant,
            manifests::secret("lab", &format!("{name}-chap"), secret),
        ]
    }
}

/// The two boot discs, each a target of its own on the portal `address`, copied into `images`
/// (where discus sees them at `seen_at`): the raw image as a disk; the ISO as a CD where the
/// backend has CD drives (tgt), else as a disk of 2048-byte blocks (LIO), which iPXE and the
/// firmware boot as a CD too.
pub fn boot_discs(images: &Path, seen_at: &Path, address: &str, cdrom: bool) -> Vec<Value> {
    let built = netboot::boot_images();
    let mut objects = Vec::new();
    for kind in ImageKind::ALL {
        let file = format!("{}.img", kind.name());
        std::fs::copy(built.image(kind), images.join(&file)).expect("copy the boot image");
        let digest = super::serve_host::sha256_file(&images.join(&file));
        let (format, lun) = match kind {
            ImageKind::Iso if cdrom => ("iso", json!({"deviceType": "cdrom"})),
            ImageKind::Iso => ("iso", json!({"blockSize": 2048})),
            ImageKind::Raw => ("raw", json!({})),
        };
        let mut lun = lun;
        lun["lun"] = json!(0);
        lun["image"] = json!(kind.name());
        objects.push(manifests::discus(
            "DiscImage",
            "lab",
            kind.name(),
            json!({"source": {"file": {"path": seen_at.join(&file)}}, "sha256": digest, "format": format}),
        ));
        objects.push(manifests::discus(
            "IscsiTarget",
            "lab",
            kind.name(),
            json!({
                "iqn": format!("iqn.2026-11.dev.discus:boot-{}", kind.name()),
                "portals": [{"address": address}],
                "luns": [lun],
            }),
        ));
    }
    objects
}

/// BIOS and UEFI machines, each booting the ISO or the raw disc, two of them with mutual CHAP.
pub fn machines() -> [Machine; 4] {
    [
        Machine {
            firmware: Firmware::Bios,
            kind: ImageKind::Iso,
            card: "52:54:00:10:00:01",
            mutual: false,
        },
        Machine {
            firmware: Firmware::Uefi,
            kind: ImageKind::Iso,
            card: "52:54:00:10:00:02",
            mutual: true,
        },
        Machine {
            firmware: Firmware::Bios,
            kind: ImageKind::Raw,
            card: "52:54:00:10:00:03",
            mutual: true,
        },
        Machine {
            firmware: Firmware::Uefi,
            kind: ImageKind::Raw,
            card: "52:54:00:10:00:04",
            mutual: false,
        },
    ]
}

/// Powers each machine on with `start` and checks what its booted system read from the iBFT:
/// the grant's initiator name and card, the target of its disc at `(portal, lun)`, the CHAP
/// names. Returns the boot times; `log` is the node's, for failures.
pub fn boot_all(
    machines: &[Machine],
    start: impl Fn(&Machine) -> NetbootMachine,
    (portal, lun): (&str, u16),
    log: impl Fn() -> String,
) -> String {
    let mut times = Vec::new();
    for machine in machines {
        let booted = start(machine)
            .wait_for_marker(Instant::now() + Duration::from_secs(300))
            .unwrap_or_else(|why| panic!("{}: {why}\n{}", machine.name(), log()));
        let marker = booted.marker;
        assert_eq!(marker.kind, machine.kind.name());
        let ibft = marker
            .ibft
            .unwrap_or_else(|| panic!("{}: no iBFT", machine.name()));
        assert_eq!(ibft.initiator, machine.initiator());
        assert_eq!(ibft.mac, machine.card);
        let target = &ibft.targets[0];
        assert_eq!(
            (target.name.as_str(), target.address.as_str(), target.lun),
            (
                format!("iqn.2026-11.dev.discus:boot-{}", machine.kind.name()).as_str(),
                portal,
                Some(lun)
            ),
            "{}",
            machine.name()
        );
        assert_eq!(target.chap_name.as_deref(), Some(machine.name().as_str()));
        let reverse = machine
            .mutual
            .then(|| format!("{}-target", machine.kind.name()));
        assert_eq!(target.reverse_chap_name, reverse, "{}", machine.name());
        times.push(format!(
            "{} {:.1} s",
            machine.name(),
            booted.boot_time.as_secs_f64()
        ));
    }
    times.join(", ")
}
