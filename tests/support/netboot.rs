//! Network boot through iPXE, for tests: boot images that report what the firmware handed the
//! booted system, and a diskless qemu machine that boots them from an iSCSI target with
//! Debian's iPXE.
//!
//! ## The boot images ([`boot_images`])
//!
//! Both boot Debian's kernel (the one tests/support/lio_vm.rs caches, [`lio_vm::kernel`]) with a
//! busybox initramfs whose init loads `iscsi_boot_sysfs` and `iscsi_ibft` (its only dependency,
//! per its modinfo), prints one line on the serial console and powers off (`poweroff -f`; qemu
//! exits):
//!
//! ```text
//! DISCUS-NETBOOT-OK iso ibft: initiator=<iqn> mac=<mac> ip=<ip> target0=<iqn>@<ip>:<port> lun0=<raw> chap0=<name> rchap0=<name> [target1=…]
//! DISCUS-NETBOOT-OK raw ibft: none
//! ```
//!
//! (`-` for a field the iBFT lacks; the CHAP secrets, which sysfs shows too, are never printed.)
//! [`find_marker`] and [`parse_marker`] read it. The kind comes from the kernel command line
//! (`discus.kind=`), so one initramfs serves both images.
//!
//! - **iso**: `grub-mkrescue` (grub-pc-bin, grub-efi-amd64-bin, mtools, xorriso), ~14 MiB:
//!   ISO 9660 with two El Torito entries, BIOS (grub's eltorito.img) and UEFI (a FAT image with
//!   grub's BOOTX64.EFI). Serve it as a CD (tgt `--device-type cd`: 2048-byte blocks).
//! - **raw**: a 64 MiB MBR disk, assembled here without loop devices, partitioning tools or
//!   grub-install: partition 1 is a FAT ESP (type 0xEF, from 1 MiB; `mkfs.vfat -C`, filled
//!   with mtools) holding the kernel, the initramfs, grub.cfg and `EFI/BOOT/BOOTX64.EFI`
//!   (`grub-mkimage -O x86_64-efi`); for BIOS, sector 0 is grub's boot.img (its
//!   `kernel_sector` at 0x5c set to 1) and sectors 1… a `grub-mkimage -O i386-pc` core.img,
//!   whose own block list already points at LBA 2 on (what grub-bios-setup would write for an
//!   MBR-gap install; that tool wants a device). Both grubs have their modules built in and
//!   find their partition with `search --file /discus-netboot`. MBR rather than GPT: no CRCs,
//!   a gap for core.img without a BIOS boot partition, and OVMF and iPXE take an 0xEF
//!   partition's FAT as an ESP. The file is sparse (~11 MiB on disk).
//!
//! Cached in `~/.cache/discus/netboot-<release>-r<RECIPE>-<digest of the recipe's texts>/`
//! (`netboot.iso`, `netboot.raw`, `initrd`; ~27 MiB), built aside (`….partial-<pid>`) and
//! renamed into place, rebuilt when absent; a few seconds to build once the kernel is cached.
//!
//! ## The machine ([`Netboot`], [`NetbootMachine`])
//!
//! `qemu-system-x86_64 -accel tcg`, no disk, no VGA, one virtio NIC whose option ROM is
//! Debian's iPXE, qemu's user-mode network (its DHCP hands iPXE the boot file URL; the guest
//! reaches 127.0.0.1 at 10.0.2.2), SeaBIOS or OVMF, and the serial console in a file. Start it
//! in a [`Sandbox`] ([`Netboot::start_in`]) to reach servers on the sandbox's loopback (tgtd,
//! discus, or [`ScriptServer`] bound there with [`Sandbox::listen`]).
//!
//! ## Facts (found with tests/netboot_harness.rs; Debian 12: ipxe-qemu 1.0.0+git-20190125.36a4c85,
//! qemu 7.2, SeaBIOS 1.16.2, ovmf 2022.11, tgt 1.0.85, grub 2.06)
//!
//! - **ROMs**: BIOS: `/usr/lib/ipxe/qemu/pxe-virtio.rom` (efi-virtio.rom works too: it carries
//!   the BIOS image first). UEFI: `/usr/lib/ipxe/qemu/efi-virtio.rom` only; with pxe-virtio.rom,
//!   OVMF uses its own virtio-net driver and PXE/HTTP boot (no iPXE), which fetches the script
//!   as a boot program and fails. Both ROMs say PCI 1af4:1041 (modern virtio-net) and qemu does
//!   not patch that: with qemu's default transitional device (1af4:1000) SeaBIOS does not run
//!   the ROM at all ("No bootable device"); hence `disable-legacy=on`.
//! - **Serial console**: SeaBIOS mirrors text output (its own, iPXE's, grub's) onto the serial
//!   port with `-machine graphics=off` and no VGA; OVMF's console is the serial port anyway.
//! - **`${net0/mac}` in the DHCP boot file** is expanded, and percent-encoded in the query:
//!   `bootfile=http://10.0.2.2:PORT/boot/iso?mac=${net0/mac}` arrives as
//!   `GET /boot/iso?mac=52%3A54%3A00%3Ad1%3A5c%3A01 HTTP/1.1`.
//! - **Multipath**: `sanboot` takes several SAN URIs. With a dead portal first
//!   (`iscsi:10.0.2.2::3299:1:…`, connection refused) and the live one second, it boots from
//!   the second; the iBFT lists both, in the script's order (target0 the dead path, without a
//!   CHAP name; target1 the live one, with it).
//! - **2048-byte blocks**: the ISO as a tgt CD LUN (READ CAPACITY: 2048-byte blocks) boots
//!   under SeaBIOS (iPXE's int13: "Registered SAN device 0x80", El Torito) and under OVMF
//!   (iPXE's block device; OVMF finds the El Torito ESP image and iPXE starts its
//!   BOOTX64.EFI).
//! - **iBFT**: found under both firmwares (sysfs `acpi_header`: iBFT/FENSYS/iPXE): initiator
//!   name, the NIC's MAC and DHCP address (10.0.2.50, as the harness asks qemu), each target's
//!   IQN, address 10.0.2.2 and port, LUN (sysfs shows `01000000` for LUN 1), CHAP name and, with mutual CHAP, the
//!   reverse name; the secrets are in sysfs too (`chap-secret`, `rev-chap-name-secret`).
//! - **Mutual CHAP** works against tgt (`reverse-username`/`reverse-password` in the script, an
//!   account bound `--outgoing`), and iPXE checks it: a wrong target secret ends in "Could not
//!   open SAN device: Permission denied (http://ipxe.org/020d623c)" (020d628f under UEFI) and
//!   "Could not boot image"; the wait for the marker ends there, 5.5 s after power-on under
//!   SeaBIOS, 10 s under OVMF (whose boot manager would go on with its own PXE and HTTP boot
//!   over iPXE's network driver, then its shell, at ~28 s).
//! - **Addresses**: the guest reaches the sandbox's 127.0.0.1 as 10.0.2.2, and any other
//!   address the sandbox has (e.g. 10.99.0.1 added to its `lo`) as itself, through qemu's NAT:
//!   a script and a portal at 10.99.0.1 boot, and the iBFT then says 10.99.0.1:3260. So a
//!   discus in the sandbox can advertise such an address in its scripts.
//! - **Boot times**, power-on to marker, TCG on 2 busy cores (five runs): SeaBIOS 15.1–19.8 s,
//!   OVMF 15.8–20.4 s (the slowest run shared the cores with another test's qemu). SeaBIOS reaches iPXE in 0.3 s, OVMF in ~4.5 s; iPXE's DHCP takes ~3 s
//!   to its script; grub loads kernel and initramfs (~10 MiB over iSCSI) in ~0.5 s; Linux runs
//!   to the marker in ~9 s after SeaBIOS, ~6 s after OVMF. See [`NetbootMachine::milestones`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::lio_vm::{self, Qemu};
use super::sandbox::Sandbox;

