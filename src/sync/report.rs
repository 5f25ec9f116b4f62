//! What one pass found and did on this node — the input of status, events and metrics — with
//! the lookups status needs built once per pass, and when the next pass is due.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;

use super::sessions::SessionKey;
use crate::backend::Session;
use crate::desired::{self, DesiredState, Kind, ObjectKey, Problem, TargetConfig};
use crate::images::manager::ImageState;
use crate::metrics::PassSummary;

/// Work that did not converge: an operation that failed, or one still planned after applying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsettled {
    pub target: Option<String>,
    pub initiator: Option<String>,
    pub message: String,
}

/// What one pass found and did on this node: the input of status.
#[derive(Debug, Default)]
pub struct NodeReport {
    pub node: String,
    pub backend: &'static str,
    pub desired: DesiredState,
    /// The desired state's problems, what the backend refused, and images that cannot be had.
    pub problems: Vec<Problem>,
    pub unsettled: Vec<Unsettled>,
    pub sessions: Vec<Session>,
    /// When each session was first seen.
    pub session_since: BTreeMap<SessionKey, Timestamp>,
    /// The UID of each declared grant, for Events about it.
    pub grant_uids: BTreeMap<ObjectKey, String>,
    /// Which object of each name this pass read: what this node's entries describe.
    pub read: BTreeMap<(Kind, ObjectKey), ObjectRead>,
    pub images: BTreeMap<ObjectKey, ImageState>,
    /// API LUN → the LUN initiators see.
    pub device_luns: BTreeMap<u32, u32>,
    /// The targets (IQNs) this pass may have changed: those it read and reconciled (a scoped
    /// pass), or, on a backend read whole, those it found or left different from the last
    /// converged pass; `None` when it may have changed any. Every other target is as the
    /// previous pass left it.
    pub scope: Option<BTreeSet<String>>,
    /// Where machines can ask this node for boot scripts (empty when it serves none).
    pub boot_urls: Vec<String>,
    /// The grants whose machines this node hands a script (its boot table).
    pub booting: BTreeSet<ObjectKey>,
    /// Where this node receives uploads (none when it receives none); the URLs lack the path.
    pub upload: Option<crate::api::disc_image::NodeEndpointStatus>,
    /// The uploaded images this node offers the other nodes (`images::peers::Offers`).
    pub offered: BTreeSet<ObjectKey>,
    /// Lookups for status, built once a pass: statuses of thousands of resources must not each
    /// search the whole report.
    index: ReportIndex,
}

/// One object a pass read.
#[derive(Clone, Debug, Default)]
pub struct ObjectRead {
    pub uid: Option<String>,
    pub generation: Option<i64>,
}

#[derive(Debug, Default)]
struct ReportIndex {
    target_by_owner: BTreeMap<ObjectKey, usize>,
    acl_by_grant: BTreeMap<ObjectKey, (usize, usize)>,
    problems: BTreeMap<(Kind, ObjectKey), Vec<usize>>,
    sessions: BTreeMap<String, Vec<usize>>,
}

impl NodeReport {
    /// An empty report of a pass on this node.
    pub fn new(node: &str, backend: &'static str) -> Self {
        Self {
            node: node.to_owned(),
            backend,
            ..Self::default()
        }
    }

    /// The generation at which this pass read `object` (`Some(None)`: one without generations,
    /// from a file); `None` when it read none of that name, or another one — deleted and made
    /// again since, which nothing this pass found describes.
    pub fn generation(&self, kind: Kind, object: &ObjectMeta) -> Option<Option<i64>> {
        let read = self.read.get(&(kind, desired::object_key(object)))?;
        (read.uid == object.uid).then_some(read.generation)
    }

    /// Builds the lookups once the report is complete.
    pub(super) fn index(&mut self) {
        let mut index = ReportIndex::default();
        for (t, target) in self.desired.targets.iter().enumerate() {
            index.target_by_owner.insert(target.owner.clone(), t);
            for (a, acl) in target.acls.iter().enumerate() {
                index.acl_by_grant.insert(acl.grant.clone(), (t, a));
            }
        }
        for (i, problem) in self.problems.iter().enumerate() {
            index
                .problems
                .entry((problem.kind, problem.key.clone()))
                .or_default()
                .push(i);
        }
        for (i, session) in self.sessions.iter().enumerate() {
            index
                .sessions
                .entry(session.target.clone())
                .or_default()
                .push(i);
        }
        self.index = index;
    }

