//! Arrivals — a target served, a grant applied, an image verified — told by the lease holder as
//! one Event per object naming every node it reached, rather than by each node: on a cold start
//! of 3000 objects on three nodes, one Event per object and node made 9000 creates, the
//! apiserver's largest cost then.
//!
//! The lease holder remembers, per object, the nodes it told (`Arrivals`). A node counts as
//! reached when its entry is good at the object's generation; the nodes newly reached are told
//! once the object has settled — no node on its way or behind (a lost node's entry aside), no
//! node that should have an entry without one — or has not settled for `UNSETTLED_AT_MOST` (a
//! node that keeps failing, or a download that takes long, does not silence the others). So a cold start tells each object once,
//! a node that arrives later (added, recovered) is told when it does, and a new generation
//! reached everywhere is told again. An object first seen counts as told as its stored status
//! stands when that had settled: a new lease holder does not repeat what the last one told.
//!
//! Telling goes on beside the lease holder's passes (`Telling`): a burst of thousands of Events
//! does not hold back the next status writes. An arrival whose status write failed is told by a
//! later pass; one whose Event the apiserver answered 429 or 5xx is tried again a few seconds
//! later, `TELLS_AT_MOST` times in all. One it refused (403, 422), or that got no answer (it may
//! have been stored), is not. One still being told when the agent stops or loses the lease is
//! lost; a new holder tells again what the stored status does not show as told (see `told_in`
//! in `leader`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::Event;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, watch};

use crate::desired::{Kind, ObjectKey};
use crate::reasons::EventReason;

use super::events::{CONCURRENT_EVENTS, Teller, normal, truncate};
use super::node_status::apiserver_unwell;

/// An object of a kind, by name.
pub type Object = (Kind, ObjectKey);

/// A note names this many bytes of nodes at most, then says how many more.
const NAMES_AT_MOST: usize = 800;
/// The nodes reached are told after this long even if the object has not settled.
pub const UNSETTLED_AT_MOST: Duration = Duration::from_secs(5 * 60);
/// An arrival the apiserver answered 429 or 5xx is told this many times at most.
const TELLS_AT_MOST: u8 = 3;
/// Arrivals the apiserver could not take are taken back after this long.
const TAKEN_BACK_AFTER: Duration = Duration::from_secs(5);

/// The nodes told of one object: of which object (by uid) and generation.
#[derive(Debug)]
struct Told {
    uid: String,
    generation: Option<i64>,
    /// Sorted.
    nodes: Vec<Box<str>>,
    /// Since when a node reached waits for the object to settle.
    waiting_since: Option<Instant>,
    /// How many times the apiserver could not take an Event of this generation.
    failed_tells: u8,
}

impl Told {
    fn new(now: &Reach<'_>, nodes: Vec<Box<str>>) -> Self {
        Self {
            uid: now.uid.to_owned(),
            generation: now.generation,
            nodes,
            waiting_since: None,
            failed_tells: 0,
        }
    }
}

/// Where an object stands now, for its arrivals.
pub struct Reach<'a> {
    pub uid: &'a str,
    pub generation: Option<i64>,
    /// The nodes whose entries are good at `generation`, sorted.
    pub nodes: &'a [String],
    /// Whether the object's status stands (written, or the object's already), rather than held back:
    /// nothing is told before.
    pub stands: bool,
    pub at: Instant,
}

/// What the lease holder told of each object.
#[derive(Debug, Default)]
pub struct Arrivals {
    told: HashMap<Object, Told>,
}

