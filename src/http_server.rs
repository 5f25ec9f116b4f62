//! Serving HTTP with bounds, for the node's endpoints (`/metrics`, the boot scripts): a client
//! that opens connections and sends nothing, or sends a byte a minute, must not hold the node's
//! sockets and memory. One request per connection (no keep-alive); the request head must arrive
//! within a deadline and the whole exchange within another; connections are capped overall, per
//! address, and per network (an IPv6 /64, which one host may fill with addresses, and which a
//! whole LAN may share). A connection beyond a cap is closed at once, before anything is read.
//! Over TLS (the upload endpoint), the handshake counts as part of the request head.

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
    pub per_address: usize,
    /// Per [`network`]: an IPv4 address, an IPv6 /64.
    pub per_network: usize,
    /// From accepting the connection to the end of the request head.
    pub head_deadline: Duration,
    /// From accepting the connection to the end of the response.
    pub exchange_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 256,
            per_address: 8,
            per_network: 64,
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

/// The network an address counts in for the wider limits: an IPv4 address itself, an IPv6
/// address's /64.
pub fn network(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(network))
        }
        v4 => v4,
    }
}

/// Where a listener bound to `bound` can be reached among the node's `addresses`: the bound
/// address itself, or — bound to a wildcard — every address of the node it covers (`0.0.0.0`
/// listens on IPv4 only, `[::]` on both), loopback aside.
pub fn reachable(bound: SocketAddr, addresses: &[IpAddr]) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    (addresses.iter())
        .filter(|a| !a.is_unspecified() && !a.is_loopback() && (bound.is_ipv6() || a.is_ipv4()))
        .map(|a| SocketAddr::new(*a, bound.port()))
        .collect()
}

/// Open connections, overall, per address and per network (an IPv4 address is its own).
#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
    by_network: HashMap<IpAddr, usize>,
}

/// A connection's place under the caps, given back when it closes.
struct Admitted {
    open: Arc<Mutex<Open>>,
    address: IpAddr,
}

fn count_down(counts: &mut HashMap<IpAddr, usize>, key: IpAddr) {
    if let Some(count) = counts.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(&key);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        open.total -= 1;
        count_down(&mut open.by_address, self.address);
        count_down(&mut open.by_network, network(self.address));
    }
}

fn admit(open: &Arc<Mutex<Open>>, limits: &Limits, address: IpAddr) -> Option<Admitted> {
    let address = address.to_canonical();
    let mut counts = open.lock();
    let of = |counts: &HashMap<IpAddr, usize>, key| counts.get(&key).copied().unwrap_or(0);
    if counts.total >= limits.connections
        || of(&counts.by_address, address) >= limits.per_address
        || of(&counts.by_network, network(address)) >= limits.per_network
    {
        return None;
    }
    counts.total += 1;
    *counts.by_address.entry(address).or_default() += 1;
    *counts.by_network.entry(network(address)).or_default() += 1;
    Some(Admitted {
        open: Arc::clone(open),
        address,
    })
}

/// Serves `router` on `listener` until the process ends; `name` says which endpoint in logs.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, name: &'static str) {
    serve_with(listener, router, limits, name, None).await
}

/// Like [`serve`], over TLS: the handshake must end within the head deadline.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    name: &'static str,
    tls: tokio_rustls::TlsAcceptor,
) {
    serve_with(listener, router, limits, name, Some(tls)).await
}

async fn serve_with(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    name: &'static str,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
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
        let Some(admitted) = admit(&open, &limits, remote.ip()) else {
            tracing::debug!(endpoint = name, %remote, "connection refused: too many open");
            continue;
        };
        let peer = Peer { local, remote };
        let router = router.clone();
        match &tls {
            None => tokio::spawn(exchange(stream, peer, router, limits, admitted)),
            Some(tls) => tokio::spawn(exchange_tls(
                stream,
                tls.clone(),
                peer,
                router,
                limits,
                admitted,
            )),
        };
    }
}

/// The TLS handshake within the head deadline, then the exchange.
async fn exchange_tls(
    stream: TcpStream,
    tls: tokio_rustls::TlsAcceptor,
    peer: Peer,
    router: Router,
    limits: Limits,
    admitted: Admitted,
) {
    match tokio::time::timeout(limits.head_deadline, tls.accept(stream)).await {
        Ok(Ok(stream)) => exchange(stream, peer, router, limits, admitted).await,
        Ok(Err(error)) => tracing::debug!(remote = %peer.remote, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(remote = %peer.remote, "TLS handshake took too long; closed"),
    }
}

/// One request and its answer, within the deadlines.
async fn exchange<S>(stream: S, peer: Peer, router: Router, limits: Limits, _admitted: Admitted)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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
    fn an_ipv6_address_counts_in_its_64_and_a_mapped_ipv4_is_itself() {
        let key = |s: &str| network(s.parse().expect("address"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
    }

    #[test]
    fn caps_count_open_connections_and_free_them_on_close() {
        let open = Arc::new(Mutex::new(Open::default()));
        let limits = Limits {
            connections: 3,
            per_address: 2,
            per_network: 2,
            ..Limits::default()
        };
        let (a, b) = (IpAddr::from([192, 0, 2, 1]), IpAddr::from([192, 0, 2, 2]));
        let first = admit(&open, &limits, a).expect("first");
        let _second = admit(&open, &limits, a).expect("second");
        assert!(admit(&open, &limits, a).is_none(), "per address");
        let _third = admit(&open, &limits, b).expect("another address");
        assert!(admit(&open, &limits, b).is_none(), "overall");
        drop(first);
        assert!(admit(&open, &limits, a).is_some(), "freed on close");
    }

    #[test]
    fn the_addresses_of_one_ipv6_64_share_its_cap_but_not_each_others() {
        let open = Arc::new(Mutex::new(Open::default()));
        let limits = Limits {
            per_address: 1,
            per_network: 3,
            ..Limits::default()
        };
        let address = |s: &str| s.parse::<IpAddr>().expect("address");
        let _held: Vec<_> = ["2001:db8::1", "2001:db8::2", "2001:db8::3"]
            .into_iter()
            .map(|a| admit(&open, &limits, address(a)).expect("one each"))
            .collect();
        assert!(admit(&open, &limits, address("2001:db8::1")).is_none());
        assert!(
            admit(&open, &limits, address("2001:db8::4")).is_none(),
            "the /64"
        );
        assert!(admit(&open, &limits, address("2001:db8:0:1::1")).is_some());
    }
}
