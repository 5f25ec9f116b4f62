//! Kubernetes Events (events.k8s.io) for what a person watching `kubectl describe` wants to know:
//! a target served or removed, a grant applied, revoked or expired, an image verified or failed.
//!
//! Arrivals — a target served, a grant applied, an image verified — the lease holder tells, per
//! object for all the nodes it reached (`arrivals`). What only a node can say — a problem on that
//! node, an expiry it carried out, a target it no longer serves — each node tells itself, from
//! changes of its own entries between passes, so each change is told once; states that resolve
//! themselves (an image downloading) tell nothing. The first pass after a start sets the
//! baseline and tells nothing either: a restart does not repeat the story of every resource.
//! `Teller` tells them all, in series or each as an Event of its own.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::SignedDuration;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::api::disc_image::{DiscImageNodeStatus, ImagePhase};
use crate::api::initiator_access::AccessNodeStatus;
use crate::api::iscsi_target::TargetNodeStatus;
use crate::desired::{ObjectKey, object_key};
use crate::metrics::Metrics;
use crate::reasons::{EventReason, Kind, Reason};
use crate::status;
use crate::sync::SessionChange;

pub const CONCURRENT_EVENTS: usize = 8;

/// Where a resource stands on this node, as far as events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Served, applied, verified.
    Good,
    /// A grant past its `expiresAt`.
    Expired,
    /// Only a person can fix it.
    Stalled { reason: String, message: String },
    /// On its way, or waiting for something that will come.
    Pending,
}

/// A node's entry of some kind, summed up.
pub trait Summary {
    fn state(&self) -> State;
}

fn stalled_or_pending(reason: &Option<String>, message: &Option<String>) -> State {
    match reason {
        Some(reason) if status::is_stalling(reason) => State::Stalled {
            reason: reason.clone(),
            message: message.clone().unwrap_or_default(),
        },
        _ => State::Pending,
    }
}

impl Summary for TargetNodeStatus {
    fn state(&self) -> State {
        if self.ready {
            State::Good
        } else {
            stalled_or_pending(&self.reason, &self.message)
        }
    }
}

impl Summary for AccessNodeStatus {
    fn state(&self) -> State {
        if self.applied {
            State::Good
        } else if self.reason.as_deref() == Some(Reason::Expired.as_str()) {
            State::Expired
        } else {
            stalled_or_pending(&self.reason, &self.message)
        }
    }
}

impl Summary for DiscImageNodeStatus {
    fn state(&self) -> State {
        match self.phase {
            ImagePhase::Ready => State::Good,
            ImagePhase::Failed => stalled_or_pending(&self.reason, &self.message),
            _ => State::Pending,
        }
    }
}

/// What this node holds for each resource that has an entry here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    states: BTreeMap<(Kind, ObjectKey), (ObjectReference, State)>,
}

impl Observed {
    pub fn insert<K: Resource<DynamicType = ()>>(&mut self, kind: Kind, object: &K, state: State) {
        self.states.insert(
            (kind, object_key(object.meta())),
            (reference(object), state),
        );
    }
}

/// The object an event is about. No resourceVersion: the recorder groups repeats of an event
/// about the same object into a series (within its life: `EVENTS_PER_RECORDER`), and every
/// status write changes the version.
pub fn reference<K: Resource<DynamicType = ()>>(object: &K) -> ObjectReference {
    let meta = object.meta();
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        ..ObjectReference::default()
    }
}

/// The events between two observations of a node.
pub fn changes(node: &str, before: &Observed, after: &Observed) -> Vec<(ObjectReference, Event)> {
    let mut events = Vec::new();
    for (key, (reference, state)) in &after.states {
        let old = before.states.get(key).map(|(_, s)| s);
        if let Some(event) = arrived(key.0, node, old, state) {
            events.push((reference.clone(), event));
        }
    }
    for (key, (reference, state)) in &before.states {
        if *state == State::Good
            && !after
                .states
                .get(key)
                .is_some_and(|(_, s)| *s == State::Good)
            && let Some(event) = left(key.0, node, after.states.get(key).map(|(_, s)| s))
        {
            events.push((reference.clone(), event));
        }
    }
    events
}

