//! Network boot through discus: the boot endpoint as iPXE and an attacker see it (HTTP inside a
//! host of its own, with a real tgtd behind `discus serve`), and diskless qemu machines with
//! Debian's iPXE booting from it (tests/support/netboot.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail by panicking

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::diskless::{Machine, boot_all, boot_discs, machines};
use support::manifests;
use support::netboot::{self, Firmware, ImageKind, Netboot};
use support::serve_host::{Host, INITIATOR, Served};

const BOOT: &str = "127.0.0.1:8090";
const CARD: &str = "52:54:00:d1:5c:01";

/// `curl` inside the host: the status code and the body.
fn get(host: &Host, path: &str) -> (u16, String) {
    get_from(host, "127.0.0.1", path)
}

/// `curl` inside the host from its address `source`.
fn get_from(host: &Host, source: &str, path: &str) -> (u16, String) {
    let output = host
        .sandbox
        .command("curl")
        .args(["-s", "-S", "--max-time", "30", "-w", "\n%{http_code}"])
        .args(["--interface", source])
        .arg(format!("http://{BOOT}{path}"))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or_default();
    (code.parse().unwrap_or(0), body.to_owned())
}

/// A grant for `initiator` on the target `boot` (CHAP from `client-chap`) with `boot` as its
/// boot block.
fn boot_grant(name: &str, initiator: &str, boot: Value, extra: Value) -> Value {
    let mut spec = json!({
        "targetRef": {"name": "boot"},
        "initiatorIqn": initiator,
        "chap": {"secretRef": {"name": "client-chap"}},
        "boot": boot,
    });
    spec.as_object_mut()
        .expect("spec")
        .extend(extra.as_object().cloned().unwrap_or_default());
    manifests::discus("InitiatorAccess", "lab", name, spec)
}

