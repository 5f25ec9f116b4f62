//! This node's status entries and events go out from a task of their own: a pass hands its
//! report over and goes on, so that a slow or silent apiserver never delays the next pass — and
//! with it the end of an expiring grant. Only the newest report matters: one that arrives while
//! an older one is being published replaces it. What could not be written is tried again,
//! 2 s later and then twice as late each time up to 30 s while the apiserver keeps failing
//! (sooner with a newer report, which the sync loop makes at most once a pass): a long fault
//! costs the apiserver a few writes a minute, not a round of every pending write every 2 s.
//! Entries that only report progress are held back a moment (`coalesce`); the task publishes
//! again when the first of them falls due. Right after a start, before this node's reports are
//! listed, nothing can be planned: the task waits for the listing, which is no failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::sync::NodeReport;

use super::events::NodeEvents;
use super::node_status::NodeStatusWriter;
use super::stores::Stores;

/// How soon status that could not be written is tried again…
const RETRY: Duration = Duration::from_secs(2);
/// …and, while it keeps failing, at the latest.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The sync loop's end of the publishing task; the task stops when this is dropped.
pub struct Publisher {
    reports: watch::Sender<Option<Arc<NodeReport>>>,
}

impl Publisher {
    pub fn start(writer: NodeStatusWriter, events: NodeEvents, stores: Arc<Stores>) -> Self {
        let (reports, receiver) = watch::channel(None);
        tokio::spawn(publish(receiver, writer, events, stores));
        Self { reports }
    }

    /// Hands a pass's report over, in place of any not yet published.
    pub fn publish(&self, report: NodeReport) {
        self.reports.send_replace(Some(Arc::new(report)));
    }
}

async fn publish(
    mut reports: watch::Receiver<Option<Arc<NodeReport>>>,
    writer: NodeStatusWriter,
    events: NodeEvents,
    stores: Arc<Stores>,
) {
    let mut retry = RETRY;
    let mut held_until = None;
    loop {
        // A new report, or entries held back (see `coalesce`) falling due.
        tokio::select! {
            changed = reports.changed() => if changed.is_err() { return },
            () = sleep_until(held_until) => {}
        }
        loop {
            let Some(report) = reports.borrow_and_update().clone() else {
                break;
            };
            let published = writer.publish(&stores, &report).await;
            events.observe(published.observed).await;
            held_until = published.held_until;
            tracing::debug!(
                written = published.written,
                failed = published.failed,
                "status published"
            );
            if published.unlisted {
                // Nothing failed: publish as soon as the reports are listed (or a newer
                // report comes), without backing off.
                tokio::select! {
                    changed = reports.changed() => if changed.is_err() { return },
                    () = stores.own_reports_listed() => {}
                }
                continue;
            }
            if published.failed == 0 {
                retry = RETRY;
                break;
            }
            // Again after `retry`, or at once with a newer report.
            tokio::select! {
                changed = reports.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(retry) => {}
            }
            retry = next_retry(retry);
        }
    }
}

/// Sleeps until `at`, or for ever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The wait after `retry` when the next attempt fails too.
fn next_retry(retry: Duration) -> Duration {
    retry.saturating_mul(2).min(MAX_RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_writes_are_tried_again_less_and_less_often_up_to_a_bound() {
        let waits: Vec<u64> = std::iter::successors(Some(RETRY), |r| Some(next_retry(*r)))
            .take(7)
            .map(|r| r.as_secs())
            .collect();
        assert_eq!(waits, [2, 4, 8, 16, 30, 30, 30]);
    }
}
