//! Which addresses an image download may connect to.
//!
//! A DiscImage's URL is a request the node sends on a tenant's behalf, from a privileged agent on
//! the host network: left alone, whoever may create a DiscImage reaches the pod and service
//! networks, node ports, private ranges and the cloud's metadata service (server-side request
//! forgery). Every address a download connects to — each one a name resolves to, on every
//! redirect hop — passes [`DestinationPolicy::check`] first.
//!
//! The order is fixed: built-in refusals (loopback unless allowed, link-local, unique-local IPv6,
//! unspecified, multicast, broadcast, reserved) always apply; then the deny list, which wins;
//! then, if there is one, the allow list (empty means "any address not denied"). An IPv6 address
//! that carries an IPv4 one (IPv4-mapped, IPv4-compatible, NAT64's `64:ff9b::/96`) is judged as
//! both, so `::ffff:169.254.169.254` is as refused as `169.254.169.254`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Where image sources may connect. `discus serve` and `discus agent` build it from their
/// options; the agent adds the apiserver's service address with [`Self::deny_more`], and every
/// pass sets the node's own networks, which change with its Node ([`Self::deny_node`]).
#[derive(Clone, Debug, Default)]
pub struct DestinationPolicy {
    /// Allow loopback addresses (tests, single-server setups): `--allow-loopback`.
    pub allow_loopback: bool,
    /// If not empty, only these networks: `--source-allow`.
    pub allow: Vec<IpNet>,
    /// Never these networks, whatever `allow` says.
    pub deny: Vec<DeniedNet>,
    /// The node's own addresses and pod networks, shared by every copy of the policy.
    node: std::sync::Arc<parking_lot::RwLock<Vec<IpNet>>>,
}

impl PartialEq for DestinationPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.allow_loopback == other.allow_loopback
            && self.allow == other.allow
            && self.deny == other.deny
            && *self.node.read() == *other.node.read()
    }
}

impl Eq for DestinationPolicy {}

/// A denied network and why it is denied (shown in the refusal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedNet {
    pub net: IpNet,
    /// For example "--source-deny" or "the node's pod network".
    pub why: String,
}

/// Why an address must not be fetched from. The message names the address, the rule and what
/// would change it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("refusing to fetch from {address} ({rule}); {hint}")]
pub struct Refusal {
    pub address: IpAddr,
    pub rule: String,
    pub hint: String,
}

const BUILT_IN: &str =
    "a built-in refusal that no option lifts: images must come from a host address";

impl DestinationPolicy {
    /// The policy of the command-line options: `--allow-loopback`, `--source-allow`,
    /// `--source-deny`.
    pub fn new(allow_loopback: bool, allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        let mut policy = Self {
            allow_loopback,
            allow: allow.iter().map(IpNet::trunc).collect(),
            deny: Vec::new(),
            node: std::sync::Arc::default(),
        };
        policy.deny_more("--source-deny", deny);
        policy
    }

    /// Denies more networks, for example the cluster's own (pod CIDRs, node addresses, the
    /// kubernetes service): `why` says where they come from in refusals.
    pub fn deny_more(&mut self, why: &str, nets: impl IntoIterator<Item = IpNet>) {
        self.deny.extend(nets.into_iter().map(|net| DeniedNet {
            net: net.trunc(),
            why: why.to_owned(),
        }));
    }

    /// The node's own networks now (its addresses: node ports listen on them; its pod
    /// networks): never an image source, for every copy of this policy.
    pub fn deny_node(&self, nets: &[IpNet]) {
        let nets: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
        if *self.node.read() != nets {
            *self.node.write() = nets;
        }
    }

    /// Whether a download may connect to `address`.
    pub fn check(&self, address: IpAddr) -> Result<(), Refusal> {
        let forms = forms(address);
        let refuse = |rule: String, hint: String| Refusal {
            address,
            rule,
            hint,
        };
        for form in forms.iter().flatten() {
            if let Some((rule, hint)) = self.built_in(*form) {
                return Err(refuse(rule.to_owned(), hint.to_owned()));
            }
        }
        let denied = self
            .deny
            .iter()
            .find(|d| forms.iter().flatten().any(|form| d.net.contains(form)));
        if let Some(denied) = denied {
            return Err(refuse(
                format!("in {}, denied by {}", denied.net, denied.why),
                "a denied network wins over --source-allow".to_owned(),
            ));
        }
        if let Some(net) = self
            .node
            .read()
            .iter()
            .find(|net| forms.iter().flatten().any(|form| net.contains(form)))
        {
            return Err(refuse(
                format!("in {net}, this node's own address or pod network"),
                "images never come from the node itself or its pods".to_owned(),
            ));
        }
        let allowed = self.allow.is_empty()
            || self
                .allow
                .iter()
                .any(|net| forms.iter().flatten().any(|form| net.contains(form)));
        if !allowed {
            return Err(refuse(
                format!("not in --source-allow {}", Nets(&self.allow)),
                "add its network to --source-allow if this source is intended".to_owned(),
            ));
        }
        Ok(())
    }

    fn built_in(&self, address: IpAddr) -> Option<(&'static str, &'static str)> {
        let loopback = match address {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => v6.is_loopback(),
        };
        if loopback {
            return (!self.allow_loopback).then_some((
                "loopback",
                "allow loopback sources explicitly (--allow-loopback) if this is intended",
            ));
        }
        let rule = match address {
            IpAddr::V4(v4) => built_in_v4(v4),
            IpAddr::V6(v6) => built_in_v6(v6),
        };
        rule.map(|rule| (rule, BUILT_IN))
    }
}

