//! The `file` source: a path on the storage node, allowed only under the configured roots.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::fetch::ensure_space;
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
    #[error("{} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
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

/// Copies the file into the sink, which hashes it on the way: one pass over the source.
pub async fn copy(
    path: &Path,
    roots: &[PathBuf],
    limit: u64,
    sink: &Sink,
    progress: &mut ProgressReporter,
) -> Result<u64, FileSourceError> {
    let real = resolve(path, roots)?;
    let mut file = tokio::fs::File::open(&real).await.map_err(io_at(&real))?;
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
    let metadata = file.metadata().await.map_err(io_at(&real))?;
    if !metadata.is_file() {
        return Err(FileSourceError::NotAFile { path: real });
    }
    let size = metadata.len();
    if size > limit {
        return Err(FileSourceError::TooLarge {
            path: real,
            size,
            limit,
        });
    }
    ensure_space(sink.dir(), size)?;
    let mut done = 0u64;
    progress.update(Phase::Downloading, 0, Some(size));
    loop {
        let mut buffer = BytesMut::with_capacity(1 << 20);
        let n = file.read_buf(&mut buffer).await.map_err(io_at(&real))?;
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
