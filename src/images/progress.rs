//! Progress of an import, for status: the phase and the bytes done, at most a few times a second.

use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use crate::api::disc_image::ImagePhase as Phase;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            phase: Phase::Pending,
            bytes_done: 0,
            bytes_total: None,
        }
    }
}

/// Sends progress on a watch channel: a phase change at once, byte counts at most every
/// `interval`, so that status written from it does not churn.
pub struct ProgressReporter {
    tx: Option<watch::Sender<Progress>>,
    interval: Duration,
    last_sent: Option<Instant>,
}

pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(250);

/// A reporter and the receiver the agent turns into status.
pub fn channel() -> (ProgressReporter, watch::Receiver<Progress>) {
    let (tx, rx) = watch::channel(Progress::default());
    (
        ProgressReporter {
            tx: Some(tx),
            interval: DEFAULT_INTERVAL,
            last_sent: None,
        },
        rx,
    )
}

impl ProgressReporter {
    /// A reporter nobody listens to.
    pub fn silent() -> Self {
        Self {
            tx: None,
            interval: DEFAULT_INTERVAL,
            last_sent: None,
        }
    }

    pub fn update(&mut self, phase: Phase, bytes_done: u64, bytes_total: Option<u64>) {
        let Some(tx) = &self.tx else { return };
        let next = Progress {
            phase,
            bytes_done,
            bytes_total,
        };
        let phase_changed = tx.borrow().phase != phase;
        let due = self.last_sent.is_none_or(|t| t.elapsed() >= self.interval);
        let complete = bytes_total == Some(bytes_done);
        if phase_changed || due || complete {
            tx.send_replace(next);
            self.last_sent = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_changes_go_out_at_once_and_byte_counts_are_throttled() {
        let (mut reporter, rx) = channel();
        reporter.update(Phase::Downloading, 0, Some(100));
        assert_eq!(rx.borrow().phase, Phase::Downloading);
        for done in 1..50 {
            reporter.update(Phase::Downloading, done, Some(100));
        }
        assert_eq!(rx.borrow().bytes_done, 0, "throttled within the interval");
        reporter.update(Phase::Downloading, 100, Some(100));
        assert_eq!(rx.borrow().bytes_done, 100, "completion always goes out");
        reporter.update(Phase::Converting, 0, None);
        assert_eq!(
            *rx.borrow(),
            Progress {
                phase: Phase::Converting,
                bytes_done: 0,
                bytes_total: None
            }
        );
    }
}
