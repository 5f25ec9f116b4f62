//! Grants held by heartbeat (`spec.heartbeat`): applied on a node only while the node sees their
//! holder renew a Lease. Whether a grant is held is judged outside (the agent, on its monotonic
//! clock, from its watch of the Leases); here it only decides the grant's ACL.

use std::collections::BTreeMap;
use std::time::Instant;

use super::{Inputs, ObjectKey, Reason};
use crate::api::initiator_access::ValidGrant;

/// Whether a grant held by heartbeat is held now, as this node judged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Renewed within its grace: held until `until` (this node's monotonic clock) unless
    /// renewed again.
    Held { until: Instant },
    /// Not held; the message says why.
    Lapsed(String),
}

/// The hold of every grant held by heartbeat, by grant.
pub type Holds = BTreeMap<ObjectKey, Hold>;

/// `Ok(Some(until))` for a held grant, `Ok(None)` for one that is not held by heartbeat, and the
/// reason it has no ACL otherwise. Fails closed: a grant nobody judged is not held.
pub(super) fn check(
    inputs: &Inputs<'_>,
    key: &ObjectKey,
    grant: &ValidGrant,
) -> Result<Option<Instant>, (Reason, String)> {
    let Some(grace) = grant.heartbeat else {
        return Ok(None);
    };
    let Some(holds) = inputs.holds else {
        return Err((
            Reason::HeartbeatUnsupported,
            "spec.heartbeat: renewals come through a Lease in a cluster; `discus serve` has \
             none, so it never applies this grant (remove spec.heartbeat to serve it)"
                .to_owned(),
        ));
    };
    match holds.get(key) {
        Some(Hold::Held { until }) => Ok(Some(*until)),
        Some(Hold::Lapsed(why)) => Err((Reason::HeartbeatLapsed, why.clone())),
        None => Err((
            Reason::HeartbeatLapsed,
            format!(
                "no renewal of Lease {key} seen within {}s (spec.heartbeat.graceSeconds)",
                grace.as_secs()
            ),
        )),
    }
}
