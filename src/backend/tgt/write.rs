//! What each tgt operation asks of tgtadm (pure), and which of tgtadm's refusals mean the work is
//! already done.

use super::plan::TgtOp;
use super::tgtadm::Arg;

/// The arguments of the tgtadm command that carries out `op` (after `-C <port> --lld iscsi`).
pub fn argv(op: &TgtOp) -> Vec<Arg> {
    let plain = |args: &[&str]| args.iter().map(|a| Arg::from(*a)).collect::<Vec<_>>();
    match op {
        TgtOp::AddPortal(portal) => portal_args("new", portal),
        TgtOp::RemovePortal(portal) => portal_args("delete", portal),
        TgtOp::CreateTarget { tid, iqn } => {
            let mut args = target_args("new", *tid);
            args.extend(plain(&["--targetname", iqn]));
            args
        }
        TgtOp::SetState { tid, ready, .. } => {
            let mut args = target_args("update", *tid);
            let state = if *ready { "ready" } else { "offline" };
            args.extend(plain(&["--name", "state", "--value", state]));
            args
        }
        TgtOp::DeleteTarget { tid, .. } => {
            let mut args = plain(&["--mode", "target", "--op", "delete", "--force"]);
            args.extend([Arg::from("--tid"), Arg::from(tid.to_string())]);
            args
        }
        TgtOp::AddLun {
            tid,
            lun,
            path,
            block_size,
            cdrom,
            ..
        } => {
            let mut args = lun_args("new", *tid, *lun);
            args.extend([
                Arg::from("--backing-store"),
                Arg::from(path.display().to_string()),
            ]);
            if *cdrom {
                args.extend(plain(&["--device-type", "cd"]));
            }
            if let Some(size) = block_size {
                args.extend([Arg::from("--blocksize"), Arg::from(size.to_string())]);
            }
            args
        }
        TgtOp::UpdateLun {
            tid,
            lun,
            readonly,
            serial,
            ..
        } => {
            let mut args = lun_args("update", *tid, *lun);
            args.extend([
                Arg::from("--params"),
                Arg::from(format!(
                    "readonly={},scsi_sn={serial},scsi_id={serial}",
                    u8::from(*readonly)
                )),
            ]);
            args
        }
        TgtOp::DeleteLun { tid, lun, .. } => lun_args("delete", *tid, *lun),
        // tgtadm takes the secret only as an argument (LIO's configfs needs none): it is in
        // tgtadm's command line for the few milliseconds tgtadm runs.
        TgtOp::CreateAccount { user, password } => {
            let mut args = plain(&["--mode", "account", "--op", "new", "--user", user]);
            args.extend([Arg::from("--password"), Arg::Secret(password.clone())]);
            args
        }
        TgtOp::DeleteAccount { user } => {
            plain(&["--mode", "account", "--op", "delete", "--user", user])
        }
        TgtOp::BindAccount {
            tid,
            user,
            outgoing,
            ..
        } => account_binding("bind", *tid, user, *outgoing),
        TgtOp::UnbindAccount {
            tid,
            user,
            outgoing,
            ..
        } => account_binding("unbind", *tid, user, *outgoing),
        TgtOp::BindInitiator { tid, initiator, .. } => {
            let mut args = target_args("bind", *tid);
            args.extend(plain(&["--initiator-name", initiator]));
            args
        }
        TgtOp::UnbindInitiator { tid, initiator, .. } => {
            let mut args = target_args("unbind", *tid);
            args.extend(plain(&["--initiator-name", initiator]));
            args
        }
        TgtOp::UnbindAddress { tid, address, .. } => {
            let mut args = target_args("unbind", *tid);
            args.extend(plain(&["--initiator-address", address]));
            args
        }
        TgtOp::CloseSession { tid, sid, cid, .. } => {
            let mut args = plain(&["--mode", "conn", "--op", "delete"]);
            for (flag, value) in [("--tid", tid.to_string()), ("--sid", sid.to_string())] {
                args.extend([Arg::from(flag), Arg::from(value)]);
            }
            args.extend([Arg::from("--cid"), Arg::from(cid.to_string())]);
            args
        }
    }
}

/// The words of tgtadm's refusal when the operation's work is already done (deleting what is
/// gone), if an operation has such a refusal.
pub fn already_done(op: &TgtOp) -> Option<&'static str> {
    match op {
        TgtOp::DeleteAccount { .. } | TgtOp::CloseSession { .. } => Some("can't find"),
        TgtOp::UnbindAccount { .. } => Some("can't find"),
        TgtOp::UnbindInitiator { .. } | TgtOp::UnbindAddress { .. } => Some("does not exist"),
        _ => None,
    }
}

