//! The boot endpoint: `GET /boot/ipxe?mac=<card>` answers iPXE with the script of the grant that
//! boots that card on this node.
//!
//! Deny by default: a card no applied grant names, an expired grant, a source outside the
//! grant's networks and a request without a card all get the same 404, so the answer tells an
//! outsider nothing; the log and `discus_boot_requests_total` say which it was. Each source
//! address may ask a bounded number of times a minute, and each IPv6 /64 sixteen times that (429
//! beyond); connections are bounded in number and time (`http_server`). Every script served is an
//! audit line (`boot script served`: grant, card, source address) and never carries a secret
//! into a log. Scripts are not cached anywhere (`Cache-Control: no-store`).

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use k8s_openapi::jiff::Timestamp;
use parking_lot::RwLock;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use super::script::{ask_with_mac, ipxe_script};
use super::table::{BootEntry, BootTable, Refusal};
use crate::api::mac::MacAddress;
use crate::api::printable;
use crate::desired::ObjectKey;
use crate::http_server::{self, Limits, Peer, network};
use crate::metrics::Metrics;

/// The one answer to every request that gets no script.
const REFUSED: &str = "no boot script for this machine\n";

/// Where the endpoint listens and how often one source may ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootOptions {
    pub address: SocketAddr,
    /// Requests a minute one source address may make (also the burst).
    pub requests_per_minute: NonZeroU32,
}

/// A script handed out: what the audit trail records (the agent makes it an Event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedScript {
    pub grant: ObjectKey,
    pub uid: Option<String>,
    pub mac: MacAddress,
    pub source: IpAddr,
}

/// Scripts served and not yet told are dropped past this many (the log has every one).
const SERVED_BACKLOG: usize = 256;

/// The node's boot table, replaced by each sync pass and read by every request, and the news
/// of every script served.
#[derive(Clone)]
pub struct BootTables {
    table: Arc<RwLock<BootTable>>,
    served: broadcast::Sender<ServedScript>,
    /// Where the endpoint listens, once it does.
    address: Option<SocketAddr>,
}

impl Default for BootTables {
    fn default() -> Self {
        Self {
            table: Arc::default(),
            served: broadcast::channel(SERVED_BACKLOG).0,
            address: None,
        }
    }
}

impl BootTables {
    /// These tables, knowing where the endpoint listens.
    pub fn serving_at(mut self, address: SocketAddr) -> Self {
        self.address = Some(address);
        self
    }

    /// The URLs machines can boot from on this node: the endpoint's address, or, where it
    /// listens on every address, each of the node's `addresses` that is one.
    pub fn urls(&self, addresses: &[IpAddr]) -> Vec<String> {
        let Some(bound) = self.address else {
            return Vec::new();
        };
        http_server::reachable(bound, addresses)
            .into_iter()
            .map(|at| format!("http://{at}/boot/ipxe"))
            .collect()
    }

    pub fn replace(&self, table: BootTable) {
        *self.table.write() = table;
    }

    /// Every script served from now on.
    pub fn served(&self) -> broadcast::Receiver<ServedScript> {
        self.served.subscribe()
    }

    /// Drops what the next desired state no longer backs (before the pass applies it).
    pub fn retain_desired(&self, state: &crate::desired::DesiredState) {
        self.table.write().retain_desired(state);
    }

    /// The script for a request, made while the table is read: a pass that drops the grant
    /// waits until it is made.
    pub fn script(
        &self,
        mac: &str,
        source: IpAddr,
        local: IpAddr,
        now: Timestamp,
    ) -> Result<(Arc<BootEntry>, String), Refusal> {
        let table = self.table.read();
        let entry = table.decide(mac, source, now)?;
        let script = ipxe_script(&entry, local);
        Ok((entry, script))
    }
}

struct Endpoint {
    tables: BootTables,
    /// Per address, and per network (an IPv6 /64, whose many addresses one host may use) with
    /// [`NETWORK_SHARE`] times the quota.
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    network_limiter: DefaultKeyedRateLimiter<IpAddr>,
    metrics: Arc<Metrics>,
}

/// How many addresses' worth of requests one IPv6 /64 may make: a rack booting together shares
/// one, and so does one host with many addresses.
const NETWORK_SHARE: u32 = 16;

