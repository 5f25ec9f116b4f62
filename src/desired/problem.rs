//! Why a resource cannot be served on this node.

use std::fmt;

/// The kind of a discus resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    DiscImage,
    IscsiTarget,
    InitiatorAccess,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DiscImage => "DiscImage",
            Self::IscsiTarget => "IscsiTarget",
            Self::InitiatorAccess => "InitiatorAccess",
        }
    }
}

/// A namespaced object's name.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Another object in the same namespace.
    pub fn sibling(&self, name: &str) -> Self {
        Self::new(self.namespace.clone(), name)
    }
}

impl fmt::Display for ObjectKey {
    /// Names straight from a manifest may hold anything: control characters are escaped, so
    /// that a name can never forge a line of output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            printable(&self.namespace),
            printable(&self.name)
        )
    }
}

/// `text` as it may be printed: unchanged when it is plain, escaped when it holds control or
/// other invisible characters.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text
        .chars()
        .all(|c| !c.is_control() && c != '\u{2028}' && c != '\u{2029}')
    {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(text.escape_default().to_string())
    }
}

/// Why a resource is not served. The names are the `reason` of its conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The spec breaks a rule.
    InvalidSpec,
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
    /// The grant names an IscsiTarget that does not exist.
    TargetNotFound,
    /// The grant's target exists but cannot be served on this node.
    TargetNotServed,
    /// The grant names a LUN the target does not have.
    LunNotFound,
    /// The target requires CHAP and the grant has none.
    ChapRequired,
    /// The grant has CHAP but the target is configured without authentication.
    ChapNotUsed,
    /// The CHAP Secret does not exist.
    SecretNotFound,
    /// The CHAP Secret does not exist yet; discus generates it.
    SecretPending,
    /// The CHAP Secret breaks a rule.
    SecretInvalid,
    /// An older grant already gives this initiator access to this target.
    DuplicateGrant,
    /// The backend cannot do what the resource asks (for example per-initiator LUNs on tgt).
    BackendLimit,
    /// The target software holds an object of that name that discus did not create.
    ForeignObject,
    /// `spec.portals` names an address or port the node's administrator does not allow.
    PortalNotAllowed,
    /// `spec.iqn` is not among the IQNs the node's administrator lets this namespace use.
    IqnNotAllowed,
    /// The image could not be imported, and trying again will not help (a wrong digest, a
    /// hostile or unsupported image, a source outside the allowed roots).
    ImportFailed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidSpec => "InvalidSpec",
            Self::IqnConflict => "IqnConflict",
            Self::NoPortal => "NoPortal",
            Self::UnsupportedDeviceType => "UnsupportedDeviceType",
            Self::ImageNotFound => "ImageNotFound",
            Self::ImageInvalid => "ImageInvalid",
            Self::ImageNotReady => "ImageNotReady",
            Self::TargetNotFound => "TargetNotFound",
            Self::TargetNotServed => "TargetNotServed",
            Self::LunNotFound => "LunNotFound",
            Self::ChapRequired => "ChapRequired",
            Self::ChapNotUsed => "ChapNotUsed",
            Self::SecretNotFound => "SecretNotFound",
            Self::SecretPending => "SecretPending",
            Self::SecretInvalid => "SecretInvalid",
            Self::DuplicateGrant => "DuplicateGrant",
            Self::BackendLimit => "BackendLimit",
            Self::ForeignObject => "ForeignObject",
            Self::ImportFailed => "ImportFailed",
            Self::PortalNotAllowed => "PortalNotAllowed",
            Self::IqnNotAllowed => "IqnNotAllowed",
        }
    }

    /// Every reason, for reading one back from status.
    pub const ALL: [Reason; 21] = [
        Self::InvalidSpec,
        Self::IqnConflict,
        Self::NoPortal,
        Self::UnsupportedDeviceType,
        Self::ImageNotFound,
        Self::ImageInvalid,
        Self::ImageNotReady,
        Self::TargetNotFound,
        Self::TargetNotServed,
        Self::LunNotFound,
        Self::ChapRequired,
        Self::ChapNotUsed,
        Self::SecretNotFound,
        Self::SecretPending,
        Self::SecretInvalid,
        Self::DuplicateGrant,
        Self::BackendLimit,
        Self::ForeignObject,
        Self::ImportFailed,
        Self::PortalNotAllowed,
        Self::IqnNotAllowed,
    ];

    pub fn parse(name: &str) -> Option<Reason> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Whether only a person can fix it (kstatus `Stalled`), as opposed to something that may
    /// resolve itself: an image still downloading, an object not created yet.
    pub fn stalls(self) -> bool {
        match self {
            Self::InvalidSpec
            | Self::IqnConflict
            | Self::NoPortal
            | Self::UnsupportedDeviceType
            | Self::ChapRequired
            | Self::ChapNotUsed
            | Self::SecretInvalid
            | Self::DuplicateGrant
            | Self::BackendLimit
            | Self::ForeignObject
            | Self::ImportFailed
            | Self::PortalNotAllowed
            | Self::IqnNotAllowed => true,
            Self::ImageNotFound
            | Self::ImageInvalid
            | Self::ImageNotReady
            | Self::TargetNotFound
            | Self::TargetNotServed
            | Self::LunNotFound
            | Self::SecretNotFound
            | Self::SecretPending => false,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One resource that cannot be served on this node, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: Kind,
    pub key: ObjectKey,
    pub reason: Reason,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}: {}: {}",
            self.kind.as_str(),
            self.key,
            self.reason,
            self.message
        )
    }
}