    /// The LUN number initiators see for an API LUN, when it differs (status shows it only then).
    pub fn device_lun(&self, lun: u32) -> Option<u32> {
        self.device_luns.get(&lun).copied().filter(|d| *d != lun)
    }

    pub fn problems_of(&self, kind: Kind, key: &ObjectKey) -> impl Iterator<Item = &Problem> {
        self.index
            .problems
            .get(&(kind, key.clone()))
            .into_iter()
            .flatten()
            .filter_map(|i| self.problems.get(*i))
    }

    /// The target an IscsiTarget became on this node.
    pub fn served_target(&self, owner: &ObjectKey) -> Option<&TargetConfig> {
        self.index
            .target_by_owner
            .get(owner)
            .and_then(|t| self.desired.targets.get(*t))
    }

    /// The target and ACL a grant became on this node.
    pub fn grant_acl(&self, grant: &ObjectKey) -> Option<(&TargetConfig, &desired::AclConfig)> {
        let (t, a) = self.index.acl_by_grant.get(grant)?;
        let target = self.desired.targets.get(*t)?;
        Some((target, target.acls.get(*a)?))
    }

    /// The sessions on a target.
    pub fn sessions_on(&self, iqn: &str) -> impl Iterator<Item = &Session> {
        self.index
            .sessions
            .get(iqn)
            .into_iter()
            .flatten()
            .filter_map(|i| self.sessions.get(*i))
    }

    /// Whether this pass left a served target exactly as the previous pass did — outside its
    /// scope, without a problem, with nothing unsettled node-wide — so that its status is the
    /// previous one, unless its own declaration changed.
    pub fn untouched_target(&self, owner: &ObjectKey) -> bool {
        self.served_target(owner)
            .is_some_and(|target| self.untouched(&target.iqn))
            && self.problems_of(Kind::IscsiTarget, owner).next().is_none()
    }

    /// Like `untouched_target`, for a grant and the target it applies to.
    pub fn untouched_grant(&self, grant: &ObjectKey) -> bool {
        self.grant_acl(grant)
            .is_some_and(|(target, _)| self.untouched(&target.iqn))
            && self
                .problems_of(Kind::InitiatorAccess, grant)
                .next()
                .is_none()
            && !self.desired.expired.contains(grant)
    }

    /// What metrics count of this pass.
    pub fn summary(&self, pass: Pass, took: std::time::Duration) -> PassSummary<'_> {
        PassSummary {
            pass: pass.label(),
            took,
            targets: self.desired.targets.len(),
            sessions: self.sessions.iter().map(|s| s.target.as_str()).collect(),
            problems: self
                .problems
                .iter()
                .map(|p| (p.kind.as_str(), p.reason.to_string()))
                .collect(),
            images: self
                .images
                .values()
                .map(|image| match image {
                    ImageState::Ready(stored) => ("ready", stored.virtual_size),
                    ImageState::InProgress(_) => ("in_progress", 0),
                    ImageState::Failed { .. } => ("failed", 0),
                })
                .collect(),
        }
    }

    fn untouched(&self, iqn: &str) -> bool {
        self.scope
            .as_ref()
            .is_some_and(|scope| !scope.contains(iqn))
            && self.unsettled.iter().all(|u| u.target.is_some())
    }

    /// What did not converge for a target (`initiator: None`) or for one grant on it: its own
    /// work, and work that concerns every target (a backend that cannot be reached).
    pub fn unsettled_messages(&self, iqn: &str, initiator: Option<&str>) -> Vec<&str> {
        self.unsettled
            .iter()
            .filter(|u| match (&u.target, &u.initiator) {
                (None, _) => true,
                (Some(target), None) => target == iqn,
                (Some(target), Some(who)) => target == iqn && initiator == Some(who.as_str()),
            })
            .map(|u| u.message.as_str())
            .collect()
    }
}

/// When the next pass is due without any change: at the next grant's expiry, or after `resync`
/// for a full pass that catches drift.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextPass {
    pub after: std::time::Duration,
    pub pass: Pass,
}

impl NodeReport {
    /// When the next pass is due without news, and what kind: a grant's expiry or lapse, or the
    /// periodic full pass, whichever comes first.
    pub fn next_pass(&self, resync: &Resync) -> NextPass {
        let now = Timestamp::now();
        let expiry = (self.desired.next_expiry).map(|at| desired::wake_for_expiry(at, now));
        // Just past the lapse, as for an expiry: a pass then sees it lapsed.
        let lapse = (self.desired.next_lapse).map(|until| {
            until.saturating_duration_since(std::time::Instant::now())
                + std::time::Duration::from_millis(10)
        });
        let full = resync.due_in();
        match expiry.into_iter().chain(lapse).min() {
            Some(expiry) if expiry < full => NextPass {
                after: expiry,
                pass: Pass::Changes,
            },
            _ => NextPass {
                after: full,
                pass: Pass::Full,
            },
        }
    }
}

