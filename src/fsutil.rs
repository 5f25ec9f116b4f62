//! Writing files so that a reader sees the old content or the new, never half of either.

use std::io::Write;
use std::path::Path;

/// Writes `content` to a temporary file beside `path`, syncs it, renames it over `path`, and
/// syncs the directory: after a crash, the old content or the new one, durably.
pub fn write_atomic(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file = replace(path, content, true)?;
    drop(file);
    std::fs::File::open(dir)?.sync_all()
}

/// Like `write_atomic`, without syncing: for what is derived and written again anyway (status),
/// where readers need never see half a file but a crash may lose the latest version.
pub fn write_replace(path: &Path, content: &[u8]) -> std::io::Result<()> {
    replace(path, content, false).map(drop)
}

fn replace(path: &Path, content: &[u8], sync: bool) -> std::io::Result<std::fs::File> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    file.write_all(content)?;
    if sync {
        file.as_file().sync_all()?;
    }
    file.persist(path).map_err(|e| e.error)
}

/// An exclusive claim for the life of the process on something only one discus may drive — a
/// data directory, the kernel's LIO, one tgtd — as a flocked file holding the holder's pid, so
/// that a second claimant can say who holds it.
#[derive(Debug)]
pub struct Claim {
    _file: std::fs::File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{what} is in use by another discus (pid {holder}): two would undo each other's targets. Stop \
         the other one{hint}"
    )]
    Held {
        what: String,
        holder: String,
        hint: &'static str,
    },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl Claim {
    /// Claims `path` (its folder is made if need be) for `what`, or says who holds it; `hint`
    /// ends the refusal.
    pub fn take(path: &Path, what: &str, hint: &'static str) -> Result<Self, LockError> {
        use std::io::{Read, Seek};
        let io = |source: std::io::Error| LockError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = open_lock_file(path).map_err(io)?;
        match lock_within(&file, CLAIM_PATIENCE) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(LockError::Held {
                    what: what.to_owned(),
                    holder: holder.trim().to_owned(),
                    hint,
                });
            }
            Err(errno) => return Err(io(errno.into())),
        }
        // The pid is only for the message above; a full disk must not stop discus here.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}", std::process::id()));
        Ok(Self { _file: file })
    }
}

/// How long a claim waits for its holder to let go. A discus killed and started again at once
/// (a supervisor's restart) may find its lock still held for a moment — by a child it was
/// starting, which holds the locked file until it executes its program — though no discus holds
/// it any more.
const CLAIM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Locks `file`, trying again until `patience` has passed while another holds it.
fn lock_within(file: &std::fs::File, patience: std::time::Duration) -> rustix::io::Result<()> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The lock file, for writing the holder's pid — or, on a file system that turned read-only (a
/// disk remounted after errors), for reading only: a lock needs no write access, and a node that
/// cannot write must still start and revoke what was revoked.
fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    let writable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path);
    match writable {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) => {
            tracing::warn!(path = %path.display(), "the file system is read-only; locking without writing");
            std::fs::File::open(path)
        }
        other => other,
    }
}
