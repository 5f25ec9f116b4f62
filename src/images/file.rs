//! The `file` source: a path on the storage node, allowed only under the configured roots.
//!
//! What is read is judged after it is opened, never before (a path can change in between): the
//! opened file's real path must lie under a root, and it must be a regular file. The open itself
//! must not block, or a FIFO or a device under a root would hold the import forever; and the copy
//! keeps the same minimum average rate as a download.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::fetch::ensure_space;
use super::pace::{Pace, TooSlow};
use super::progress::{Phase, ProgressReporter};
use super::sink::Sink;

#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("file sources are not allowed on this node (no file roots are configured)")]
    NoRoots,
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is outside the allowed file roots ({roots})", path.display())]
    OutsideRoots { path: PathBuf, roots: String },
    #[error("{} is not a regular file (it is {kind}); file sources are image files", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("{}: {source}", path.display())]
    TooSlow {
        path: PathBuf,
        #[source]
        source: TooSlow,
    },
    #[error("{}: the file is {size} bytes, more than the limit of {limit} bytes", path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error(transparent)]
    Space(#[from] super::fetch::FetchError),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> FileSourceError + '_ {
    move |source| FileSourceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The real path of `path` if it lies under one of `roots` once every symlink is resolved.
pub fn resolve(path: &Path, roots: &[PathBuf]) -> Result<PathBuf, FileSourceError> {
    if roots.is_empty() {
        return Err(FileSourceError::NoRoots);
    }
    let real = std::fs::canonicalize(path).map_err(io_at(path))?;
    let inside = roots
        .iter()
        .any(|root| std::fs::canonicalize(root).is_ok_and(|root| real.starts_with(&root)));
    if !inside {
        return Err(FileSourceError::OutsideRoots {
            path: path.to_owned(),
            roots: roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(real)
}

/// What a file type is called in errors.
fn kind(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// Opens `real` without blocking (a FIFO would wait for a writer), then refuses anything but a
/// regular file, judged on what was opened.
fn open_regular(real: &Path) -> Result<(std::fs::File, u64), FileSourceError> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::open(real, flags, Mode::empty())
        .map_err(std::io::Error::from)
        .map_err(io_at(real))?;
    let file = std::fs::File::from(fd);
    let metadata = file.metadata().map_err(io_at(real))?;
    if !metadata.is_file() {
        return Err(FileSourceError::NotAFile {
            path: real.to_owned(),
            kind: kind(metadata.file_type()),
        });
    }
    rustix::fs::fcntl_setfl(&file, OFlags::empty())
        .map_err(std::io::Error::from)
        .map_err(io_at(real))?;
    Ok((file, metadata.len()))
}

/// Copies the file into the sink, which hashes it on the way: one pass over the source.
pub async fn copy(
    path: &Path,
    roots: &[PathBuf],
    limit: u64,
    pace: Pace,
    sink: &Sink,
    progress: &mut ProgressReporter,
) -> Result<u64, FileSourceError> {
    let real = resolve(path, roots)?;
    let opening = real.clone();
    // Even an open can hang (a stuck network file system): the deadline holds from the start.
    let opened = tokio::time::timeout_at(
        pace.deadline(0),
        tokio::task::spawn_blocking(move || open_regular(&opening)),
    )
    .await
    .map_err(|_| FileSourceError::TooSlow {
        path: real.clone(),
        source: pace.too_slow(0),
    })?;
    let (file, size) = opened.map_err(|e| FileSourceError::Io {
        path: real.clone(),
        source: std::io::Error::other(e),
    })??;
    // Check what was opened, not what the path named a moment ago.
    let opened = tokio::fs::canonicalize(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&file)
    ))
    .await
    .unwrap_or_else(|_| real.clone());
    if opened != real {
        resolve(&opened, roots)?;
    }
    if size > limit {
        return Err(FileSourceError::TooLarge {
            path: real,
            size,
            limit,
        });
    }
    ensure_space(sink.dir(), size)?;
    let mut file = tokio::fs::File::from_std(file);
    let mut done = 0u64;
    progress.update(Phase::Downloading, 0, Some(size));
    loop {
        let mut buffer = BytesMut::with_capacity(1 << 20);
        let read = tokio::time::timeout_at(pace.deadline(done), file.read_buf(&mut buffer))
            .await
            .map_err(|_| FileSourceError::TooSlow {
                path: real.clone(),
                source: pace.too_slow(done),
            })?;
        let n = read.map_err(io_at(&real))?;
        if n == 0 {
            break;
        }
        done += n as u64;
        if done > limit {
            return Err(FileSourceError::TooLarge {
                path: real,
                size: done,
                limit,
            });
        }
        sink.write(buffer.freeze()).await.map_err(io_at(&real))?;
        progress.update(Phase::Downloading, done, Some(size));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_under_the_roots_after_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("images");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::write(root.join("a.iso"), b"iso").expect("write");
        std::fs::write(dir.path().join("secret"), b"no").expect("write");
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape.iso"))
            .expect("symlink");
        let roots = vec![root.clone()];

        assert!(resolve(&root.join("a.iso"), &roots).is_ok());
        assert!(matches!(
            resolve(&root.join("escape.iso"), &roots),
            Err(FileSourceError::OutsideRoots { .. })
        ));
        assert!(matches!(
            resolve(&root.join("../secret"), &roots),
            Err(FileSourceError::OutsideRoots { .. })
        ));
        assert!(matches!(
            resolve(&root.join("a.iso"), &[]),
            Err(FileSourceError::NoRoots)
        ));
        assert!(matches!(
            resolve(&root.join("missing.iso"), &roots),
            Err(FileSourceError::Io { .. })
        ));
    }
}