/// The version of the image recipe: bump it when the images change in a way the texts below do
/// not show (a tool's options, the disk layout).
pub const RECIPE: u32 = 1;

/// The modules the guest loads, in load order (`iscsi_ibft` depends on `iscsi_boot_sysfs`).
pub const MODULES: &[&str] = &["iscsi_boot_sysfs", "iscsi_ibft"];

/// What the guest's init prints, first on its line.
pub const MARKER: &str = "DISCUS-NETBOOT-OK";

/// The raw disk image's size.
pub const RAW_SIZE: u64 = 64 << 20;

/// Where the raw image's ESP starts, in 512-byte sectors (1 MiB; core.img lives before it).
const ESP_START: u64 = 2048;

/// The file both grubs look for to find their partition.
const TAG: &str = "discus-netboot";

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko 2>/dev/null; done
kind=unknown
for word in $(cat /proc/cmdline); do
  case "$word" in discus.kind=*) kind=${word#discus.kind=};; esac
done
# A field of the iBFT, or - when it has none.
v() { x=$(cat "$1" 2>/dev/null); [ -n "$x" ] || x=-; echo "$x"; }
ibft=/sys/firmware/ibft
if [ -d $ibft/initiator ]; then
  line="initiator=$(v $ibft/initiator/initiator-name) mac=$(v $ibft/ethernet0/mac) ip=$(v $ibft/ethernet0/ip-addr)"
  for t in $ibft/target*; do
    [ -d "$t" ] || continue
    n=${t#$ibft/target}
    line="$line target$n=$(v $t/target-name)@$(v $t/ip-addr):$(v $t/port) lun$n=$(v $t/lun) chap$n=$(v $t/chap-name) rchap$n=$(v $t/rev-chap-name)"
  done
else
  line=none
fi
echo "DISCUS-NETBOOT-OK $kind ibft: $line"
poweroff -f
"#;

/// grub.cfg of both images; `@KIND@` is the image's kind.
const GRUB_CFG: &str = r#"serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
menuentry "discus netboot @KIND@" {
  # A machine whose SMBIOS product is discus-pause waits here for a line on its serial port,
  # booted from the disc and logged in, before it reads the rest (Linux) from it.
  if smbios --type 1 --get-string 5 --set product; then
    if [ "$product" = "discus-pause" ]; then
      echo "discus netboot: paused"
      read go
    fi
  fi
  echo "discus netboot: grub (${grub_platform}) loads Linux"
  linux /vmlinuz console=ttyS0 loglevel=3 panic=-1 discus.kind=@KIND@
  initrd /initrd
  echo "discus netboot: Linux loaded, starting it"
}
"#;

/// The config built into the raw image's grubs: find the ESP, then read its grub.cfg.
const EARLY_CFG: &str = "search --no-floppy --file --set=root /discus-netboot\n\
                         set prefix=($root)/boot/grub\n";

/// The grub modules the images need (the raw image's grubs have them built in).
const GRUB_MODULES: &[&str] = &[
    "part_msdos",
    "part_gpt",
    "fat",
    "iso9660",
    "normal",
    "linux",
    "search",
    "search_fs_file",
    "search_fs_uuid",
    "configfile",
    "echo",
    "serial",
    "terminal",
    "test",
    "boot",
    "smbios",
    "read",
];

/// The two images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// ISO 9660, El Torito for BIOS and UEFI: serve it as a CD (tgt `--device-type cd`).
    Iso,
    /// A 64 MiB MBR disk with a FAT ESP, for BIOS and UEFI: serve it as a disk.
    Raw,
}

impl ImageKind {
    pub const ALL: [ImageKind; 2] = [ImageKind::Iso, ImageKind::Raw];

    /// The name the marker line carries.
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Iso => "iso",
            ImageKind::Raw => "raw",
        }
    }
}

