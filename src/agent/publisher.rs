//! This node's status entries and events go out from a task of their own: a pass hands its
//! report over and goes on, so that a slow or silent apiserver never delays the next pass — and
//! with it the end of an expiring grant. Only the newest report matters: one that arrives while
//! an older one is being published replaces it. What could not be written is tried again soon.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::sync::NodeReport;

use super::events::NodeEvents;
use super::node_status::NodeStatusWriter;
use super::stores::Stores;

/// How soon status that could not be written is tried again.
const RETRY: Duration = Duration::from_secs(2);

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
    while reports.changed().await.is_ok() {
        loop {
            let Some(report) = reports.borrow_and_update().clone() else {
                break;
            };
            let published = writer.publish(&stores, &report).await;
            events.observe(published.observed).await;
            tracing::debug!(
                written = published.written,
                failed = published.failed,
                "status published"
            );
            if published.failed == 0 {
                break;
            }
            // Again soon, or at once with a newer report.
            tokio::select! {
                changed = reports.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    }
}
