//! A private LAN for tests with several hosts: a bridge inside a sandbox of its own (the
//! switch), sandboxes plugged into it with addresses of their own, and the test process plugged
//! in too, as a client. Servers bind to their sandbox's address; everything — bridge, cables,
//! addresses — disappears with the switch.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::sandbox::Sandbox;

pub struct Lan {
    switch: Sandbox,
    /// The first three octets of the /24.
    prefix: [u8; 3],
    id: u32,
    cables: AtomicU32,
}

static LANS: AtomicU32 = AtomicU32::new(0);

impl Lan {
    /// A new /24, the test process at `.1`.
    pub fn new() -> Self {
        let id = std::process::id() % 1000 * 100 + LANS.fetch_add(1, Ordering::Relaxed);
        // Spread over 10.64.0.0/10 so that parallel tests and test binaries do not collide.
        let n = std::process::id().wrapping_mul(97).wrapping_add(id);
        let prefix = [10, 64 + (n % 64) as u8, ((n / 64) % 250) as u8 + 1];
        let lan = Self {
            switch: Sandbox::new(),
            prefix,
            id,
            cables: AtomicU32::new(0),
        };
        lan.switch
            .must(&["ip", "link", "add", "br0", "type", "bridge"]);
        lan.switch.must(&["ip", "link", "set", "br0", "up"]);
        let host_side = lan.cable(None);
        host(&[
            "ip",
            "address",
            "add",
            &format!("{}/24", lan.address(1)),
            "dev",
            &host_side,
        ]);
        host(&["ip", "link", "set", &host_side, "up"]);
        lan
    }

    /// Plugs a sandbox in at `.<host>`; returns its address.
    pub fn plug(&self, sandbox: &Sandbox, host_number: u8) -> Ipv4Addr {
        let address = self.address(host_number);
        let end = self.cable(Some(sandbox));
        sandbox.must(&[
            "ip",
            "address",
            "add",
            &format!("{address}/24"),
            "dev",
            &end,
        ]);
        sandbox.must(&["ip", "link", "set", &end, "up"]);
        address
    }

    /// Plugs in the network namespace of process `pid` (a container's) at `.<host>`; returns
    /// its address.
    pub fn plug_netns(&self, pid: u32, host_number: u8) -> Ipv4Addr {
        let address = self.address(host_number);
        let end = self.cable_to(&pid.to_string());
        let pid = pid.to_string();
        let cidr = format!("{address}/24");
        for args in [
            vec!["ip", "address", "add", &cidr, "dev", &end],
            vec!["ip", "link", "set", &end, "up"],
            vec!["ip", "link", "set", "lo", "up"],
        ] {
            let mut all = vec!["nsenter", "-t", &pid, "-n", "--"];
            all.extend(args);
            host(&all);
        }
        address
    }

    pub fn address(&self, host_number: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], host_number)
    }

    /// A veth pair with one end on the bridge and the other in `sandbox` (or left in the test's
    /// own namespace); returns the name of that other end.
    fn cable(&self, sandbox: Option<&Sandbox>) -> String {
        match sandbox {
            Some(sandbox) => self.cable_to(&sandbox.pid().to_string()),
            None => self.cable_to(""),
        }
    }

    /// A veth pair with one end on the bridge and the other in the network namespace of `pid`
    /// (or left in the test's own namespace when empty); returns the name of that other end.
    fn cable_to(&self, pid: &str) -> String {
        let n = self.cables.fetch_add(1, Ordering::Relaxed);
        let (bridge_end, other_end) = (format!("dl{}s{n}", self.id), format!("dl{}h{n}", self.id));
        host(&[
            "ip",
            "link",
            "add",
            &bridge_end,
            "type",
            "veth",
            "peer",
            "name",
            &other_end,
        ]);
        host(&[
            "ip",
            "link",
            "set",
            &bridge_end,
            "netns",
            &self.switch.pid().to_string(),
        ]);
        self.switch
            .must(&["ip", "link", "set", &bridge_end, "master", "br0"]);
        self.switch.must(&["ip", "link", "set", &bridge_end, "up"]);
        if !pid.is_empty() {
            host(&["ip", "link", "set", &other_end, "netns", pid]);
        }
        other_end
    }
}

fn host(args: &[&str]) {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
