//! A front that misbehaves as an apiserver does, to put between an agent and the real one.
//!
//! Why a front of its own: `proxy.rs` forwards bytes and can only lose them; the faults here are
//! answers — 429 with `Retry-After`, 500, 503, a watch ended by a `410 Gone` status event — and
//! giving them takes understanding HTTP. So the front ends the agent's TLS with a certificate of
//! its own (`kubeconfig` writes the agent a kubeconfig that trusts it), reads each request, and
//! forwards it over a TLS connection of its own to the real apiserver, which it trusts through the
//! control plane's CA. Every header goes through as the agent sent it, `Authorization` included:
//! the apiserver sees the agent's own ServiceAccount token, so the agent keeps its identity and
//! its RBAC. The front never logs, and keeps no header: a token passes through it and nowhere
//! else.
//!
//! Each of the agent's connections gets one connection to the apiserver, opened at its first
//! request and opened again when the apiserver closed it; when that fails (the apiserver is
//! down), the agent's connection is closed, as a refused connection would end its request.
//!
//! It counts every request by kind (lists and gets, watches, status writes, other writes) and
//! how many it answered itself, so a test can tell the request rate while a fault lasts.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A concrete error type: hyper's bounds with a boxed one trip the compiler (`From` not general
/// enough) once the connection is spawned.
type FrontError = std::io::Error;
type Body = BoxBody<Bytes, FrontError>;

/// What the front does with the requests it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwards everything.
    None,
    /// Answers every request itself with this status (a `Status` object, as the apiserver's),
    /// with `Retry-After: <seconds>` when given. Watches open when it starts end.
    Answer { code: u16, retry_after: Option<u32> },
    /// Ends every watch with a `410 Gone` status event — those open when it starts, and each new
    /// one as it starts (as a watch resumed from a resource version the apiserver no longer
    /// has); everything else is forwarded.
    Gone,
}

/// Requests the front got, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// GETs that are not watches.
    pub reads: u64,
    pub watches: u64,
    /// Writes to a `status` subresource.
    pub status_writes: u64,
    /// Every other write (Leases, Events, Secrets).
    pub writes: u64,
    /// Of all those, how many the front answered itself (a fault).
    pub faulted: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.reads + self.watches + self.status_writes + self.writes
    }

    /// What came in since `earlier`.
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            reads: self.reads - earlier.reads,
            watches: self.watches - earlier.watches,
            status_writes: self.status_writes - earlier.status_writes,
            writes: self.writes - earlier.writes,
            faulted: self.faulted - earlier.faulted,
        }
    }
}

pub struct ApiFront {
    address: SocketAddr,
    state: Arc<State>,
    /// The CA that signed the front's certificate.
    ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    fault: Mutex<Fault>,
    counts: Mutex<Counts>,
    /// Bumped when a fault starts: every open watch ends (with `410 Gone` under `Fault::Gone`).
    cut: watch::Sender<u64>,
    upstream: SocketAddr,
    upstream_name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
}

impl ApiFront {
    /// Listens on `listen` (port 0: any) and forwards to the apiserver at `upstream`, which
    /// presents a certificate of `upstream_ca` (PEM) for its IP address.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr, upstream_ca: &Path) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(upstream_ca).expect("the apiserver's CA") {
            roots.add(cert.expect("a CA certificate")).expect("CA");
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (ca_pem, chain, key) = certificate(listen.ip());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("the front's certificate");
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind(listen).await.expect("the front listens");
        let address = listener.local_addr().expect("address");
        let state = Arc::new(State {
            fault: Mutex::new(Fault::None),
            counts: Mutex::default(),
            cut: watch::channel(0).0,
            upstream,
            upstream_name: ServerName::IpAddress(upstream.ip().into()),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        });
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, acceptor.clone(), Arc::clone(&shared)));
            }
        });
        Self {
            address,
            state,
            ca_pem,
            task,
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// From now on, `fault`; open watches end when a fault starts.
    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().expect("fault") = fault;
        if fault != Fault::None {
            self.state.cut.send_modify(|epoch| *epoch += 1);
        }
    }

    pub fn counts(&self) -> Counts {
        *self.state.counts.lock().expect("counts")
    }

    /// A copy of `kubeconfig` (the agent's) that reaches the apiserver through the front, with
    /// the same credentials: the server and the CA to trust are the front's.
    pub fn kubeconfig(&self, kubeconfig: &Path, into: &Path) -> PathBuf {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = std::fs::read_to_string(kubeconfig).expect("kubeconfig");
        let rewritten: Vec<String> = text
            .lines()
            .map(|line| {
                let indent = &line[..line.len() - line.trim_start().len()];
                match line.trim_start() {
                    l if l.starts_with("server:") => {
                        format!("{indent}server: https://{}", self.address)
                    }
                    l if l.starts_with("certificate-authority-data:") => {
                        format!("{indent}certificate-authority-data: {ca}")
                    }
                    _ => line.to_owned(),
                }
            })
            .collect();
        let path = into.join("front.kubeconfig");
        std::fs::write(&path, rewritten.join("\n") + "\n").expect("kubeconfig");
        path
    }
}

