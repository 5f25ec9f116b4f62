//! Uploads: bytes a client pushes to this node, instead of the node fetching them.
//!
//! An import whose source is an upload waits here for its bytes (phase `Uploading`), for as
//! long as its DiscImage asks for it. The upload endpoint — after checking the client's token —
//! appends what the client sends at the offset the node holds, through the same sink as a
//! download: each byte hashed once as it arrives and written to `uploads/<uid>.part`, a file that
//! survives a restart, so that an upload resumes from what the node holds (whose bytes are hashed
//! once more at the start). When the declared length is reached, the digest is compared with the
//! one the DiscImage names. Bytes that match move on through the import (inspect, convert,
//! store) from that same file, which goes only once the image is stored: a node that restarts
//! in between finds every byte again (what it holds hashes to the digest) and stores them
//! without the client. Bytes that do not match are dropped, the client is told, and the image
//! awaits a new upload. Nothing here is ever served.
//!
//! An append starts only at the offset the node holds (or at zero, to start again), never goes
//! past the declared length, never starts when the disk cannot hold the rest, and ends when the
//! client sends nothing for a while. One request per upload at a time, and a bounded number of
//! uploads receiving at once.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::{self, Seek};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, oneshot, watch};

use super::fetch::{self, FetchError};
use super::pace::Pace;
use super::sink::{Sink, Written};
use super::store::{Staging, Store, StoreError};
use super::{Phase, ProgressReporter};

/// How much a node receives at once, and how long it waits for a silent client.
#[derive(Clone, Copy, Debug)]
pub struct UploadOptions {
    /// Uploads receiving bytes at the same time; more are refused until one ends.
    pub concurrent: usize,
    /// A request that brings no byte for this long ends; what it brought is kept.
    pub idle_timeout: Duration,
    /// A request must keep this average rate (bytes per second) after a grace of
    /// `idle_timeout`, so that a client sending a trickle does not hold a place for hours.
    pub min_rate: u64,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self {
            concurrent: 4,
            idle_timeout: Duration::from_secs(60),
            min_rate: 64 << 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0:?} is not a Kubernetes uid")]
    Uid(String),
    #[error("this node does not await an upload for that DiscImage")]
    NotAwaited,
    #[error("the DiscImage now names another digest; ask for a new token")]
    OtherDigest,
    #[error("another request is uploading to this image; wait for it to end")]
    InProgress,
    #[error("{0} uploads are receiving on this node; try again shortly")]
    Busy(usize),
    #[error("the node holds {held} bytes of this upload; continue from there (or from 0)")]
    Offset { held: u64 },
    #[error("an upload of {length} bytes is in progress; start again from 0 to change its length")]
    Length { length: u64 },
    #[error("the upload declares {length} bytes, more than the image may have ({limit} bytes)")]
    TooLarge { length: u64, limit: u64 },
    #[error("the request brings more bytes than the upload declares ({length} bytes)")]
    TooLong { length: u64 },
    #[error(transparent)]
    Space(#[from] FetchError),
    #[error("no byte for {} s; the node holds {held} bytes, continue from there", idle.as_secs())]
    Idle { idle: Duration, held: u64 },
    #[error(
        "the request brought {brought} bytes in {} s, slower than the {min_rate} bytes/s on \
         average a node asks for; the node holds {held} bytes, continue from there",
        elapsed.as_secs()
    )]
    TooSlow {
        brought: u64,
        elapsed: Duration,
        min_rate: u64,
        held: u64,
    },
    #[error("the request ended after {held} bytes ({why}); continue from there")]
    Interrupted { held: u64, why: String },
    #[error(
        "the uploaded bytes' SHA-256 is {actual}, but the DiscImage's spec.sha256 is {expected}; \
         they were dropped, and the image awaits a new upload"
    )]
    DigestMismatch { expected: String, actual: String },
    #[error("the node stopped waiting for this upload; try again")]
    Abandoned,
    #[error("upload store: {0}")]
    Store(#[from] StoreError),
    #[error("upload store: {0}")]
    Io(#[from] io::Error),
}

/// Where an upload stands, as the endpoint tells a client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub bytes: u64,
    /// The length the upload declared, once a request declared it.
    pub length: Option<u64>,
}

/// What an append achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// More bytes are needed.
    Partial(Held),
    /// Every byte arrived and their digest is the DiscImage's: the import goes on.
    Verified,
}

