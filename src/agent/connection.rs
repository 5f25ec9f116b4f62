//! The agent's connection to the apiserver, with deadlines on everything.
//!
//! kube's client waits for ever by default: it has no read timeout, so one answer lost on the way
//! (a connection a middlebox forgot, a peer that vanished without a reset) hangs a list, the start
//! of a watch or a write for good — and an agent that waits for the API never applies a deleted
//! grant. Here every request has a read deadline: no byte for `read`, and the answer counts as
//! lost; the request fails and is tried again on a new connection. Watches would trip that
//! deadline whenever nothing changes, so the apiserver is asked to end each watch earlier
//! (`timeoutSeconds`); kube's watcher gives up on a silent stream 5 s after that, and resumes it.
//! A healthy idle watch therefore never errs, and a dead one is restarted within the deadline.
//! An answer that says "later" (429, 503) is tried again a few times, soon (`retry`).

use std::time::Duration;

use kube::client::ClientBuilder;
use kube::runtime::watcher;
use kube::{Client, Config};
use tower::buffer::BufferLayer;
use tower::retry::RetryLayer;

use super::retry::RetryPolicy;

/// The fewest seconds `--api-timeout-seconds` takes: a watch needs some seconds of its own.
pub const MIN_API_TIMEOUT: Duration = Duration::from_secs(15);
/// The default: above the apiserver's own deadline for ordinary requests (`--request-timeout`,
/// 60 s), so that any answer a live apiserver gives arrives before it.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(70);
/// How much earlier than the read deadline the apiserver ends a watch: kube's watcher waits 5 s
/// past `timeoutSeconds` before it calls a stream dead, and the read deadline comes 5 s later.
const WATCH_MARGIN: Duration = Duration::from_secs(10);
/// Requests waiting for the client's stack, as kube's own buffer holds.
const RETRY_BUFFER: usize = 1024;

/// How long the agent waits for the apiserver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiTimeouts {
    /// The longest silence on a connection with a request in flight.
    pub read: Duration,
}

impl Default for ApiTimeouts {
    fn default() -> Self {
        Self {
            read: DEFAULT_API_TIMEOUT,
        }
    }
}

impl ApiTimeouts {
    /// `read`, or why it cannot be.
    pub fn new(read: Duration) -> Result<Self, String> {
        if read < MIN_API_TIMEOUT {
            return Err(format!(
                "must be at least {} seconds (a watch is renewed {} seconds before it)",
                MIN_API_TIMEOUT.as_secs(),
                WATCH_MARGIN.as_secs()
            ));
        }
        Ok(Self { read })
    }

    /// The `timeoutSeconds` of every watch.
    pub fn watch_seconds(&self) -> u32 {
        u32::try_from(self.read.saturating_sub(WATCH_MARGIN).as_secs()).unwrap_or(u32::MAX)
    }

    /// A watcher configuration whose watches end before the read deadline.
    pub fn watcher(&self) -> watcher::Config {
        watcher::Config::default().timeout(self.watch_seconds())
    }

    /// A client over `config` whose requests wait `read` at most for each byte of an answer,
    /// and are tried again as `retry` says, in place of kube's default.
    pub fn client(&self, config: &Config, read: Duration) -> Result<Client, kube::Error> {
        let mut config = config.clone();
        config.default_retry = false;
        config.read_timeout = Some(read);
        // The deadline counts from when the request is sent, not from when its pooled
        // connection went idle.
        config.reset_reader_on_write = true;
        config.write_timeout = Some(read);
        config.connect_timeout = Some(config.connect_timeout.map_or(read, |c| c.min(read)));
        // The retry layer needs a service it can clone: the buffer makes kube's stack one.
        Ok(ClientBuilder::try_from(config)?
            .with_layer(&BufferLayer::new(RETRY_BUFFER))
            .with_layer(&RetryLayer::new(RetryPolicy::default()))
            .build())
    }
}

/// The clients of one agent: one for everything, one for the leader election, whose requests
/// must end while the lease they renew still holds.
pub struct Clients {
    pub main: Client,
    pub lease: Client,
}

/// Connects with the kubeconfig or the in-cluster configuration, as kubectl would.
pub async fn connect(timeouts: ApiTimeouts, lease_seconds: u64) -> Result<Clients, kube::Error> {
    let config = Config::infer().await.map_err(kube::Error::InferConfig)?;
    let lease = Duration::from_secs(lease_seconds.max(1)).min(timeouts.read);
    Ok(Clients {
        main: timeouts.client(&config, timeouts.read)?,
        lease: timeouts.client(&config, lease)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_end_before_the_read_deadline_and_too_short_a_deadline_is_refused() {
        let timeouts = ApiTimeouts::default();
        assert_eq!(timeouts.watch_seconds(), 60);
        // kube's watcher calls a stream dead 5 s past timeoutSeconds: still before the deadline.
        assert!(Duration::from_secs(u64::from(timeouts.watch_seconds()) + 5) < timeouts.read);
        assert_eq!(
            ApiTimeouts::new(Duration::from_secs(15)).map(|t| t.watch_seconds()),
            Ok(5)
        );
        let refused = ApiTimeouts::new(Duration::from_secs(14)).expect_err("too short");
        assert!(refused.contains("at least 15 seconds"), "{refused}");
    }

    /// kube's default client waits for ever here.
    #[tokio::test]
    async fn an_answer_that_never_comes_fails_the_request_within_the_deadline() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let address = listener.local_addr().expect("address");
        // Takes every request and answers none, holding the connections open.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = listener.accept().await {
                held.push(connection);
            }
        });
        let config = Config::new(format!("http://{address}").parse().expect("url"));
        let client = ApiTimeouts::default()
            .client(&config, Duration::from_millis(300))
            .expect("client");
        let secrets = kube::Api::<k8s_openapi::api::core::v1::Secret>::all(client);
        let started = std::time::Instant::now();
        let listed =
            tokio::time::timeout(Duration::from_secs(10), secrets.list(&Default::default())).await;
        assert!(matches!(listed, Ok(Err(_))), "{listed:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
