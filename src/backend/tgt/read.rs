//! Reads tgtd: `tgtadm --op show` for targets, accounts and portals, and the parsers of the
//! text tgtd prints into the model (model.rs).
//!
//! The format is indentation-based (four spaces a level). Unknown lines are ignored, so a newer
//! tgt that prints more does not break the reader; a line that should be a number and is not is
//! an error, because a misread state would make the planner do the wrong thing.

use std::collections::BTreeSet;

use super::model::{TgtLun, TgtSession, TgtState, TgtTarget};
use super::tgtadm::Tgtadm;
use crate::backend::BackendError;

/// Everything tgtd holds now.
pub async fn state(tgtadm: &Tgtadm) -> Result<TgtState, BackendError> {
    let show = |mode| ["--mode", mode, "--op", "show"];
    let targets = tgtadm.run_plain(&show("target")).await?;
    let accounts = tgtadm.run_plain(&show("account")).await?;
    let portals = tgtadm.run_plain(&show("portal")).await?;
    Ok(TgtState {
        // Output discus cannot read is a failure to report, not a reason to restart tgtd.
        targets: parse_targets(&targets).map_err(|e| BackendError::Failed {
            operation: "tgtadm --mode target --op show".into(),
            message: e.to_string(),
        })?,
        accounts: parse_accounts(&accounts),
        portals: parse_portals(&portals),
        kept: BTreeSet::new(),
    })
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read tgtadm's output, line {line}: {what}: {text:?}")]
pub struct ParseError {
    line: usize,
    what: &'static str,
    text: String,
}

fn number<T: std::str::FromStr>(
    value: &str,
    line: usize,
    what: &'static str,
    text: &str,
) -> Result<T, ParseError> {
    value.trim().parse().map_err(|_| ParseError {
        line,
        what,
        text: text.to_owned(),
    })
}

/// The section of a target's output a line belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    System,
    Nexus,
    Luns,
    Accounts,
    Acls,
}

/// Parses `tgtadm --mode target --op show`.
pub fn parse_targets(text: &str) -> Result<Vec<TgtTarget>, ParseError> {
    let mut targets: Vec<TgtTarget> = Vec::new();
    let mut section = Section::None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let depth = (raw.len() - raw.trim_start_matches(' ').len()) / 4;
        let content = raw.trim();
        if content.is_empty() {
            continue;
        }
        if depth == 0 {
            let rest = content.strip_prefix("Target ").ok_or(ParseError {
                line,
                what: "expected a target",
                text: raw.to_owned(),
            })?;
            let (tid, name) = rest.split_once(": ").ok_or(ParseError {
                line,
                what: "expected `Target <tid>: <name>`",
                text: raw.to_owned(),
            })?;
            targets.push(TgtTarget {
                tid: number(tid, line, "target id", raw)?,
                name: name.trim().to_owned(),
                ..TgtTarget::default()
            });
            section = Section::None;
            continue;
        }
        let Some(target) = targets.last_mut() else {
            return Err(ParseError {
                line,
                what: "a line before any target",
                text: raw.to_owned(),
            });
        };
        if depth == 1 {
            section = match content {
                "System information:" => Section::System,
                "I_T nexus information:" => Section::Nexus,
                "LUN information:" => Section::Luns,
                "Account information:" => Section::Accounts,
                "ACL information:" => Section::Acls,
                _ => Section::None,
            };
            continue;
        }
        let (key, value) = content
            .split_once(':')
            .map_or((content, ""), |(k, v)| (k.trim(), v.trim()));
        match (section, depth) {
            (Section::System, 2) if key == "State" => target.state = value.to_owned(),
            (Section::Nexus, 2) if key == "I_T nexus" => target.sessions.push(TgtSession {
                sid: number(value, line, "I_T nexus id", raw)?,
                ..TgtSession::default()
            }),
            (Section::Nexus, 3 | 4) => {
                let Some(session) = target.sessions.last_mut() else {
                    continue;
                };
                match key {
                    // "Initiator: iqn.… alias: none"
                    "Initiator" => {
                        session.initiator = value
                            .split(" alias:")
                            .next()
                            .unwrap_or(value)
                            .trim()
                            .to_owned();
                    }
                    "Connection" => {
                        session
                            .connections
                            .push(number(value, line, "connection id", raw)?)
                    }
                    "IP Address" if session.address.is_none() => {
                        session.address = Some(value.to_owned())
                    }
                    _ => {}
                }
            }
            (Section::Luns, 2) if key == "LUN" => target.luns.push(TgtLun {
                lun: number(value, line, "LUN", raw)?,
                ..TgtLun::default()
            }),
            (Section::Luns, 3) => {
                let Some(lun) = target.luns.last_mut() else {
                    continue;
                };
                match key {
                    "Type" => lun.kind = value.to_owned(),
                    "SCSI ID" => lun.scsi_id = value.to_owned(),
                    "SCSI SN" => lun.scsi_sn = value.to_owned(),
                    // "Size: 4 MB, Block size: 512"
                    "Size" => {
                        if let Some(block) = content.split("Block size:").nth(1) {
                            lun.block_size = number(block, line, "block size", raw)?;
                        }
                    }
                    "Readonly" => lun.readonly = value == "Yes",
                    "Backing store path" => {
                        lun.backing_path = (value != "None").then(|| value.to_owned());
                    }
                    _ => {}
                }
            }
            (Section::Accounts, 2) => match content.strip_suffix(" (outgoing)") {
                Some(user) => target.outgoing_account = Some(user.to_owned()),
                None => target.accounts.push(content.to_owned()),
            },
            // tgt lists initiator names and addresses alike; names are iSCSI names.
            (Section::Acls, 2) if crate::api::rules::iscsi_name(content).is_ok() => {
                target.acls.push(content.to_owned())
            }
            (Section::Acls, 2) => target.address_acls.push(content.to_owned()),
            _ => {}
        }
    }
    Ok(targets)
}

