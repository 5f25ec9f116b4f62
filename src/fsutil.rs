//! Writing files so that a reader sees the old content or the new, never half of either.

use std::io::Write;
use std::path::Path;

/// Writes `content` to a temporary file beside `path`, syncs it, renames it over `path`, and
/// syncs the directory.
pub fn write_atomic(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    file.write_all(content)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}
