//! The whole-node sync: the same loop for `discus serve` and the Kubernetes agent.
//!
//! Level-triggered: every pass computes the complete desired state of the node from all the
//! resources, diffs it against what the backend holds, applies only the difference, and observes
//! again to see what converged. One pass at a time (one writer per node); images download in the
//! background and a finished import asks for another pass.

mod reconcile;
mod report;
mod requests;
mod sessions;
mod syncer;

use std::collections::BTreeMap;

use crate::api::chap::SecretData;
use crate::api::{DiscImage, InitiatorAccess, IscsiTarget};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::desired::{Kind, ObjectKey, Snapshot, object_key};

pub use report::{NextPass, NodeReport, ObjectRead, Pass, Resync, Unsettled};
pub use requests::{Receiving, UploadReception};
pub use sessions::{GrantRef, SessionChange, key as session_key};
pub use syncer::Syncer;

/// Everything declared: the input of a sync.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub images: Vec<DiscImage>,
    /// Without their status in the agent (a pass reads none; images' it does).
    pub targets: Vec<IscsiTarget>,
    /// In the agent, with no status but the node entries of those with a boot block (the other
    /// nodes' portals, for their boot scripts).
    pub grants: Vec<InitiatorAccess>,
    pub secrets: BTreeMap<ObjectKey, SecretData>,
    /// Some input could not be read and nothing earlier is known of it: what these resources do
    /// not declare may still be declared there. A pass then removes no target and no image.
    pub partial: bool,
    /// Whether each grant held by heartbeat is held, as this node judged it; `None` where
    /// nothing watches heartbeats (`discus serve`), so such grants are never applied.
    pub holds: Option<crate::desired::Holds>,
}

impl Resources {
    /// Which object of each name these are, at which generation (those from files have
    /// neither uid nor generation).
    pub fn read(&self) -> BTreeMap<(Kind, ObjectKey), ObjectRead> {
        let of = |kind, meta: &ObjectMeta| {
            let read = ObjectRead {
                uid: meta.uid.clone(),
                generation: meta.generation,
            };
            ((kind, object_key(meta)), read)
        };
        let images = (self.images.iter()).map(|i| of(Kind::DiscImage, &i.metadata));
        let targets = (self.targets.iter()).map(|t| of(Kind::IscsiTarget, &t.metadata));
        let grants = (self.grants.iter()).map(|g| of(Kind::InitiatorAccess, &g.metadata));
        images.chain(targets).chain(grants).collect()
    }

    /// Every object's spec validated once: what a pass reads.
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot::new(&self.images, &self.targets, &self.grants, &self.secrets)
    }
}

#[cfg(test)]
mod tests;
