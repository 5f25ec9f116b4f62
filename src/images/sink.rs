//! Where downloaded and copied bytes go: a thread that hashes them with SHA-256 and writes them to
//! a staging file in one pass, while the network keeps receiving. The digest is ready the moment
//! the last byte is written; the file is never read again to hash it.

use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::store::Staging;

enum Message {
    Data(Bytes),
    /// Start again from zero (a server that cannot resume).
    Reset,
}

/// The result of a finished sink.
pub struct Written {
    pub staging: Staging,
    /// Lower-case hex.
    pub sha256: String,
    pub bytes: u64,
}

pub struct Sink {
    tx: Option<mpsc::Sender<Message>>,
    thread: Option<std::thread::JoinHandle<io::Result<Written>>>,
    failure: Arc<Mutex<Option<io::Error>>>,
    /// Set when the sink is dropped unfinished: the thread stops writing at once.
    abandoned: Arc<AtomicBool>,
    dir: PathBuf,
}

/// An unfinished sink is abandoned: its thread stops and its staging file is removed before
/// `drop` returns, so a failed import leaves nothing behind.
impl Drop for Sink {
    fn drop(&mut self) {
        self.abandoned.store(true, Ordering::Relaxed);
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Sink {
    /// Starts writing into `staging`.
    pub fn start(staging: Staging) -> io::Result<Self> {
        // Enough to keep the writer busy while the network stalls briefly, without buffering much.
        let (tx, mut rx) = mpsc::channel::<Message>(64);
        let failure = Arc::new(Mutex::new(None));
        let dir = staging
            .path()
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        let report = Arc::clone(&failure);
        let abandoned = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&abandoned);
        let thread = std::thread::Builder::new()
            .name("discus-sink".into())
            .spawn(move || {
                let mut staging = staging;
                let mut hash = Sha256::new();
                let mut bytes = 0u64;
                let result = (|| {
                    while let Some(message) = rx.blocking_recv() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match message {
                            Message::Data(data) => {
                                hash.update(&data);
                                staging.file_mut().write_all(&data)?;
                                bytes += data.len() as u64;
                            }
                            Message::Reset => {
                                staging.file_mut().set_len(0)?;
                                staging.file_mut().rewind()?;
                                hash = Sha256::new();
                                bytes = 0;
                            }
                        }
                    }
                    staging.file_mut().flush()
                })();
                match result {
                    Ok(()) => Ok(Written {
                        staging,
                        sha256: hex::encode(hash.finalize()),
                        bytes,
                    }),
                    Err(error) => {
                        let kind = error.kind();
                        let message = error.to_string();
                        if let Ok(mut slot) = report.lock() {
                            *slot = Some(error);
                        }
                        Err(io::Error::new(kind, message))
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            failure,
            abandoned,
            dir,
        })
    }

    /// The directory of the staging file, for free-space checks.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub async fn write(&self, data: Bytes) -> io::Result<()> {
        self.send(Message::Data(data)).await
    }

    pub async fn reset(&self) -> io::Result<()> {
        self.send(Message::Reset).await
    }

    async fn send(&self, message: Message) -> io::Result<()> {
        if let Some(tx) = &self.tx
            && tx.send(message).await.is_ok()
        {
            return Ok(());
        }
        // The writer stopped: say why.
        let failure = self.failure.lock().ok().and_then(|mut slot| slot.take());
        Err(failure.unwrap_or_else(|| io::Error::other("the image writer stopped")))
    }

    /// Waits for every byte to be written and returns the file with its digest.
    pub async fn finish(mut self) -> io::Result<Written> {
        self.tx.take();
        let thread = self
            .thread
            .take()
            .ok_or_else(|| io::Error::other("the image writer is gone"))?;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(io::Error::other)?
            .map_err(|_| io::Error::other("the image writer panicked"))?
    }
}
