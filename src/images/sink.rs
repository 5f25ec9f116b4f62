//! Where downloaded and copied bytes go: one thread hashes them with SHA-256 while another writes
//! them to a staging file, and the network keeps receiving meanwhile. Each byte is hashed once,
//! as it arrives: the digest is ready the moment the last byte is written, and the file is never
//! read again to hash it. The hash is the floor of an import; everything else runs beside it.

use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::store::Staging;

#[derive(Clone)]
enum Message {
    Data(Bytes),
    /// Start again from zero (a server that cannot resume).
    Reset,
    /// Tell when everything before was written.
    Barrier(Arc<Mutex<Option<oneshot::Sender<()>>>>),
}

/// The result of a finished sink.
pub struct Written {
    pub staging: Staging,
    /// Lower-case hex.
    pub sha256: String,
    pub bytes: u64,
}

/// What the workers share: why one failed, and whether the sink was abandoned.
#[derive(Clone, Default)]
struct Shared {
    failure: Arc<Mutex<Option<io::Error>>>,
    abandoned: Arc<AtomicBool>,
}

/// A thread that applies every message to its state, then hands the state back.
struct Worker<T> {
    tx: Option<mpsc::Sender<Message>>,
    thread: Option<std::thread::JoinHandle<io::Result<T>>>,
}

impl<T: Send + 'static> Worker<T> {
    fn spawn<S: Send + 'static>(
        name: &str,
        mut state: S,
        apply: fn(&mut S, Message) -> io::Result<()>,
        finish: fn(S) -> io::Result<T>,
        shared: Shared,
    ) -> io::Result<Self> {
        // Enough to ride out a brief stall on either side without buffering much.
        let (tx, mut rx) = mpsc::channel::<Message>(64);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let result = (|| {
                    while let Some(message) = rx.blocking_recv() {
                        if shared.abandoned.load(Ordering::Relaxed) {
                            break;
                        }
                        apply(&mut state, message)?;
                    }
                    finish(state)
                })();
                if let Err(error) = &result {
                    shared
                        .failure
                        .lock()
                        .get_or_insert_with(|| io::Error::new(error.kind(), error.to_string()));
                }
                result
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// A place in the queue, or none when the worker stopped.
    async fn reserve(&self) -> Option<mpsc::Permit<'_, Message>> {
        self.tx.as_ref()?.reserve().await.ok()
    }

    /// Closes the queue and waits for the thread (blocking: call it where blocking is fine).
    fn join(&mut self) -> io::Result<T> {
        self.tx.take();
        let thread = self
            .thread
            .take()
            .ok_or_else(|| io::Error::other("the image worker is gone"))?;
        thread
            .join()
            .map_err(|_| io::Error::other("an image worker panicked"))?
    }
}

fn hash(state: &mut Sha256, message: Message) -> io::Result<()> {
    match message {
        Message::Data(data) => state.update(&data),
        Message::Reset => *state = Sha256::new(),
        Message::Barrier(_) => {}
    }
    Ok(())
}

/// How many bytes the writer leaves to the kernel before it has the flusher write them back.
const WRITE_BACK_STEP: u64 = 32 << 20;

/// The staging file as the writer fills it.
struct Output {
    staging: Staging,
    bytes: u64,
    /// Up to where the file was handed to the flusher.
    written_back: u64,
    flusher: Flusher,
}

/// Writes the staging file back to disk beside the writer (`fdatasync` of a second handle), so
/// that the disk works while the network brings more and the commit's fsync finds little left;
/// the pages stay cached, for what reads the image next. Hints that come while it flushes are
/// dropped: the flush under way takes their bytes too.
struct Flusher {
    hint: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(staging: &Staging) -> io::Result<Self> {
        let file = staging.file().try_clone()?;
        let (hint, hints) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("discus-flush".into())
            .spawn(move || {
                while hints.recv().is_ok() {
                    // A hint only: the commit's fsync is what makes the file durable.
                    let _ = file.sync_data();
                }
            })?;
        Ok(Self {
            hint: Some(hint),
            thread: Some(thread),
        })
    }

