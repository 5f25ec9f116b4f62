//! The node's sync loop in a cluster: passes over the watches' stores, on the loop's own clock.
//!
//! It never waits for the apiserver. Changes wake it; otherwise it wakes when the next grant
//! expires or a resync is due, reads the stores as they are, and hands the report to the
//! publisher. So a silent apiserver delays what the node learns, never what it enforces: a grant
//! it knows ends at its `expiresAt`.
//!
//! No pass runs from incomplete stores: until every watch has listed once, an empty store would
//! read as "nothing is declared" and a pass would tear every target down. Until then the loop
//! does nothing to the backend at all — not even ending grants applied before a restart, whose
//! expiry only the API can tell this process (keeping a copy on disk would mean keeping CHAP
//! secrets there, or a backend operation outside plan and apply). It says what it waits for,
//! and `/healthz` turns unhealthy when that lasts too long. After the first list the stores stay
//! complete — a watch that lists again swaps its store whole — so passes never stop again.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use crate::backend::Backend;
use crate::desired::NodeFacts;
use crate::sync::{Pass, Resync, Syncer};

use super::publisher::Publisher;
use super::stores::{Stores, Wakers};

/// How often the loop looks again while it cannot run a pass (a watch's list also wakes it).
const WAITING_TICK: Duration = Duration::from_secs(1);
/// How often it says so in the log.
const WAITING_LOG: Duration = Duration::from_secs(10);
/// How long a burst of changes (an apply of many objects) may settle before the pass.
const SETTLE: Duration = Duration::from_millis(200);

pub struct SyncLoop<'a, B: Backend> {
    pub syncer: &'a Syncer<B>,
    pub stores: &'a Stores,
    pub wakers: &'a Wakers,
    pub publisher: Publisher,
    pub resync: Duration,
    /// The node's name.
    pub node: String,
}

/// What the loop knows about the moment it last said it was waiting, and the node.
#[derive(Default)]
struct Waiting {
    said: Option<(Instant, String)>,
    /// The Node was seen once: its facts are known.
    node_known: bool,
    /// The Node's disappearance was logged.
    node_gone_said: bool,
}

impl<B: Backend + 'static> SyncLoop<'_, B> {
    /// Runs passes until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let finished = self.syncer.images().finished();
        let metrics = Arc::clone(self.syncer.metrics());
        let mut waiting = Waiting::default();
        let mut pass = Pass::Full;
        let mut resync = Resync::every(self.resync);
        loop {
            let facts = match self.readiness(&mut waiting) {
                Ok(facts) => facts,
                Err(why) => {
                    say_waiting(&mut waiting, &self.node, &why);
                    metrics.waiting(Some(why));
                    tokio::select! {
                        () = self.wakers.sync.notified() => {}
                        () = tokio::time::sleep(WAITING_TICK) => {}
                        () = &mut shutdown => return,
                    }
                    continue;
                }
            };
            metrics.waiting(None);
            self.syncer.set_node_facts(facts);
            // A copy of every object: gone once the pass is, not kept while the loop waits.
            let report = {
                let snapshot = self.stores.snapshot();
                let now = Timestamp::now();
                self.syncer.sync(&snapshot.resources, now, pass).await
            };
            resync.ran(pass);
            let next = report.next_pass(&resync);
            tracing::debug!(targets = report.desired.targets.len(), "sync pass done");
            self.publisher.publish(report);
            pass = Pass::Changes;
            tokio::select! {
                () = self.wakers.sync.notified() => tokio::time::sleep(SETTLE).await,
                () = finished.notified() => {}
                () = tokio::time::sleep(next.after) => pass = next.pass,
                () = &mut shutdown => return,
            }
            pass = resync.at_least(pass);
        }
    }

    /// The node's facts when a pass may run; otherwise why not.
    fn readiness(&self, waiting: &mut Waiting) -> Result<NodeFacts, String> {
        let unlisted = self.stores.unlisted();
        if !unlisted.is_empty() {
            return Err(format!(
                "waiting for watches to list: {}",
                unlisted.join(", ")
            ));
        }
        match self.stores.node_facts() {
            Some(facts) => {
                waiting.node_known = true;
                waiting.node_gone_said = false;
                Ok(facts)
            }
            // Deleted after it was seen: serve on as it said, and keep enforcing expiry.
            None if waiting.node_known => {
                if !waiting.node_gone_said {
                    tracing::warn!(node = %self.node, "Node {} is gone: serving on with its last labels and addresses", self.node);
                    waiting.node_gone_said = true;
                }
                Ok(self.syncer.node_facts())
            }
            // Without its Node, the agent knows neither its labels nor its addresses: a pass
            // would place nothing here and tear every target down.
            None => Err(format!(
                "Node {} not found: serving nothing new until it exists",
                self.node
            )),
        }
    }
}

/// Logs why no pass runs, when it changed or every `WAITING_LOG`.
fn say_waiting(waiting: &mut Waiting, node: &str, why: &str) {
    let due = waiting
        .said
        .as_ref()
        .is_none_or(|(at, said)| said != why || at.elapsed() >= WAITING_LOG);
    if due {
        tracing::info!(%node, "no sync pass yet: {why}");
        waiting.said = Some((Instant::now(), why.to_owned()));
    }
}
