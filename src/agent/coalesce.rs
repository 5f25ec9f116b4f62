//! When a status write goes out. On a cold start every object passes through states that last
//! a moment — no entry yet, waiting for its image, Ready on one node of three, then two — and
//! writing each of them cost the apiserver 1.8 writes per object and node (the lease holder
//! alone 2.4 per object), on two cores the larger part of what slowed the user's own
//! `kubectl apply` tenfold. So a write that only reports progress, or only changes the details
//! of a Ready (one node more, a session), waits until the object has wanted a new status for a
//! moment (`--status-settle-seconds`, 2 by default): if it moves on meanwhile, the latest state
//! goes out once, in place of every state it passed through. What users and tools act on goes
//! out at once: Ready reached, a failure, an expiry, a removal, any loss of Ready, and the
//! conditions of a new generation. The price: a new object has no status at all until it is
//! Ready or its first state has lasted that moment (kstatus reads that as Current; docs/agent.md
//! says so). One exception to "Ready at once": a Ready that some node which should serve the
//! object has not reported on yet (`expected`) waits that moment for it (for a new object, up to
//! twice that moment without any status: kstatus reads that as Current, as it reads the Ready
//! the wait holds back) — nodes report the
//! same burst of objects within a second or so of each other, and writing Ready with the first
//! node and the others' details after cost the lease holder a second write of most objects.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A wait this old belongs to an object that is gone.
const STALE: Duration = Duration::from_secs(600);

/// What a status says, as far as when to write it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Ready: written at once when reached; its changes of detail wait like progress.
    Ready,
    /// Ready on the nodes that reported, while a node that should serve the object has not:
    /// waits for it, from the moment it was first wanted, for the settle time at most.
    Partial,
    /// On its way: written once it has held, or been replaced, for the settle time.
    Passing,
    /// Stalled, failed, expired or removed: for users to act on, written at once.
    Final,
}

/// When each object began to want a status other than the one it has.
#[derive(Debug)]
pub struct Coalescer<K> {
    settle: Duration,
    diverged: HashMap<K, Instant>,
    /// When each object's Ready was first wanted while a node had not reported.
    partial: HashMap<K, Instant>,
}

impl Standing {
    /// Says Ready, to the nodes that reported at least.
    pub fn is_ready(self) -> bool {
        matches!(self, Standing::Ready | Standing::Partial)
    }
}

/// When a write is due: now, or not before an instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Now,
    At(Instant),
}

impl<K: Eq + Hash + Clone> Coalescer<K> {
    /// Progress waits `settle` for the next (zero: every state is written).
    pub fn new(settle: Duration) -> Self {
        Self {
            settle,
            diverged: HashMap::new(),
            partial: HashMap::new(),
        }
    }

    /// Whether `key`'s write of a `wanted` status, in place of a `current` one (`None`: it has
    /// none), is due at `now`; `written` is what a write made and not yet in the store says (a
    /// Ready there counts: its loss never waits). The wait runs from the first pass that wanted
    /// a change, whatever came after: a status that keeps moving is written every `settle`, no
    /// more often.
    pub fn due(
        &mut self,
        key: &K,
        wanted: Standing,
        current: Option<Standing>,
        written: Option<Standing>,
        now: Instant,
    ) -> When {
        let current = written.filter(|w| w.is_ready()).or(current);
        let current_ready = current.is_some_and(Standing::is_ready);
        let mut since = *self.diverged.entry(key.clone()).or_insert(now);
        let waits = match wanted {
            // Progress, unless it is Ready lost.
            Standing::Passing => !current_ready,
            // Ready still, with other details (one node more, a session).
            Standing::Ready => current_ready,
            // Waits for the nodes from its own start, even for an object without any status:
            // kstatus reads none as Current, just as it reads the Ready this would write.
            Standing::Partial => {
                since = *self.partial.entry(key.clone()).or_insert(now);
                true
            }
            Standing::Final => false,
        };
        let at = since + self.settle;
        if waits && now < at {
            When::At(at)
        } else {
            When::Now
        }
    }

    /// `key` has the status it wants, or its write went out: the next change waits anew.
    pub fn settled(&mut self, key: &K) {
        self.diverged.remove(key);
        self.partial.remove(key);
    }

    /// Forgets what has waited far longer than any write does: objects deleted while their
    /// write waited. (Were one still there, its next write would only wait anew.)
    pub fn forget_stale(&mut self, now: Instant) {
        for waits in [&mut self.diverged, &mut self.partial] {
            waits.retain(|_, since| now.saturating_duration_since(*since) < STALE);
        }
    }
}