/// The cached boot images.
#[derive(Debug)]
pub struct BootImages {
    pub dir: PathBuf,
    /// The release of the kernel they boot.
    pub release: String,
    pub iso: PathBuf,
    pub raw: PathBuf,
}

impl BootImages {
    pub fn image(&self, kind: ImageKind) -> &Path {
        match kind {
            ImageKind::Iso => &self.iso,
            ImageKind::Raw => &self.raw,
        }
    }
}

/// The cache's key: the kernel release, [`RECIPE`], and a digest of everything the recipe
/// writes into the images, so that an edit of the init or a grub config is a new cache.
pub fn cache_key(release: &str) -> String {
    let mut digest = Sha256::new();
    for text in [INIT, GRUB_CFG, EARLY_CFG] {
        digest.update(text.as_bytes());
        digest.update([0]);
    }
    for name in MODULES.iter().chain(GRUB_MODULES) {
        digest.update(name.as_bytes());
        digest.update([0]);
    }
    let digest = hex::encode(digest.finalize());
    format!("{release}-r{RECIPE}-{}", &digest[..12])
}

/// The boot images, built once (per machine, while the key holds) and cached in
/// `~/.cache/discus/netboot-<key>/`: `netboot.iso` and `netboot.raw`.
pub fn boot_images() -> &'static BootImages {
    static IMAGES: OnceLock<BootImages> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let kernel = lio_vm::kernel(MODULES);
        let dir = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"))
            .join(".cache/discus")
            .join(format!("netboot-{}", cache_key(&kernel.release)));
        let images = BootImages {
            iso: dir.join("netboot.iso"),
            raw: dir.join("netboot.raw"),
            release: kernel.release.clone(),
            dir,
        };
        let complete = |images: &BootImages| images.iso.exists() && images.raw.exists();
        if complete(&images) {
            return images;
        }
        let partial = images.dir.with_file_name(format!(
            "{}.partial-{}",
            images.dir.file_name().expect("name").to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).expect("cache");
        build(&partial, &kernel);
        if std::fs::rename(&partial, &images.dir).is_err() {
            if complete(&images) {
                // Another test process got there first with the same recipe.
                let _ = std::fs::remove_dir_all(&partial);
            } else {
                // Renames are atomic: a folder without both images was damaged by hand.
                let _ = std::fs::remove_dir_all(&images.dir);
                std::fs::rename(&partial, &images.dir).expect("cache");
            }
        }
        assert!(complete(&images), "{}", images.dir.display());
        images
    })
}

/// Builds both images into `out`, with scratch files in `out/work` (removed at the end).
fn build(out: &Path, kernel: &lio_vm::Kernel) {
    let work = out.join("work");
    std::fs::create_dir_all(&work).expect("work");
    let initrd = out.join("initrd");
    initramfs(&work.join("initramfs"), &kernel.modules, &initrd);
    iso(&work, &kernel.vmlinuz, &initrd, &out.join("netboot.iso"));
    raw(&work, &kernel.vmlinuz, &initrd, &out.join("netboot.raw"));
    std::fs::remove_dir_all(&work).expect("work");
}

