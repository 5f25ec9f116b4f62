//! Downloads over HTTP(S), hashed as the bytes arrive.
//!
//! rustls (no OpenSSL), timeouts, a bounded number of redirects, resume with `Range` after a
//! dropped connection (from zero when the server cannot resume), retries with backoff, and never
//! more bytes than announced or than the size limit. Destinations on loopback and link-local
//! addresses (cloud metadata lives at 169.254.169.254) are refused after DNS resolution and on
//! every redirect, unless loopback is explicitly allowed.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};

use super::progress::{Phase, ProgressReporter};
use super::sink::Sink;
use crate::api::chap::Password;

#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Allow loopback destinations (tests, single-server setups).
    pub allow_loopback: bool,
    pub connect_timeout: Duration,
    /// The longest silence while waiting for the next bytes.
    pub read_timeout: Duration,
    pub max_redirects: usize,
    /// Consecutive attempts without progress before giving up.
    pub attempts: usize,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            allow_loopback: false,
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
            max_redirects: 5,
            attempts: 5,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// What an HTTP source needs besides its URL, from the Secrets the DiscImage names.
#[derive(Clone, Debug, Default)]
pub struct HttpAuth {
    /// PEM certificates to trust instead of the system's.
    pub ca_bundle: Option<Vec<u8>>,
    /// Request headers (for example `Authorization`), never logged.
    pub headers: Vec<(String, Password)>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("refusing to fetch from {address} ({why}); {hint}")]
    Forbidden {
        address: IpAddr,
        why: &'static str,
        hint: &'static str,
    },
    #[error("{url}: the server answered {status}")]
    Status { url: String, status: StatusCode },
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

/// The URL without its query and fragment, which may carry signatures or tokens.
pub fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// Why an address must not be fetched from, if it must not.
fn forbidden(address: IpAddr, allow_loopback: bool) -> Option<&'static str> {
    let address = match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    };
    match address {
        IpAddr::V4(v4) if v4.is_loopback() && !allow_loopback => Some("loopback"),
        IpAddr::V6(v6) if v6.is_loopback() && !allow_loopback => Some("loopback"),
        IpAddr::V4(v4) if v4.is_link_local() => {
            Some("link-local, where cloud metadata services live")
        }
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
            Some("not a host address")
        }
        IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => Some("not a host address"),
        _ => None,
    }
}

fn check(address: IpAddr, allow_loopback: bool) -> Result<(), FetchError> {
    match forbidden(address, allow_loopback) {
        None => Ok(()),
        Some(why) => Err(FetchError::Forbidden {
            address,
            why,
            hint: if why == "loopback" {
                "allow loopback sources explicitly (--allow-loopback) if this is intended"
            } else {
                "images must come from a host address"
            },
        }),
    }
}

