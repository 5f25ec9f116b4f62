//! The network-boot harness (tests/support/netboot.rs) on its own, without discus: its marker
//! parser and image builder (quick), and — ignored by default: it boots qemu under TCG nine
//! times, ~2.5 minutes — iPXE `sanboot` of both images under SeaBIOS and OVMF, multipath and
//! mutual CHAP, from a tgtd set up by hand with tgtadm and fixed iPXE scripts served by the
//! test:
//!
//! ```text
//! cargo test --test netboot_harness -- --ignored --nocapture
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::netboot::{
    self, Firmware, ImageKind, Netboot, ScriptServer, boot_images, find_marker, ibft_lun,
    parse_marker,
};
use support::serve_host::Host;

#[test]
fn marker_lines_are_read() {
    let console = "\u{1b}[2J\u{1b}[01;01Hgrub\r\n[    1.9] something\r\n\
        DISCUS-NETBOOT-OK iso ibft: initiator=iqn.2010-04.org.ipxe:test mac=52:54:00:12:34:56 \
        ip=10.0.2.15 target0=iqn.2026-11.dev.discus:a@10.0.2.2:3299 lun0=01000000 chap0=- \
        rchap0=- target1=iqn.2026-11.dev.discus:a@10.0.2.2:3260 lun1=01000000 chap1=nbuser \
        rchap1=tgtout\r\n[    2.3] reboot: Power down\r\n";
    let line = find_marker(console).expect("a marker");
    assert!(line.starts_with("DISCUS-NETBOOT-OK iso"), "{line:?}");
    let marker = parse_marker(line).unwrap();
    assert_eq!(marker.kind, "iso");
    let ibft = marker.ibft.expect("an iBFT");
    assert_eq!(ibft.initiator, "iqn.2010-04.org.ipxe:test");
    assert_eq!(ibft.mac, "52:54:00:12:34:56");
    assert_eq!(ibft.ip, "10.0.2.15");
    assert_eq!(ibft.targets.len(), 2);
    let (first, second) = (&ibft.targets[0], &ibft.targets[1]);
    assert_eq!(first.name, "iqn.2026-11.dev.discus:a");
    assert_eq!(first.address, "10.0.2.2:3299");
    assert_eq!((first.lun, first.lun_raw.as_str()), (Some(1), "01000000"));
    assert_eq!(
        (first.chap_name.clone(), first.reverse_chap_name.clone()),
        (None, None)
    );
    assert_eq!(second.index, 1);
    assert_eq!(second.chap_name.as_deref(), Some("nbuser"));
    assert_eq!(second.reverse_chap_name.as_deref(), Some("tgtout"));

    let none = parse_marker("DISCUS-NETBOOT-OK raw ibft: none").unwrap();
    assert_eq!((none.kind.as_str(), none.ibft), ("raw", None));
    // A line still being written is no marker yet.
    assert_eq!(find_marker("x\nDISCUS-NETBOOT-OK raw ibft: no"), None);
    for bad in [
        "DISCUS-NETBOOT-OK",
        "DISCUS-NETBOOT-OK iso",
        "DISCUS-NETBOOT-OK iso ibft: initiator=x",
        "DISCUS-NETBOOT-OK iso ibft: initiator=x mac=m ip=i target0=noat lun0=0",
        "DISCUS-NETBOOT-OK iso ibft: initiator=x mac=m ip=i target0=a@b:1",
        "DISCUS-NETBOOT-OK iso ibft: initiator=x mac=m ip=i garbage",
        "NETBOOT-OK iso ibft: none",
    ] {
        assert!(parse_marker(bad).is_err(), "{bad:?} parsed");
    }
    // The kernel prints each of the LUN's 8 bytes as %x.
    assert_eq!(ibft_lun("00000000"), Some(0));
    assert_eq!(ibft_lun("01000000"), Some(1));
    assert_eq!(ibft_lun("0ff000000"), Some(255));
    assert_eq!(ibft_lun("40100000000"), None);
    assert_eq!(
        netboot::readable("\u{1b}[1;1Hab\u{1b}[0m\r\nc\u{1b}c"),
        "ab\nc"
    );
}

