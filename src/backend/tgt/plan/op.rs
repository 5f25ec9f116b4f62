//! The operations the tgt planner orders: one `tgtadm` call each (write.rs turns one into its
//! arguments), with what each concerns — a target, an initiator, a shared account — and whether
//! it revokes access.

use std::fmt;
use std::path::PathBuf;

use crate::api::chap::Password;
use crate::backend::Operation;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TgtOp {
    AddPortal(String),
    RemovePortal(String),
    CreateTarget {
        tid: u32,
        iqn: String,
    },
    /// `ready` or `offline`: offline before a delete, so that no I/O is in flight.
    SetState {
        tid: u32,
        iqn: String,
        ready: bool,
    },
    DeleteTarget {
        tid: u32,
        iqn: String,
    },
    AddLun {
        tid: u32,
        iqn: String,
        lun: u32,
        path: PathBuf,
        block_size: Option<u32>,
        cdrom: bool,
    },
    /// Read-only flag and serial: only `--op update` takes them.
    UpdateLun {
        tid: u32,
        iqn: String,
        lun: u32,
        readonly: bool,
        serial: String,
    },
    DeleteLun {
        tid: u32,
        iqn: String,
        lun: u32,
    },
    CreateAccount {
        user: String,
        password: Password,
    },
    DeleteAccount {
        user: String,
    },
    BindAccount {
        tid: u32,
        iqn: String,
        user: String,
        outgoing: bool,
    },
    UnbindAccount {
        tid: u32,
        iqn: String,
        user: String,
        outgoing: bool,
    },
    BindInitiator {
        tid: u32,
        iqn: String,
        initiator: String,
    },
    UnbindInitiator {
        tid: u32,
        iqn: String,
        initiator: String,
    },
    /// An address ACL (`ALL`, a network): admits by address, never discus's doing.
    UnbindAddress {
        tid: u32,
        iqn: String,
        address: String,
    },
    /// Ends a session (tgt does not when its ACL goes).
    CloseSession {
        tid: u32,
        iqn: String,
        initiator: String,
        sid: u64,
        cid: u32,
    },
}

impl fmt::Display for TgtOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AddPortal(p) => write!(f, "add portal {p}"),
            Self::RemovePortal(p) => write!(f, "remove portal {p}"),
            Self::CreateTarget { tid, iqn } => write!(f, "create target {tid} {iqn}"),
            Self::SetState { iqn, ready, .. } => {
                write!(
                    f,
                    "set target {iqn} {}",
                    if *ready { "ready" } else { "offline" }
                )
            }
            Self::DeleteTarget { iqn, .. } => write!(f, "delete target {iqn}"),
            Self::AddLun { iqn, lun, path, .. } => {
                write!(f, "add LUN {lun} of {iqn} from {}", path.display())
            }
            Self::UpdateLun {
                iqn, lun, readonly, ..
            } => {
                write!(
                    f,
                    "set LUN {lun} of {iqn} {}",
                    if *readonly { "read-only" } else { "writable" }
                )
            }
            Self::DeleteLun { iqn, lun, .. } => write!(f, "delete LUN {lun} of {iqn}"),
            Self::CreateAccount { user, .. } => write!(f, "create account {user}"),
            Self::DeleteAccount { user } => write!(f, "delete account {user}"),
            Self::BindAccount {
                iqn,
                user,
                outgoing,
                ..
            } => {
                write!(
                    f,
                    "bind {}account {user} to {iqn}",
                    if *outgoing { "outgoing " } else { "" }
                )
            }
            Self::UnbindAccount {
                iqn,
                user,
                outgoing,
                ..
            } => {
                write!(
                    f,
                    "unbind {}account {user} from {iqn}",
                    if *outgoing { "outgoing " } else { "" }
                )
            }
            Self::BindInitiator { iqn, initiator, .. } => write!(f, "admit {initiator} to {iqn}"),
            Self::UnbindInitiator { iqn, initiator, .. } => {
                write!(f, "stop admitting {initiator} to {iqn}")
            }
            Self::UnbindAddress { iqn, address, .. } => {
                write!(f, "stop admitting address {address} to {iqn}")
            }
            Self::CloseSession {
                iqn,
                initiator,
                sid,
                ..
            } => write!(f, "close session {sid} of {initiator} on {iqn}"),
        }
    }
}

impl Operation for TgtOp {
    fn target(&self) -> Option<&str> {
        match self {
            Self::AddPortal(_)
            | Self::RemovePortal(_)
            | Self::CreateAccount { .. }
            | Self::DeleteAccount { .. } => None,
            Self::CreateTarget { iqn, .. }
            | Self::SetState { iqn, .. }
            | Self::DeleteTarget { iqn, .. }
            | Self::AddLun { iqn, .. }
            | Self::UpdateLun { iqn, .. }
            | Self::DeleteLun { iqn, .. }
            | Self::BindAccount { iqn, .. }
            | Self::UnbindAccount { iqn, .. }
            | Self::BindInitiator { iqn, .. }
            | Self::UnbindInitiator { iqn, .. }
            | Self::UnbindAddress { iqn, .. }
            | Self::CloseSession { iqn, .. } => Some(iqn),
        }
    }

    fn initiator(&self) -> Option<&str> {
        match self {
            Self::BindInitiator { initiator, .. }
            | Self::UnbindInitiator { initiator, .. }
            | Self::CloseSession { initiator, .. } => Some(initiator),
            _ => None,
        }
    }

    fn shared(&self) -> Option<&str> {
        match self {
            Self::CreateAccount { user, .. }
            | Self::DeleteAccount { user }
            | Self::BindAccount { user, .. }
            | Self::UnbindAccount { user, .. } => Some(user),
            _ => None,
        }
    }

    /// Unbinding or deleting an account is not a revocation on tgt: a target left without
    /// accounts admits its initiators without CHAP.
    fn revokes(&self) -> bool {
        match self {
            Self::SetState { ready, .. } => !ready,
            Self::DeleteTarget { .. }
            | Self::DeleteLun { .. }
            | Self::UnbindInitiator { .. }
            | Self::UnbindAddress { .. }
            | Self::CloseSession { .. } => true,
            Self::AddPortal(_)
            | Self::RemovePortal(_)
            | Self::CreateTarget { .. }
            | Self::AddLun { .. }
            | Self::UpdateLun { .. }
            | Self::CreateAccount { .. }
            | Self::DeleteAccount { .. }
            | Self::BindAccount { .. }
            | Self::UnbindAccount { .. }
            | Self::BindInitiator { .. } => false,
        }
    }
}
