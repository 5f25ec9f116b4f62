//! Arrivals — a target served, a grant applied, an image verified — told by the lease holder as
//! one Event per object naming every node it reached, rather than by each node: on a cold start
//! of 3000 objects on three nodes, one Event per object and node made 9000 creates, the
//! apiserver's largest cost then.
//!
//! The lease holder remembers, per object, the nodes it told (`Arrivals`). A node counts as
//! reached when its entry is good at the object's generation; the nodes newly reached are told
//! once the object has settled — no node on its way or behind (a lost node's entry aside), no
//! node that should have an entry without one — so a cold start tells each object once, a node
//! that arrives later (added, recovered) is told when it does, and a new generation reached
//! everywhere is told again. An object first seen counts as told as its stored status stands
//! when that had settled: a new lease holder does not repeat what the last one told.
//!
//! Telling goes on beside the lease holder's passes (`Telling`): a burst of thousands of Events
//! does not hold back the next status writes. An arrival whose status write failed, or whose
//! Event could not be told, is taken back and told by a later pass; one still being told when
//! the agent stops is lost.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::Event;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::desired::{Kind, ObjectKey};
use crate::reasons::EventReason;

use super::events::{CONCURRENT_EVENTS, Teller, normal, truncate};

/// An object of a kind, by name.
pub type Object = (Kind, ObjectKey);

/// A note names this many bytes of nodes at most, then says how many more.
const NAMES_AT_MOST: usize = 800;

/// The nodes told of one object: of which object (by uid) and generation.
#[derive(Debug)]
struct Told {
    uid: String,
    generation: Option<i64>,
    /// Sorted.
    nodes: Vec<Box<str>>,
}

/// Where an object stands now, for its arrivals.
pub struct Reach<'a> {
    pub uid: &'a str,
    pub generation: Option<i64>,
    /// The nodes whose entries are good at `generation`, sorted.
    pub nodes: &'a [String],
}

/// What the lease holder told of each object.
#[derive(Debug, Default)]
pub struct Arrivals {
    told: HashMap<Object, Told>,
}

impl Arrivals {
    /// The nodes to tell `object` reached, counted as told from now on (`untell` takes them
    /// back). `stored`: the nodes reached in the status the object has, when it had settled,
    /// asked of an object first seen; `settled`: whether the object has settled, asked only when
    /// a node is new.
    pub fn arrived(
        &mut self,
        object: &Object,
        now: &Reach<'_>,
        stored: impl FnOnce() -> Vec<String>,
        settled: impl FnOnce() -> bool,
    ) -> Vec<String> {
        if !self.told.contains_key(object) {
            let mut nodes: Vec<Box<str>> = stored().into_iter().map(Into::into).collect();
            nodes.sort();
            let told = Told {
                uid: now.uid.to_owned(),
                generation: now.generation,
                nodes,
            };
            self.told.insert(object.clone(), told);
        }
        let Some(told) = self.told.get_mut(object) else {
            return Vec::new();
        };
        if told.uid != now.uid || told.generation != now.generation {
            // Another object of the same name, or a new spec: nothing of it told yet.
            *told = Told {
                uid: now.uid.to_owned(),
                generation: now.generation,
                nodes: Vec::new(),
            };
        }
        let reached = |node: &str| now.nodes.binary_search_by(|n| n.as_str().cmp(node)).is_ok();
        // A node no longer reached is told again when it is.
        told.nodes.retain(|node| reached(node));
        let was_told = |node: &str| told.nodes.binary_search_by(|t| (**t).cmp(node)).is_ok();
        let new: Vec<String> = (now.nodes.iter())
            .filter(|node| !was_told(node))
            .cloned()
            .collect();
        if new.is_empty() || !settled() {
            return Vec::new();
        }
        told.nodes = now.nodes.iter().map(|node| node.as_str().into()).collect();
        new
    }

    /// Takes back an arrival that was not told: a later pass tells it.
    pub fn untell(&mut self, object: &Object, uid: &str, nodes: &[String]) {
        if let Some(told) = self.told.get_mut(object).filter(|told| told.uid == uid) {
            told.nodes
                .retain(|node| !nodes.iter().any(|n| n.as_str() == &**node));
        }
    }

    /// Forgets the objects for which `keep` says no (deleted ones).
    pub fn retain(&mut self, keep: impl Fn(&Object) -> bool) {
        self.told.retain(|object, _| keep(object));
    }

    /// Forgets all: a holder that lost the lease and takes it again starts from what is stored.
    pub fn clear(&mut self) {
        self.told.clear();
    }
}

/// An arrival to tell.
pub struct Arrival {
    pub object: Object,
    pub uid: String,
    /// The nodes newly reached.
    pub nodes: Vec<String>,
    pub reference: ObjectReference,
}

impl Arrival {
    /// The Event: served, applied or verified on these nodes.
    pub fn event(&self) -> Event {
        let on = named(&self.nodes);
        let (reason, note) = match self.object.0 {
            Kind::IscsiTarget => (EventReason::Served, format!("served on {on}")),
            Kind::InitiatorAccess => (EventReason::Applied, format!("access applied on {on}")),
            Kind::DiscImage => (
                EventReason::Verified,
                format!("digest verified; ready to serve on {on}"),
            ),
        };
        normal(reason, truncate(note))
    }
}

/// "node a", "nodes a, b, c", or, past `NAMES_AT_MOST` bytes of names, "300 nodes: a, b, … and
/// 290 more".
fn named(nodes: &[String]) -> String {
    if let [node] = nodes {
        return format!("node {node}");
    }
    let mut names = String::new();
    let mut listed = 0;
    for node in nodes {
        if names.len() + node.len() > NAMES_AT_MOST {
            break;
        }
        if listed > 0 {
            names.push_str(", ");
        }
        names.push_str(node);
        listed += 1;
    }
    match nodes.len() - listed {
        0 => format!("nodes {names}"),
        more => format!("{} nodes: {names} and {more} more", nodes.len()),
    }
}