/// Parses `tgtadm --mode account --op show`.
pub fn parse_accounts(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("    "))
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Parses `tgtadm --mode portal --op show`: `Portal: 127.0.0.1:3260,1`.
pub fn parse_portals(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Portal: "))
        .map(|p| {
            p.rsplit_once(',')
                .map_or(p, |(portal, _tpgt)| portal)
                .to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from tgt 1.0.85 (Debian 12): a session, a controller, a read-only disk, a CD.
    const SHOW: &str = "Target 1: iqn.2026-11.dev.discus:t1
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 8
            Initiator: iqn.2026-11.dev.discus:init1 alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00010000
            SCSI SN: beaf10
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            SCSI ID: 0123456789abcdef0123456789abcdef
            SCSI SN: 0123456789abcdef0123456789abcdef
            Size: 4 MB, Block size: 4096
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: Yes
            SWP: No
            Thin-provisioning: No
            Backing store type: rdwr
            Backing store path: /var/lib/discus/images/a.raw
            Backing store flags: 
    Account information:
        u1
        tgtuser (outgoing)
    ACL information:
        iqn.2026-11.dev.discus:init1
Target 2: iqn.2026-11.dev.discus:empty
    System information:
        Driver: iscsi
        State: offline
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00020000
            SCSI SN: beaf20
            Size: 0 MB, Block size: 1
            Readonly: No
            Backing store path: None
    Account information:
    ACL information:
";

    #[test]
    fn reads_targets_sessions_luns_accounts_and_acls() {
        let targets = parse_targets(SHOW).expect("parses");
        assert_eq!(targets.len(), 2);
        let t = &targets[0];
        assert_eq!(
            (t.tid, t.name.as_str(), t.state.as_str()),
            (1, "iqn.2026-11.dev.discus:t1", "ready")
        );
        assert_eq!(
            t.sessions,
            vec![TgtSession {
                sid: 8,
                initiator: "iqn.2026-11.dev.discus:init1".into(),
                connections: vec![0],
                address: Some("127.0.0.1".into()),
            }]
        );
        assert_eq!(t.luns.len(), 2);
        assert_eq!(
            t.luns[1],
            TgtLun {
                lun: 1,
                kind: "disk".into(),
                scsi_id: "0123456789abcdef0123456789abcdef".into(),
                scsi_sn: "0123456789abcdef0123456789abcdef".into(),
                block_size: 4096,
                readonly: true,
                backing_path: Some("/var/lib/discus/images/a.raw".into()),
            }
        );
        assert_eq!(t.luns[0].backing_path, None);
        assert_eq!(t.accounts, ["u1"]);
        assert_eq!(t.outgoing_account.as_deref(), Some("tgtuser"));
        assert_eq!(t.acls, ["iqn.2026-11.dev.discus:init1"]);
        assert_eq!(targets[1].state, "offline");
        assert!(targets[1].sessions.is_empty() && targets[1].acls.is_empty());
    }

    #[test]
    fn an_empty_daemon_prints_nothing() {
        assert_eq!(parse_targets("").expect("empty"), vec![]);
    }

    #[test]
    fn garbage_is_an_error_not_a_misread_state() {
        assert!(parse_targets("Target x: iqn.a").is_err());
        assert!(parse_targets("    LUN information:").is_err());
        assert!(
            parse_targets("Target 1: iqn.a\n    LUN information:\n        LUN: one\n").is_err()
        );
    }

    #[test]
    fn reads_accounts_and_portals() {
        assert_eq!(
            parse_accounts("Account list:\n    tgtuser\n    u1\n"),
            ["tgtuser", "u1"]
        );
        assert_eq!(parse_accounts(""), Vec::<String>::new());
        assert_eq!(
            parse_portals("Portal: 127.0.0.1:3270,1\nPortal: [::1]:3260,1\n"),
            ["127.0.0.1:3270", "[::1]:3260"]
        );
    }
}
