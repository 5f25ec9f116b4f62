//! A TCP proxy that loses answers, to put between an agent and the apiserver.
//!
//! It forwards bytes both ways until told otherwise. `blackhole`: from then on, every connection
//! open at that moment, and every new one, forwards nothing in either direction and is never
//! closed from the proxy's side — as a connection a middlebox forgot, or a peer gone without a
//! reset. `lose_answers`: the same for the open connections, but a new one carries its TLS
//! handshake and its first request to the server, and then nothing comes back: a request sent,
//! its answer lost, and nothing says so (a connection that never completes its handshake is
//! caught by the client's connect timeout; this is what is not). After `restore`, new
//! connections are forwarded again; the dead ones stay dead until their client gives up on them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    address: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

/// What a new connection gets.
const FORWARD: u8 = 0;
const BLACKHOLE: u8 = 1;
const LOSE_ANSWERS: u8 = 2;

#[derive(Default)]
struct State {
    /// Bumped whenever answers start being lost: connections born in an earlier epoch are dead.
    epoch: AtomicU64,
    mode: AtomicU8,
    accepted: AtomicU64,
}

impl Proxy {
    /// Listens on `listen` (port 0: any) and forwards to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind(listen).await.expect("the proxy listens");
        let address = listener.local_addr().expect("address");
        let state = Arc::new(State::default());
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let birth = Birth {
                    epoch: shared.epoch.load(Ordering::SeqCst),
                    mode: shared.mode.load(Ordering::SeqCst),
                };
                tokio::spawn(relay(client, upstream, Arc::clone(&shared), birth));
            }
        });
        Self {
            address,
            state,
            task,
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Every connection open now, and every new one until `restore`, goes silent for good.
    pub fn blackhole(&self) {
        self.lose(BLACKHOLE);
    }

    /// Every connection open now goes silent for good; every new one until `restore` takes one
    /// request and gives no answer.
    pub fn lose_answers(&self) {
        self.lose(LOSE_ANSWERS);
    }

    fn lose(&self, mode: u8) {
        self.state.mode.store(mode, Ordering::SeqCst);
        self.state.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// New connections are forwarded again.
    pub fn restore(&self) {
        self.state.mode.store(FORWARD, Ordering::SeqCst);
    }

    /// How many connections clients opened so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy)]
struct Birth {
    epoch: u64,
    mode: u8,
}

/// One connection's fate.
struct Connection {
    birth: Birth,
    state: Arc<State>,
    /// The client's TLS records so far (`LOSE_ANSWERS`).
    records: TlsRecords,
}

impl Connection {
    /// Whether bytes still go through.
    fn alive(&self) -> bool {
        self.birth.epoch == self.state.epoch.load(Ordering::SeqCst)
            && match self.birth.mode {
                FORWARD => true,
                // TLS 1.3: the client's first application-data record is its Finished, the
                // second carries its first request.
                LOSE_ANSWERS => self.records.application_data < 2,
                _ => false,
            }
    }
}

/// Forwards one connection while it is alive; once dead, swallows what the client sends until
/// the client closes it.
async fn relay(client: TcpStream, upstream: SocketAddr, state: Arc<State>, birth: Birth) {
    let mut connection = Connection {
        birth,
        state,
        records: TlsRecords::default(),
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = if connection.alive() {
        match TcpStream::connect(upstream).await {
            Ok(server) => {
                let (read, write) = server.into_split();
                (Some(read), Some(write))
            }
            Err(_) => return,
        }
    } else {
        (None, None)
    };
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        tokio::select! {
            read = from_client.read(&mut up) => {
                let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                let forward = connection.alive();
                connection.records.take(&up[..n]);
                if forward
                    && let Some(server) = to_server.as_mut()
                    && server.write_all(&up[..n]).await.is_err()
                {
                    return;
                }
            }
            read = async { from_server.as_mut()?.read(&mut down).await.ok() }, if from_server.is_some() => {
                match read {
                    Some(n) if n > 0 => {
                        if connection.alive() && to_client.write_all(&down[..n]).await.is_err() {
                            return;
                        }
                    }
                    // The server closed: so does the client's side, unless this one is dead.
                    _ if connection.alive() => return,
                    _ => from_server = None,
                }
            }
        }
    }
}

/// Counts the TLS records of one direction of a connection by their 5-byte headers.
#[derive(Default)]
struct TlsRecords {
    header: Vec<u8>,
    /// Bytes of the current record's body still to come.
    remaining: usize,
    application_data: u64,
}

impl TlsRecords {
    fn take(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 5 {
                if self.header[0] == 0x17 {
                    self.application_data += 1;
                }
                self.remaining = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header.clear();
            }
        }
    }
}
