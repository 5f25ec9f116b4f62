//! Everything declared, checked once per pass: each DiscImage, IscsiTarget and InitiatorAccess
//! with its key and the result of validating its spec. The desired state, the sync's image
//! requests and the lease holder all read the same snapshot, so that a spec is judged once and
//! the same way everywhere — and a grant's expiry, and the moment to wake for it, are computed in
//! one place.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::Resource;

use super::{ObjectKey, object_key};
use crate::api::chap::SecretData;
use crate::api::disc_image::ValidImage;
use crate::api::initiator_access::ValidGrant;
use crate::api::iscsi_target::ValidTarget;
use crate::api::{DiscImage, FieldErrors, InitiatorAccess, IscsiTarget};

/// One declared object, its key, and its spec as validated.
#[derive(Debug)]
pub struct Checked<'a, R, V> {
    pub object: &'a R,
    pub key: ObjectKey,
    pub valid: Result<V, FieldErrors>,
}

/// Everything one pass reads. Targets and grants are oldest first (then by namespace and
/// name), the order in which the older claim wins.
#[derive(Debug)]
pub struct Snapshot<'a> {
    pub images: Vec<Checked<'a, DiscImage, ValidImage>>,
    pub targets: Vec<Checked<'a, IscsiTarget, ValidTarget>>,
    pub grants: Vec<Checked<'a, InitiatorAccess, ValidGrant>>,
    /// Secrets by namespace and name.
    pub secrets: &'a BTreeMap<ObjectKey, SecretData>,
    target_index: BTreeMap<ObjectKey, usize>,
    grant_index: BTreeMap<ObjectKey, usize>,
}

impl<'a> Snapshot<'a> {
    pub fn new(
        images: impl IntoIterator<Item = &'a DiscImage>,
        targets: impl IntoIterator<Item = &'a IscsiTarget>,
        grants: impl IntoIterator<Item = &'a InitiatorAccess>,
        secrets: &'a BTreeMap<ObjectKey, SecretData>,
    ) -> Self {
        let targets = check(targets, |t| t.spec.validate());
        let grants = check(grants, |g| g.spec.validate());
        Self {
            images: images
                .into_iter()
                .map(|image| Checked {
                    object: image,
                    key: object_key(image.meta()),
                    valid: image.spec.validate(),
                })
                .collect(),
            target_index: index(&targets),
            grant_index: index(&grants),
            targets,
            grants,
            secrets,
        }
    }

    pub fn target(&self, key: &ObjectKey) -> Option<&Checked<'a, IscsiTarget, ValidTarget>> {
        self.targets.get(*self.target_index.get(key)?)
    }

    pub fn grant(&self, key: &ObjectKey) -> Option<&Checked<'a, InitiatorAccess, ValidGrant>> {
        self.grants.get(*self.grant_index.get(key)?)
    }

    /// The IQN a valid target is served under: `spec.iqn`, or `<authority>:<namespace>.<name>`.
    pub fn target_iqn(&self, target: &ObjectKey, authority: &str) -> Option<String> {
        let valid = self.target(target)?.valid.as_ref().ok()?;
        super::targets::effective_iqn(valid, target, authority).ok()
    }

    /// When a grant's access ends: its valid `expiresAt`, if any.
    pub fn expires_at(&self, grant: &ObjectKey) -> Option<Timestamp> {
        self.grant(grant)?.valid.as_ref().ok()?.expires_at
    }

    /// Whether a grant is past its `expiresAt` at `now`.
    pub fn expired(&self, grant: &ObjectKey, now: Timestamp) -> bool {
        self.expires_at(grant).is_some_and(|at| at <= now)
    }

    /// The next moment after `now` a grant expires.
    pub fn next_expiry(&self, now: Timestamp) -> Option<Timestamp> {
        self.grants
            .iter()
            .filter_map(|g| g.valid.as_ref().ok()?.expires_at)
            .filter(|at| *at > now)
            .min()
    }
}

/// How long to wait, from `now`, to see a grant expiring at `at` expired: just past the instant.
pub fn wake_for_expiry(at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or_default() + Duration::from_millis(10)
}

/// Validated objects, oldest first, then by namespace and name, so that "the older wins" is
/// stable (and deterministic where there are no timestamps, as in manifest folders).
fn check<'a, R: Resource + 'a, V>(
    objects: impl IntoIterator<Item = &'a R>,
    validate: impl Fn(&R) -> Result<V, FieldErrors>,
) -> Vec<Checked<'a, R, V>> {
    let mut checked: Vec<Checked<'a, R, V>> = objects
        .into_iter()
        .map(|object| Checked {
            object,
            key: object_key(object.meta()),
            valid: validate(object),
        })
        .collect();
    checked.sort_by_cached_key(|c| {
        (
            c.object.meta().creation_timestamp.as_ref().map(|t| t.0),
            c.key.clone(),
        )
    });
    checked
}

fn index<R, V>(checked: &[Checked<'_, R, V>]) -> BTreeMap<ObjectKey, usize> {
    (checked.iter().enumerate())
        .map(|(i, c)| (c.key.clone(), i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wake_up_for_an_expiry_is_just_past_it_and_never_negative() {
        let now = Timestamp::from_second(1_000).expect("time");
        let at = Timestamp::from_second(1_005).expect("time");
        assert_eq!(wake_for_expiry(at, now), Duration::from_millis(5_010));
        assert_eq!(wake_for_expiry(now, at), Duration::from_millis(10));
    }
}