fn portal_args(op: &str, portal: &str) -> Vec<Arg> {
    ["--mode", "portal", "--op", op, "--param"]
        .into_iter()
        .map(Arg::from)
        .chain([Arg::from(format!("portal={portal}"))])
        .collect()
}

fn target_args(op: &str, tid: u32) -> Vec<Arg> {
    ["--mode", "target", "--op", op, "--tid"]
        .into_iter()
        .map(Arg::from)
        .chain([Arg::from(tid.to_string())])
        .collect()
}

fn lun_args(op: &str, tid: u32, lun: u32) -> Vec<Arg> {
    let mut args: Vec<Arg> = ["--mode", "logicalunit", "--op", op, "--tid"]
        .into_iter()
        .map(Arg::from)
        .collect();
    args.extend([
        Arg::from(tid.to_string()),
        Arg::from("--lun"),
        Arg::from(lun.to_string()),
    ]);
    args
}

fn account_binding(op: &str, tid: u32, user: &str, outgoing: bool) -> Vec<Arg> {
    let mut args: Vec<Arg> = ["--mode", "account", "--op", op, "--tid"]
        .into_iter()
        .map(Arg::from)
        .collect();
    args.extend([
        Arg::from(tid.to_string()),
        Arg::from("--user"),
        Arg::from(user),
    ]);
    if outgoing {
        args.push(Arg::from("--outgoing"));
    }
    args
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::tgtadm::Shown;
    use super::*;
    use crate::api::chap::Password;

    fn shown(op: &TgtOp) -> String {
        Shown(&argv(op)).to_string()
    }

    #[test]
    fn every_operation_becomes_its_tgtadm_command() {
        let iqn = || "iqn.2026-11.dev.discus:lab.boot".to_owned();
        let cases = [
            (
                TgtOp::AddPortal("10.0.0.1:3260".into()),
                "tgtadm --mode portal --op new --param portal=10.0.0.1:3260",
            ),
            (
                TgtOp::CreateTarget { tid: 3, iqn: iqn() },
                "tgtadm --mode target --op new --tid 3 --targetname iqn.2026-11.dev.discus:lab.boot",
            ),
            (
                TgtOp::SetState {
                    tid: 3,
                    iqn: iqn(),
                    ready: false,
                },
                "tgtadm --mode target --op update --tid 3 --name state --value offline",
            ),
            (
                TgtOp::DeleteTarget { tid: 3, iqn: iqn() },
                "tgtadm --mode target --op delete --force --tid 3",
            ),
            (
                TgtOp::AddLun {
                    tid: 3,
                    iqn: iqn(),
                    lun: 1,
                    path: PathBuf::from("/data/images/a.raw"),
                    block_size: Some(4096),
                    cdrom: false,
                },
                "tgtadm --mode logicalunit --op new --tid 3 --lun 1 --backing-store /data/images/a.raw --blocksize 4096",
            ),
            (
                TgtOp::UpdateLun {
                    tid: 3,
                    iqn: iqn(),
                    lun: 1,
                    readonly: true,
                    serial: "abc".into(),
                },
                "tgtadm --mode logicalunit --op update --tid 3 --lun 1 --params readonly=1,scsi_sn=abc,scsi_id=abc",
            ),
            (
                TgtOp::CreateAccount {
                    user: "host-a".into(),
                    password: Password::new("s3cret-s3cret".into()),
                },
                "tgtadm --mode account --op new --user host-a --password <redacted>",
            ),
            (
                TgtOp::UnbindAccount {
                    tid: 3,
                    iqn: iqn(),
                    user: "target".into(),
                    outgoing: true,
                },
                "tgtadm --mode account --op unbind --tid 3 --user target --outgoing",
            ),
            (
                TgtOp::BindInitiator {
                    tid: 3,
                    iqn: iqn(),
                    initiator: "iqn.1993-08.org.debian:01:a".into(),
                },
                "tgtadm --mode target --op bind --tid 3 --initiator-name iqn.1993-08.org.debian:01:a",
            ),
            (
                TgtOp::CloseSession {
                    tid: 3,
                    iqn: iqn(),
                    initiator: "iqn.1993-08.org.debian:01:a".into(),
                    sid: 7,
                    cid: 0,
                },
                "tgtadm --mode conn --op delete --tid 3 --sid 7 --cid 0",
            ),
        ];
        for (op, expected) in cases {
            assert_eq!(shown(&op), expected);
        }
    }

    #[test]
    fn the_password_reaches_tgtadm_and_nothing_else() {
        let op = TgtOp::CreateAccount {
            user: "host-a".into(),
            password: Password::new("s3cret-s3cret".into()),
        };
        let args = argv(&op);
        assert!(args.contains(&Arg::Secret(Password::new("s3cret-s3cret".into()))));
        assert!(!format!("{op} {op:?} {}", shown(&op)).contains("s3cret"));
    }
}