/// Resolves names and drops forbidden addresses, so that a name pointing at loopback or at the
/// metadata service is refused as surely as the address itself.
struct GuardedResolver {
    allow_loopback: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_loopback = self.allow_loopback;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|a| forbidden(a.ip(), allow_loopback).is_none())
                .collect();
            match (allowed.is_empty(), resolved.first()) {
                (true, Some(first)) => {
                    let error: Box<dyn std::error::Error + Send + Sync> =
                        Box::new(check(first.ip(), allow_loopback).err().unwrap_or(
                            FetchError::Client(format!(
                                "{host} has no address discus may fetch from"
                            )),
                        ));
                    Err(error)
                }
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// Refuses URLs whose host is a forbidden address literal (names go through the resolver).
fn check_url(url: &Url, allow_loopback: bool) -> Result<(), FetchError> {
    let literal = match url.host() {
        Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
        _ => None,
    };
    literal.map_or(Ok(()), |address| check(address, allow_loopback))
}

pub struct Fetcher {
    options: FetchOptions,
}

/// One attempt's outcome, when it did not finish the download.
enum Retry {
    /// Worth another attempt: the connection dropped, timed out, or the server had a bad moment.
    Transient(String),
    Permanent(FetchError),
}

impl Fetcher {
    pub fn new(options: FetchOptions) -> Self {
        // reqwest is built without a default TLS provider so that one (ring) serves kube and
        // reqwest alike; installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self { options }
    }

    fn client(&self, auth: &HttpAuth) -> Result<reqwest::Client, FetchError> {
        let allow_loopback = self.options.allow_loopback;
        let max_redirects = self.options.max_redirects;
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                attempt.error(format!("more than {max_redirects} redirects"))
            } else if let Err(error) = check_url(attempt.url(), allow_loopback) {
                attempt.error(error)
            } else {
                attempt.follow()
            }
        });
        let mut builder = reqwest::Client::builder()
            .tls_backend_rustls()
            .connect_timeout(self.options.connect_timeout)
            .read_timeout(self.options.read_timeout)
            .redirect(redirects)
            // A proxy would resolve names out of the guard's sight.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver { allow_loopback }))
            .user_agent(concat!("discus/", env!("CARGO_PKG_VERSION")));
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

    /// Downloads `url` into the sink, at most `limit` bytes. Returns the number of bytes.
    pub async fn fetch(
        &self,
        url: &Url,
        auth: &HttpAuth,
        limit: u64,
        sink: &Sink,
        progress: &mut ProgressReporter,
    ) -> Result<u64, FetchError> {
        check_url(url, self.options.allow_loopback)?;
        let client = self.client(auth)?;
        let headers = Self::headers(auth)?;
        let shown = redacted(url);
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
            match self
                .attempt(
                    &client, url, &headers, &shown, limit, &mut state, sink, progress,
                )
                .await
            {
                Ok(bytes) => return Ok(bytes),
                Err(Retry::Permanent(error)) => return Err(error),
                Err(Retry::Transient(message)) => {
                    failures = if state.done > before { 1 } else { failures + 1 };
                    if failures >= self.options.attempts {
                        return Err(match state.total {
                            Some(total)
                                if state.done < total
                                    && message.starts_with("connection ended") =>
                            {
                                FetchError::Incomplete {
                                    url: shown,
                                    received: state.done,
                                    announced: total,
                                    attempts: failures,
                                }
                            }
                            _ => FetchError::Transport {
                                url: shown,
                                message,
                                attempts: failures,
                            },
                        });
                    }
                    let delay = delays.next().unwrap_or(self.options.max_backoff);
                    tracing::warn!(url = %shown, %message, retry_in = ?delay, "download interrupted");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        client: &reqwest::Client,
        url: &Url,
        headers: &HeaderMap,
        shown: &str,
        limit: u64,
        state: &mut Download,
        sink: &Sink,
        progress: &mut ProgressReporter,
    ) -> Result<u64, Retry> {
        let mut request = client.get(url.clone()).headers(headers.clone());
        if state.done > 0 {
            request = request.header(header::RANGE, format!("bytes={}-", state.done));
            // Resume only if the file is still the one we started: otherwise the server sends it whole.
            if let Some(validator) = &state.validator {
                request = request.header(header::IF_RANGE, validator.clone());
            }
        }
        let mut response = request.send().await.map_err(|e| classify(&e))?;
        let status = response.status();
        match status {
            StatusCode::OK => {
                if state.done > 0 {
                    tracing::info!(url = %shown, "the server cannot resume; starting again from zero");
                    sink.reset().await.map_err(|e| Retry::Permanent(e.into()))?;
                    state.done = 0;
                }
                state.total = response.content_length();
                state.validator = response
                    .headers()
                    .get(header::ETAG)
                    .or_else(|| response.headers().get(header::LAST_MODIFIED))
                    .cloned();
            }
            StatusCode::PARTIAL_CONTENT => {
                let range = response
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range);
                match range {
                    Some((start, total)) if start == state.done => {
                        state.total = total.or(state.total)
                    }
                    _ => {
                        // Not the range asked for: start again from zero, without a range.
                        sink.reset().await.map_err(|e| Retry::Permanent(e.into()))?;
                        state.done = 0;
                        state.validator = None;
                        return Err(Retry::Transient(
                            "the server answered a different range".into(),
                        ));
                    }
                }
            }
            s if s.is_server_error()
                || s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT =>
            {
                return Err(Retry::Transient(format!("the server answered {s}")));
            }
            s => {
                return Err(Retry::Permanent(FetchError::Status {
                    url: shown.to_owned(),
                    status: s,
                }));
            }
        }
        if let Some(total) = state.total {
            if total > limit {
                return Err(Retry::Permanent(FetchError::TooLarge {
                    url: shown.to_owned(),
                    size: total,
                    limit,
                }));
            }
            if state.done == 0 {
                ensure_space(sink.dir(), total).map_err(Retry::Permanent)?;
            }
        }
        progress.update(Phase::Downloading, state.done, state.total);
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => return Err(classify(&e)),
            };
            let done = state.done + chunk.len() as u64;
            if let Some(total) = state.total
                && done > total
            {
                return Err(Retry::Permanent(FetchError::MoreThanAnnounced {
                    url: shown.to_owned(),
                    announced: total,
                }));
            }
            if done > limit {
                return Err(Retry::Permanent(FetchError::TooLarge {
                    url: shown.to_owned(),
                    size: done,
                    limit,
                }));
            }
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
    // A refused destination surfaces as a connect error carrying our FetchError.
    if let Some(FetchError::Forbidden { address, why, hint }) = find_in_chain::<FetchError>(error) {
        return Retry::Permanent(FetchError::Forbidden {
            address: *address,
            why,
            hint,
        });
    }
    // A certificate the trust roots do not vouch for will not be vouched for on the next try.
    if let Some(tls) = find_in_chain::<rustls::Error>(error) {
        return Retry::Permanent(FetchError::Transport {
            url: error.url().map(redacted).unwrap_or_default(),
            message: format!("TLS: {tls}"),
            attempts: 1,
        });
    }
    if error.is_redirect() {
        let message =
            std::error::Error::source(error).map_or_else(|| error.to_string(), ToString::to_string);
        return Retry::Permanent(FetchError::Transport {
            url: error.url().map(redacted).unwrap_or_default(),
            message,
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
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
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
    fn loopback_and_link_local_destinations_are_refused() {
        for (address, allowed_with_loopback) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("169.254.169.254", false),
            ("fe80::1", false),
            ("0.0.0.0", false),
            ("224.0.0.1", false),
        ] {
            let ip: IpAddr = address.parse().expect("ip");
            assert!(forbidden(ip, false).is_some(), "{address}");
            assert_eq!(
                forbidden(ip, true).is_none(),
                allowed_with_loopback,
                "{address}"
            );
        }
        for address in ["10.0.0.5", "192.168.1.1", "2001:db8::1", "8.8.8.8"] {
            assert_eq!(
                forbidden(address.parse().expect("ip"), false),
                None,
                "{address}"
            );
        }
    }

    #[test]
    fn urls_with_forbidden_literals_are_refused_before_any_request() {
        let url = Url::parse("http://169.254.169.254/latest/meta-data/").expect("url");
        let error = check_url(&url, true).expect_err("metadata");
        assert!(
            error
                .to_string()
                .starts_with("refusing to fetch from 169.254.169.254 (link-local"),
            "{error}"
        );
        assert!(check_url(&Url::parse("http://[::1]:8080/a").expect("url"), false).is_err());
        assert!(check_url(&Url::parse("http://example.com/a").expect("url"), false).is_ok());
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
    }
}