/// The periodic full pass, which finds drift: due every `every` since the last one, however
/// many passes news wakes in between (a folder that changes every few seconds must not put it
/// off for good).
#[derive(Debug)]
pub struct Resync {
    every: std::time::Duration,
    last_full: std::time::Instant,
}

impl Resync {
    pub fn every(every: std::time::Duration) -> Self {
        Self {
            every,
            last_full: std::time::Instant::now(),
        }
    }

    /// A pass ran.
    pub fn ran(&mut self, pass: Pass) {
        if pass == Pass::Full {
            self.last_full = std::time::Instant::now();
        }
    }

    /// What a pass that starts now must be at least: `Full` once one is due.
    pub fn at_least(&self, pass: Pass) -> Pass {
        if self.due_in().is_zero() {
            Pass::Full
        } else {
            pass
        }
    }

    fn due_in(&self) -> std::time::Duration {
        self.every.saturating_sub(self.last_full.elapsed())
    }
}

/// Why a pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Read everything: the first pass, and the periodic one that finds drift.
    Full,
    /// Something declared changed (a file, an image, the clock of a grant): read only the
    /// targets the change touches, when the backend can.
    Changes,
}

impl Pass {
    /// Its name in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Changes => "changes",
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn news_never_puts_the_full_pass_off() {
        let hourly = Resync::every(std::time::Duration::from_secs(3600));
        assert_eq!(hourly.at_least(Pass::Changes), Pass::Changes);
        let mut due = Resync::every(std::time::Duration::ZERO);
        assert_eq!(due.at_least(Pass::Changes), Pass::Full);
        due.ran(Pass::Changes);
        assert_eq!(due.at_least(Pass::Changes), Pass::Full);
        let report = NodeReport::new("n", "tgt");
        assert_eq!(report.next_pass(&hourly).pass, Pass::Full);
        assert!(report.next_pass(&due).after.is_zero());
    }
    use crate::desired::Reason;

    fn target(name: &str, grants: &[&str]) -> TargetConfig {
        TargetConfig {
            iqn: format!("iqn.2026-11.dev.discus:{name}"),
            owner: ObjectKey::new("lab", name),
            portals: Vec::new(),
            chap_required: false,
            luns: Vec::new(),
            acls: grants
                .iter()
                .map(|g| desired::AclConfig {
                    initiator: format!("iqn.2026-11.dev.discus:{g}"),
                    grant: ObjectKey::new("lab", *g),
                    chap: None,
                    luns: Vec::new(),
                })
                .collect(),
        }
    }

    fn report(scope: Option<&[&str]>) -> NodeReport {
        let mut report = NodeReport {
            scope: scope.map(|s| {
                s.iter()
                    .map(|t| format!("iqn.2026-11.dev.discus:{t}"))
                    .collect()
            }),
            ..NodeReport::default()
        };
        report.desired.targets = vec![target("a", &["a1"]), target("b", &["b1", "b2"])];
        report.problems.push(Problem {
            kind: Kind::InitiatorAccess,
            key: ObjectKey::new("lab", "b2"),
            reason: Reason::SecretNotFound,
            message: "spec.chap.secretRef: Secret chap not found".into(),
        });
        report.index();
        report
    }

    #[test]
    fn only_what_a_scoped_pass_did_not_read_is_untouched() {
        let key = |name: &str| ObjectKey::new("lab", name);
        let scoped = report(Some(&["a"]));
        assert!(!scoped.untouched_target(&key("a")), "in scope");
        assert!(!scoped.untouched_grant(&key("a1")), "its target in scope");
        assert!(scoped.untouched_target(&key("b")));
        assert!(scoped.untouched_grant(&key("b1")));
        assert!(!scoped.untouched_grant(&key("b2")), "it has a problem");
        assert!(!scoped.untouched_target(&key("c")), "not served");

        let full = report(None);
        assert!(
            !full.untouched_target(&key("b")),
            "a full pass reads everything"
        );

        let mut unsettled = report(Some(&["a"]));
        unsettled.unsettled.push(Unsettled {
            target: None,
            initiator: None,
            message: "lio backend: configfs is gone".into(),
        });
        assert!(!unsettled.untouched_target(&key("b")), "trouble node-wide");
    }
}