/// busybox, the init above and the modules, as an uncompressed cpio archive.
fn initramfs(root: &Path, modules: &Path, out: &Path) {
    for sub in ["bin", "modules", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(sub)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static must be installed");
    std::fs::write(root.join("init"), INIT).expect("init");
    std::fs::write(root.join("modules.order"), MODULES.join("\n")).expect("order");
    for module in MODULES {
        std::fs::copy(
            modules.join(format!("{module}.ko")),
            root.join(format!("modules/{module}.ko")),
        )
        .expect("module");
    }
    for file in ["init", "bin/busybox"] {
        executable(&root.join(file));
    }
    lio_vm::cpio(root, out);
}

fn executable(path: &Path) {
    let mut permissions = std::fs::metadata(path).expect("file").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(path, permissions).expect("chmod");
}

fn grub_cfg(kind: ImageKind) -> String {
    GRUB_CFG.replace("@KIND@", kind.name())
}

/// The ISO: grub-mkrescue over a tree with the kernel, the initramfs and grub.cfg.
fn iso(work: &Path, vmlinuz: &Path, initrd: &Path, out: &Path) {
    let tree = work.join("iso");
    std::fs::create_dir_all(tree.join("boot/grub")).expect("mkdir");
    std::fs::copy(vmlinuz, tree.join("vmlinuz")).expect("vmlinuz");
    std::fs::copy(initrd, tree.join("initrd")).expect("initrd");
    std::fs::write(tree.join(TAG), "discus netboot iso\n").expect("tag");
    std::fs::write(tree.join("boot/grub/grub.cfg"), grub_cfg(ImageKind::Iso)).expect("cfg");
    let mut command = Command::new("grub-mkrescue");
    command
        .arg("-o")
        .arg(out)
        .args(["--fonts=", "--locales=", "--themes="])
        .arg(format!("--install-modules={}", GRUB_MODULES.join(" ")))
        .arg(&tree)
        // grub-mkrescue makes its own temporary files; keep them out of the cache.
        .env("TMPDIR", work);
    must(command);
}

/// The raw disk: MBR with grub's boot.img, core.img in the gap, a FAT ESP from 1 MiB.
fn raw(work: &Path, vmlinuz: &Path, initrd: &Path, out: &Path) {
    let early = work.join("early.cfg");
    std::fs::write(&early, EARLY_CFG).expect("early.cfg");
    let core = work.join("core.img");
    let efi = work.join("BOOTX64.EFI");
    for (format, image, extra) in [
        ("i386-pc", &core, Some("biosdisk")),
        ("x86_64-efi", &efi, None),
    ] {
        let mut command = Command::new("grub-mkimage");
        command
            .args(["-O", format, "-p", "/boot/grub", "-o"])
            .arg(image)
            .arg("-c")
            .arg(&early)
            .args(GRUB_MODULES)
            .args(extra);
        must(command);
    }
    // The ESP, as a file of its own.
    let esp = work.join("esp.img");
    let esp_kib = (RAW_SIZE - ESP_START * 512) / 1024;
    let mut mkfs = Command::new(sbin("mkfs.vfat"));
    mkfs.args(["-C", "-n", "DISCUSNB", "-i", "d15c0001", "-h"])
        .arg(ESP_START.to_string())
        .arg(&esp)
        .arg(esp_kib.to_string());
    must(mkfs);
    let cfg = work.join("grub.cfg");
    std::fs::write(&cfg, grub_cfg(ImageKind::Raw)).expect("cfg");
    let tag = work.join(TAG);
    std::fs::write(&tag, "discus netboot raw\n").expect("tag");
    let mut mmd = Command::new("mmd");
    mmd.arg("-i")
        .arg(&esp)
        .args(["::/EFI", "::/EFI/BOOT", "::/boot", "::/boot/grub"]);
    must(mmd);
    for (from, to) in [
        (efi.as_path(), "::/EFI/BOOT/BOOTX64.EFI"),
        (cfg.as_path(), "::/boot/grub/grub.cfg"),
        (vmlinuz, "::/vmlinuz"),
        (initrd, "::/initrd"),
        (tag.as_path(), "::/discus-netboot"),
    ] {
        let mut mcopy = Command::new("mcopy");
        mcopy.arg("-i").arg(&esp).arg(from).arg(to);
        must(mcopy);
    }
    // The disk.
    let boot = std::fs::read("/usr/lib/grub/i386-pc/boot.img").expect("grub-pc-bin's boot.img");
    assert_eq!(boot.len(), 512, "boot.img");
    let mut core = std::fs::read(&core).expect("core.img");
    let sectors = core.len().div_ceil(512);
    assert!(
        (sectors as u64) < ESP_START,
        "core.img ({sectors} sectors) must fit before the ESP"
    );
    core.resize(sectors * 512, 0);
    // core.img's first sector (diskboot) loads the rest from the block list at its end: from
    // LBA 2, `sectors - 1` of them, to segment 0x820. grub-mkimage writes these for an image at
    // LBA 1 (grub 2.06); written here anyway, rather than relied on.
    core[500..508].copy_from_slice(&2u64.to_le_bytes());
    core[508..510].copy_from_slice(&u16::try_from(sectors - 1).expect("size").to_le_bytes());
    core[510..512].copy_from_slice(&0x820u16.to_le_bytes());
    let mut mbr = [0u8; 512];
    mbr[..440].copy_from_slice(&boot[..440]);
    // boot.img's kernel_sector: where core.img starts.
    mbr[0x5c..0x64].copy_from_slice(&1u64.to_le_bytes());
    // boot.img's boot_drive: 0xff, the drive the BIOS booted from (%dl).
    mbr[0x64] = 0xff;
    mbr[440..444].copy_from_slice(&0xd15c_0001u32.to_le_bytes());
    let count = u32::try_from(RAW_SIZE / 512 - ESP_START).expect("size");
    let start = u32::try_from(ESP_START).expect("start");
    let mut entry = vec![0x80, 0xfe, 0xff, 0xff, 0xef, 0xfe, 0xff, 0xff];
    entry.extend_from_slice(&start.to_le_bytes());
    entry.extend_from_slice(&count.to_le_bytes());
    mbr[446..462].copy_from_slice(&entry);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let disk = std::fs::File::create(out).expect("raw image");
    disk.set_len(RAW_SIZE).expect("size");
    use std::os::unix::fs::FileExt;
    disk.write_all_at(&mbr, 0).expect("mbr");
    disk.write_all_at(&core, 512).expect("core.img");
    // The ESP, leaving its holes as holes: the cached image stays small.
    let mut esp = std::fs::File::open(&esp).expect("esp");
    let mut chunk = vec![0u8; 64 << 10];
    let mut offset = ESP_START * 512;
    loop {
        let n = read_full(&mut esp, &mut chunk);
        if n == 0 {
            break;
        }
        if chunk[..n].iter().any(|b| *b != 0) {
            disk.write_all_at(&chunk[..n], offset).expect("esp");
        }
        offset += n as u64;
    }
    assert!(offset <= RAW_SIZE, "the ESP overflows the disk");
    disk.sync_all().expect("sync");
}

fn read_full(file: &mut std::fs::File, buffer: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buffer.len() {
        match file.read(&mut buffer[done..]).expect("read") {
            0 => break,
            n => done += n,
        }
    }
    done
}

/// A tool from /usr/sbin or /sbin, which are not on every PATH.
fn sbin(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs a command that must succeed; fails the test with what it said otherwise.
fn must(mut command: Command) {
    command.env("MTOOLS_SKIP_CHECK", "1");
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} (grub-pc-bin, grub-efi-amd64-bin, mtools, dosfstools, xorriso installed?): {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What the guest found in the iBFT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ibft {
    pub initiator: String,
    pub mac: String,
    pub ip: String,
    pub targets: Vec<IbftTarget>,
}

/// One target of the iBFT (iPXE writes one per SAN URI, up to two).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IbftTarget {
    pub index: u32,
    pub name: String,
    /// `ip:port`.
    pub address: String,
    /// The LUN, decoded from what sysfs shows, when it is a plain (peripheral) LUN below 256.
    pub lun: Option<u16>,
    /// What sysfs shows: the 8 bytes of the SCSI LUN, each as `%x`.
    pub lun_raw: String,
    pub chap_name: Option<String>,
    pub reverse_chap_name: Option<String>,
}

/// The marker line, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// `iso` or `raw`: which image booted.
    pub kind: String,
    /// `None` when the guest found no iBFT.
    pub ibft: Option<Ibft>,
}

/// The last complete marker line in a console log, from the marker on.
pub fn find_marker(console: &str) -> Option<&str> {
    let start = console.rfind(MARKER)?;
    let rest = &console[start..];
    let end = rest.find('\n')?;
    Some(rest[..end].trim_end_matches('\r'))
}

/// Reads a marker line (`DISCUS-NETBOOT-OK <kind> ibft: …`).
pub fn parse_marker(line: &str) -> Result<Marker, String> {
    let bad = |why: &str| format!("{why}: {line:?}");
    let rest = line
        .trim()
        .strip_prefix(MARKER)
        .ok_or_else(|| bad("no marker"))?;
    let (kind, summary) = rest
        .trim_start()
        .split_once(" ibft: ")
        .ok_or_else(|| bad("no ` ibft: `"))?;
    if kind.is_empty() || kind.contains(' ') {
        return Err(bad("no image kind"));
    }
    let summary = summary.trim();
    if summary == "none" {
        return Ok(Marker {
            kind: kind.to_owned(),
            ibft: None,
        });
    }
    let mut fields = std::collections::BTreeMap::new();
    for word in summary.split_whitespace() {
        let (key, value) = word
            .split_once('=')
            .ok_or_else(|| bad(&format!("{word:?} is not key=value")))?;
        fields.insert(key, value);
    }
    let field = |key: &str| {
        fields
            .get(key)
            .map(|v| (*v).to_owned())
            .ok_or_else(|| bad(&format!("no {key}")))
    };
    let optional = |key: &str| {
        fields
            .get(key)
            .filter(|v| **v != "-")
            .map(|v| (*v).to_owned())
    };
    let mut targets = Vec::new();
    for key in fields.keys() {
        let Some(index) = key
            .strip_prefix("target")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let (name, address) = field(key)?
            .rsplit_once('@')
            .map(|(n, a)| (n.to_owned(), a.to_owned()))
            .ok_or_else(|| bad(&format!("{key} is not name@ip:port")))?;
        let lun_raw = field(&format!("lun{index}"))?;
        targets.push(IbftTarget {
            index,
            name,
            address,
            lun: ibft_lun(&lun_raw),
            lun_raw,
            chap_name: optional(&format!("chap{index}")),
            reverse_chap_name: optional(&format!("rchap{index}")),
        });
    }
    targets.sort_by_key(|t| t.index);
    Ok(Marker {
        kind: kind.to_owned(),
        ibft: Some(Ibft {
            initiator: field("initiator")?,
            mac: field("mac")?,
            ip: field("ip")?,
            targets,
        }),
    })
}

/// The LUN in what the kernel's iscsi_ibft shows (each of the 8 LUN bytes as `%x`, unpadded):
/// for a peripheral LUN below 256, `0`, the LUN in hex, then six `0`s.
pub fn ibft_lun(raw: &str) -> Option<u16> {
    let middle = raw.strip_prefix('0')?.strip_suffix("000000")?;
    if middle.is_empty() || middle.len() > 2 {
        return None;
    }
    u16::from_str_radix(middle, 16).ok()
}

/// The guest's firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, qemu's default.
    Bios,
    /// OVMF (Debian's `ovmf`), as pflash: the code read-only, a copy of the variables per
    /// machine.
    Uefi,
}

