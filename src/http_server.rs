//! Serving HTTP with bounds, for the node's endpoints (`/metrics`, the boot scripts): a client
//! that opens connections and sends nothing, or sends a byte a minute, must not hold the node's
//! sockets and memory. One request per connection (no keep-alive); the request head must arrive
//! within a deadline and the whole exchange within another; connections are capped overall and
//! per source (an IPv6 source is its /64: one host has a whole one). A connection beyond a cap is
//! closed at once, before anything is read.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tower::Service;

/// How much one endpoint serves at once, and how long one exchange may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connections: usize,
    pub per_source: usize,
    /// From accepting the connection to the end of the request head.
    pub head_deadline: Duration,
    /// From accepting the connection to the end of the response.
    pub exchange_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 256,
            per_source: 8,
            head_deadline: Duration::from_secs(5),
            exchange_deadline: Duration::from_secs(15),
        }
    }
}

/// Both ends of a request's connection, for handlers (`ConnectInfo<Peer>`).
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// Where the request came in (a wildcard listener's concrete address).
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Whom a limit counts: an IPv4 address, or an IPv6 address's /64.
pub fn source_key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(network))
        }
        v4 => v4,
    }
}

/// Open connections, overall and per source.
#[derive(Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// A connection's place under the caps, given back when it closes.
struct Admitted {
    open: Arc<Mutex<Open>>,
    source: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        open.total -= 1;
        if let Some(count) = open.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

fn admit(open: &Arc<Mutex<Open>>, limits: &Limits, source: IpAddr) -> Option<Admitted> {
    let mut counts = open.lock();
    let from_source = counts.by_source.get(&source).copied().unwrap_or(0);
    if counts.total >= limits.connections || from_source >= limits.per_source {
        return None;
    }
    counts.total += 1;
    counts.by_source.insert(source, from_source + 1);
    Some(Admitted {
        open: Arc::clone(open),
        source,
    })
}

/// Serves `router` on `listener` until the process ends; `name` says which endpoint in logs.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, name: &'static str) {
    let open = Arc::new(Mutex::new(Open::default()));
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                tracing::warn!(endpoint = name, %error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let Some(admitted) = admit(&open, &limits, source_key(remote.ip())) else {
            tracing::debug!(endpoint = name, %remote, "connection refused: too many open");
            continue;
        };
        let peer = Peer { local, remote };
        tokio::spawn(exchange(stream, peer, router.clone(), limits, admitted));
    }
}

/// One request and its answer, within the deadlines.
async fn exchange(
    stream: TcpStream,
    peer: Peer,
    router: Router,
    limits: Limits,
    _admitted: Admitted,
) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().call(request)
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_deadline)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.exchange_deadline, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(remote = %peer.remote, %error, "HTTP connection ended"),
        Err(_) => tracing::debug!(remote = %peer.remote, "HTTP exchange took too long; closed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_source_is_its_64_and_a_mapped_ipv4_is_itself() {
        let key = |s: &str| source_key(s.parse().expect("address"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
    }

    #[test]
    fn caps_count_open_connections_and_free_them_on_close() {
        let open = Arc::new(Mutex::new(Open::default()));
        let limits = Limits {
            connections: 3,
            per_source: 2,
            ..Limits::default()
        };
        let (a, b) = (IpAddr::from([192, 0, 2, 1]), IpAddr::from([192, 0, 2, 2]));
        let first = admit(&open, &limits, a).expect("first");
        let _second = admit(&open, &limits, a).expect("second");
        assert!(admit(&open, &limits, a).is_none(), "per source");
        let _third = admit(&open, &limits, b).expect("another source");
        assert!(admit(&open, &limits, b).is_none(), "overall");
        drop(first);
        assert!(admit(&open, &limits, a).is_some(), "freed on close");
    }
}