#[test]
fn boot_images_are_built_for_bios_and_uefi() {
    let images = boot_images();
    assert!(
        images
            .dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("netboot-{}-r", images.release)),
        "{}",
        images.dir.display()
    );
    assert_ne!(
        netboot::cache_key("6.1.0-1-amd64"),
        netboot::cache_key("6.1.0-2-amd64")
    );
    // The ISO: El Torito entries for BIOS and UEFI.
    let report = std::process::Command::new("xorriso")
        .args(["-indev"])
        .arg(&images.iso)
        .args(["-report_el_torito", "plain"])
        .output()
        .expect("xorriso");
    let report = String::from_utf8_lossy(&report.stdout);
    let platforms: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("El Torito boot img :"))
        .filter_map(|l| l.split_whitespace().nth(6))
        .collect();
    assert_eq!(platforms, ["BIOS", "UEFI"], "{report}");
    // The raw disk: grub's boot.img in the MBR pointing at core.img in sector 1, one ESP.
    let raw = std::fs::read(&images.raw).unwrap();
    assert_eq!(raw.len() as u64, netboot::RAW_SIZE);
    assert_eq!(&raw[510..512], &[0x55, 0xaa]);
    let boot = std::fs::read("/usr/lib/grub/i386-pc/boot.img").unwrap();
    assert_eq!(&raw[..0x5c], &boot[..0x5c], "boot.img's code");
    assert_eq!(u64::from_le_bytes(raw[0x5c..0x64].try_into().unwrap()), 1);
    assert_eq!(raw[446 + 4], 0xef, "an EFI system partition");
    assert_eq!(
        u32::from_le_bytes(raw[446 + 8..446 + 12].try_into().unwrap()),
        2048
    );
    assert_eq!(
        u64::from_le_bytes(raw[1012..1020].try_into().unwrap()),
        2,
        "core.img's block list"
    );
    let listing = std::process::Command::new("mdir")
        .args(["-b", "-/", "-i"])
        .arg(format!("{}@@1M", images.raw.display()))
        .arg("::/")
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .expect("mtools");
    let listing = String::from_utf8_lossy(&listing.stdout);
    for file in [
        "::/EFI/BOOT/BOOTX64.EFI",
        "::/boot/grub/grub.cfg",
        "::/vmlinuz",
        "::/initrd",
        "::/discus-netboot",
    ] {
        assert!(listing.lines().any(|l| l == file), "{file} in\n{listing}");
    }
}

const TARGET_ISO: &str = "iqn.2026-11.dev.discus:netboot-iso";
const TARGET_RAW: &str = "iqn.2026-11.dev.discus:netboot-raw";
const INITIATOR: &str = "iqn.2010-04.org.ipxe:discus-test";
const USER: &str = "nbuser";
const PASSWORD: &str = "nbsecret123456";
const TARGET_USER: &str = "tgtout";
const TARGET_PASSWORD: &str = "tgtsecret98765";

/// An iPXE script: the initiator's name and CHAP, then `sanboot` of these URIs.
fn script(reverse: Option<(&str, &str)>, uris: &[String]) -> String {
    let mut script = format!(
        "#!ipxe\necho discus harness script\nset initiator-iqn {INITIATOR}\n\
         set username {USER}\nset password {PASSWORD}\n"
    );
    if let Some((user, password)) = reverse {
        script.push_str(&format!(
            "set reverse-username {user}\nset reverse-password {password}\n"
        ));
    }
    script.push_str(&format!("sanboot {}\n", uris.join(" ")));
    script
}

fn uri(port: u16, iqn: &str) -> String {
    format!("iscsi:10.0.2.2::{port}:1:{iqn}")
}