/// The event for reaching `state` on this node, if reaching it is news the node tells (an
/// arrival the lease holder tells: see `Arrivals`).
fn arrived(kind: Kind, node: &str, old: Option<&State>, state: &State) -> Option<Event> {
    match state {
        State::Expired if old != Some(&State::Expired) => Some(normal(
            EventReason::Expired,
            format!("expired: access ended on node {node}"),
        )),
        State::Stalled { reason, message } => {
            let news = !matches!(old, Some(State::Stalled { reason: r, .. }) if r == reason);
            news.then(|| {
                let told = match kind {
                    Kind::IscsiTarget => EventReason::NotServed,
                    Kind::InitiatorAccess => EventReason::NotApplied,
                    Kind::DiscImage => EventReason::ImportFailed,
                };
                Event {
                    type_: EventType::Warning,
                    reason: told.as_str().into(),
                    note: Some(truncate(format!("{reason} on node {node}: {message}"))),
                    action: told.action().into(),
                    secondary: None,
                }
            })
        }
        _ => None,
    }
}

/// The event for a served target or an applied grant that no longer is (removed, revoked, or
/// no longer placed here), unless its new state has told already.
fn left(kind: Kind, node: &str, now: Option<&State>) -> Option<Event> {
    if matches!(now, Some(State::Expired | State::Stalled { .. })) {
        return None;
    }
    match kind {
        Kind::IscsiTarget => Some(normal(
            EventReason::Removed,
            format!("no longer served on node {node}"),
        )),
        Kind::InitiatorAccess => Some(normal(
            EventReason::Revoked,
            format!("access removed on node {node}"),
        )),
        Kind::DiscImage => None,
    }
}

pub fn normal(reason: EventReason, note: String) -> Event {
    Event {
        type_: EventType::Normal,
        reason: reason.as_str().into(),
        note: Some(note),
        action: reason.action().into(),
        secondary: None,
    }
}

/// Notes are limited to 1 kB.
pub fn truncate(mut note: String) -> String {
    if note.len() > 1000 {
        let mut end = 1000;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    note
}

/// How many events a recorder tells before a fresh one takes its place: kube's recorder keeps
/// every event it published for six minutes (to count repeats as a series) in a table that
/// never shrinks and goes over all of it at every event — after a cold start of 3000 objects,
/// 6 MB for good and a quadratic burst. Repeats are counted as a series within one recorder's
/// life; the next starts new ones.
const EVENTS_PER_RECORDER: usize = 256;

/// Tells Events as one reporter (a node's agent, or the lease holder).
pub struct Teller {
    client: kube::Client,
    reporter: Reporter,
    /// The recorder of events told in series, with how many it told.
    recorder: parking_lot::Mutex<(Recorder, usize)>,
    metrics: Arc<Metrics>,
}

impl Teller {
    pub fn new(client: kube::Client, instance: &str, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: "discus.dev/agent".into(),
            instance: Some(instance.to_owned()),
        };
        Self {
            recorder: parking_lot::Mutex::new((Recorder::new(client.clone(), reporter.clone()), 0)),
            client,
            reporter,
            metrics,
        }
    }

    /// Tells `events`, a repeat of one within minutes adding to its series (a count) rather
    /// than making an Event of its own.
    pub async fn tell_in_series(&self, events: Vec<(ObjectReference, Event)>) {
        let recorder = &self.recorder_for(events.len());
        futures::stream::iter(events)
            .for_each_concurrent(CONCURRENT_EVENTS, |(reference, event)| async move {
                let _ = self.publish(recorder, &reference, &event).await;
            })
            .await;
    }

    /// Tells one event as an Event of its own (in a series, a repeat's note — which nodes,
    /// which address, how long — would be lost).
    pub async fn tell_one(&self, reference: &ObjectReference, event: &Event) -> kube::Result<()> {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        self.publish(&recorder, reference, event).await
    }

    async fn publish(
        &self,
        recorder: &Recorder,
        reference: &ObjectReference,
        event: &Event,
    ) -> kube::Result<()> {
        let published = super::bounded(recorder.publish(event, reference)).await;
        self.metrics.event_published(published.is_ok());
        if let Err(error) = &published {
            tracing::warn!(reason = %event.reason, object = ?reference.name, %error, "cannot publish an event");
        }
        published
    }

    /// The recorder to tell `count` events with: the current one, or a fresh one in its place
    /// when it would tell more than `EVENTS_PER_RECORDER`.
    fn recorder_for(&self, count: usize) -> Recorder {
        let mut current = self.recorder.lock();
        if current.1 + count > EVENTS_PER_RECORDER {
            *current = (Recorder::new(self.client.clone(), self.reporter.clone()), 0);
        }
        current.1 += count;
        current.0.clone()
    }
}