#[test]
fn the_boot_endpoint_answers_only_the_cards_of_applied_unexpired_grants_from_their_networks() {
    let host = Host::new();
    let (image, digest) = host.image("disk.raw", 1 << 20);
    let mut served = Served::new(&image, &digest);
    served.grant = boot_grant(
        "client",
        INITIATOR,
        json!({"macAddresses": [CARD.to_uppercase()], "sourceCidrs": ["127.0.0.0/8"]}),
        json!({}),
    );
    let others = [
        // Applied, but only for machines on another network.
        boot_grant(
            "elsewhere",
            "iqn.2010-04.org.ipxe:elsewhere",
            json!({"macAddresses": ["52:54:00:d1:5c:02"], "sourceCidrs": ["10.9.0.0/16"]}),
            json!({}),
        ),
        // Over.
        boot_grant(
            "over",
            "iqn.2010-04.org.ipxe:over",
            json!({"macAddresses": ["52:54:00:d1:5c:03"]}),
            json!({"expiresAt": "2026-01-01T00:00:00Z"}),
        ),
    ];
    host.manifest("lab.yaml", &served.yaml());
    host.manifest("others.yaml", &manifests::yaml(others.iter()));
    let mut server = host.start_with(&["--boot-address", BOOT, "--boot-requests-per-minute", "20"]);
    host.wait_for("the boot grant applied", || {
        host.condition("InitiatorAccess", "client", "Ready").0 == "True"
    });

    // The card's script: the grant's initiator name and credentials, the target at the LUN
    // tgt shows (its LUN 0 is the controller), never cached.
    let (code, script) = get(&host, &format!("/boot/ipxe?mac={CARD}"));
    assert_eq!(code, 200, "{script}");
    assert_eq!(
        script,
        format!(
            "#!ipxe\n# discus: InitiatorAccess lab/client\nset initiator-iqn {INITIATOR}\n\
             set username client\nset password client-secret\nclear reverse-username\n\
             clear reverse-password\nsanboot iscsi:127.0.0.1::3260:1:iqn.2026-11.dev.discus:boot\n"
        )
    );
    // Status says where its machines get their script.
    assert_eq!(
        host.status("InitiatorAccess", "client")["status"]["connection"]["bootUrls"],
        json!([format!("http://{BOOT}/boot/ipxe")])
    );
    // Without a card, any machine gets only the way to ask again with its card.
    assert_eq!(
        get(&host, "/boot/ipxe"),
        (
            200,
            format!("#!ipxe\nchain http://{BOOT}/boot/ipxe?mac=${{netX/mac}}\n")
        )
    );
    // Everything else: one answer, whatever the reason.
    let refused = (404, "no boot script for this machine\n".to_owned());
    for (mac, why) in [
        ("52:54:00:d1:5c:02", "source_not_allowed"),
        ("52:54:00:d1:5c:03", "unknown_mac"),
        ("52:54:00:d1:5c:04", "unknown_mac"),
        ("52%3A54%3A00", "no_mac"),
        ("%24%7Bnet0%2Fmac%7D%0Aforged", "no_mac"),
        (&format!("{CARD}&mac={CARD}"), "no_mac"),
    ] {
        assert_eq!(
            get(&host, &format!("/boot/ipxe?mac={mac}")),
            refused,
            "{mac}"
        );
        assert!(
            host.log().contains(&format!("why=\"{why}\"")),
            "{why}: {}",
            host.log()
        );
    }
    let log = host.log();
    assert!(log.contains("boot script served"), "{log}");
    assert!(log.contains("grant=lab/client"), "{log}");
    assert!(
        !log.contains("client-secret"),
        "a secret in the log:\n{log}"
    );
    assert!(!log.contains("\nforged"), "a forged log line:\n{log}");

    // The grant loses its boot block: the card gets nothing from the next pass on.
    served.grant = boot_grant("client", INITIATOR, Value::Null, json!({}));
    served.grant["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("boot");
    host.manifest("lab.yaml", &served.yaml());
    host.wait_for("the card refused", || {
        get(&host, &format!("/boot/ipxe?mac={CARD}")) == refused
    });
    host.wait_for("no boot URL in the grant's status", || {
        let connection = &host.status("InitiatorAccess", "client")["status"]["connection"];
        connection["iqn"].is_string() && connection.get("bootUrls").is_none()
    });

    // One source asking too often is told to wait.
    let limited = (0..30).any(|_| get(&host, "/boot/ipxe").0 == 429);
    assert!(limited, "no request of 30 was limited");

    // Clients that connect and send nothing hold the endpoint neither for others nor for long.
    silent_clients_are_bounded(&host);
    server.kill().expect("kill");
    server.wait().expect("wait");
}

/// One source's silent connections: beyond 8 they are closed at once, the source gets no answer
/// while it holds 8 and another source is served; each is closed after 5 s without a request.
fn silent_clients_are_bounded(host: &Host) {
    use std::io::Read;
    let opened = Instant::now();
    let mut silent: Vec<_> = (0..8).map(|_| host.sandbox.connect(BOOT)).collect();
    let mut ninth = host.sandbox.connect(BOOT);
    ninth
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    assert_eq!(ninth.read(&mut [0; 64]).expect("closed, not timed out"), 0);
    assert_eq!(get(host, "/boot/ipxe").0, 0, "the same source is answered");
    assert_eq!(get_from(host, "127.0.0.2", "/boot/ipxe").0, 200);
    for connection in &mut silent {
        connection
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        assert_eq!(connection.read(&mut [0; 64]).expect("closed"), 0);
    }
    let held = opened.elapsed();
    assert!(
        held >= Duration::from_secs(4) && held < Duration::from_secs(15),
        "silent connections held for {held:?}"
    );
}

/// A provisioning network in `sandbox` as the examples assume it: the storage node at
/// 10.20.0.11 on `eth1` (a tap device, which a qemu machine can plug into).
fn provisioning_network(sandbox: &support::sandbox::Sandbox) {
    sandbox.must(&["ip", "tuntap", "add", "eth1", "mode", "tap"]);
    sandbox.must(&["ip", "address", "add", "10.20.0.11/24", "dev", "eth1"]);
    sandbox.must(&["ip", "link", "set", "eth1", "up"]);
}

#[test]
fn the_dhcp_examples_are_configurations_their_servers_accept() {
    let sandbox = support::sandbox::Sandbox::new();
    provisioning_network(&sandbox);
    let examples = support::repo().join("examples/netboot");
    let dnsmasq = examples.join("dnsmasq.conf");
    let kea = examples.join("kea-dhcp4.conf");
    for (program, args) in [
        (
            "dnsmasq",
            vec![
                "--test".to_owned(),
                format!("--conf-file={}", dnsmasq.display()),
            ],
        ),
        (
            "kea-dhcp4",
            vec!["-t".to_owned(), kea.display().to_string()],
        ),
    ] {
        let output = sandbox.command(program).args(&args).output().expect("runs");
        assert!(
            output.status.success(),
            "{program}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// What tgt does with an initiator name in another case than its ACL's (docs/netboot.md): the
/// reason the boot script always sets the grant's own name.
#[test]
fn tgt_compares_initiator_names_as_written() {
    let host = Host::new();
    let (image, digest) = host.image("disk.raw", 1 << 20);
    let mut served = Served::new(&image, &digest);
    served.grant["spec"]["initiatorIqn"] = json!("iqn.2010-04.org.ipxe:pxe-1");
    host.manifest("lab.yaml", &served.yaml());
    host.converge();
    let iqn = "iqn.2026-11.dev.discus:boot";
    let chap = Some(("client", "client-secret"));
    assert!(
        host.inquiry(iqn, 1, "iqn.2010-04.org.ipxe:pxe-1", chap)
            .is_ok()
    );
    // The name iPXE would send for a DHCP host name `PXE-1`: tgt hides the target from it.
    let upper = host.inquiry(iqn, 1, "iqn.2010-04.org.ipxe:PXE-1", chap);
    assert!(
        upper
            .as_ref()
            .is_err_and(|e| e.contains("Target not found")),
        "{upper:?}"
    );
}

/// The storage node as machines reach it, as in examples/netboot: an address of the host's own
/// (qemu's user-mode network takes a machine's connections there).
const NODE: &str = "10.20.0.11";

/// Machines without a disk power on; DHCP hands their iPXE the node's boot URL (no card in it:
/// the endpoint asks again with it); discus answers each card with its grant's script; each
/// boots its disc from tgt under SeaBIOS or OVMF and reports what the iBFT told the booted
/// system.
#[test]
fn diskless_machines_boot_discs_through_discus_under_bios_and_uefi() {
    let host = Host::new();
    host.sandbox
        .must(&["ip", "address", "add", &format!("{NODE}/32"), "dev", "lo"]);
    let machines = machines();
    let mut objects = boot_discs(&host.images, &host.images, NODE, true);
    objects.extend(machines.iter().flat_map(|m| m.manifests("10.20.0.0/24")));
    host.manifest("netboot.yaml", &manifests::yaml(objects.iter()));
    let boot_address = format!("{NODE}:8090");
    let mut server = host.start_with(&["--boot-address", &boot_address]);
    host.wait_for("every boot grant applied", || {
        machines
            .iter()
            .all(|m| host.condition("InitiatorAccess", &m.name(), "Ready").0 == "True")
    });

    let times = boot_all(
        &machines,
        |machine| {
            Netboot::new(machine.firmware, format!("http://{boot_address}/boot/ipxe"))
                .mac(machine.card)
                .start_in(&host.sandbox)
        },
        (&format!("{NODE}:3260"), 1),
        || host.log(),
    );
    println!("power-on to marker (TCG, tgt): {times}");
    let log = host.log();
    for machine in &machines {
        assert!(
            log.contains(&format!("grant=lab/{}", machine.name())),
            "{log}"
        );
    }
    server.kill().expect("kill");
    server.wait().expect("wait");
}

/// A machine booted from its disc, logged in and paused in grub, loses its grant: discus ends
/// its session and removes its ACL; when the machine reads on (Linux, from the disc), iPXE
/// logs in again and again, each login is refused (no session ever), and the machine never
/// gets Linux.
#[test]
fn a_machine_whose_grant_is_revoked_mid_boot_cannot_log_in_again() {
    let host = Host::new();
    host.sandbox
        .must(&["ip", "address", "add", &format!("{NODE}/32"), "dev", "lo"]);
    let machine = Machine {
        firmware: Firmware::Bios,
        kind: ImageKind::Raw,
        card: "52:54:00:10:00:09",
        mutual: false,
    };
    let discs = boot_discs(&host.images, &host.images, NODE, true);
    host.manifest("discs.yaml", &manifests::yaml(discs.iter()));
    let grant = machine.manifests("10.20.0.0/24");
    host.manifest("machine.yaml", &manifests::yaml(grant.iter()));
    let boot_address = format!("{NODE}:8090");
    let mut server = host.start_with(&["--boot-address", &boot_address]);
    host.wait_for("the boot grant applied", || {
        host.condition("InitiatorAccess", &machine.name(), "Ready")
            .0
            == "True"
    });

    let running = Netboot::new(machine.firmware, format!("http://{boot_address}/boot/ipxe"))
        .mac(machine.card)
        .paused()
        .start_in(&host.sandbox);
    running
        .wait_for(
            "discus netboot: paused",
            Instant::now() + Duration::from_secs(300),
        )
        .unwrap_or_else(|why| panic!("{why}\n{}", host.log()));
    let show = || host.tgtadm(&["--mode", "target", "--op", "show"]);
    assert!(show().contains(&machine.initiator()), "{}", show());

    host.remove_manifest("machine.yaml");
    host.wait_for("the machine's session and ACL gone", || {
        !show().contains(&machine.initiator())
    });
    // What connected to the portal so far (in TIME-WAIT for a minute: none is missed).
    let connections = || -> BTreeSet<String> {
        host.sandbox
            .must(&["ss", "-Htan", "( sport = :3260 )"])
            .lines()
            .filter_map(|line| line.split_whitespace().nth(4).map(str::to_owned))
            .filter(|peer| !peer.ends_with(":*"))
            .collect()
    };
    let before = connections();
    running.resume();
    // iPXE logs in again to read Linux from the disc, and again: each login refused.
    let deadline = Instant::now() + Duration::from_secs(180);
    let tried = loop {
        let tried: Vec<String> = connections().difference(&before).cloned().collect();
        let console = netboot::readable(&running.console());
        assert!(
            !console.contains("discus netboot: Linux loaded"),
            "the machine read Linux after its grant was revoked:\n{}",
            running.console_tail(30)
        );
        assert!(!show().contains(&machine.initiator()), "{}", show());
        if tried.len() >= 3 {
            break tried;
        }
        assert!(
            Instant::now() < deadline,
            "the machine did not try to log in again ({tried:?}):\n{}",
            running.console_tail(30)
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let refused = format!("{} logins refused", tried.len());
    println!("after the revocation: {refused}");
    assert!(!show().contains(&machine.initiator()), "{}", show());
    server.kill().expect("kill");
    server.wait().expect("wait");
}

/// A card without iPXE on a real provisioning network: OVMF's own PXE asks the dnsmasq of
/// examples/netboot — run as the example says, on a tap device in the host's namespace — for
/// an address, gets iPXE (`ipxe.efi`, Debian's ipxe) over its TFTP, and iPXE asks again and
/// gets discus's boot URL: the chain a user sets up, over real DHCP and TFTP exchanges.
#[test]
fn a_plain_pxe_card_boots_through_the_dnsmasq_example() {
    let host = Host::new();
    provisioning_network(&host.sandbox);
    let machine = Machine {
        firmware: Firmware::Uefi,
        kind: ImageKind::Raw,
        card: "52:54:00:10:00:0a",
        mutual: false,
    };
    let mut objects = boot_discs(&host.images, &host.images, NODE, true);
    objects.extend(machine.manifests("10.20.0.0/24"));
    host.manifest("netboot.yaml", &manifests::yaml(objects.iter()));
    let mut server = host.start_with(&["--boot-address", &format!("{NODE}:8090")]);
    host.wait_for("the boot grant applied", || {
        host.condition("InitiatorAccess", &machine.name(), "Ready")
            .0
            == "True"
    });
    let dir = host.sandbox.scratch("dnsmasq");
    let log = dir.join("dnsmasq.log");
    let conf = support::repo().join("examples/netboot/dnsmasq.conf");
    let mut dnsmasq = host
        .sandbox
        .command("dnsmasq")
        .arg("--keep-in-foreground")
        .arg(format!("--conf-file={}", conf.display()))
        // The test's own: its files in the test's folder, and what it does on stderr.
        .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
        .arg(format!("--pid-file={}", dir.join("pid").display()))
        .args(["--log-facility=-", "--log-dhcp"])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("dnsmasq runs");
    host.wait_for("dnsmasq serving DHCP", || {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!said.contains("dnsmasq: "), "dnsmasq failed: {said}");
        said.contains("DHCP, IP range")
    });

    let booted = Netboot::new(Firmware::Uefi, "")
        .mac(machine.card)
        .plain_pxe_on("eth1")
        .start_in(&host.sandbox)
        .wait_for_marker(Instant::now() + Duration::from_secs(300))
        .unwrap_or_else(|why| {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("{why}\n--- dnsmasq:\n{said}\n--- discus:\n{}", host.log())
        });
    let ibft = booted.marker.ibft.expect("iBFT");
    assert_eq!(ibft.initiator, machine.initiator());
    assert_eq!(ibft.mac, machine.card);
    assert_eq!(ibft.targets[0].address, format!("{NODE}:3260"));
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    for step in ["sent size:", "ipxe.efi", "http://10.20.0.11:8090/boot/ipxe"] {
        assert!(said.contains(step), "{step} not in dnsmasq's log:\n{said}");
    }
    println!(
        "plain PXE → ipxe.efi → discus: power-on to marker {:.1} s",
        booted.boot_time.as_secs_f64()
    );
    host.sandbox.kill(&mut dnsmasq);
    server.kill().expect("kill");
    server.wait().expect("wait");
}
