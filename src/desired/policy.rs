//! What the node's administrator lets targets ask for (pure).
//!
//! In a cluster, whoever may create an IscsiTarget in a watched namespace writes to a
//! privileged agent on the host's network: where a target listens and which iSCSI names it
//! claims are the administrator's to allow, not the namespace's. A target asking for more is
//! refused for itself (`PortalNotAllowed`, `IqnNotAllowed`) and touches nothing else.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::api::iscsi_target::Portal;

/// The administrator's rules for targets on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Addresses `spec.portals` may name; `None`: only the node's own addresses.
    pub portal_addresses: Option<Vec<IpNet>>,
    /// Ports `spec.portals` may name; empty: any.
    pub portal_ports: Vec<u16>,
    /// Prefixes an explicit `spec.iqn` may start with, by namespace (`*`: every namespace).
    /// A namespace may always use its own default prefix, `<authority>:<namespace>.`. `None`:
    /// any IQN.
    pub iqn_prefixes: Option<BTreeMap<String, Vec<String>>>,
}

impl Policy {
    /// Anything goes: for `discus serve`, whose manifest folder is the administrator's own.
    pub fn open() -> Self {
        Self {
            portal_addresses: Some(
                ["0.0.0.0/0", "::/0", "0.0.0.0/32", "::/128"]
                    .iter()
                    .filter_map(|net| net.parse().ok())
                    .collect(),
            ),
            portal_ports: Vec::new(),
            iqn_prefixes: None,
        }
    }

    /// The node's own addresses on the iSCSI port, and each namespace's own IQNs: for the
    /// agent, whose resources come from every namespace it watches.
    pub fn strict() -> Self {
        Self {
            portal_addresses: None,
            portal_ports: vec![crate::api::rules::DEFAULT_ISCSI_PORT],
            iqn_prefixes: Some(BTreeMap::new()),
        }
    }

    /// Why `portal` may not be used on a node with `own` addresses, if it may not.
    pub fn refuse_portal(&self, portal: &Portal, own: &[IpAddr]) -> Option<String> {
        let address = portal.address.to_canonical();
        // Every address at once, or a group: only where the administrator named it exactly.
        let wide = address.is_unspecified() || address.is_multicast();
        let address_allowed = match &self.portal_addresses {
            None => !wide && own.iter().any(|a| a.to_canonical() == address),
            Some(nets) => nets.iter().any(|net| {
                net.contains(&address) && (!wide || net.prefix_len() == net.max_prefix_len())
            }),
        };
        if !address_allowed {
            let allowed = match &self.portal_addresses {
                None => format!("this node's own addresses ({})", list(own)),
                Some(nets) => list(nets),
            };
            return Some(format!(
                "spec.portals: {portal} is not an address targets may listen on here; allowed: {allowed} \
                 (the administrator's --portal-address)"
            ));
        }
        if !self.portal_ports.is_empty() && !self.portal_ports.contains(&portal.port) {
            return Some(format!(
                "spec.portals: port {} is not a port targets may listen on here; allowed: {} (the \
                 administrator's --portal-port)",
                portal.port,
                list(&self.portal_ports)
            ));
        }
        None
    }

    /// Why `iqn`, set explicitly in namespace `namespace`, may not be used, if it may not.
    pub fn refuse_iqn(&self, iqn: &str, namespace: &str, authority: &str) -> Option<String> {
        let prefixes = self.iqn_prefixes.as_ref()?;
        let own = format!("{authority}:{namespace}.");
        let namespaces = [namespace, "*"];
        let granted = namespaces.iter().filter_map(|n| prefixes.get(*n)).flatten();
        let allowed: Vec<&str> = std::iter::once(own.as_str())
            .chain(granted.map(String::as_str))
            .collect();
        if allowed.iter().any(|prefix| iqn.starts_with(prefix)) {
            return None;
        }
        Some(format!(
            "spec.iqn: {iqn} does not start with a prefix namespace {namespace} may use ({}); leave spec.iqn \
             out for the default, or ask the administrator for the prefix (--iqn-prefix {namespace}=PREFIX)",
            allowed.join(", ")
        ))
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn portal(address: &str, port: u16) -> Portal {
        Portal {
            address: address.parse().expect("address"),
            port,
        }
    }

    #[test]
    fn the_strict_policy_allows_the_node_s_own_addresses_on_3260_only() {
        let own: Vec<IpAddr> = vec!["10.0.0.5".parse().expect("ip")];
        let strict = Policy::strict();
        assert_eq!(strict.refuse_portal(&portal("10.0.0.5", 3260), &own), None);
        let other = strict
            .refuse_portal(&portal("10.96.0.1", 3260), &own)
            .expect("not the node's");
        assert!(
            other.contains("this node's own addresses (10.0.0.5)"),
            "{other}"
        );
        let port = strict
            .refuse_portal(&portal("10.0.0.5", 22), &own)
            .expect("not 3260");
        assert!(port.contains("port 22"), "{port}");
        assert_eq!(Policy::open().refuse_portal(&portal("::1", 22), &own), None);
        assert_eq!(
            Policy::open().refuse_portal(&portal("0.0.0.0", 3260), &own),
            None
        );
        // Every address at once, or an IPv4 address in IPv6 clothes: judged for what they are.
        let mut wide = Policy::strict();
        wide.portal_addresses = Some(vec!["::/0".parse().expect("net")]);
        assert!(wide.refuse_portal(&portal("::", 3260), &own).is_some());
        assert!(
            strict
                .refuse_portal(&portal("::ffff:10.0.0.5", 3260), &own)
                .is_none()
        );
        let mut v4 = Policy::strict();
        v4.portal_addresses = Some(vec!["10.0.0.0/24".parse().expect("net")]);
        assert!(
            v4.refuse_portal(&portal("::ffff:127.0.0.1", 3260), &own)
                .is_some()
        );
    }

    #[test]
    fn a_namespace_uses_its_own_iqns_and_the_prefixes_it_is_given() {
        let mut policy = Policy::strict();
        let authority = "iqn.2026-11.dev.discus";
        assert_eq!(
            policy.refuse_iqn("iqn.2026-11.dev.discus:lab.boot", "lab", authority),
            None
        );
        let theft = policy
            .refuse_iqn("iqn.2026-11.dev.discus:prod.boot", "lab", authority)
            .expect("another namespace's name");
        assert!(theft.contains("--iqn-prefix lab=PREFIX"), "{theft}");
        assert!(
            policy
                .refuse_iqn("iqn.2026-11.dev.discus:lab", "lab", authority)
                .is_some(),
            "the prefix ends with its dot"
        );
        policy.iqn_prefixes = Some(BTreeMap::from([(
            "lab".to_owned(),
            vec!["iqn.2003-01.org.example:".to_owned()],
        )]));
        assert_eq!(
            policy.refuse_iqn("iqn.2003-01.org.example:legacy", "lab", authority),
            None
        );
        assert!(
            policy
                .refuse_iqn("iqn.2003-01.org.example:legacy", "other", authority)
                .is_some()
        );
        assert_eq!(
            Policy::open().refuse_iqn("iqn.2003-01.org.example:x", "any", authority),
            None
        );
    }
}