/// The uploads this node awaits, by DiscImage uid.
pub struct Uploads {
    store: Store,
    options: UploadOptions,
    awaited: Mutex<BTreeMap<String, Arc<Awaited>>>,
    receiving: Arc<Semaphore>,
    /// Complete uploads this process hashed and found matching, by uid: an import tried again
    /// after a failure takes the same file as it is, not hashed once more.
    verified: Mutex<BTreeMap<String, Verified>>,
}

/// A file whose digest this process checked, as it was then.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Verified {
    stamp: FileStamp,
    sha256: String,
}

/// Which file, and whether it changed: inode, length, modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    device: u64,
    inode: u64,
    length: u64,
    modified_ns: i128,
}

impl FileStamp {
    fn of(file: &std::fs::File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        Ok(Self {
            device: meta.dev(),
            inode: meta.ino(),
            length: meta.len(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }
}

/// One awaited upload: what it must hash to, and what it received.
struct Awaited {
    sha256: String,
    limit: u64,
    receiving: tokio::sync::Mutex<Receiving>,
    held: watch::Sender<Held>,
    /// Set when the import stops awaiting (its DiscImage is gone): a request in flight ends.
    ended_flag: std::sync::atomic::AtomicBool,
    ended: tokio::sync::Notify,
}

impl Awaited {
    fn is_ended(&self) -> bool {
        self.ended_flag.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn end(&self) {
        self.ended_flag
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.ended.notify_waiters();
    }
}

struct Receiving {
    /// Taken when the last byte arrived, until the job judged it.
    sink: Option<Sink>,
    held: Held,
    /// To the job: every byte arrived.
    complete: Option<oneshot::Sender<Complete>>,
}

/// The bytes of a complete upload, and where to say what the job found.
struct Complete {
    sink: Sink,
    verdict: oneshot::Sender<Result<(), UploadError>>,
}

/// Whether `uid` is one Kubernetes made: it names a file.
pub fn check_uid(uid: &str) -> Result<(), UploadError> {
    let fine = !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-');
    fine.then_some(())
        .ok_or_else(|| UploadError::Uid(uid.chars().take(80).collect()))
}

impl Uploads {
    pub fn new(store: Store, options: UploadOptions) -> Self {
        Self {
            store,
            options,
            awaited: Mutex::default(),
            receiving: Arc::new(Semaphore::new(options.concurrent)),
            verified: Mutex::default(),
        }
    }

    /// Where the upload for `uid` stands, if this node awaits one.
    pub fn held(&self, uid: &str, sha256: &str) -> Result<Held, UploadError> {
        let awaited = self.awaited(uid, sha256)?;
        let held = *awaited.held.borrow();
        Ok(held)
    }

    fn awaited(&self, uid: &str, sha256: &str) -> Result<Arc<Awaited>, UploadError> {
        let awaited = self
            .awaited
            .lock()
            .get(uid)
            .cloned()
            .ok_or(UploadError::NotAwaited)?;
        if awaited.sha256 != sha256 {
            return Err(UploadError::OtherDigest);
        }
        Ok(awaited)
    }

    /// Awaits the upload for the DiscImage `uid` until bytes with `sha256`, at most `limit` of
    /// them, arrived, and returns them in their file in `uploads/`, which stays when dropped
    /// (until the image is stored: [`Staging::discard`]). Bytes that do not match are dropped and
    /// the wait goes on. Ends only with the bytes, an error of the store, or when dropped.
    pub async fn receive(
        &self,
        uid: &str,
        sha256: &str,
        limit: u64,
        progress: &mut ProgressReporter,
    ) -> Result<Written, UploadError> {
        check_uid(uid)?;
        let staging = self.store.upload_file(uid)?;
        let staging = match self.verified_before(uid, sha256, staging) {
            Ok(written) => return Ok(written),
            Err(staging) => staging,
        };
        let resumed = resume(staging, limit).await?;
        if resumed.held > 0 && resumed.sha256 == sha256 {
            // Every byte arrived before a restart, which came before they were stored.
            progress.update(Phase::Verifying, resumed.held, Some(resumed.held));
            let written = resumed.sink.finish().await?;
            tracing::info!(
                uid,
                sha256,
                bytes = written.bytes,
                "the upload the node holds is complete and its digest matches"
            );
            self.remember(uid, &written);
            return Ok(written);
        }
        let (sink, held) = (resumed.sink, resumed.held);
        if held > 0 {
            tracing::info!(
                uid,
                bytes = held,
                "resuming an upload from what the node holds"
            );
        }
        let held = Held {
            bytes: held,
            length: None,
        };
        let (complete_tx, mut complete_rx) = oneshot::channel();
        let awaited = Arc::new(Awaited {
            sha256: sha256.to_owned(),
            limit,
            receiving: tokio::sync::Mutex::new(Receiving {
                sink: Some(sink),
                held,
                complete: Some(complete_tx),
            }),
            held: watch::Sender::new(held),
            ended_flag: Default::default(),
            ended: Default::default(),
        });
        self.awaited
            .lock()
            .insert(uid.to_owned(), Arc::clone(&awaited));
        let _listed = Listed {
            uploads: self,
            uid,
            awaited: &awaited,
        };
        loop {
            let complete = wait_for_bytes(&awaited, complete_rx, progress).await?;
            let written = complete.sink.finish().await?;
            progress.update(Phase::Verifying, written.bytes, Some(written.bytes));
            if written.sha256 == sha256 {
                tracing::info!(
                    uid,
                    sha256,
                    bytes = written.bytes,
                    "received an upload whose digest matches"
                );
                let _ = complete.verdict.send(Ok(()));
                self.remember(uid, &written);
                return Ok(written);
            }
            tracing::warn!(uid, expected = sha256, actual = %written.sha256, "dropped an upload whose digest does not match");
            let mismatch = UploadError::DigestMismatch {
                expected: sha256.to_owned(),
                actual: written.sha256,
            };
            let (complete_tx, next_rx) = oneshot::channel();
            complete_rx = next_rx;
            {
                let mut receiving = awaited.receiving.lock().await;
                *receiving = Receiving {
                    sink: Some(start_over(written.staging)?),
                    held: Held::default(),
                    complete: Some(complete_tx),
                };
                awaited.held.send_replace(receiving.held);
            }
            // Told once the upload can start over, so that a client starting at once finds it so.
            let _ = complete.verdict.send(Err(mismatch));
        }
    }

    /// The upload's file as it is, if this process found it complete and matching before (an
    /// import tried again after a failure); the file back otherwise.
    fn verified_before(
        &self,
        uid: &str,
        sha256: &str,
        staging: Staging,
    ) -> Result<Written, Staging> {
        let known = self.verified.lock().get(uid).cloned();
        let now = FileStamp::of(staging.file()).ok();
        match known {
            Some(known) if Some(known.stamp) == now && known.sha256 == sha256 => {
                tracing::info!(
                    uid,
                    sha256,
                    "taking the upload this process verified before"
                );
                Ok(Written {
                    staging,
                    sha256: known.sha256,
                    bytes: known.stamp.length,
                })
            }
            _ => {
                self.verified.lock().remove(uid);
                Err(staging)
            }
        }
    }

    fn remember(&self, uid: &str, written: &Written) {
        if let Ok(stamp) = FileStamp::of(written.staging.file()) {
            let verified = Verified {
                stamp,
                sha256: written.sha256.clone(),
            };
            self.verified.lock().insert(uid.to_owned(), verified);
        }
    }

    /// Appends a client's bytes to the upload for `uid` at `offset`, declaring its whole
    /// `length` (and, when the request says so, the bytes it brings). Returns when the body
    /// ended, and — once it was the last byte — when their digest was judged.
    pub async fn append<S, E>(
        &self,
        uid: &str,
        sha256: &str,
        offset: u64,
        length: u64,
        announced: Option<u64>,
        body: S,
    ) -> Result<Appended, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: Display,
    {
        let awaited = self.awaited(uid, sha256)?;
        let _permit = Arc::clone(&self.receiving)
            .try_acquire_owned()
            .map_err(|_| UploadError::Busy(self.options.concurrent))?;
        let mut receiving = awaited
            .receiving
            .try_lock()
            .map_err(|_| UploadError::InProgress)?;
        let complete = (self.take(&awaited, &mut receiving, offset, length, announced, body)).await;
        match complete {
            Ok(false) => Ok(Appended::Partial(receiving.held)),
            Ok(true) => {
                let verdict = hand_over(&mut receiving)?;
                drop(receiving);
                verdict.await.map_err(|_| UploadError::Abandoned)??;
                Ok(Appended::Verified)
            }
            Err(error) => {
                if let UploadError::Io(_) = error {
                    // The file could not be written: this wait ends, and the next resumes from
                    // what the file holds.
                    receiving.sink = None;
                    receiving.complete = None;
                }
                Err(error)
            }
        }
    }

    /// Takes the body into the upload; whether the upload is complete.
    async fn take<S, E>(
        &self,
        awaited: &Awaited,
        receiving: &mut Receiving,
        offset: u64,
        length: u64,
        announced: Option<u64>,
        body: S,
    ) -> Result<bool, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: Display,
    {
        let sink = receiving.sink.as_ref().ok_or(UploadError::Abandoned)?;
        check_append(&receiving.held, awaited.limit, offset, length, announced)?;
        fetch::ensure_space(sink.dir(), length - offset)?;
        if offset == 0 && receiving.held.bytes > 0 {
            sink.reset().await?;
        }
        receiving.held = Held {
            bytes: offset,
            length: Some(length),
        };
        awaited.held.send_replace(receiving.held);
        let streamed = self.stream(awaited, receiving, length, body).await;
        let sink = receiving.sink.as_ref().ok_or(UploadError::Abandoned)?;
        if let Err(UploadError::TooLong { .. }) = &streamed {
            // Bytes past the declared length: nothing of this upload is kept.
            sink.reset().await?;
            receiving.held = Held::default();
            awaited.held.send_replace(receiving.held);
        }
        // What the node says it holds is in the file, even if the upload stops here.
        sink.settle().await?;
        streamed?;
        Ok(receiving.held.bytes == length)
    }

    /// Streams the body into the sink, counting what the node holds.
    async fn stream<S, E>(
        &self,
        awaited: &Awaited,
        receiving: &mut Receiving,
        length: u64,
        mut body: S,
    ) -> Result<(), UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: Display,
    {
        let idle = self.options.idle_timeout;
        let pace = Pace::start(idle, self.options.min_rate);
        let start = receiving.held.bytes;
        let ended = awaited.ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        loop {
            if awaited.is_ended() {
                return Err(UploadError::NotAwaited);
            }
            let held = receiving.held.bytes;
            let brought = held - start;
            let wait = (tokio::time::Instant::now() + idle).min(pace.deadline(brought));
            let next = tokio::select! {
                next = tokio::time::timeout_at(wait, body.next()) => next,
                () = &mut ended => return Err(UploadError::NotAwaited),
            };
            let next = next.map_err(|_| match pace.would_miss(brought, Duration::ZERO) {
                true => UploadError::TooSlow {
                    brought,
                    elapsed: pace.elapsed(),
                    min_rate: pace.min_rate(),
                    held,
                },
                false => UploadError::Idle { idle, held },
            })?;
            let chunk = match next {
                None => return Ok(()),
                Some(Ok(chunk)) => chunk,
                Some(Err(why)) => {
                    return Err(UploadError::Interrupted {
                        held,
                        why: why.to_string(),
                    });
                }
            };
            if held + chunk.len() as u64 > length {
                return Err(UploadError::TooLong { length });
            }
            let sink = receiving.sink.as_ref().ok_or(UploadError::Abandoned)?;
            let size = chunk.len() as u64;
            sink.write(chunk).await?;
            receiving.held.bytes += size;
            awaited.held.send_replace(receiving.held);
        }
    }
}

/// Takes an upload out of the list when its import ends (done, failed or dropped), unless a
/// newer import of the same image replaced it.
struct Listed<'a> {
    uploads: &'a Uploads,
    uid: &'a str,
    awaited: &'a Arc<Awaited>,
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        self.awaited.end();
        let mut awaited = self.uploads.awaited.lock();
        if awaited
            .get(self.uid)
            .is_some_and(|a| Arc::ptr_eq(a, self.awaited))
        {
            awaited.remove(self.uid);
        }
    }
}

/// The rules of an append: where it starts, how long the upload is, what the request brings.
fn check_append(
    held: &Held,
    limit: u64,
    offset: u64,
    length: u64,
    announced: Option<u64>,
) -> Result<(), UploadError> {
    if length > limit {
        return Err(UploadError::TooLarge { length, limit });
    }
    if offset != 0 && offset != held.bytes {
        return Err(UploadError::Offset { held: held.bytes });
    }
    if let Some(declared) = held.length
        && offset != 0
        && declared != length
    {
        return Err(UploadError::Length { length: declared });
    }
    if offset > length || announced.is_some_and(|n| n > length - offset) {
        return Err(UploadError::TooLong { length });
    }
    Ok(())
}

/// Gives the complete bytes to the waiting import; the receiver gets its verdict.
fn hand_over(
    receiving: &mut Receiving,
) -> Result<oneshot::Receiver<Result<(), UploadError>>, UploadError> {
    let (sink, complete) = receiving
        .sink
        .take()
        .zip(receiving.complete.take())
        .ok_or(UploadError::Abandoned)?;
    let (verdict, told) = oneshot::channel();
    complete
        .send(Complete { sink, verdict })
        .map_err(|_| UploadError::Abandoned)?;
    Ok(told)
}

/// Reports progress until every byte arrived.
async fn wait_for_bytes(
    awaited: &Awaited,
    mut complete: oneshot::Receiver<Complete>,
    progress: &mut ProgressReporter,
) -> Result<Complete, UploadError> {
    let mut held = awaited.held.subscribe();
    loop {
        let now = *held.borrow_and_update();
        progress.update(Phase::Uploading, now.bytes, now.length);
        tokio::select! {
            done = &mut complete => {
                return done.map_err(|_| {
                    UploadError::Io(io::Error::other(
                        "the upload's file could not be written; it resumes from what the file \
                         holds",
                    ))
                });
            }
            _ = held.changed() => {}
        }
    }
}

/// An upload's file, opened to go on after what it holds.
struct Resumed {
    sink: Sink,
    held: u64,
    /// The digest of what it holds.
    sha256: String,
}

/// A sink that goes on after what the upload's file holds (hashed again first); a file longer
/// than any upload may be starts again.
async fn resume(mut staging: Staging, limit: u64) -> Result<Resumed, UploadError> {
    let (staging, hashed, held) = tokio::task::spawn_blocking(move || {
        let held = staging.file().metadata()?.len();
        if held > limit {
            staging.file_mut().set_len(0)?;
            staging.file_mut().rewind()?;
            return Ok::<_, io::Error>((staging, Sha256::new(), 0));
        }
        // Locked by this process: nobody writes it meanwhile. Read to its end, where appends go.
        staging.file_mut().rewind()?;
        let (hash, read) = super::hash_reader(staging.file())?;
        Ok((staging, hash, read))
    })
    .await
    .map_err(io::Error::other)??;
    let sha256 = hex::encode(hashed.clone().finalize());
    Ok(Resumed {
        sink: Sink::resume(staging, hashed, held)?,
        held,
        sha256,
    })
}

/// An empty upload file, for bytes that did not match.
fn start_over(mut staging: Staging) -> Result<Sink, UploadError> {
    staging.file_mut().set_len(0)?;
    staging.file_mut().rewind()?;
    Ok(Sink::start(staging)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(bytes: u64, length: Option<u64>) -> Held {
        Held { bytes, length }
    }

    #[test]
    fn appends_start_where_the_node_is_or_at_zero() {
        assert!(check_append(&held(10, Some(100)), 1000, 10, 100, Some(90)).is_ok());
        assert!(check_append(&held(10, Some(100)), 1000, 0, 200, None).is_ok());
        assert!(matches!(
            check_append(&held(10, Some(100)), 1000, 5, 100, None),
            Err(UploadError::Offset { held: 10 })
        ));
        assert!(matches!(
            check_append(&held(10, Some(100)), 1000, 10, 200, None),
            Err(UploadError::Length { length: 100 })
        ));
    }

    #[test]
    fn appends_never_pass_the_declared_length_or_the_limit() {
        assert!(matches!(
            check_append(&held(0, None), 1000, 0, 100, Some(101)),
            Err(UploadError::TooLong { length: 100 })
        ));
        assert!(matches!(
            check_append(&held(0, None), 1000, 0, 1001, None),
            Err(UploadError::TooLarge {
                length: 1001,
                limit: 1000
            })
        ));
    }

    #[test]
    fn only_kubernetes_uids_name_files() {
        assert!(check_uid("0b6a2c1e-57d4-4c7e-9a55-8f3d2b1c0e9a").is_ok());
        for bad in ["", "../x", "A", "x/y", &"a".repeat(65)] {
            assert!(check_uid(bad).is_err(), "{bad}");
        }
    }
}
