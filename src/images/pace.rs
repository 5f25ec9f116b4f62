//! The overall deadline of a transfer: a minimum average rate.
//!
//! A read timeout alone never ends a source that sends one byte a second (or a file system that
//! answers just as slowly), and `discus serve --once` would wait for it forever. So a transfer
//! must keep an average rate: after a grace period for connecting, redirects and retries, the
//! first `n` bytes must have arrived by `start + grace + n / min_rate`. The deadline moves with
//! the bytes received, so it needs no size up front, and for a known size it is exactly
//! `grace + size / min_rate`. It spans every attempt and every backoff.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct Pace {
    start: Instant,
    grace: Duration,
    /// Bytes per second, at least 1.
    min_rate: u64,
}

impl Pace {
    pub fn start(grace: Duration, min_rate: u64) -> Self {
        Self {
            start: Instant::now(),
            grace,
            min_rate: min_rate.max(1),
        }
    }

    /// When the transfer is too slow if it has not got past `done` bytes.
    pub fn deadline(&self, done: u64) -> Instant {
        let allowed = Duration::from_secs_f64(done as f64 / self.min_rate as f64);
        self.start + self.grace.saturating_add(allowed)
    }

    /// Whether waiting `delay` now would already miss the deadline for `done` bytes.
    pub fn would_miss(&self, done: u64, delay: Duration) -> bool {
        Instant::now() + delay > self.deadline(done)
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn min_rate(&self) -> u64 {
        self.min_rate
    }
}

/// What a too-slow transfer got, for its error.
#[derive(Debug, thiserror::Error)]
#[error(
    "{received} bytes in {} s, slower than the minimum average of {min_rate} bytes/s (after a grace \
     of {} s); a slow source can be allowed with --source-min-rate",
    elapsed.as_secs(), grace.as_secs()
)]
pub struct TooSlow {
    pub received: u64,
    pub elapsed: Duration,
    pub min_rate: u64,
    pub grace: Duration,
}

impl Pace {
    pub fn too_slow(&self, received: u64) -> TooSlow {
        TooSlow {
            received,
            elapsed: self.elapsed(),
            min_rate: self.min_rate,
            grace: self.grace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_moves_with_the_bytes_received() {
        let pace = Pace::start(Duration::from_secs(10), 1000);
        assert_eq!(pace.deadline(0), pace.start + Duration::from_secs(10));
        assert_eq!(pace.deadline(5000), pace.start + Duration::from_secs(15));
        assert!(!pace.would_miss(0, Duration::from_secs(1)));
        assert!(pace.would_miss(0, Duration::from_secs(11)));
        let zero = Pace::start(Duration::ZERO, 0);
        assert_eq!(zero.min_rate(), 1, "never a division by zero");
    }
}