/// What a node tells of its own entries, and what it last observed.
pub struct NodeEvents {
    teller: Teller,
    node: String,
    last: parking_lot::Mutex<Option<Observed>>,
}

impl NodeEvents {
    pub fn new(client: kube::Client, node: &str, metrics: Arc<Metrics>) -> Self {
        Self {
            teller: Teller::new(client, node, metrics),
            node: node.to_owned(),
            last: parking_lot::Mutex::new(None),
        }
    }

    /// Publishes what changed since the last observation (nothing the first time).
    pub async fn observe(&self, now: Observed) {
        let events = {
            let mut last = self.last.lock();
            let events = last
                .as_ref()
                .map(|before| changes(&self.node, before, &now))
                .unwrap_or_default();
            *last = Some(now);
            events
        };
        self.teller.tell_in_series(events).await;
    }
}

/// News a node tells as an Event on a grant, as it happens (not from a change of status): the
/// audit trail of who booted and who connected, in `kubectl get events`.
pub trait GrantNews: Clone + Send + 'static {
    /// The grant it is about (its UID when known); nothing to tell without one.
    fn grant(&self) -> Option<(&ObjectKey, Option<&str>)>;
    fn event(&self, node: &str) -> Event;
}

impl GrantNews for crate::boot::ServedScript {
    fn grant(&self) -> Option<(&ObjectKey, Option<&str>)> {
        Some((&self.grant, self.uid.as_deref()))
    }

    fn event(&self, node: &str) -> Event {
        normal(
            EventReason::BootScriptServed,
            format!(
                "node {node} served the boot script to card {} at {}",
                self.mac, self.source
            ),
        )
    }
}

impl GrantNews for SessionChange {
    fn grant(&self) -> Option<(&ObjectKey, Option<&str>)> {
        (self.grant.as_ref()).map(|grant| (&grant.key, grant.uid.as_deref()))
    }

    fn event(&self, node: &str) -> Event {
        let from = match self.address.as_str() {
            "" => String::new(),
            address => format!(" from {address}"),
        };
        let (initiator, target) = (&self.initiator, &self.target);
        match self.ended_after {
            None => normal(
                EventReason::LoggedIn,
                format!("{initiator} logged in to {target}{from} on node {node}"),
            ),
            Some(lasted) => normal(
                EventReason::LoggedOut,
                format!(
                    "{initiator} logged out of {target}{from} on node {node} (seen for {:#})",
                    SignedDuration::try_from(lasted).unwrap_or(SignedDuration::MAX)
                ),
            ),
        }
    }
}