/// Binds `options.address` now (so that a taken port fails the start) and serves in the
/// background.
pub async fn start(
    options: BootOptions,
    tables: BootTables,
    metrics: Arc<Metrics>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(options.address).await?;
    let bound = listener.local_addr()?;
    let endpoint = Arc::new(Endpoint {
        tables,
        limiter: RateLimiter::keyed(Quota::per_minute(options.requests_per_minute)),
        network_limiter: RateLimiter::keyed(Quota::per_minute(
            options
                .requests_per_minute
                .saturating_mul(NonZeroU32::new(NETWORK_SHARE).unwrap_or(NonZeroU32::MIN)),
        )),
        metrics,
    });
    let app = Router::new()
        .route("/boot/ipxe", get(boot_script))
        .with_state(Arc::clone(&endpoint));
    tokio::spawn(forget_quiet_sources(endpoint));
    tokio::spawn(http_server::serve(listener, app, Limits::default(), "boot"));
    tracing::info!(address = %bound, "serving iPXE boot scripts at /boot/ipxe");
    Ok(bound)
}

/// The rate limiter keeps a state per source; sources quiet for a minute are forgotten.
async fn forget_quiet_sources(endpoint: Arc<Endpoint>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        every.tick().await;
        for limiter in [&endpoint.limiter, &endpoint.network_limiter] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[derive(serde::Deserialize)]
struct BootQuery {
    mac: Option<String>,
}

async fn boot_script(
    State(endpoint): State<Arc<Endpoint>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    query: Result<Query<BootQuery>, QueryRejection>,
) -> Response {
    let source = peer.remote.ip().to_canonical();
    // The /64 first: an address over its network's quota adds no key of its own.
    let limited = (source.is_ipv6()
        && endpoint
            .network_limiter
            .check_key(&network(source))
            .is_err())
        || endpoint.limiter.check_key(&source).is_err();
    if limited {
        endpoint.metrics.boot_request("rate_limited");
        tracing::warn!(%source, "boot request refused: too many from this address");
        return (StatusCode::TOO_MANY_REQUESTS, "too many requests\n").into_response();
    }
    // Where the request came in: what wildcard portals and the ask-again URL become.
    let local = SocketAddr::new(peer.local.ip().to_canonical(), peer.local.port());
    // A query that does not parse (`mac` twice, say) is refused like a malformed card.
    let mac = query.map_or_else(|_| Some(String::new()), |Query(q)| q.mac);
    let Some(mac) = mac else {
        endpoint.metrics.boot_request("asked_for_mac");
        return script_response(ask_with_mac(local));
    };
    match endpoint
        .tables
        .script(&mac, source, local.ip(), Timestamp::now())
    {
        Ok((entry, script)) => {
            endpoint.metrics.boot_request("served");
            tell_served(&endpoint, &entry, &mac, source);
            script_response(script)
        }
        Err(refusal) => {
            endpoint.metrics.boot_request(refusal.as_str());
            let shown: String = mac.chars().take(32).collect();
            tracing::info!(
                mac = %printable(&shown),
                %source,
                why = refusal.as_str(),
                "boot request refused"
            );
            (StatusCode::NOT_FOUND, REFUSED).into_response()
        }
    }
}

/// The audit trail of a script served: a log line, and news for whoever tells Events.
fn tell_served(endpoint: &Endpoint, entry: &BootEntry, mac: &str, source: IpAddr) {
    if let Ok(card) = mac.parse() {
        // Nobody listening (discus serve) is fine: the log line below is the record.
        let _ = endpoint.tables.served.send(ServedScript {
            grant: entry.grant.clone(),
            uid: entry.uid.clone(),
            mac: card,
            source,
        });
    }
    tracing::info!(
        target: "discus::audit",
        grant = %entry.grant,
        mac = %mac.to_ascii_lowercase(),
        %source,
        iqn = %entry.iqn,
        "boot script served"
    );
}

fn script_response(script: String) -> Response {
    let mut response = script.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_urls_name_the_endpoint_or_each_node_address_where_it_listens_on_all() {
        let tables = |at: &str| BootTables::default().serving_at(at.parse().expect("address"));
        let node: Vec<IpAddr> = ["10.20.0.11", "2001:db8::11"]
            .iter()
            .map(|a| a.parse().expect("address"))
            .collect();
        assert_eq!(
            tables("10.20.0.11:8090").urls(&node),
            ["http://10.20.0.11:8090/boot/ipxe"]
        );
        assert_eq!(
            tables("0.0.0.0:8090").urls(&node),
            ["http://10.20.0.11:8090/boot/ipxe"]
        );
        assert_eq!(
            tables("[::]:8090").urls(&node),
            [
                "http://10.20.0.11:8090/boot/ipxe",
                "http://[2001:db8::11]:8090/boot/ipxe"
            ]
        );
        let unknown = [IpAddr::from([0, 0, 0, 0])];
        assert!(tables("0.0.0.0:8090").urls(&unknown).is_empty());
        assert!(BootTables::default().urls(&node).is_empty(), "not serving");
    }
}
