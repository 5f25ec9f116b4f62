//! How long a watch waits before it starts again after a failure.
//!
//! kube's watcher backs off from 0.8 s to 30 s between failures, but forgets its backoff at
//! every event that arrives (`StreamBackoff` resets on any `Ok`). A watch that fails right after
//! each list — every watch answered `410 Gone`, say, by an apiserver whose cache cannot serve
//! it — therefore lists every namespace again every second or so, for as long as the fault
//! lasts: a full list, per kind and namespace, about once a second (the API fault tests in
//! tests/agent.rs measured the agent's requests at 2.2 times its healthy rate, and a list of
//! thousands of objects costs the apiserver far more than a request at rest).
//!
//! Here a watch's backoff starts afresh only once it has run `STEADY` without failing, counted
//! from the end of its last wait: while failures keep coming, the waits keep growing to the cap,
//! whatever succeeds in between. The longest wait is 10 s, where kube's is 30 s — up to 60 s with
//! its jitter, which adds as much again at most: a watch that is waiting does not learn that a
//! grant was deleted, and once the apiserver answers again, that revocation should be applied
//! within seconds, not a minute (the tests measured 27 s to 45 s with kube's). While the
//! apiserver keeps failing, a node then sends a request per watch every 5 s to 10 s, about
//! what it sends at rest, for as long as the fault lasts.

use std::time::Duration;

use std::time::Instant;

use kube::runtime::utils::Backoff;
use kube::runtime::watcher::ExponentialBackoff;

/// How long a watch must go without failing for its backoff to start afresh.
const STEADY: Duration = Duration::from_secs(30);
/// The first wait after a failure (kube's), and the longest, before jitter adds up to as much
/// again: from 0.8–1.6 s to 5–10 s.
const FIRST_WAIT: Duration = Duration::from_millis(800);
const MAX_WAIT: Duration = Duration::from_secs(5);

/// The backoff of every watch: 0.8 s doubling up to `MAX_WAIT`, with jitter, kept up while
/// failures keep coming.
pub fn watch_backoff() -> WatchBackoff<ExponentialBackoff> {
    WatchBackoff::new(ExponentialBackoff::from(
        backon::ExponentialBuilder::default()
            .with_min_delay(FIRST_WAIT)
            .with_max_delay(MAX_WAIT)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times(),
    ))
}

/// `inner`, reset only after `STEADY` without a failure.
pub struct WatchBackoff<B> {
    inner: B,
    /// When the wait after the last failure ends.
    waited_until: Option<Instant>,
    steady: Duration,
}

impl<B: Backoff> WatchBackoff<B> {
    pub fn new(inner: B) -> Self {
        Self::steady_after(inner, STEADY)
    }

    fn steady_after(inner: B, steady: Duration) -> Self {
        Self {
            inner,
            waited_until: None,
            steady,
        }
    }
}

impl<B: Backoff> Iterator for WatchBackoff<B> {
    type Item = Duration;

    /// The wait after a failure.
    fn next(&mut self) -> Option<Duration> {
        let wait = self.inner.next();
        self.waited_until = Some(Instant::now() + wait.unwrap_or_default());
        wait
    }
}

impl<B: Backoff> Backoff for WatchBackoff<B> {
    /// Called at every event: forgets the failures only once the watch has run long enough
    /// since its last wait.
    fn reset(&mut self) {
        let steady =
            |until: Instant| Instant::now().saturating_duration_since(until) >= self.steady;
        if self.waited_until.is_none_or(steady) {
            self.inner.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits of 1, 2, 3… (ms, scaled down from seconds) until reset.
    #[derive(Default)]
    struct Counting(u64);

    impl Iterator for Counting {
        type Item = Duration;
        fn next(&mut self) -> Option<Duration> {
            self.0 += 1;
            Some(Duration::from_millis(self.0))
        }
    }

    impl Backoff for Counting {
        fn reset(&mut self) {
            self.0 = 0;
        }
    }

    fn ms(ms: u64) -> Option<Duration> {
        Some(Duration::from_millis(ms))
    }

    #[test]
    fn a_watch_that_fails_after_every_list_keeps_backing_off() {
        let steady = Duration::from_millis(200);
        let mut backoff = WatchBackoff::steady_after(Counting::default(), steady);
        // The first events of a watch reset nothing there is to reset.
        backoff.reset();
        assert_eq!(backoff.next(), ms(1));
        // After each wait a list succeeds (events), then the watch fails again: the wait
        // grows all the same, even once the waits are longer than `steady` would be.
        for wait in 2..=4 {
            std::thread::sleep(Duration::from_millis(wait - 1));
            backoff.reset();
            assert_eq!(backoff.next(), ms(wait));
        }
        let mut long = WatchBackoff::steady_after(Counting(400), steady);
        assert_eq!(long.next(), ms(401));
        std::thread::sleep(Duration::from_millis(401));
        long.reset();
        assert_eq!(long.next(), ms(402), "a long wait is not a steady run");
        // Steady for long enough after the wait: the next failure waits the shortest again.
        std::thread::sleep(steady + Duration::from_millis(10));
        backoff.reset();
        assert_eq!(backoff.next(), ms(1));
        assert_eq!(WatchBackoff::new(Counting::default()).steady, STEADY);
    }

    #[test]
    fn the_waits_grow_from_about_a_second_to_ten_seconds_at_most() {
        let mut backoff = watch_backoff();
        let waits: Vec<Duration> = (0..8).filter_map(|_| backoff.next()).collect();
        assert_eq!(waits.len(), 8);
        assert!(waits[0] <= FIRST_WAIT * 2, "{waits:?}");
        assert!(waits[0] >= FIRST_WAIT, "{waits:?}");
        assert!(waits[7] >= MAX_WAIT, "{waits:?}");
        let longest = Duration::from_secs(10);
        assert!(waits.iter().all(|w| *w <= longest), "{waits:?}");
    }
}