impl Firmware {
    pub const ALL: [Firmware; 2] = [Firmware::Bios, Firmware::Uefi];

    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "seabios",
            Firmware::Uefi => "ovmf",
        }
    }

    /// Debian's iPXE ROM (ipxe-qemu) for a virtio NIC under this firmware: the BIOS-only
    /// pxe-virtio.rom, or efi-virtio.rom, which holds iPXE for both.
    pub fn rom(self) -> PathBuf {
        PathBuf::from(match self {
            Firmware::Bios => "/usr/lib/ipxe/qemu/pxe-virtio.rom",
            Firmware::Uefi => "/usr/lib/ipxe/qemu/efi-virtio.rom",
        })
    }
}

/// OVMF's code and its variables' template: the 4 MiB build when there is one (newer releases
/// may ship no other), else the 2 MiB one. The two must match.
fn ovmf() -> (PathBuf, PathBuf) {
    for suffix in ["_4M", ""] {
        let code = PathBuf::from(format!("/usr/share/OVMF/OVMF_CODE{suffix}.fd"));
        let vars = PathBuf::from(format!("/usr/share/OVMF/OVMF_VARS{suffix}.fd"));
        if code.exists() && vars.exists() {
            return (code, vars);
        }
    }
    panic!("OVMF must be installed (Debian's ovmf: /usr/share/OVMF/OVMF_CODE_4M.fd)");
}

