//! A small HTTP/1.1 server on loopback that misbehaves on request: it drops connections midway,
//! announces the wrong length, ignores ranges, answers errors, redirects in a loop or stalls.
//! One request per connection. It stops when dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the server answers one path.
#[derive(Clone, Debug, Default)]
pub struct Behavior {
    /// Serve `Range` requests (206) and send an ETag.
    pub ranges: bool,
    /// For the first `times` requests, close the connection after this many body bytes.
    pub drop_after: Option<(u64, usize)>,
    /// Announce this many bytes more (positive) or fewer (negative) than the body has.
    pub announce_delta: i64,
    /// Answer this status with an empty body.
    pub status: Option<u16>,
    /// Answer 302 to this location.
    pub redirect: Option<String>,
    /// Send the headers, then nothing.
    pub stall: bool,
}

impl Behavior {
    pub fn normal() -> Self {
        Self {
            ranges: true,
            ..Self::default()
        }
    }
}

#[derive(Clone)]
struct Route {
    path: String,
    body: Arc<Vec<u8>>,
    behavior: Behavior,
}

/// What the server saw.
#[derive(Clone, Debug)]
pub struct Logged {
    pub path: String,
    pub range: Option<String>,
    pub headers: Vec<(String, String)>,
}

pub struct HttpServer {
    pub addr: SocketAddr,
    routes: Arc<Mutex<Vec<Route>>>,
    log: Arc<Mutex<Vec<Logged>>>,
    task: tokio::task::JoinHandle<()>,
    scheme: &'static str,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpServer {
    pub async fn start() -> Self {
        Self::start_with(None, [127, 0, 0, 1].into()).await
    }

    /// A plain HTTP server on `address` (the test's address on a test LAN, say).
    pub async fn start_on(address: std::net::IpAddr) -> Self {
        Self::start_with(None, address).await
    }

    /// An HTTPS server with this certificate chain and key (PEM).
    pub async fn start_tls(chain_pem: &str, key_pem: &str) -> Self {
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("chain");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        Self::start_with(
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            [127, 0, 0, 1].into(),
        )
        .await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>, address: std::net::IpAddr) -> Self {
        let listener = TcpListener::bind((address, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tls_on = tls.is_some();
        let routes: Arc<Mutex<Vec<Route>>> = Arc::default();
        let log: Arc<Mutex<Vec<Logged>>> = Arc::default();
        let (r, l) = (Arc::clone(&routes), Arc::clone(&log));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, l, tls) = (Arc::clone(&r), Arc::clone(&l), tls.clone());
                tokio::spawn(async move {
                    let _ = match tls {
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => serve(stream, r, l).await,
                            Err(_) => Ok(()),
                        },
                        None => serve(stream, r, l).await,
                    };
                });
            }
        });
        Self {
            addr,
            routes,
            log,
            task,
            scheme: if tls_on { "https" } else { "http" },
        }
    }

    /// Serves `body` at `path` with `behavior`.
    pub fn route(&self, path: &str, body: Vec<u8>, behavior: Behavior) {
        self.routes.lock().expect("routes").push(Route {
            path: path.to_owned(),
            body: Arc::new(body),
            behavior,
        });
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    pub fn requests(&self, path: &str) -> Vec<Logged> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|l| l.path == path)
            .cloned()
            .collect()
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    routes: Arc<Mutex<Vec<Route>>>,
    log: Arc<Mutex<Vec<Logged>>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let range = headers
        .iter()
        .find(|(k, _)| k == "range")
        .map(|(_, v)| v.clone());
    let seen = {
        let mut log = log.lock().expect("log");
        log.push(Logged {
            path: path.clone(),
            range: range.clone(),
            headers: headers.clone(),
        });
        log.iter().filter(|l| l.path == path).count()
    };
    let route = routes
        .lock()
        .expect("routes")
        .iter()
        .find(|r| r.path == path)
        .cloned();
    let Some(route) = route else {
        return respond(&mut stream, "404 Not Found", &[], b"").await;
    };
    let b = &route.behavior;
    if let Some(status) = b.status {
        return respond(&mut stream, &format!("{status} Status"), &[], b"").await;
    }
    if let Some(location) = &b.redirect {
        return respond(
            &mut stream,
            "302 Found",
            &[("Location", location.clone())],
            b"",
        )
        .await;
    }
    let body = &route.body[..];
    let start = match (&range, b.ranges) {
        (Some(range), true) => range
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok()),
        _ => None,
    };
    if start.is_some_and(|s| s >= body.len()) {
        let total = format!("bytes */{}", body.len());
        return respond(
            &mut stream,
            "416 Range Not Satisfiable",
            &[("Content-Range", total)],
            b"",
        )
        .await;
    }
    let (status, part, mut extra) = match start {
        Some(start) => (
            "206 Partial Content",
            &body[start..],
            vec![(
                "Content-Range",
                format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
            )],
        ),
        None => ("200 OK", body, Vec::new()),
    };
    if b.ranges {
        extra.push(("ETag", "\"v1\"".to_owned()));
        extra.push(("Accept-Ranges", "bytes".to_owned()));
    }
    let announced = (part.len() as i64 + b.announce_delta).max(0);
    extra.push(("Content-Length", announced.to_string()));
    let mut send = part.len();
    if let Some((after, times)) = b.drop_after
        && seen <= times
    {
        send = send.min(after as usize);
    }
    write_head(&mut stream, status, &extra).await?;
    if b.stall {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    stream.write_all(&part[..send]).await?;
    stream.shutdown().await
}

async fn write_head<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    headers: &[(&str, String)],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut headers = headers.to_vec();
    headers.push(("Content-Length", body.len().to_string()));
    write_head(stream, status, &headers).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}