impl Arrivals {
    /// The nodes to tell `object` reached, counted as told from now on (`untell` takes them
    /// back). `stored`: what the status the object has says was told, asked of an object first
    /// seen; `settled`: whether the object has settled, asked only when a node is new.
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
            self.told.insert(object.clone(), Told::new(now, nodes));
        }
        let Some(told) = self.told.get_mut(object) else {
            return Vec::new();
        };
        if told.uid != now.uid || told.generation != now.generation {
            // Another object of the same name, or a new spec: nothing of it told yet.
            *told = Told::new(now, Vec::new());
        }
        let reached = |node: &str| now.nodes.binary_search_by(|n| n.as_str().cmp(node)).is_ok();
        // A node no longer reached is told again when it is.
        told.nodes.retain(|node| reached(node));
        let was_told = |node: &str| told.nodes.binary_search_by(|t| (**t).cmp(node)).is_ok();
        let new: Vec<String> = (now.nodes.iter())
            .filter(|node| !was_told(node))
            .cloned()
            .collect();
        if new.is_empty() {
            told.waiting_since = None;
            return Vec::new();
        }
        if !now.stands {
            return Vec::new();
        }
        let since = *told.waiting_since.get_or_insert(now.at);
        if !settled() && now.at.saturating_duration_since(since) < UNSETTLED_AT_MOST {
            return Vec::new();
        }
        told.nodes = now.nodes.iter().map(|node| node.as_str().into()).collect();
        told.waiting_since = None;
        new
    }

    /// Takes back an arrival that was not told, unless the object moved on since (another uid
    /// or generation): a later pass tells it.
    pub fn untell(&mut self, arrival: &Arrival) {
        if let Some(told) = self.told_of(arrival) {
            let not_told = |node: &str| arrival.nodes.iter().any(|n| n.as_str() == node);
            told.nodes.retain(|node| !not_told(node));
        }
    }

    /// An arrival whose Event the apiserver could not take: taken back (`untell`), unless its
    /// object's Events of this generation failed `TELLS_AT_MOST` times already.
    pub fn not_told(&mut self, arrival: &Arrival) {
        let Some(told) = self.told_of(arrival) else {
            return;
        };
        told.failed_tells = told.failed_tells.saturating_add(1);
        if told.failed_tells < TELLS_AT_MOST {
            self.untell(arrival);
        } else {
            let object = &arrival.object.1;
            tracing::warn!(%object, nodes = ?arrival.nodes, "an arrival not told, given up");
        }
    }

    /// What was told of `arrival`'s object, when it is still the same object and generation.
    fn told_of(&mut self, arrival: &Arrival) -> Option<&mut Told> {
        (self.told.get_mut(&arrival.object))
            .filter(|told| told.uid == arrival.uid && told.generation == arrival.generation)
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
    pub generation: Option<i64>,
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

/// Tells arrivals beside the lease holder's passes, while it holds the lease; hands back those
/// the apiserver could not take then.
pub struct Telling {
    queue: mpsc::UnboundedSender<Vec<Arrival>>,
    taken_back: Mutex<mpsc::UnboundedReceiver<Arrival>>,
}

impl Telling {
    /// Tells as `teller` while `leading` says this agent holds the lease; `wake` starts the pass
    /// that tells again what was taken back.
    pub fn start(teller: Teller, leading: watch::Receiver<bool>, wake: Arc<Notify>) -> Self {
        let (queue, batches) = mpsc::unbounded_channel();
        let (back, taken_back) = mpsc::unbounded_channel();
        let task = Task {
            teller,
            leading,
            back,
            wake,
        };
        tokio::spawn(task.run(batches));
        Self {
            queue,
            taken_back: Mutex::new(taken_back),
        }
    }

    /// Queues `arrivals` to be told.
    pub fn tell(&self, arrivals: Vec<Arrival>) {
        if !arrivals.is_empty() && self.queue.send(arrivals).is_err() {
            tracing::warn!("the arrivals' Events are no longer told");
        }
    }

    /// The arrivals not told since the last call, to take back.
    pub fn taken_back(&self) -> Vec<Arrival> {
        let mut taken_back = self.taken_back.lock();
        std::iter::from_fn(|| taken_back.try_recv().ok()).collect()
    }
}

struct Task {
    teller: Teller,
    leading: watch::Receiver<bool>,
    back: mpsc::UnboundedSender<Arrival>,
    wake: Arc<Notify>,
}

impl Task {
    async fn run(self, mut batches: mpsc::UnboundedReceiver<Vec<Arrival>>) {
        while let Some(batch) = batches.recv().await {
            let not_told: Vec<Arrival> = futures::stream::iter(batch)
                .map(|arrival| self.tell(arrival))
                .buffer_unordered(CONCURRENT_EVENTS)
                .filter_map(std::future::ready)
                .collect()
                .await;
            if !not_told.is_empty() {
                tokio::spawn(self.hand_back(not_told));
            }
        }
    }

    /// Hands `not_told` back a few seconds later (unless the lease was lost meanwhile), and
    /// wakes the pass that tells them again.
    fn hand_back(&self, not_told: Vec<Arrival>) -> impl Future<Output = ()> + 'static {
        let (leading, back, wake) = (self.leading.clone(), self.back.clone(), self.wake.clone());
        async move {
            tokio::time::sleep(TAKEN_BACK_AFTER).await;
            if !*leading.borrow() {
                return;
            }
            for arrival in not_told {
                // The receiver lives as long as the lease holder's aggregator.
                let _ = back.send(arrival);
            }
            wake.notify_one();
        }
    }

    /// Tells one arrival, unless the lease is lost; the arrival back when the apiserver
    /// answered 429 or 5xx (not when it gave no answer: the Event may be stored).
    async fn tell(&self, arrival: Arrival) -> Option<Arrival> {
        if !*self.leading.borrow() {
            return None;
        }
        let event = arrival.event();
        match self.teller.tell_one(&arrival.reference, &event).await {
            Err(error @ kube::Error::Api(_)) if apiserver_unwell(&error) => Some(arrival),
            _ => None,
        }
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
            stands: true,
            at: Instant::now(),
        }
    }

    fn arrival(kind: Kind, generation: i64, names: Vec<String>) -> Arrival {
        Arrival {
            object: (kind, ObjectKey::new("lab", "x")),
            uid: "u1".into(),
            generation: Some(generation),
            nodes: names,
            reference: ObjectReference::default(),
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
        let not_told = |generation| Arrival {
            object: object.clone(),
            ..arrival(Kind::IscsiTarget, generation, nodes(&["c"]))
        };
        arrivals.untell(&not_told(1));
        assert!(
            (arrivals.arrived(&object, &reach(&more, 2), new, settled)).is_empty(),
            "an older generation's failure takes nothing back"
        );
        arrivals.untell(&not_told(2));
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
        arrivals.untell(&Arrival {
            object: object.clone(),
            ..arrival(Kind::InitiatorAccess, 1, all.clone())
        });
        assert!(
            (arrivals.arrived(&object, &again, stored, || true)).is_empty(),
            "the old object's failures do not touch the new one"
        );
    }

    #[test]
    fn an_event_the_apiserver_cannot_take_is_told_again_a_few_times_then_given_up() {
        let mut arrivals = Arrivals::default();
        let all = nodes(&["a", "b"]);
        let (new, settled) = (Vec::new, || true);
        let failed = arrival(Kind::IscsiTarget, 1, all.clone());
        let object = failed.object.clone();
        assert_eq!(
            arrivals.arrived(&object, &reach(&all, 1), new, settled),
            all
        );
        for _ in 1..TELLS_AT_MOST {
            arrivals.not_told(&failed);
            let again = arrivals.arrived(&object, &reach(&all, 1), new, settled);
            assert_eq!(again, all, "told again");
        }
        arrivals.not_told(&failed);
        assert!((arrivals.arrived(&object, &reach(&all, 1), new, settled)).is_empty());
    }

    #[test]
    fn a_node_that_never_settles_does_not_silence_the_others_for_long() {
        let mut arrivals = Arrivals::default();
        let object = (Kind::DiscImage, ObjectKey::new("lab", "iso"));
        let two = nodes(&["a", "b"]);
        let start = reach(&two, 1);
        let never = || false;
        assert!((arrivals.arrived(&object, &start, Vec::new, never)).is_empty());
        let later = Reach {
            at: start.at + UNSETTLED_AT_MOST,
            ..reach(&two, 1)
        };
        assert_eq!(arrivals.arrived(&object, &later, Vec::new, never), two);
    }

    #[test]
    fn the_event_names_the_nodes_and_how_many_more_past_a_kilobyte() {
        let arrival = |kind, names| arrival(kind, 1, names);
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