/// Tells arrivals beside the lease holder's passes, taking back those it could not tell.
#[derive(Clone)]
pub struct Telling {
    queue: mpsc::UnboundedSender<Vec<Arrival>>,
}

impl Telling {
    pub fn start(teller: Teller, arrivals: Arc<Mutex<Arrivals>>) -> Self {
        let (queue, batches) = mpsc::unbounded_channel();
        tokio::spawn(tell(batches, teller, arrivals));
        Self { queue }
    }

    /// Queues `arrivals` to be told.
    pub fn tell(&self, arrivals: Vec<Arrival>) {
        if !arrivals.is_empty() && self.queue.send(arrivals).is_err() {
            tracing::warn!("the arrivals' Events are no longer told");
        }
    }
}

async fn tell(
    mut batches: mpsc::UnboundedReceiver<Vec<Arrival>>,
    teller: Teller,
    arrivals: Arc<Mutex<Arrivals>>,
) {
    while let Some(batch) = batches.recv().await {
        futures::stream::iter(batch)
            .for_each_concurrent(CONCURRENT_EVENTS, |arrival| {
                let (teller, arrivals) = (&teller, &arrivals);
                async move {
                    if !teller.tell_one(&arrival.reference, &arrival.event()).await {
                        let (object, uid) = (&arrival.object, &arrival.uid);
                        arrivals.lock().untell(object, uid, &arrival.nodes);
                    }
                }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn reach<'a>(nodes: &'a [String], generation: i64) -> Reach<'a> {
        Reach {
            uid: "u1",
            generation: Some(generation),
            nodes,
        }
    }

    #[test]
    fn an_arrival_is_told_once_settled_for_every_node_reached_then_per_node() {
        let mut arrivals = Arrivals::default();
        let object = (Kind::IscsiTarget, ObjectKey::new("lab", "boot"));
        let (new, settled, on_its_way) = (Vec::new, || true, || false);
        let two = nodes(&["a", "b"]);
        let told = arrivals.arrived(&object, &reach(&two, 1), new, on_its_way);
        assert!(told.is_empty(), "c on its way: nothing yet");
        let all = nodes(&["a", "b", "c"]);
        assert_eq!(
            arrivals.arrived(&object, &reach(&all, 1), new, settled),
            all
        );
        assert!((arrivals.arrived(&object, &reach(&all, 1), new, settled)).is_empty());
        let more = nodes(&["a", "b", "c", "d"]);
        assert_eq!(
            arrivals.arrived(&object, &reach(&more, 1), new, settled),
            ["d"]
        );
        // b fails, and recovers.
        let without_b = nodes(&["a", "c", "d"]);
        assert!((arrivals.arrived(&object, &reach(&without_b, 1), new, settled)).is_empty());
        assert_eq!(
            arrivals.arrived(&object, &reach(&more, 1), new, settled),
            ["b"]
        );
        // A new generation reached everywhere is told again.
        assert_eq!(
            arrivals.arrived(&object, &reach(&more, 2), new, settled),
            more
        );
        // Not told after all: told by a later pass.
        arrivals.untell(&object, "u1", &nodes(&["c"]));
        assert_eq!(
            arrivals.arrived(&object, &reach(&more, 2), new, settled),
            ["c"]
        );
        arrivals.retain(|_| false);
        assert!(arrivals.told.is_empty(), "a deleted object is forgotten");
    }

    #[test]
    fn a_new_lease_holder_does_not_tell_what_the_stored_status_says_and_a_new_uid_starts_anew() {
        let mut arrivals = Arrivals::default();
        let object = (Kind::InitiatorAccess, ObjectKey::new("lab", "client"));
        let stored = || nodes(&["b", "a"]);
        let all = nodes(&["a", "b", "c"]);
        let told = arrivals.arrived(&object, &reach(&all, 1), stored, || true);
        assert_eq!(told, ["c"]);
        let again = Reach {
            uid: "u2",
            ..reach(&all, 1)
        };
        assert_eq!(arrivals.arrived(&object, &again, stored, || true), all);
        arrivals.untell(&object, "u1", &all);
        assert!(
            (arrivals.arrived(&object, &again, stored, || true)).is_empty(),
            "the old object's failures do not touch the new one"
        );
    }

    #[test]
    fn the_event_names_the_nodes_and_how_many_more_past_a_kilobyte() {
        let arrival = |kind, names: Vec<String>| Arrival {
            object: (kind, ObjectKey::new("lab", "x")),
            uid: "u1".into(),
            nodes: names,
            reference: ObjectReference::default(),
        };
        let event = arrival(Kind::InitiatorAccess, nodes(&["c"])).event();
        assert_eq!(event.reason, "Applied");
        assert_eq!(event.note.as_deref(), Some("access applied on node c"));
        let event = arrival(Kind::IscsiTarget, nodes(&["a", "b", "c"])).event();
        assert_eq!(event.note.as_deref(), Some("served on nodes a, b, c"));
        let fleet: Vec<String> = (0..300).map(|i| format!("rack-7-node-{i:03}")).collect();
        let event = arrival(Kind::DiscImage, fleet).event();
        let note = event.note.unwrap_or_default();
        assert!(
            note.starts_with("digest verified; ready to serve on 300 nodes: rack-7-node-000, ")
        );
        assert!(
            note.ends_with(" and 253 more") && note.len() < 1000,
            "{note}"
        );
    }
}
