//! Downloads over HTTP(S), hashed as the bytes arrive.
//!
//! rustls (no OpenSSL), timeouts, resume with `Range` after a dropped connection (from zero when
//! the server cannot resume), retries with backoff, and never more bytes than announced or than
//! the size limit. Every address a download connects to passes the node's
//! [`DestinationPolicy`] — after DNS resolution and on every redirect hop. Redirects are followed
//! here, not by the HTTP client, so that each hop is checked the same way: the headers of
//! `headersSecretRef` go only to the origin (scheme, host, port) the DiscImage names and are
//! dropped for the rest of the chain once a hop leaves it, and an https source never continues
//! over plain http. The whole transfer keeps a minimum average rate ([`Pace`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};

use super::destinations::{DestinationPolicy, Refusal};
use super::pace::{Pace, TooSlow};
use super::progress::{Phase, ProgressReporter};
use super::sink::Sink;
use crate::api::chap::Password;

#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Where downloads may connect (`--allow-loopback`, `--source-allow`, `--source-deny`).
    pub destinations: DestinationPolicy,
    pub connect_timeout: Duration,
    /// The longest silence while waiting for the next bytes.
    pub read_timeout: Duration,
    pub max_redirects: usize,
    /// Consecutive attempts without progress before giving up.
    pub attempts: usize,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// The slowest average rate a transfer may have, in bytes per second (`--source-min-rate`).
    pub min_average_rate: u64,
    /// How long a transfer may take before its average rate counts (connecting, redirects,
    /// retries).
    pub rate_grace: Duration,
}

/// The default `--source-min-rate`: 128 KiB/s, about 1 Mbit/s.
pub const DEFAULT_MIN_AVERAGE_RATE: u64 = 128 << 10;

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            destinations: DestinationPolicy::default(),
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
            max_redirects: 5,
            attempts: 5,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            min_average_rate: DEFAULT_MIN_AVERAGE_RATE,
            rate_grace: Duration::from_secs(120),
        }
    }
}

impl FetchOptions {
    /// The deadline of a transfer that starts now.
    pub fn pace(&self) -> Pace {
        Pace::start(self.rate_grace, self.min_average_rate)
    }
}

/// What an HTTP source needs besides its URL, from the Secrets the DiscImage names.
#[derive(Clone, Debug, Default)]
pub struct HttpAuth {
    /// PEM certificates to trust instead of the system's.
    pub ca_bundle: Option<Vec<u8>>,
    /// Request headers (for example `Authorization`), never logged, sent only to the URL's own
    /// origin.
    pub headers: Vec<(String, Password)>,
    /// Accept exactly the certificate with this SHA-256 (another node's, from its status), and
    /// no other: a peer, never a DiscImage's source.
    pub pinned_certificate: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Forbidden(#[from] Refusal),
    #[error("{url}: the server answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("{url}: {why}")]
    Redirect { url: String, why: String },
    #[error("{url}: {source}")]
    TooSlow {
        url: String,
        #[source]
        source: TooSlow,
    },
    #[error("{url}: the image is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge { url: String, size: u64, limit: u64 },
    #[error("{url}: the server sent more than the {announced} bytes it announced")]
    MoreThanAnnounced { url: String, announced: u64 },
    #[error(
        "{url}: the connection ended after {received} of {announced} bytes, {attempts} times in a row"
    )]
    Incomplete {
        url: String,
        received: u64,
        announced: u64,
        attempts: usize,
    },
    #[error("{url}: {message} ({attempts} attempts)")]
    Transport {
        url: String,
        message: String,
        attempts: usize,
    },
    #[error("not enough free space for {needed} bytes in {}: {available} bytes free", dir.display())]
    NoSpace {
        dir: std::path::PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("caBundleSecretRef: {0}")]
    CaBundle(String),
    #[error("headersSecretRef: {0}")]
    Header(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("writing the download: {0}")]
    Write(#[from] std::io::Error),
}