impl Drop for ApiFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A CA (PEM) and a certificate it signed for `address` and `localhost`, with its key.
fn certificate(address: IpAddr) -> (String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("CA");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params.subject_alt_names.push(SanType::IpAddress(address));
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca).expect("certificate");
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key");
    (ca.pem(), vec![cert.der().clone()], key)
}

/// What kind of request this is, for the counts.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Read,
    Watch,
    StatusWrite,
    Write,
}

fn kind(request: &Request<Incoming>) -> Kind {
    let query = request.uri().query().unwrap_or_default();
    let watch = query
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1");
    match *request.method() {
        hyper::Method::GET if watch => Kind::Watch,
        hyper::Method::GET => Kind::Read,
        _ if request.uri().path().ends_with("/status") => Kind::StatusWrite,
        _ => Kind::Write,
    }
}

/// One connection of the agent's: its requests, one after the other, each answered by the
/// fault or forwarded on the connection to the apiserver.
async fn serve(stream: TcpStream, acceptor: tokio_rustls::TlsAcceptor, state: Arc<State>) {
    let Ok(tls) = acceptor.accept(stream).await else {
        return;
    };
    let upstream: Arc<tokio::sync::Mutex<Option<Upstream>>> = Arc::default();
    let service = hyper::service::service_fn(move |request| {
        let (state, upstream) = (Arc::clone(&state), Arc::clone(&upstream));
        async move { answer(request, &state, &upstream).await }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

type Upstream = hyper::client::conn::http1::SendRequest<Incoming>;

async fn answer(
    request: Request<Incoming>,
    state: &Arc<State>,
    upstream: &tokio::sync::Mutex<Option<Upstream>>,
) -> Result<Response<Body>, FrontError> {
    let kind = kind(&request);
    let fault = *state.fault.lock().expect("fault");
    {
        let mut counts = state.counts.lock().expect("counts");
        match kind {
            Kind::Read => counts.reads += 1,
            Kind::Watch => counts.watches += 1,
            Kind::StatusWrite => counts.status_writes += 1,
            Kind::Write => counts.writes += 1,
        }
        if matches!(fault, Fault::Answer { .. }) || (fault == Fault::Gone && kind == Kind::Watch) {
            counts.faulted += 1;
        }
    }
    match fault {
        Fault::Answer { code, retry_after } => return Ok(status_answer(code, retry_after)),
        Fault::Gone if kind == Kind::Watch => {
            return Response::builder()
                .header("content-type", "application/json")
                .body(full(gone_event()))
                .map_err(std::io::Error::other);
        }
        _ => {}
    }
    let mut upstream = upstream.lock().await;
    let alive = match upstream.as_mut() {
        Some(sender) => sender.ready().await.is_ok(),
        None => false,
    };
    // First request, or the apiserver closed the connection: a new one. When that fails, the
    // error closes the agent's connection.
    if !alive {
        *upstream = Some(connect(state).await.map_err(std::io::Error::other)?);
    }
    let Some(sender) = upstream.as_mut() else {
        return Err(std::io::Error::other("no connection to the apiserver"));
    };
    let response = sender
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let (parts, body) = response.into_parts();
    let body = if kind == Kind::Watch {
        cuttable(body, state)
    } else {
        body.map_err(std::io::Error::other).boxed()
    };
    Ok(Response::from_parts(parts, body))
}

async fn connect(state: &State) -> Result<Upstream, FrontError> {
    let tcp = TcpStream::connect(state.upstream).await?;
    let tls = state
        .connector
        .connect(state.upstream_name.clone(), tcp)
        .await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

/// A watch's body, forwarded until a fault starts: then it ends, after a `410 Gone` event under
/// `Fault::Gone`.
fn cuttable(body: Incoming, state: &Arc<State>) -> Body {
    let mut cut = state.cut.subscribe();
    cut.borrow_and_update();
    let stream = futures::stream::unfold(Some((body, cut, Arc::clone(state))), |open| async move {
        let (mut body, mut cut, state) = open?;
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(frame)) => Some((Ok(frame), Some((body, cut, state)))),
                Some(Err(error)) => Some((Err(std::io::Error::other(error)), None)),
                None => None,
            },
            _ = cut.changed() => {
                let gone = *state.fault.lock().expect("fault") == Fault::Gone;
                gone.then(|| (Ok(Frame::data(Bytes::from(gone_event()))), None))
            }
        }
    });
    StreamBody::new(stream).boxed()
}

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed()
}

/// The apiserver's `Status` answer for `code`.
fn status_answer(code: u16, retry_after: Option<u32>) -> Response<Body> {
    let reason = match code {
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": reason, "code": code,
        "message": "answered by the test's API front",
    });
    let mut response = Response::builder()
        .status(code)
        .header("content-type", "application/json");
    if let Some(seconds) = retry_after {
        response = response.header("retry-after", seconds.to_string());
    }
    response
        .body(full(status.to_string().into_bytes()))
        .expect("a status answer")
}

/// The event with which the apiserver ends a watch from a resource version it no longer has.
fn gone_event() -> Vec<u8> {
    let event = serde_json::json!({
        "type": "ERROR",
        "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": "too old resource version: answered by the test's API front",
        },
    });
    let mut line = event.to_string().into_bytes();
    line.push(b'\n');
    line
}