/// The earlier of two optional instants.
pub fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(2);

    #[test]
    fn progress_waits_and_its_latest_state_goes_out_once() {
        let mut coalescer = Coalescer::new(SETTLE);
        let start = Instant::now();
        let due = coalescer.due(&"t-1", Standing::Passing, None, None, start);
        assert_eq!(due, When::At(start + SETTLE), "waiting for the image");
        // A second later, still on its way (another message): the wait runs from the first.
        let later = start + Duration::from_secs(1);
        let due = coalescer.due(&"t-1", Standing::Passing, None, None, later);
        assert_eq!(due, When::At(start + SETTLE));
        assert_eq!(
            coalescer.due(&"t-1", Standing::Passing, None, None, start + SETTLE),
            When::Now
        );
        // Ready within the wait: written at once, in place of what came before.
        let mut coalescer = Coalescer::new(SETTLE);
        coalescer.due(&"t-2", Standing::Passing, None, None, start);
        assert_eq!(
            coalescer.due(&"t-2", Standing::Ready, None, None, later),
            When::Now
        );
    }

    #[test]
    fn the_details_of_a_ready_wait_like_progress() {
        let mut coalescer = Coalescer::new(SETTLE);
        let start = Instant::now();
        // Served by one node, then two: one write of the second, a moment later.
        let due = coalescer.due(&"t", Standing::Ready, Some(Standing::Ready), None, start);
        assert_eq!(due, When::At(start + SETTLE));
    }

    #[test]
    fn what_users_act_on_never_waits() {
        let mut coalescer = Coalescer::new(SETTLE);
        let now = Instant::now();
        for (wanted, current) in [
            (Standing::Ready, None),
            (Standing::Final, None),
            (Standing::Final, Some(Standing::Ready)),
            (Standing::Final, Some(Standing::Passing)),
            // Ready lost: shown at once, even while only on its way back.
            (Standing::Passing, Some(Standing::Ready)),
        ] {
            assert_eq!(
                coalescer.due(&"x", wanted, current, None, now),
                When::Now,
                "{wanted:?} over {current:?}"
            );
            coalescer.settled(&"x");
        }
    }

    #[test]
    fn a_ready_some_node_has_not_reported_on_waits_for_it_from_its_own_start() {
        let mut coalescer = Coalescer::new(SETTLE);
        let start = Instant::now();
        let passing = Some(Standing::Passing);
        let due = |c: &mut Coalescer<&str>, key, wanted, current, at| {
            c.due(&key, wanted, current, None, at)
        };
        // On its way for long (its wait ran out long ago, the write was not made yet)…
        due(&mut coalescer, "t", Standing::Passing, passing, start);
        let first_ready = start + SETTLE * 5;
        // …then Ready on one node of the three that should serve it: it waits from now.
        let when = due(&mut coalescer, "t", Standing::Partial, passing, first_ready);
        assert_eq!(when, When::At(first_ready + SETTLE));
        let later = first_ready + Duration::from_secs(1);
        let when = due(&mut coalescer, "t", Standing::Partial, passing, later);
        assert_eq!(
            when,
            When::At(first_ready + SETTLE),
            "the wait does not restart"
        );
        // Every node reported: Ready goes out at once.
        let when = due(&mut coalescer, "t", Standing::Ready, passing, later);
        assert_eq!(when, When::Now);
        // So does an object without any status (kstatus reads none as Current, as it reads the
        // Ready this holds back).
        due(&mut coalescer, "new", Standing::Passing, None, start);
        let first_ready = start + SETTLE * 3 / 4;
        let when = due(&mut coalescer, "new", Standing::Partial, None, first_ready);
        assert_eq!(when, When::At(first_ready + SETTLE));
        // A node that never reports holds it back for the settle time, no longer.
        due(&mut coalescer, "u", Standing::Partial, passing, start);
        let when = due(
            &mut coalescer,
            "u",
            Standing::Partial,
            passing,
            start + SETTLE,
        );
        assert_eq!(when, When::Now);
        // With no settle time, nothing waits.
        let mut coalescer = Coalescer::new(Duration::ZERO);
        let when = due(&mut coalescer, "v", Standing::Partial, passing, start);
        assert_eq!(when, When::Now);
    }

    #[test]
    fn a_ready_written_and_not_yet_in_the_store_counts() {
        let mut coalescer = Coalescer::new(SETTLE);
        let now = Instant::now();
        // The store still shows the progress before it; losing that Ready goes out at once, and
        // so does losing a Ready written while a node had not reported.
        for written in [Standing::Ready, Standing::Partial] {
            let current = Some(Standing::Passing);
            let due = coalescer.due(&"t", Standing::Passing, current, Some(written), now);
            assert_eq!(due, When::Now, "{written:?}");
        }
    }

    #[test]
    fn once_written_the_next_change_waits_anew() {
        let mut coalescer = Coalescer::new(SETTLE);
        let start = Instant::now();
        coalescer.due(&"g", Standing::Passing, None, None, start);
        coalescer.settled(&"g");
        let later = start + SETTLE * 3;
        assert_eq!(
            coalescer.due(
                &"g",
                Standing::Passing,
                Some(Standing::Passing),
                None,
                later
            ),
            When::At(later + SETTLE)
        );
        coalescer.forget_stale(later + STALE);
        assert!(coalescer.diverged.is_empty());
    }
}