/// The URL without credentials, query and fragment, which may carry signatures or tokens (a
/// DiscImage's URL has no credentials, but a redirect's Location may).
pub fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    // Only URLs that cannot have credentials refuse these, and those have none to hide.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// Resolves names and drops refused addresses, so that a name pointing at loopback or at the
/// metadata service is refused as surely as the address itself.
struct GuardedResolver {
    policy: Arc<DestinationPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.policy);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusal = None;
            let mut allowed = Vec::new();
            for address in resolved {
                match policy.check(address.ip()) {
                    Ok(()) => allowed.push(address),
                    Err(refused) => {
                        refusal.get_or_insert(refused);
                    }
                }
            }
            match (allowed.is_empty(), refusal) {
                (true, Some(refusal)) => Err(Box::new(refusal) as Box<_>),
                (true, None) => {
                    Err(Box::new(FetchError::Client(format!("{host} has no address"))) as Box<_>)
                }
                (false, _) => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// Refuses URLs whose host is a refused address literal (names go through the resolver).
fn check_url(url: &Url, policy: &DestinationPolicy) -> Result<(), Refusal> {
    let literal = match url.host() {
        Some(url::Host::Ipv4(v4)) => Some(std::net::IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(std::net::IpAddr::V6(v6)),
        _ => None,
    };
    literal.map_or(Ok(()), |address| policy.check(address))
}

pub struct Fetcher {
    options: FetchOptions,
    /// Whether every address passes the destination policy: a DiscImage's source does; another
    /// node, at the address its agent published, does not (it is in the node's own networks).
    guarded: bool,
}

/// One attempt's outcome, when it did not finish the download.
enum Retry {
    /// Worth another attempt: the connection dropped, timed out, or the server had a bad moment.
    Transient(String),
    Permanent(FetchError),
}

/// One download as it goes: where it starts, what it sends, how fast it must be.
struct Transfer<'a> {
    url: &'a Url,
    /// The URL as errors and logs show it.
    shown: String,
    /// From `headersSecretRef`: only for `url`'s origin.
    secrets: HeaderMap,
    limit: u64,
    pace: Pace,
}

impl Transfer<'_> {
    fn too_slow(&self, received: u64) -> FetchError {
        FetchError::TooSlow {
            url: self.shown.clone(),
            source: self.pace.too_slow(received),
        }
    }
}