/// What a diskless machine boots with.
#[derive(Clone, Debug)]
pub struct Netboot {
    pub firmware: Firmware,
    /// The boot file qemu's DHCP server hands iPXE: an `http://10.0.2.2:<port>/…` URL for a
    /// server on the (sandbox's) 127.0.0.1, or one at another address the sandbox has (qemu's
    /// NAT connects to it from there). iPXE expands `${net0/mac}` and the like in it.
    pub bootfile: String,
    /// The NIC's MAC address.
    pub mac: String,
    /// Another iPXE ROM than [`Firmware::rom`].
    pub rom: Option<PathBuf>,
    /// No option ROM on the card: the firmware's own PXE (OVMF has one; SeaBIOS has none).
    pub plain_pxe: bool,
    /// Plugged into this tap device (of the sandbox) instead of qemu's own network: DHCP, and
    /// [`Netboot::bootfile`], come from whatever serves that network.
    pub tap: Option<String>,
    pub memory_mib: u32,
    /// The machine's grub waits for a line on its serial port ([`NetbootMachine::resume`])
    /// before it loads Linux from the disc.
    pub paused: bool,
    /// `(address:port, host address:port)`: connections the machine makes to an address of its
    /// network (10.0.2.0/24) go to a port of the host (or sandbox) instead, through
    /// `busybox nc` — as if the server were on the machine's own network.
    pub forwards: Vec<(String, String)>,
}

impl Netboot {
    pub fn new(firmware: Firmware, bootfile: impl Into<String>) -> Self {
        Self {
            firmware,
            bootfile: bootfile.into(),
            mac: "52:54:00:d1:5c:01".into(),
            rom: None,
            memory_mib: 512,
            plain_pxe: false,
            tap: None,
            paused: false,
            forwards: Vec::new(),
        }
    }

    /// A card without iPXE, on the sandbox's tap device `tap`.
    pub fn plain_pxe_on(mut self, tap: &str) -> Self {
        self.plain_pxe = true;
        self.tap = Some(tap.to_owned());
        self
    }

    /// The machine waits in grub, booted from the disc, until [`NetbootMachine::resume`].
    pub fn paused(mut self) -> Self {
        self.paused = true;
        self
    }

    /// Connections to `address` (`10.0.2.x:port`) reach `to` (`127.0.0.1:port`).
    pub fn forward(mut self, address: &str, to: &str) -> Self {
        self.forwards.push((address.to_owned(), to.to_owned()));
        self
    }

    pub fn mac(mut self, mac: impl Into<String>) -> Self {
        self.mac = mac.into();
        self
    }

    /// Powers the machine on, on the host's network.
    pub fn start(&self) -> NetbootMachine {
        NetbootMachine::start(self, None)
    }

    /// Powers the machine on inside `sandbox`: 10.0.2.2 is the sandbox's loopback.
    pub fn start_in(&self, sandbox: &Sandbox) -> NetbootMachine {
        NetbootMachine::start(self, Some(sandbox))
    }
}

/// A successful boot: the marker, and how long after power-on it came.
#[derive(Clone, Debug)]
pub struct Booted {
    pub marker: Marker,
    pub boot_time: Duration,
}

/// Steps of a boot, by what the console shows when each is reached: (name, text).
pub const MILESTONES: &[(&str, &str)] = &[
    ("ipxe", "iPXE 1."),
    ("dhcp", "Configuring (net0"),
    ("script", "[script]"),
    ("sanboot", "Booting from SAN device"),
    ("grub", "discus netboot: grub"),
    ("linux", "discus netboot: Linux loaded"),
    ("marker", MARKER),
];

