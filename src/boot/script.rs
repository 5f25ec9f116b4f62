//! The iPXE script of one boot grant.
//!
//! iPXE splits a script line at whitespace, has no quoting, expands `${…}` anywhere, and reads
//! `#`, `;`, `&&` and `||` as syntax. Every value discus writes is either made only of
//! characters none of that touches, or written as hex bytes (`set password:hex 73:65:…`), which
//! iPXE stores as the same bytes. The script clears the credentials it does not set, so that
//! nothing an earlier script set reaches another target.
//!
//! SAN URIs are `iscsi:<server>::<port>:<lun>:<target>` with the LUN in hex, as iPXE parses it;
//! several URIs are paths to the same disc (multipath).

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use super::table::BootEntry;
use crate::api::iscsi_target::Portal;

/// The script for `entry`, for a request that came in on `local` (what wildcard portals become).
pub fn ipxe_script(entry: &BootEntry, local: IpAddr) -> String {
    let mut script = String::from("#!ipxe\n");
    let _ = writeln!(script, "# discus: InitiatorAccess {}", entry.grant);
    set(&mut script, "initiator-iqn", Some(&entry.initiator));
    let chap = entry.chap.as_ref();
    set(
        &mut script,
        "username",
        chap.map(|c| c.initiator.username.as_str()),
    );
    set(
        &mut script,
        "password",
        chap.map(|c| c.initiator.password.expose()),
    );
    let mutual = chap.and_then(|c| c.mutual.as_ref());
    set(
        &mut script,
        "reverse-username",
        mutual.map(|m| m.username.as_str()),
    );
    set(
        &mut script,
        "reverse-password",
        mutual.map(|m| m.password.expose()),
    );
    script.push_str("sanboot");
    for portal in &entry.portals {
        let _ = write!(
            script,
            " {}",
            san_uri(portal, local, entry.device_lun, &entry.iqn)
        );
    }
    script.push('\n');
    script
}

/// The script every machine may get: it asks again, at `endpoint` (the address the request came
/// in on), with the MAC address of the card it booted from — for DHCP servers that cannot put
/// `${netX/mac}` in the boot file name. The URL is absolute: iPXE of 2019 does not resolve a
/// relative one in `chain` ("Operation not supported").
pub fn ask_with_mac(endpoint: SocketAddr) -> String {
    format!("#!ipxe\nchain http://{endpoint}/boot/ipxe?mac=${{netX/mac}}\n")
}

fn set(script: &mut String, setting: &str, value: Option<&str>) {
    let _ = match value {
        None => writeln!(script, "clear {setting}"),
        Some(value) if plain(value) => writeln!(script, "set {setting} {value}"),
        Some(value) => writeln!(script, "set {setting}:hex {}", hex_bytes(value)),
    };
}

/// Whether iPXE reads `value` back exactly as it is written.
fn plain(value: &str) -> bool {
    !value.is_empty()
        && !value.starts_with('#')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@/+=-".contains(&b))
}

fn hex_bytes(value: &str) -> String {
    let pairs: Vec<String> = value.bytes().map(|b| format!("{b:02x}")).collect();
    pairs.join(":")
}

fn san_uri(portal: &Portal, local: IpAddr, lun: u32, iqn: &str) -> String {
    let address = if portal.address.is_unspecified() {
        local
    } else {
        portal.address
    };
    let server = match address {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    format!("iscsi:{server}::{}:{lun:x}:{iqn}", portal.port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::chap::{ChapAccount, ChapCredentials, Password};
    use crate::desired::{BootConfig, ObjectKey};

    fn entry(chap: Option<ChapCredentials>, portals: &[&str]) -> BootEntry {
        BootEntry {
            grant: ObjectKey::new("lab", "pxe-1"),
            uid: None,
            config: BootConfig {
                macs: vec![],
                sources: vec![],
                lun: 10,
                expires_at: None,
            },
            initiator: "iqn.2010-04.org.ipxe:pxe-1".into(),
            chap,
            iqn: "iqn.2026-11.dev.discus:lab.boot".into(),
            device_lun: 11,
            portals: portals
                .iter()
                .map(|p| {
                    let a: std::net::SocketAddr = p.parse().unwrap_or_else(|e| panic!("{e}"));
                    Portal {
                        address: a.ip(),
                        port: a.port(),
                    }
                })
                .collect(),
        }
    }

    fn account(username: &str, password: &str) -> ChapAccount {
        ChapAccount {
            username: username.into(),
            password: Password::new(password.into()),
        }
    }

    #[test]
    fn names_every_portal_with_the_lun_in_hex_and_sets_the_grants_initiator() {
        let chap = ChapCredentials {
            initiator: account("pxe-1", "s3cret-s3cret"),
            mutual: None,
        };
        let script = ipxe_script(
            &entry(
                Some(chap),
                &["0.0.0.0:3260", "10.0.0.2:3261", "[fd00::3]:3260"],
            ),
            "10.0.0.1".parse().unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(
            script,
            "#!ipxe\n# discus: InitiatorAccess lab/pxe-1\n\
             set initiator-iqn iqn.2010-04.org.ipxe:pxe-1\n\
             set username pxe-1\nset password s3cret-s3cret\n\
             clear reverse-username\nclear reverse-password\n\
             sanboot iscsi:10.0.0.1::3260:b:iqn.2026-11.dev.discus:lab.boot \
             iscsi:10.0.0.2::3261:b:iqn.2026-11.dev.discus:lab.boot \
             iscsi:[fd00::3]::3260:b:iqn.2026-11.dev.discus:lab.boot\n"
        );
    }

    #[test]
    fn asks_again_at_the_address_the_request_came_in_on() {
        let v6: SocketAddr = "[fd00::1]:8090".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            ask_with_mac(v6),
            "#!ipxe\nchain http://[fd00::1]:8090/boot/ipxe?mac=${netX/mac}\n"
        );
    }

    #[test]
    fn writes_what_ipxe_would_read_otherwise_as_hex_and_clears_what_it_does_not_set() {
        let chap = ChapCredentials {
            initiator: account("pxe-1", "a b${x}#;&&||q"),
            mutual: Some(account("target", "#mutual-secret")),
        };
        let script = ipxe_script(&entry(Some(chap), &["10.0.0.1:3260"]), IpAddr::from([0; 4]));
        assert!(script.contains("set password:hex 61:20:62:24:7b:78:7d:23:3b:26:26:7c:7c:71\n"));
        assert!(script.contains("set reverse-username target\n"));
        assert!(script.contains("set reverse-password:hex 23:6d:75"));
        let open = ipxe_script(&entry(None, &["10.0.0.1:3260"]), IpAddr::from([0; 4]));
        for setting in [
            "username",
            "password",
            "reverse-username",
            "reverse-password",
        ] {
            assert!(open.contains(&format!("clear {setting}\n")), "{open}");
        }
    }
}