impl Fetcher {
    pub fn new(options: FetchOptions) -> Self {
        // reqwest is built without a default TLS provider so that one (ring) serves kube and
        // reqwest alike; installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            options,
            guarded: true,
        }
    }

    /// A fetcher for other nodes, which the agents name: no destination policy, no redirects
    /// (a node answers itself), and the certificate pinned by each fetch's `HttpAuth`.
    pub fn for_peers(options: FetchOptions) -> Self {
        Self {
            options: FetchOptions {
                max_redirects: 0,
                ..options
            },
            guarded: false,
        }
    }

    /// Whether the fetcher may connect where `url` points.
    fn check(&self, url: &Url) -> Result<(), Refusal> {
        if self.guarded {
            check_url(url, &self.options.destinations)
        } else {
            Ok(())
        }
    }

    pub fn options(&self) -> &FetchOptions {
        &self.options
    }

    fn client(&self, auth: &HttpAuth) -> Result<reqwest::Client, FetchError> {
        let mut builder = reqwest::Client::builder()
            .tls_backend_rustls()
            .connect_timeout(self.options.connect_timeout)
            .read_timeout(self.options.read_timeout)
            // Followed in `send`, where every hop is checked.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve names out of the guard's sight.
            .no_proxy()
            .user_agent(concat!("discus/", env!("CARGO_PKG_VERSION")));
        if self.guarded {
            builder = builder.dns_resolver(Arc::new(GuardedResolver {
                policy: Arc::new(self.options.destinations.clone()),
            }));
        }
        if let Some(pinned) = &auth.pinned_certificate {
            let tls = crate::credentials::tls::pinned_client(pinned)
                .map_err(|e| FetchError::Client(e.to_string()))?;
            builder = builder.use_preconfigured_tls(tls);
        }
        if let Some(pem) = &auth.ca_bundle {
            let certificates = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| FetchError::CaBundle(format!("not a PEM certificate bundle: {e}")))?;
            if certificates.is_empty() {
                return Err(FetchError::CaBundle("holds no certificate".into()));
            }
            builder = builder.tls_certs_only(certificates);
        }
        builder
            .build()
            .map_err(|e| FetchError::Client(e.to_string()))
    }

    fn headers(auth: &HttpAuth) -> Result<HeaderMap, FetchError> {
        let mut headers = HeaderMap::new();
        for (name, value) in &auth.headers {
            let name = HeaderName::try_from(name.as_str())
                .map_err(|_| FetchError::Header(format!("{name:?} is not an HTTP header name")))?;
            let mut value = HeaderValue::try_from(value.expose()).map_err(|_| {
                FetchError::Header(format!("the value of {name} is not a valid header value"))
            })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Ok(headers)
    }

    /// Downloads `url` into the sink, at most `limit` bytes, keeping `pace`. Returns the number
    /// of bytes.
    pub async fn fetch(
        &self,
        url: &Url,
        auth: &HttpAuth,
        limit: u64,
        pace: Pace,
        sink: &Sink,
        progress: &mut ProgressReporter,
    ) -> Result<u64, FetchError> {
        self.check(url)?;
        let client = self.client(auth)?;
        let transfer = Transfer {
            url,
            shown: redacted(url),
            secrets: Self::headers(auth)?,
            limit,
            pace,
        };
        let mut state = Download::default();
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(self.options.first_backoff)
            .with_max_delay(self.options.max_backoff)
            .with_jitter()
            .without_max_times()
            .build();
        let mut failures = 0;
        loop {
            let before = state.done;
            let message = match self
                .attempt(&client, &transfer, &mut state, sink, progress)
                .await
            {
                Ok(bytes) => return Ok(bytes),
                Err(Retry::Permanent(error)) => return Err(error),
                Err(Retry::Transient(message)) => message,
            };
            failures = if state.done > before { 1 } else { failures + 1 };
            if failures >= self.options.attempts {
                return Err(gave_up(&transfer, &state, message, failures));
            }
            let delay = delays.next().unwrap_or(self.options.max_backoff);
            if transfer.pace.would_miss(state.done, delay) {
                return Err(transfer.too_slow(state.done));
            }
            tracing::warn!(url = %transfer.shown, %message, retry_in = ?delay, "download interrupted");
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(
        &self,
        client: &reqwest::Client,
        transfer: &Transfer<'_>,
        state: &mut Download,
        sink: &Sink,
        progress: &mut ProgressReporter,
    ) -> Result<u64, Retry> {
        let mut range = HeaderMap::new();
        if state.done > 0 {
            range.insert(header::RANGE, range_from(state.done)?);
            // Resume only if the file is still the one we started: otherwise the server sends it whole.
            if let Some(validator) = &state.validator {
                range.insert(header::IF_RANGE, validator.clone());
            }
        }
        let mut response = self.send(client, transfer, &range, state.done).await?;
        self.start_body(&response, transfer, state, sink).await?;
        if let Some(total) = state.total {
            if total > transfer.limit {
                return Err(Retry::Permanent(FetchError::TooLarge {
                    url: transfer.shown.clone(),
                    size: total,
                    limit: transfer.limit,
                }));
            }
            if state.done == 0 {
                ensure_space(sink.dir(), total).map_err(Retry::Permanent)?;
            }
        }
        progress.update(Phase::Downloading, state.done, state.total);
        loop {
            let next =
                tokio::time::timeout_at(transfer.pace.deadline(state.done), response.chunk())
                    .await
                    .map_err(|_| Retry::Permanent(transfer.too_slow(state.done)))?;
            let chunk = match next {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => return Err(classify(&e)),
            };
            let done = state.done + chunk.len() as u64;
            check_received(transfer, state.total, done)?;
            sink.write(chunk)
                .await
                .map_err(|e| Retry::Permanent(e.into()))?;
            state.done = done;
            progress.update(Phase::Downloading, state.done, state.total);
        }
        match state.total {
            Some(total) if state.done < total => Err(Retry::Transient(format!(
                "connection ended after {} of {total} bytes",
                state.done
            ))),
            _ => Ok(state.done),
        }
    }

    /// Reads the status of the final answer: where the body starts, how long it is, and whether
    /// the bytes so far still count.
    async fn start_body(
        &self,
        response: &reqwest::Response,
        transfer: &Transfer<'_>,
        state: &mut Download,
        sink: &Sink,
    ) -> Result<(), Retry> {
        match response.status() {
            StatusCode::OK => {
                if state.done > 0 {
                    tracing::info!(url = %transfer.shown, "the server cannot resume; starting again from zero");
                    sink.reset().await.map_err(|e| Retry::Permanent(e.into()))?;
                    state.done = 0;
                }
                state.total = response.content_length();
                state.validator = response
                    .headers()
                    .get(header::ETAG)
                    .or_else(|| response.headers().get(header::LAST_MODIFIED))
                    .cloned();
                Ok(())
            }
            StatusCode::PARTIAL_CONTENT => {
                let range = response
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range);
                match range {
                    Some((start, total)) if start == state.done => {
                        state.total = total.or(state.total);
                        Ok(())
                    }
                    _ => {
                        // Not the range asked for: start again from zero, without a range.
                        sink.reset().await.map_err(|e| Retry::Permanent(e.into()))?;
                        state.done = 0;
                        state.validator = None;
                        Err(Retry::Transient(
                            "the server answered a different range".into(),
                        ))
                    }
                }
            }
            s if s.is_server_error()
                || s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT =>
            {
                Err(Retry::Transient(format!("the server answered {s}")))
            }
            s => Err(Retry::Permanent(FetchError::Status {
                url: transfer.shown.clone(),
                status: s,
            })),
        }
    }

    /// Sends the GET and follows redirects: every hop's address is checked, the secret headers
    /// go only to the source's own origin, and https never turns into http.
    async fn send(
        &self,
        client: &reqwest::Client,
        transfer: &Transfer<'_>,
        range: &HeaderMap,
        done: u64,
    ) -> Result<reqwest::Response, Retry> {
        let origin = transfer.url.origin();
        let mut url = transfer.url.clone();
        // Once the chain leaves the origin it never gets the secrets again, even if it comes
        // back: the hop that sends it back chose where.
        let mut with_secrets = true;
        for _ in 0..=self.options.max_redirects {
            self.check(&url).map_err(|e| Retry::Permanent(e.into()))?;
            with_secrets &= url.origin() == origin;
            let mut request = client.get(url.clone()).headers(range.clone());
            if with_secrets {
                request = request.headers(transfer.secrets.clone());
            }
            let response = tokio::time::timeout_at(transfer.pace.deadline(done), request.send())
                .await
                .map_err(|_| Retry::Permanent(transfer.too_slow(done)))?
                .map_err(|e| classify(&e))?;
            match next_hop(&url, &response) {
                Ok(None) => return Ok(response),
                Ok(Some(next)) => url = next,
                Err(why) => {
                    return Err(Retry::Permanent(FetchError::Redirect {
                        url: transfer.shown.clone(),
                        why,
                    }));
                }
            }
        }
        Err(Retry::Permanent(FetchError::Redirect {
            url: transfer.shown.clone(),
            why: format!("more than {} redirects", self.options.max_redirects),
        }))
    }
}

/// Where a redirect answer sends the download next (`None` for any other answer), or why it
/// must not go there.
fn next_hop(url: &Url, response: &reqwest::Response) -> Result<Option<Url>, String> {
    let status = response.status();
    if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
        return Ok(None);
    }
    let location = response
        .headers()
        .get(header::LOCATION)
        .ok_or_else(|| format!("the server answered {status} without a Location"))?
        .to_str()
        .map_err(|_| format!("the server answered {status} with a Location that is not text"))?;
    let next = url
        .join(location)
        .map_err(|e| format!("the server redirected to an invalid location: {e}"))?;
    match (url.scheme(), next.scheme()) {
        ("https", "https") | ("http", "http" | "https") => Ok(Some(next)),
        ("https", "http") => Err(format!(
            "refusing the redirect from https to plain http ({}): the download would lose TLS",
            redacted(&next)
        )),
        (_, other) => Err(format!(
            "refusing the redirect to a {other}: URL; image sources are http or https"
        )),
    }
}

