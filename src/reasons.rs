//! The words of status, in one place: the kinds of discus's resources, the types of their
//! conditions, every reason a condition or a node's entry gives, and the reasons of Events.
//!
//! Users and tools read these words — `kubectl get -o wide`, kstatus, Argo CD's health checks
//! (deploy/argocd/), alerts on `discus_problems{reason}` — so each is spelt once, here, and the
//! status code, the agent and `discus serve` name them by value, never by a literal.

use strum::{EnumIter, EnumString, IntoStaticStr};

/// The kind of a discus resource.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, IntoStaticStr, EnumString, EnumIter,
)]
pub enum Kind {
    DiscImage,
    IscsiTarget,
    InitiatorAccess,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The kind of a manifest's `kind`, when it is one of discus's.
    pub fn parse(kind: &str) -> Option<Kind> {
        kind.parse().ok()
    }
}

/// The types of the conditions every discus resource has (kstatus's, and `Expired`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoStaticStr)]
pub enum ConditionType {
    Ready,
    Reconciling,
    Stalled,
    /// An InitiatorAccess past its `expiresAt`.
    Expired,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why a resource is not served (or not yet): the `reason` of its conditions and of a node's
/// entry. Some stall it — only a person can fix them — and the rest pass by themselves.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, IntoStaticStr, EnumString, EnumIter,
)]
pub enum Reason {
    /// The spec breaks a rule.
    InvalidSpec,
    /// The file that declares the resource cannot be read now (`discus serve`); what it last
    /// declared is served.
    ManifestUnreadable,
    /// Another, older IscsiTarget has the same IQN.
    IqnConflict,
    /// The node has no address to listen on and the target names no portal.
    NoPortal,
    /// The backend cannot present this device type (cdrom on LIO).
    UnsupportedDeviceType,
    /// A LUN names a DiscImage that does not exist.
    ImageNotFound,
    /// A LUN names a DiscImage whose spec breaks a rule.
    ImageInvalid,
    /// A LUN's image is not (yet) verified and stored on this node.
    ImageNotReady,
    /// The stored image's bytes no longer matched their digest: removed, and fetched again.
    StoredImageRotten,
    /// The grant names an IscsiTarget that does not exist.
    TargetNotFound,
    /// The grant's target exists but cannot be served on this node.
    TargetNotServed,
    /// The grant names a LUN its target does not have.
    LunNotFound,
    /// The target requires CHAP and the grant has none.
    ChapRequired,
    /// The grant has CHAP and its target does not use it.
    ChapNotUsed,
    /// A Secret the resource names does not exist.
    SecretNotFound,
    /// The Secret is to be generated (`generateSecret: true`) and is not there yet.
    SecretPending,
    /// The Secret breaks a rule (CHAP lengths, keys).
    SecretInvalid,
    /// Another grant gives the same initiator access to the same target.
    DuplicateGrant,
    /// Another grant on the node names the same MAC address (`spec.boot.macAddresses`): the card
    /// boots through none of them. The grants' access is untouched.
    DuplicateBootMac,
    /// The boot block names a LUN its target does not have: nothing boots through the grant. Its
    /// access is untouched.
    BootLunNotFound,
    /// The backend cannot honour it without widening access (tgt).
    BackendLimit,
    /// The target software holds an object of the same name that discus does not own.
    ForeignObject,
    /// The target asks for a portal the node's administrator does not allow.
    PortalNotAllowed,
    /// The target asks for an IQN its namespace may not use.
    IqnNotAllowed,
    /// The image cannot be imported, and trying again will not help.
    ImportFailed,
    /// Served (or applied) as declared.
    Ready,
    /// The node's work on it has not converged yet; the message says what is left.
    NotConverged,
    /// No storage node matches the target's `nodeSelector`.
    NoNode,
    /// No node needs the image yet.
    NotNeeded,
    /// The node that wrote this entry stopped renewing its heartbeat.
    NodeLost,
    /// An InitiatorAccess past its `expiresAt`: access has ended.
    Expired,
    /// A grant held by heartbeat whose Lease this node has not seen renewed within its grace:
    /// access has ended here until a renewal comes.
    HeartbeatLapsed,
    /// A grant held by heartbeat where no node watches Leases (`discus serve`).
    HeartbeatUnsupported,
    /// An uploaded image where the node receives no uploads (its endpoint is off, or
    /// `discus serve`).
    UploadUnavailable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn parse(name: &str) -> Option<Reason> {
        name.parse().ok()
    }

    /// Whether it concerns only how machines boot through a grant (`spec.boot`): the grant's
    /// access stands, only its boot script is withheld.
    pub fn is_boot(self) -> bool {
        matches!(self, Self::DuplicateBootMac | Self::BootLunNotFound)
    }

    /// Whether only a person can fix it (kstatus's `Stalled`).
    pub fn stalls(self) -> bool {
        match self {
            Self::InvalidSpec
            | Self::ManifestUnreadable
            | Self::IqnConflict
            | Self::NoPortal
            | Self::UnsupportedDeviceType
            | Self::ChapRequired
            | Self::ChapNotUsed
            | Self::SecretInvalid
            | Self::DuplicateGrant
            | Self::DuplicateBootMac
            | Self::BootLunNotFound
            | Self::BackendLimit
            | Self::ForeignObject
            | Self::ImportFailed
            | Self::PortalNotAllowed
            | Self::IqnNotAllowed
            | Self::HeartbeatUnsupported
            | Self::UploadUnavailable => true,
            Self::ImageNotFound
            | Self::ImageInvalid
            | Self::ImageNotReady
            | Self::StoredImageRotten
            | Self::TargetNotFound
            | Self::TargetNotServed
            | Self::LunNotFound
            | Self::SecretNotFound
            | Self::SecretPending
            | Self::Ready
            | Self::NotConverged
            | Self::NoNode
            | Self::NotNeeded
            | Self::NodeLost
            | Self::Expired
            | Self::HeartbeatLapsed => false,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reasons of the Events a node tells (`kubectl get events`), with the action each reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoStaticStr)]
pub enum EventReason {
    Served,
    Removed,
    NotServed,
    Applied,
    Revoked,
    Expired,
    NotApplied,
    Verified,
    ImportFailed,
    /// A node handed a grant's boot script to a machine (the audit trail of network boot).
    BootScriptServed,
    /// An initiator's session began on a node (the audit trail of who connected when).
    LoggedIn,
    /// …and ended.
    LoggedOut,
}

impl EventReason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The Event's `action`.
    pub fn action(self) -> &'static str {
        match self {
            Self::Served | Self::NotServed => "Serve",
            Self::Removed => "Remove",
            Self::Applied | Self::NotApplied => "Apply",
            Self::Revoked | Self::Expired => "Revoke",
            Self::Verified | Self::ImportFailed => "Import",
            Self::BootScriptServed => "Boot",
            Self::LoggedIn | Self::LoggedOut => "Connect",
        }
    }
}

#[cfg(test)]
mod tests {
    use strum::IntoEnumIterator;

    use super::*;

    #[test]
    fn every_reason_reads_back_as_itself() {
        for reason in Reason::iter() {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
        for kind in Kind::iter() {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(Reason::parse("Bogus"), None);
        assert_eq!(Kind::parse("Secret"), None);
    }

    #[test]
    fn only_what_a_person_must_fix_stalls() {
        assert!(Reason::InvalidSpec.stalls() && Reason::ManifestUnreadable.stalls());
        assert!(!Reason::ImageNotReady.stalls() && !Reason::NodeLost.stalls());
        assert!(!Reason::Ready.stalls() && !Reason::NotConverged.stalls());
    }
}