/// What the console shows when a boot has failed for good and nothing more will come: iPXE's
/// script (or what it chained to) failed and iPXE gives up on the NIC (it said why just
/// before; under OVMF, the boot manager then tries its own PXE and HTTP boot over iPXE's
/// driver, then its shell); SeaBIOS out of boot devices; OVMF at its shell.
const DEAD_ENDS: &[&str] = &[
    "Could not boot image",
    "No more network devices",
    "No bootable device.",
    "Shell> ",
];

/// A diskless qemu machine that boots from the network with iPXE. It is killed when dropped, and
/// with the test process.
pub struct NetbootMachine {
    qemu: Option<Qemu>,
    dir: tempfile::TempDir,
    started: Instant,
    /// The [`MILESTONES`] seen so far, with when (while someone waits).
    reached: Mutex<Vec<(&'static str, Duration)>>,
    pub firmware: Firmware,
    /// The serial port's input.
    keyboard: Mutex<std::io::PipeWriter>,
}

impl NetbootMachine {
    fn start(options: &Netboot, sandbox: Option<&Sandbox>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("discus-netboot-")
            .tempdir()
            .expect("tempdir");
        let rom = options
            .rom
            .clone()
            .unwrap_or_else(|| options.firmware.rom());
        assert!(
            options.plain_pxe || rom.exists(),
            "{} (Debian's ipxe-qemu) must be installed",
            rom.display()
        );
        let mut command = match sandbox {
            Some(sandbox) => sandbox.command("setpriv"),
            None => Command::new("setpriv"),
        };
        command.args(["--pdeathsig", "KILL", "--", "qemu-system-x86_64"]);
        command.args(["-accel", "tcg", "-m", &options.memory_mib.to_string()]);
        // No disk, no VGA: SeaBIOS then mirrors its text output (iPXE's too) onto the serial
        // port (graphics=off), and OVMF's console is the serial port.
        command.args([
            "-nodefaults",
            "-machine",
            "pc,graphics=off",
            "-vga",
            "none",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ]);
        if options.firmware == Firmware::Uefi {
            let (code, vars_template) = ovmf();
            let vars = dir.path().join("OVMF_VARS.fd");
            std::fs::copy(vars_template, &vars).expect("OVMF variables");
            command.args([
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    qemu_escape(&code.display().to_string())
                ),
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    qemu_escape(&vars.display().to_string())
                ),
            ]);
        }
        // The machine's own address leaves 10.0.2.15 free for a forwarded server.
        let mut netdev = match &options.tap {
            Some(tap) => format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            None => format!(
                "user,id=n0,dhcpstart=10.0.2.50,bootfile={}",
                qemu_escape(&options.bootfile)
            ),
        };
        if !options.forwards.is_empty() {
            // Nothing but the forwards leaves the machine's network.
            netdev.push_str(",restrict=on");
        }
        for (address, to) in &options.forwards {
            let (host, port) = to.rsplit_once(':').expect("host:port");
            netdev.push_str(&format!(
                ",guestfwd=tcp:{address}-cmd:busybox nc {host} {port}"
            ));
        }
        command.args([
            "-netdev",
            &netdev,
            // Debian's ROMs say 1af4:1041 (modern virtio-net): a transitional device (1af4:1000,
            // qemu's default) does not get them run.
            "-device",
            &format!(
                "virtio-net-pci,netdev=n0,mac={},romfile={},disable-legacy=on,bootindex=1",
                options.mac,
                if options.plain_pxe {
                    String::new()
                } else {
                    qemu_escape(&rom.display().to_string())
                }
            ),
        ]);
        if options.paused {
            command.args(["-smbios", "type=1,product=discus-pause"]);
        }
        // The serial port's input: what `resume` types.
        let (serial_in, keyboard) = std::io::pipe().expect("pipe");
        let console = std::fs::File::create(dir.path().join("console.log")).expect("console");
        command
            .stdin(serial_in)
            .stdout(console)
            .stderr(std::fs::File::create(dir.path().join("qemu.log")).expect("qemu.log"));
        std::fs::write(dir.path().join("command"), format!("{command:?}\n")).expect("command");
        let started = Instant::now();
        let qemu = Qemu::start(command);
        Self {
            qemu: Some(qemu),
            dir,
            started,
            reached: Mutex::new(Vec::new()),
            firmware: options.firmware,
            keyboard: Mutex::new(keyboard),
        }
    }

    /// Lets a paused machine go on ([`Netboot::paused`]).
    pub fn resume(&self) {
        use std::io::Write;
        let mut keyboard = self.keyboard.lock().expect("keyboard");
        keyboard.write_all(b"\r").expect("type on the serial port");
    }

    /// The serial console so far, as written (escape sequences and all).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(
            &std::fs::read(self.dir.path().join("console.log")).unwrap_or_default(),
        )
        .into_owned()
    }

    /// The console's last `lines` lines, readable: without escape sequences and carriage
    /// returns, with qemu's own complaints after them.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = readable(&self.console());
        let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut tail = all[all.len().saturating_sub(lines)..].join("\n");
        let qemu = std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default();
        if !qemu.trim().is_empty() {
            tail.push_str("\n--- qemu:\n");
            tail.push_str(qemu.trim());
        }
        tail
    }

    /// Whether qemu has exited (the guest powered off, or qemu failed).
    pub fn exited(&self) -> bool {
        self.qemu.as_ref().is_none_or(Qemu::exited)
    }

    /// Time since power-on.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The [`MILESTONES`] seen while waiting, in order, with their time since power-on (to the
    /// next 100 ms).
    pub fn milestones(&self) -> Vec<(&'static str, Duration)> {
        self.reached.lock().expect("milestones").clone()
    }

    /// Waits until the console shows `needle`; returns the time since power-on, or why not (a
    /// dead end, qemu gone, the deadline) with the console's tail.
    pub fn wait_for(&self, needle: &str, deadline: Instant) -> Result<Duration, String> {
        self.wait(deadline, |console| {
            console.contains(needle).then(|| Ok(self.uptime()))
        })
        .map_err(|why| format!("{why} waiting for {needle:?}"))
    }

    /// Waits for the marker line and reads it; or fails, with the console's tail, when the
    /// boot reached a dead end, qemu exited without it, or the deadline passed.
    pub fn wait_for_marker(&self, deadline: Instant) -> Result<Booted, String> {
        self.wait(deadline, |console| {
            find_marker(console).map(|line| {
                parse_marker(line).map(|marker| Booted {
                    marker,
                    boot_time: self.uptime(),
                })
            })
        })
    }

    fn wait<T>(
        &self,
        deadline: Instant,
        mut found: impl FnMut(&str) -> Option<Result<T, String>>,
    ) -> Result<T, String> {
        loop {
            // Whether qemu is gone is read before the console, so that a last line written just
            // before it exited is seen.
            let exited = self.exited();
            let console = self.console();
            let cleaned = readable(&console);
            {
                let mut reached = self.reached.lock().expect("milestones");
                for (name, text) in MILESTONES {
                    if !reached.iter().any(|(n, _)| n == name) && cleaned.contains(text) {
                        reached.push((name, self.uptime()));
                    }
                }
            }
            if let Some(result) = found(&console) {
                return result.map_err(|why| self.failure(&why));
            }
            if let Some(end) = DEAD_ENDS.iter().find(|end| cleaned.contains(*end)) {
                return Err(self.failure(&format!("the boot failed (console: {end:?})")));
            }
            if exited {
                return Err(self.failure("qemu exited"));
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!(
                    "deadline passed ({:.0?} after power-on)",
                    self.uptime()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn failure(&self, why: &str) -> String {
        format!(
            "{} netboot: {why}; console (last lines):\n{}",
            self.firmware.name(),
            self.console_tail(40)
        )
    }
}

impl Drop for NetbootMachine {
    fn drop(&mut self) {
        if let Some(qemu) = self.qemu.take() {
            qemu.stop();
        }
    }
}

/// A value inside a qemu option: commas doubled.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// A console log without terminal escape sequences and carriage returns.
pub fn readable(console: &str) -> String {
    let mut out = String::with_capacity(console.len());
    let mut chars = console.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ parameters… final byte (@ to ~); others: ESC and one character.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// A tiny HTTP/1.0 server for iPXE scripts: answers every GET with the script of the longest
/// path prefix that matches (404 otherwise), and records each request line. It stops when
/// dropped.
pub struct ScriptServer {
    pub address: std::net::IpAddr,
    pub port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    scripts: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ScriptServer {
    /// Serves on `listener` (e.g. from [`Sandbox::listen`]).
    pub fn new(listener: std::net::TcpListener) -> Self {
        let local = listener.local_addr().expect("addr");
        let (address, port) = (local.ip(), local.port());
        listener.set_nonblocking(true).expect("nonblocking");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let scripts: Arc<Mutex<Vec<(String, String)>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, scripts, stop) = (requests.clone(), scripts.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => answer(stream, &requests, &scripts),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Self {
            address,
            port,
            requests,
            scripts,
            stop,
            thread: Some(thread),
        }
    }

    /// Serves `script` at every path that starts with `prefix`.
    pub fn script(&self, prefix: &str, script: &str) {
        let mut scripts = self.scripts.lock().expect("scripts");
        scripts.retain(|(p, _)| p != prefix);
        scripts.push((prefix.to_owned(), script.to_owned()));
    }

    /// The request lines received so far (`GET /path?query HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }

    /// The URL the guest reaches the server at: 10.0.2.2 for a server on 127.0.0.1 (qemu's
    /// alias for the host's loopback), else the server's own address, through qemu's NAT.
    pub fn url(&self, path: &str) -> String {
        let host = if self.address.is_loopback() {
            "10.0.2.2".to_owned()
        } else {
            self.address.to_string()
        };
        format!("http://{host}:{}{path}", self.port)
    }
}

impl Drop for ScriptServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(
    mut stream: std::net::TcpStream,
    requests: &Mutex<Vec<String>>,
    scripts: &Mutex<Vec<(String, String)>>,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 << 10 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let line = head.lines().next().unwrap_or_default().to_owned();
    requests.lock().expect("requests").push(line.clone());
    let path = line.split(' ').nth(1).unwrap_or_default();
    let script = scripts
        .lock()
        .expect("scripts")
        .iter()
        .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, script)| script.clone());
    let response = match script {
        Some(body) => format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        ),
        None => {
            "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
        }
    };
    let _ = stream.write_all(response.as_bytes());
}