/// tgtd in the host's sandbox, on its 127.0.0.1:3260, started by hand; it dies with the sandbox.
fn tgtd(host: &Host) -> std::process::Child {
    let log = std::fs::File::create(host.sandbox.path().join("tgtd.log")).unwrap();
    let child = host
        .sandbox
        .command("tgtd")
        .args(["-f", "-C", "3261", "--iscsi", "portal=127.0.0.1:3260"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("tgtd (tgt) runs");
    // On failure the test ends, and the sandbox with it, tgtd included.
    answers(host);
    child
}

/// Waits until tgtd answers on its control port.
fn answers(host: &Host) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let show = host
            .sandbox
            .command("tgtadm")
            .args(["-C", "3261", "--mode", "system", "--op", "show"])
            .output()
            .unwrap();
        if show.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tgtd did not answer in 20 s: {}",
            std::fs::read_to_string(host.sandbox.path().join("tgtd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "boots qemu (TCG) nine times, ~2.5 min: cargo test --test netboot_harness -- --ignored --nocapture"]
fn ipxe_sanboots_both_images_under_seabios_and_ovmf() {
    let images = boot_images();
    let host = Host::new();
    // Copies, so that nothing the guest or tgtd does can touch the cache.
    let iso = host.images.join("netboot.iso");
    let raw = host.images.join("netboot.raw");
    std::fs::copy(&images.iso, &iso).unwrap();
    std::fs::copy(&images.raw, &raw).unwrap();
    let mut daemon = tgtd(&host);
    for (tid, iqn, image, cd) in [
        ("1", TARGET_ISO, &iso, true),
        ("2", TARGET_RAW, &raw, false),
    ] {
        host.tgtadm(&[
            "--mode",
            "target",
            "--op",
            "new",
            "--tid",
            tid,
            "--targetname",
            iqn,
        ]);
        let image = image.display().to_string();
        let mut lun = vec![
            "--mode",
            "logicalunit",
            "--op",
            "new",
            "--tid",
            tid,
            "--lun",
            "1",
            "--backing-store",
            &image,
        ];
        if cd {
            lun.extend(["--device-type", "cd"]);
        }
        host.tgtadm(&lun);
        host.tgtadm(&[
            "--mode",
            "logicalunit",
            "--op",
            "update",
            "--tid",
            tid,
            "--lun",
            "1",
            "--params",
            "readonly=1",
        ]);
        // iPXE, and libiscsi below.
        for initiator in [INITIATOR, support::serve_host::INITIATOR] {
            host.tgtadm(&[
                "--mode",
                "target",
                "--op",
                "bind",
                "--tid",
                tid,
                "--initiator-name",
                initiator,
            ]);
        }
    }
    host.tgtadm(&[
        "--mode",
        "account",
        "--op",
        "new",
        "--user",
        USER,
        "--password",
        PASSWORD,
    ]);
    host.tgtadm(&[
        "--mode",
        "account",
        "--op",
        "new",
        "--user",
        TARGET_USER,
        "--password",
        TARGET_PASSWORD,
    ]);
    for tid in ["1", "2"] {
        host.tgtadm(&[
            "--mode", "account", "--op", "bind", "--tid", tid, "--user", USER,
        ]);
        host.tgtadm(&[
            "--mode",
            "account",
            "--op",
            "bind",
            "--tid",
            tid,
            "--user",
            TARGET_USER,
            "--outgoing",
        ]);
    }
    // What iPXE is given: the ISO in 2048-byte blocks (a CD), the disk in 512-byte ones.
    let iso_capacity = host.read_capacity(TARGET_ISO, 1, USER, PASSWORD);
    let raw_capacity = host.read_capacity(TARGET_RAW, 1, USER, PASSWORD);
    println!("LUN 1 (blocks, block size): iso {iso_capacity:?}, raw {raw_capacity:?}");
    assert_eq!(iso_capacity.1, 2048);
    assert_eq!(raw_capacity, (netboot::RAW_SIZE / 512, 512));
    let server = ScriptServer::new(host.sandbox.listen("127.0.0.1:0"));
    let iso_uri = uri(3260, TARGET_ISO);
    let raw_uri = uri(3260, TARGET_RAW);
    server.script("/boot/iso", &script(None, std::slice::from_ref(&iso_uri)));
    server.script("/boot/raw", &script(None, std::slice::from_ref(&raw_uri)));
    // A first path to a portal where nothing listens, then the real one.
    server.script(
        "/boot/multipath",
        &script(None, &[uri(3299, TARGET_ISO), iso_uri.clone()]),
    );
    server.script(
        "/boot/mutual",
        &script(
            Some((TARGET_USER, TARGET_PASSWORD)),
            std::slice::from_ref(&iso_uri),
        ),
    );
    server.script(
        "/boot/mutual-wrong",
        &script(
            Some((TARGET_USER, "not-the-secret1")),
            std::slice::from_ref(&iso_uri),
        ),
    );

    let boot = |firmware: Firmware, path: &str| {
        let machine = Netboot::new(firmware, server.url(path)).start_in(&host.sandbox);
        let result = machine.wait_for_marker(Instant::now() + Duration::from_secs(300));
        let san: Vec<String> = netboot::readable(&machine.console())
            .lines()
            .filter(|l| l.contains("SAN device") || l.contains("iscsi:"))
            .map(str::to_owned)
            .collect();
        println!(
            "{} {path}: milestones {:.1?}; console: {san:?}",
            firmware.name(),
            machine.milestones()
        );
        (machine, result)
    };
    let mut times = Vec::new();
    for firmware in Firmware::ALL {
        for kind in ImageKind::ALL {
            // ${net0/mac} in the DHCP boot file: does iPXE expand it?
            let path = format!("/boot/{}?mac=${{net0/mac}}", kind.name());
            let (_machine, result) = boot(firmware, &path);
            let booted = result.unwrap_or_else(|e| panic!("{e}"));
            println!(
                "{} + {}: marker after {:.1?}: {:?}",
                firmware.name(),
                kind.name(),
                booted.boot_time,
                booted.marker
            );
            times.push((firmware, kind, booted.boot_time));
            assert_eq!(booted.marker.kind, kind.name());
            let ibft = booted.marker.ibft.expect("iPXE leaves an iBFT");
            assert_eq!(ibft.initiator, INITIATOR);
            assert_eq!(ibft.mac, "52:54:00:d1:5c:01");
            assert_eq!(ibft.ip, "10.0.2.50");
            assert_eq!(ibft.targets.len(), 1, "{ibft:?}");
            let target = &ibft.targets[0];
            let iqn = if kind == ImageKind::Iso {
                TARGET_ISO
            } else {
                TARGET_RAW
            };
            assert_eq!(target.name, iqn);
            assert_eq!(target.address, "10.0.2.2:3260");
            assert_eq!(target.lun, Some(1));
            assert_eq!(target.chap_name.as_deref(), Some(USER));
            assert_eq!(target.reverse_chap_name, None);
        }
    }
    let requests = server.requests();
    println!("requests: {requests:#?}");
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /boot/iso?mac=52%3A54%3A00%3Ad1%3A5c%3A01 ")),
        "iPXE expands ${{net0/mac}} in the DHCP boot file (and percent-encodes it): {requests:?}"
    );

    // Multipath: sanboot takes several URIs, skips the dead one, and the iBFT names both.
    let (_machine, result) = boot(Firmware::Bios, "/boot/multipath");
    let booted = result.unwrap_or_else(|e| panic!("{e}"));
    println!(
        "multipath: after {:.1?}: {:?}",
        booted.boot_time, booted.marker
    );
    let ibft = booted.marker.ibft.unwrap();
    let addresses: Vec<&str> = ibft.targets.iter().map(|t| t.address.as_str()).collect();
    assert_eq!(addresses, ["10.0.2.2:3299", "10.0.2.2:3260"]);
    assert_eq!(ibft.targets[1].chap_name.as_deref(), Some(USER));

    // Mutual CHAP against tgt's outgoing account.
    let (_machine, result) = boot(Firmware::Uefi, "/boot/mutual");
    let booted = result.unwrap_or_else(|e| panic!("{e}"));
    println!(
        "mutual CHAP: after {:.1?}: {:?}",
        booted.boot_time, booted.marker
    );
    let target = &booted.marker.ibft.unwrap().targets[0];
    assert_eq!(target.reverse_chap_name.as_deref(), Some(TARGET_USER));
    // …which iPXE checks: a target that does not know the secret is refused, and the
    // firmware's dead end ends the wait early.
    for firmware in Firmware::ALL {
        let (machine, result) = boot(firmware, "/boot/mutual-wrong");
        let failure = result.expect_err("iPXE must refuse a target that fails mutual CHAP");
        assert!(
            failure.contains("Could not open SAN device: Permission denied"),
            "{failure}"
        );
        println!(
            "{} wrong mutual secret: refused, wait ended {:.1?} after power-on: {failure}",
            firmware.name(),
            machine.uptime(),
        );
    }

    // Another address of the sandbox's than its 127.0.0.1 (as discus's portals will be): the
    // guest reaches it through qemu's NAT, script and target alike.
    host.sandbox
        .must(&["ip", "address", "add", "10.99.0.1/32", "dev", "lo"]);
    host.tgtadm(&[
        "--mode",
        "portal",
        "--op",
        "new",
        "--param",
        "portal=10.99.0.1:3260",
    ]);
    let routed = ScriptServer::new(host.sandbox.listen("10.99.0.1:0"));
    routed.script(
        "/boot/routed",
        &script(None, &[format!("iscsi:10.99.0.1::3260:1:{TARGET_RAW}")]),
    );
    let machine = Netboot::new(Firmware::Bios, routed.url("/boot/routed")).start_in(&host.sandbox);
    let booted = machine
        .wait_for_marker(Instant::now() + Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "routed (script and portal at 10.99.0.1): after {:.1?}: {:?}",
        booted.boot_time, booted.marker
    );
    assert_eq!(
        booted.marker.ibft.unwrap().targets[0].address,
        "10.99.0.1:3260"
    );
    assert_eq!(routed.requests(), ["GET /boot/routed HTTP/1.1"]);
    drop(machine);

    for (firmware, kind, time) in &times {
        println!(
            "boot time {} + {}: {:.1} s (power-on to marker)",
            firmware.name(),
            kind.name(),
            time.as_secs_f64()
        );
    }
    host.sandbox.kill(&mut daemon);
}
