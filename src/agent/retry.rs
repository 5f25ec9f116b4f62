//! How the agent's client tries again a request the apiserver answered with "later" (429, 503,
//! 504).
//!
//! kube's client, by default, tries such a request again up to 15 times, 5 ms apart at first and
//! doubling up to 1000 s, obeying any `Retry-After` however long. Under a fault that answers
//! everything with 503, that sends every request about eight times in its first second — a
//! burst an overloaded apiserver does not need — and, once the apiserver is well again, leaves
//! a list or a watch asleep for as long as its last delay: after half a minute of 503s, the
//! agent learnt of a grant deleted meanwhile 27 s after the apiserver answered again, and after
//! a few minutes it would be minutes (the API fault tests in tests/agent.rs found this).
//!
//! Here, as client-go does, a request is tried again only when the server said when — a 429,
//! 503 or 504 with `Retry-After` — and at most `RETRIES` times, after that many seconds (from
//! `MIN_RETRY_AFTER` to `MAX_RETRY_AFTER`; a quarter more or less, so that the nodes of a cluster
//! do not come back in step). Any other failure fails the request at once, and what sent it
//! tries again at its own pace, each bounded: the watches back off from about a second to 10 s
//! (`watch_backoff`), the heartbeat waits for its period, the publisher backs off from 2 s to
//! 30 s. So a fault neither multiplies the agent's requests nor keeps it from noticing, soon,
//! that the fault is over.

use std::time::Duration;

use ::http::{Request, Response, StatusCode};
use kube::client::Body;

/// How many times a request is tried again.
const RETRIES: u32 = 3;
/// The shortest wait obeyed (`Retry-After: 0` is not "at once, for ever").
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest `Retry-After` obeyed: a longer one would stall a watch for as long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The retry policy of every request (tower's `RetryLayer`); one per request, counting its
/// attempts.
#[derive(Clone, Debug, Default)]
pub struct RetryPolicy {
    retries: u32,
}

/// How long to wait before trying again, after `retries` retries, a request answered with
/// `status` and `retry_after` (the header's value); `None`: do not.
pub fn delay(retries: u32, status: StatusCode, retry_after: Option<&str>) -> Option<Duration> {
    let later = matches!(status.as_u16(), 429 | 503 | 504);
    if !later || retries >= RETRIES {
        return None;
    }
    // Seconds only: an HTTP date, which the apiserver never sends, counts as absent.
    let seconds = retry_after?.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(seconds).clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER))
}

/// `delay` spread by up to a quarter either way.
fn jittered(delay: Duration) -> Duration {
    let mut byte = [0u8; 1];
    if getrandom::fill(&mut byte).is_err() {
        return delay;
    }
    // 0.75 to 1.25 times the delay.
    let factor = 0.75 + f64::from(byte[0]) / 510.0;
    delay.mul_f64(factor)
}

impl<Res> tower::retry::Policy<Request<Body>, Response<Res>, tower::BoxError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _request: &mut Request<Body>,
        result: &mut Result<Response<Res>, tower::BoxError>,
    ) -> Option<Self::Future> {
        let response = result.as_ref().ok()?;
        let retry_after = (response.headers().get(::http::header::RETRY_AFTER))
            .and_then(|value| value.to_str().ok());
        let wait = delay(self.retries, response.status(), retry_after)?;
        self.retries += 1;
        Some(tokio::time::sleep(jittered(wait)))
    }

    fn clone_request(&mut self, request: &Request<Body>) -> Option<Request<Body>> {
        // A streamed body cannot be sent twice: such a request is not retried.
        let body = request.body().try_clone()?;
        let mut clone = Request::builder()
            .method(request.method().clone())
            .uri(request.uri().clone())
            .version(request.version())
            .body(body)
            .ok()?;
        *clone.headers_mut() = request.headers().clone();
        *clone.extensions_mut() = request.extensions().clone();
        Some(clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_request_the_server_said_when_to_repeat_is_repeated_a_few_times_within_a_bound() {
        let secs = |s| Some(Duration::from_secs(s));
        let too_many = StatusCode::TOO_MANY_REQUESTS;
        let delays: Vec<Option<Duration>> = (0..5)
            .map(|retries| delay(retries, too_many, Some("3")))
            .collect();
        assert_eq!(delays, [secs(3), secs(3), secs(3), None, None]);
        for status in [StatusCode::SERVICE_UNAVAILABLE, StatusCode::GATEWAY_TIMEOUT] {
            assert_eq!(delay(0, status, Some("2")), secs(2), "{status}");
        }
        // Never at once, never longer than the bound.
        assert_eq!(delay(0, too_many, Some("0")), secs(1));
        assert_eq!(delay(0, too_many, Some("86400")), Some(MAX_RETRY_AFTER));

        // Without a time to come back, the caller's own backoff decides: kube's default tried
        // a 503 again after 5 ms, 10 ms, 20 ms… fifteen times, for minutes.
        for retry_after in [None, Some("soon"), Some("Wed, 21 Oct 2026 07:28:00 GMT")] {
            assert_eq!(delay(0, too_many, retry_after), None, "{retry_after:?}");
            let unavailable = StatusCode::SERVICE_UNAVAILABLE;
            assert_eq!(delay(0, unavailable, retry_after), None, "{retry_after:?}");
        }
        // Anything else is an answer: not repeated.
        for status in [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::NOT_FOUND,
            StatusCode::CONFLICT,
            StatusCode::OK,
        ] {
            assert_eq!(delay(0, status, Some("1")), None, "{status}");
        }
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let spread = jittered(Duration::from_secs(4));
            assert!(
                (Duration::from_secs(3)..=Duration::from_secs(5)).contains(&spread),
                "{spread:?}"
            );
        }
    }
}
