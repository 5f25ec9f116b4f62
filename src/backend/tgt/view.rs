//! The verified images as tgtd sees them: a read-only bind mount of the image store.
//!
//! tgt cannot create a LUN read-only: `--op new` makes it writable and only `--op update`
//! sets `readonly=1`, so for a moment after every LUN is added (and for good, if that update
//! fails or discus dies in between) an initiator already admitted to the target could write —
//! and tgtd, as root, would write into the one verified copy every target on the node serves.
//! Through a read-only mount it cannot: tgt opens the file, gets EROFS, opens it read-only and
//! marks the LUN read-only itself.

use std::path::{Path, PathBuf};

use rustix::fs::StatVfsMountFlags;
use rustix::mount::MountFlags;

use crate::backend::BackendError;

#[derive(Clone, Debug)]
pub struct ReadOnlyView {
    /// The store's images.
    pub images: PathBuf,
    /// The same files, read-only: what tgtd is given.
    pub view: PathBuf,
}

impl ReadOnlyView {
    /// Makes sure `view` is a read-only bind mount of `images` (it stays mounted: tgtd keeps
    /// using it after discus stops).
    pub fn ensure(&self) -> Result<(), BackendError> {
        let failed = |what: &str, error: std::io::Error| {
            BackendError::Unreachable(format!(
                "cannot mount {} read-only on {} for tgtd ({what}: {error}); discus needs CAP_SYS_ADMIN, as \
                 root or a privileged container has",
                self.images.display(),
                self.view.display()
            ))
        };
        for dir in [&self.images, &self.view] {
            std::fs::create_dir_all(dir).map_err(|e| failed("mkdir", e))?;
        }
        if self.mounted().map_err(|e| failed("stat", e))? {
            return Ok(());
        }
        rustix::mount::mount_bind(&self.images, &self.view)
            .map_err(|e| failed("bind", e.into()))?;
        rustix::mount::mount_remount(&self.view, MountFlags::BIND | MountFlags::RDONLY, "")
            .map_err(|e| failed("remount read-only", e.into()))?;
        if self.mounted().map_err(|e| failed("stat", e))? {
            Ok(())
        } else {
            Err(failed(
                "check",
                std::io::Error::other("the mount is not a read-only view of the images"),
            ))
        }
    }

    /// Whether `view` is already a read-only mount of the same folder.
    fn mounted(&self) -> std::io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let (images, view) = (
            std::fs::metadata(&self.images)?,
            std::fs::metadata(&self.view)?,
        );
        let read_only = rustix::fs::statvfs(&self.view)
            .map_err(std::io::Error::from)?
            .f_flag
            .contains(StatVfsMountFlags::RDONLY);
        Ok(read_only && images.dev() == view.dev() && images.ino() == view.ino())
    }

    /// Where tgtd finds `path`, when it is one of the store's images.
    pub fn of(&self, path: &Path) -> Option<PathBuf> {
        let name = path.strip_prefix(&self.images).ok()?;
        (name.components().count() == 1).then(|| self.view.join(name))
    }

    /// The store's image tgtd reads at `seen`, when it reads one through the view.
    pub fn back(&self, seen: &Path) -> Option<PathBuf> {
        let name = seen.strip_prefix(&self.view).ok()?;
        (name.components().count() == 1).then(|| self.images.join(name))
    }
}