fn built_in_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let [first, ..] = v4.octets();
    if v4.is_link_local() {
        Some("link-local, where cloud metadata services live")
    } else if first == 0 {
        Some("unspecified, \"this network\"")
    } else if v4.is_broadcast() {
        Some("broadcast")
    } else if v4.is_multicast() {
        Some("multicast")
    } else if first >= 240 {
        Some("reserved, 240.0.0.0/4")
    } else {
        None
    }
}

fn built_in_v6(v6: Ipv6Addr) -> Option<&'static str> {
    let [first, ..] = v6.segments();
    if v6.is_unspecified() {
        Some("unspecified")
    } else if v6.is_unicast_link_local() {
        Some("link-local")
    } else if first & 0xfe00 == 0xfc00 {
        Some("unique-local IPv6, fc00::/7, where cloud metadata services also live")
    } else if first & 0xffc0 == 0xfec0 {
        Some("site-local IPv6, fec0::/10")
    } else if v6.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

/// The address itself and the IPv4 address it carries, if any.
fn forms(address: IpAddr) -> [Option<IpAddr>; 2] {
    let IpAddr::V6(v6) = address else {
        return [Some(address), None];
    };
    let segments = v6.segments();
    let octets = v6.octets();
    let low = Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]);
    let embedded = if let Some(mapped) = v6.to_ipv4_mapped() {
        Some(mapped)
    } else if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64's well-known prefix: the gateway connects to the IPv4 address.
        Some(low)
    } else if segments[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
        // IPv4-compatible (deprecated), still routed to the IPv4 address by some stacks.
        Some(low)
    } else {
        None
    };
    [Some(address), embedded.map(IpAddr::V4)]
}

struct Nets<'a>(&'a [IpNet]);

impl fmt::Display for Nets<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// Parses `--source-allow`/`--source-deny`: a CIDR, or a single address.
pub fn parse_net(value: &str) -> Result<IpNet, String> {
    value
        .parse::<IpNet>()
        .or_else(|_| value.parse::<IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| {
            format!("{value:?} is not a network: give a CIDR such as 10.0.0.0/8 or fd00::/8, or an address")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn net(text: &str) -> IpNet {
        parse_net(text).expect("net")
    }

    #[test]
    fn built_in_refusals_apply_whatever_the_lists_say() {
        let everything = DestinationPolicy::new(true, vec![net("0.0.0.0/0"), net("::/0")], vec![]);
        for address in [
            "169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "fc00::1",
            "fec0::1",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "240.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::a9fe:a9fe",
        ] {
            let refusal = everything.check(ip(address)).expect_err(address);
            assert_eq!(refusal.hint, BUILT_IN, "{address}");
        }
        for address in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "10.1.2.3",
            "2001:db8::1",
        ] {
            assert_eq!(everything.check(ip(address)), Ok(()), "{address}");
        }
    }

    #[test]
    fn loopback_needs_its_option() {
        let policy = DestinationPolicy::default();
        for address in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            let refusal = policy.check(ip(address)).expect_err(address);
            assert_eq!(refusal.rule, "loopback");
            assert!(refusal.hint.contains("--allow-loopback"));
        }
        for address in ["10.0.0.5", "192.168.1.1", "2001:db8::1", "8.8.8.8"] {
            assert_eq!(policy.check(ip(address)), Ok(()), "{address}");
        }
    }

    #[test]
    fn deny_wins_and_an_allow_list_limits() {
        let mut policy = DestinationPolicy::new(
            false,
            vec![net("10.0.0.0/8"), net("2001:db8::/32")],
            vec![net("10.96.0.0/12")],
        );
        policy.deny_more("the node's pod network", [net("10.244.1.0/24")]);
        assert_eq!(policy.check(ip("10.1.2.3")), Ok(()));
        assert_eq!(policy.check(ip("2001:db8::7")), Ok(()));
        let denied = policy.check(ip("10.96.0.1")).expect_err("denied");
        assert_eq!(
            denied.to_string(),
            "refusing to fetch from 10.96.0.1 (in 10.96.0.0/12, denied by --source-deny); a denied \
             network wins over --source-allow"
        );
        let pods = policy.check(ip("::ffff:10.244.1.9")).expect_err("mapped");
        assert_eq!(
            pods.rule,
            "in 10.244.1.0/24, denied by the node's pod network"
        );
        let outside = policy.check(ip("192.168.1.1")).expect_err("not allowed");
        assert_eq!(
            outside.to_string(),
            "refusing to fetch from 192.168.1.1 (not in --source-allow 10.0.0.0/8, 2001:db8::/32); \
             add its network to --source-allow if this source is intended"
        );
    }

    #[test]
    fn networks_are_parsed_with_a_hint() {
        assert_eq!(net("10.1.2.3/8"), net("10.0.0.0/8"), "host bits dropped");
        assert_eq!(net("10.1.2.3"), net("10.1.2.3/32"));
        assert_eq!(net("fd00::1"), net("fd00::1/128"));
        let error = parse_net("10.0.0.0/33").expect_err("bad");
        assert!(error.contains("give a CIDR such as 10.0.0.0/8"), "{error}");
    }
}

#[cfg(test)]
mod node_tests {
    use super::*;

    #[test]
    fn the_node_s_own_networks_are_refused_in_every_copy_of_the_policy() {
        let policy = DestinationPolicy::new(false, Vec::new(), Vec::new());
        let copy = policy.clone();
        let pod: IpAddr = "10.244.1.7".parse().expect("ip");
        assert!(copy.check(pod).is_ok());
        policy.deny_node(&["10.244.1.0/24".parse().expect("net")]);
        let refusal = copy.check(pod).expect_err("a pod of this node");
        assert!(
            refusal
                .to_string()
                .contains("this node's own address or pod network"),
            "{refusal}"
        );
        policy.deny_node(&[]);
        assert!(copy.check(pod).is_ok(), "follows the Node");
    }
}