    fn hint(&self) {
        if let Some(hint) = &self.hint {
            let _ = hint.try_send(());
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.hint.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write(output: &mut Output, message: Message) -> io::Result<()> {
    match message {
        Message::Data(data) => {
            output.staging.file_mut().write_all(&data)?;
            output.bytes += data.len() as u64;
            if output.bytes - output.written_back >= WRITE_BACK_STEP {
                start_write_back(output);
            }
        }
        Message::Reset => {
            output.staging.file_mut().set_len(0)?;
            output.staging.file_mut().rewind()?;
            output.bytes = 0;
            output.written_back = 0;
        }
        Message::Barrier(written) => {
            if let Some(tell) = written.lock().take() {
                let _ = tell.send(());
            }
        }
    }
    Ok(())
}

fn start_write_back(output: &mut Output) {
    output.flusher.hint();
    output.written_back = output.bytes;
}

pub struct Sink {
    hasher: Worker<String>,
    writer: Worker<(Staging, u64)>,
    shared: Shared,
    dir: PathBuf,
}

/// An unfinished sink is abandoned: its threads stop and its staging file is removed before
/// `drop` returns, so a failed import leaves nothing behind.
impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.abandoned.store(true, Ordering::Relaxed);
        let _ = self.hasher.join();
        let _ = self.writer.join();
    }
}

impl Sink {
    /// Starts hashing and writing into `staging`.
    pub fn start(staging: Staging) -> io::Result<Self> {
        Self::resume(staging, Sha256::new(), 0)
    }

    /// Goes on hashing and writing after the `held` bytes `staging` holds already, which
    /// `hashed` has hashed (an upload continued after an interruption).
    pub fn resume(staging: Staging, hashed: Sha256, held: u64) -> io::Result<Self> {
        let dir = staging
            .path()
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        let shared = Shared::default();
        let hasher = Worker::spawn(
            "discus-hash",
            hashed,
            hash,
            |state| Ok(hex::encode(state.finalize())),
            shared.clone(),
        )?;
        let writer = Worker::spawn(
            "discus-write",
            Output {
                flusher: Flusher::start(&staging)?,
                staging,
                bytes: held,
                written_back: held,
            },
            write,
            |Output {
                 mut staging, bytes, ..
             }| {
                staging.file_mut().flush()?;
                Ok((staging, bytes))
            },
            shared.clone(),
        )?;
        Ok(Self {
            hasher,
            writer,
            shared,
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

    /// Waits until every byte sent so far is written to the file (not synced): what an upload
    /// says it holds is in the file that a restart resumes from.
    pub async fn settle(&self) -> io::Result<()> {
        let (tell, written) = oneshot::channel();
        self.send(Message::Barrier(Arc::new(Mutex::new(Some(tell)))))
            .await?;
        written.await.map_err(|_| {
            let failure = self.shared.failure.lock().take();
            failure.unwrap_or_else(|| io::Error::other("the image writer stopped"))
        })
    }

    /// Gives `message` to both workers, or to neither: a place in both queues is taken before
    /// either is given it, so a caller cancelled while waiting (a client that went away) never
    /// leaves bytes hashed that are not written, or written that are not hashed.
    async fn send(&self, message: Message) -> io::Result<()> {
        if let Some(hashing) = self.hasher.reserve().await
            && let Some(writing) = self.writer.reserve().await
        {
            hashing.send(message.clone());
            writing.send(message);
            return Ok(());
        }
        // A worker stopped: say why.
        let failure = self.shared.failure.lock().take();
        Err(failure.unwrap_or_else(|| io::Error::other("the image writer stopped")))
    }

    /// Waits for every byte to be hashed and written, and returns the file with its digest.
    pub async fn finish(mut self) -> io::Result<Written> {
        let mut hasher = Worker {
            tx: self.hasher.tx.take(),
            thread: self.hasher.thread.take(),
        };
        let mut writer = Worker {
            tx: self.writer.tx.take(),
            thread: self.writer.thread.take(),
        };
        tokio::task::spawn_blocking(move || {
            let sha256 = hasher.join()?;
            let (staging, bytes) = writer.join()?;
            Ok(Written {
                staging,
                sha256,
                bytes,
            })
        })
        .await
        .map_err(io::Error::other)?
    }
}