/// The error once the attempts ran out.
fn gave_up(
    transfer: &Transfer<'_>,
    state: &Download,
    message: String,
    attempts: usize,
) -> FetchError {
    match state.total {
        Some(total) if state.done < total && message.starts_with("connection ended") => {
            FetchError::Incomplete {
                url: transfer.shown.clone(),
                received: state.done,
                announced: total,
                attempts,
            }
        }
        _ => FetchError::Transport {
            url: transfer.shown.clone(),
            message,
            attempts,
        },
    }
}

/// Refuses a body that grows past what was announced or past the limit.
fn check_received(transfer: &Transfer<'_>, total: Option<u64>, done: u64) -> Result<(), Retry> {
    if let Some(total) = total
        && done > total
    {
        return Err(Retry::Permanent(FetchError::MoreThanAnnounced {
            url: transfer.shown.clone(),
            announced: total,
        }));
    }
    if done > transfer.limit {
        return Err(Retry::Permanent(FetchError::TooLarge {
            url: transfer.shown.clone(),
            size: done,
            limit: transfer.limit,
        }));
    }
    Ok(())
}

fn range_from(done: u64) -> Result<HeaderValue, Retry> {
    HeaderValue::from_str(&format!("bytes={done}-"))
        .map_err(|e| Retry::Permanent(FetchError::Client(format!("the Range header: {e}"))))
}

