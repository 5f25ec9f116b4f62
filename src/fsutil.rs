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