/// Tells each piece of `news` as an Event on its grant, for as long as news comes. Each is an
/// Event of its own: a recorder would fold a repeat (a second login of the same initiator within
/// minutes) into the first Event's count, and its note (address, duration) would be lost.
pub async fn tell<N: GrantNews>(
    mut news: tokio::sync::broadcast::Receiver<N>,
    client: kube::Client,
    node: String,
    metrics: Arc<Metrics>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let teller = Teller::new(client, &node, metrics);
    loop {
        let item = match news.recv().await {
            Ok(item) => item,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "news came faster than Events can tell it; the log has it all"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let Some((grant, uid)) = item.grant() else {
            continue;
        };
        let reference = ObjectReference {
            api_version: Some(crate::api::API_VERSION.into()),
            kind: Some("InitiatorAccess".into()),
            name: Some(grant.name.clone()),
            namespace: Some(grant.namespace.clone()),
            uid: uid.map(str::to_owned),
            ..ObjectReference::default()
        };
        // A failure is in the log (`publish`); the news is not told again.
        let _ = teller.tell_one(&reference, &item.event(&node)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IscsiTarget;
    use crate::sync::GrantRef;

    fn target(name: &str) -> IscsiTarget {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discus.dev/v1alpha1", "kind": "IscsiTarget",
            "metadata": {"name": name, "namespace": "lab", "uid": format!("uid-{name}")},
            "spec": {"iqn": format!("iqn.2026-11.dev.discus:{name}"), "luns": [{"lun": 0, "image": "x"}]},
        }))
        .expect("target")
    }

    fn observed(states: &[(&str, Kind, State)]) -> Observed {
        let mut observed = Observed::default();
        for (name, kind, state) in states {
            observed.insert(*kind, &target(name), state.clone());
        }
        observed
    }

    fn told(before: &Observed, after: &Observed) -> Vec<(String, String)> {
        changes("node-a", before, after)
            .into_iter()
            .map(|(r, e)| (r.name.unwrap_or_default(), e.reason))
            .collect()
    }

    fn stalled(reason: &str) -> State {
        State::Stalled {
            reason: reason.into(),
            message: "why".into(),
        }
    }

    #[test]
    fn each_change_is_told_once_and_progress_is_not_told() {
        let t = Kind::IscsiTarget;
        let pending = observed(&[("boot", t, State::Pending)]);
        let served = observed(&[("boot", t, State::Good)]);
        assert!(
            told(&pending, &served).is_empty(),
            "an arrival is the lease holder's to tell"
        );
        assert!(told(&served, &served).is_empty());
        assert!(told(&Observed::default(), &pending).is_empty());
        assert_eq!(
            told(&served, &Observed::default()),
            [("boot".into(), "Removed".into())]
        );
        let broken = observed(&[("boot", t, stalled("IqnConflict"))]);
        assert_eq!(
            told(&served, &broken),
            [("boot".into(), "NotServed".into())]
        );
        assert!(
            told(&broken, &broken).is_empty(),
            "the same problem is not told again"
        );
        let other = observed(&[("boot", t, stalled("ForeignObject"))]);
        assert_eq!(told(&broken, &other), [("boot".into(), "NotServed".into())]);
    }

    #[test]
    fn grants_tell_revoked_and_expired() {
        let g = Kind::InitiatorAccess;
        let applied = observed(&[("client", g, State::Good)]);
        let expired = observed(&[("client", g, State::Expired)]);
        assert!(told(&Observed::default(), &applied).is_empty());
        assert_eq!(
            told(&applied, &expired),
            [("client".into(), "Expired".into())]
        );
        assert_eq!(
            told(&applied, &Observed::default()),
            [("client".into(), "Revoked".into())]
        );
        assert!(told(&expired, &Observed::default()).is_empty());
    }

    #[test]
    fn images_tell_failure_but_not_removal() {
        let i = Kind::DiscImage;
        let ready = observed(&[("iso", i, State::Good)]);
        let failed = observed(&[("iso", i, stalled("ImportFailed"))]);
        assert_eq!(
            told(&Observed::default(), &failed),
            [("iso".into(), "ImportFailed".into())]
        );
        assert!(told(&ready, &Observed::default()).is_empty());
    }

    #[test]
    fn references_carry_no_resource_version() {
        let mut object = target("boot");
        object.metadata.resource_version = Some("42".into());
        let reference = reference(&object);
        assert_eq!(reference.resource_version, None);
        assert_eq!(reference.uid.as_deref(), Some("uid-boot"));
    }

    #[test]
    fn sessions_are_told_on_their_grant_with_initiator_address_node_and_duration() {
        let began = SessionChange {
            target: "iqn.t:a".into(),
            initiator: "iqn.i:one".into(),
            address: "10.0.0.1".into(),
            grant: Some(GrantRef {
                key: ObjectKey::new("lab", "one"),
                uid: Some("uid-one".into()),
            }),
            ended_after: None,
        };
        let event = began.event("node-a");
        assert_eq!(event.reason, "LoggedIn");
        assert_eq!(
            event.note.as_deref(),
            Some("iqn.i:one logged in to iqn.t:a from 10.0.0.1 on node node-a")
        );
        let ended = SessionChange {
            ended_after: Some(std::time::Duration::from_secs(3723)),
            ..began.clone()
        };
        let event = ended.event("node-a");
        assert_eq!(event.reason, "LoggedOut");
        assert_eq!(
            event.note.as_deref(),
            Some(
                "iqn.i:one logged out of iqn.t:a from 10.0.0.1 on node node-a (seen for 1h 2m 3s)"
            )
        );
        assert_eq!(
            ended.grant().map(|(g, uid)| (g.name.as_str(), uid)),
            Some(("one", Some("uid-one")))
        );
        let unowned = SessionChange {
            grant: None,
            ..began
        };
        assert!(unowned.grant().is_none(), "no grant, no Event");
    }
}