/// How far a download got, across attempts.
#[derive(Default)]
struct Download {
    done: u64,
    total: Option<u64>,
    /// The ETag or Last-Modified of the first answer, for `If-Range`.
    validator: Option<HeaderValue>,
}

/// The first error of type `T` in the chain, looking inside `io::Error`s too (whose `source`
/// skips the error they wrap).
fn find_in_chain<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

fn classify(error: &reqwest::Error) -> Retry {
    // A refused destination surfaces as a connect error carrying the refusal.
    if let Some(refusal) = find_in_chain::<Refusal>(error) {
        return Retry::Permanent(FetchError::Forbidden(refusal.clone()));
    }
    // A certificate the trust roots do not vouch for will not be vouched for on the next try.
    if let Some(tls) = find_in_chain::<rustls::Error>(error) {
        return Retry::Permanent(FetchError::Transport {
            url: error.url().map(redacted).unwrap_or_default(),
            message: format!("TLS: {tls}"),
            attempts: 1,
        });
    }
    let message = if error.is_timeout() {
        "timed out waiting for the server".to_owned()
    } else if error.is_connect() {
        format!("cannot connect: {}", innermost(error))
    } else if error.is_body() || error.is_decode() {
        format!("connection ended: {}", innermost(error))
    } else {
        innermost(error)
    };
    Retry::Transient(message)
}

fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut error = error;
    while let Some(source) = error.source() {
        error = source;
    }
    error.to_string()
}

/// `bytes <start>-<end>/<total or *>` → (start, total).
pub(crate) fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let range = value.strip_prefix("bytes ")?;
    let (span, total) = range.split_once('/')?;
    let start = span.split_once('-')?.0.trim().parse().ok()?;
    let total = if total.trim() == "*" {
        None
    } else {
        Some(total.trim().parse().ok()?)
    };
    Some((start, total))
}

/// Fails early when the file system cannot hold `needed` more bytes.
pub fn ensure_space(dir: &Path, needed: u64) -> Result<(), FetchError> {
    let stats = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    let available = stats.f_bavail.saturating_mul(stats.f_frsize);
    if available < needed {
        return Err(FetchError::NoSpace {
            dir: dir.to_owned(),
            needed,
            available,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_refused_literals_are_refused_before_any_request() {
        let policy = DestinationPolicy::new(true, Vec::new(), Vec::new());
        let url = Url::parse("http://169.254.169.254/latest/meta-data/").expect("url");
        let error = check_url(&url, &policy).expect_err("metadata");
        assert!(
            error
                .to_string()
                .starts_with("refusing to fetch from 169.254.169.254 (link-local"),
            "{error}"
        );
        let strict = DestinationPolicy::default();
        assert!(check_url(&Url::parse("http://[::1]:8080/a").expect("url"), &strict).is_err());
        assert!(
            check_url(
                &Url::parse("http://[fd00:ec2::254]/").expect("url"),
                &policy
            )
            .is_err()
        );
        assert!(check_url(&Url::parse("http://example.com/a").expect("url"), &strict).is_ok());
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range("bytes x-1/2"), None);
    }

    #[test]
    fn urls_are_shown_without_query_strings() {
        let url =
            Url::parse("https://bucket.example.com/a.iso?X-Amz-Signature=secret#f").expect("url");
        assert_eq!(redacted(&url), "https://bucket.example.com/a.iso");
        let url = Url::parse("https://user:pass@example.com/b.iso").expect("url");
        assert_eq!(redacted(&url), "https://example.com/b.iso");
    }
}
