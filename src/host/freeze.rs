//! Filesystem freeze and thaw with the kernel's own ioctls (`backend::freeze_ioctl`), so
//! that "not frozen" is told by its errno and never by reading a tool's (translated) message.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::{Error, Result};
use crate::backend::freeze_ioctl;

fn open_mount_point(mount_point: &Path) -> Result<File> {
    File::open(mount_point).map_err(|source| Error::Io { op: "open", path: mount_point.to_owned(), source })
}

/// Freezes the filesystem mounted at `mount_point`: its dirty data is written out and new
/// writes wait until it is thawed. EBUSY if it is frozen already.
pub fn freeze(mount_point: &Path) -> Result<()> {
    let dir = open_mount_point(mount_point)?;
    freeze_ioctl::freeze(&dir).map_err(|source| Error::Sys { op: "freeze", path: mount_point.to_owned(), source })
}

/// What a thaw found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thawed {
    /// It was frozen and runs again.
    WasFrozen,
    /// It was not frozen (the kernel's EINVAL): nothing to do.
    NotFrozen,
}

/// Thaws the filesystem mounted at `mount_point`.
pub fn thaw(mount_point: &Path) -> Result<Thawed> {
    let dir = open_mount_point(mount_point)?;
    match freeze_ioctl::thaw(&dir) {
        Ok(()) => Ok(Thawed::WasFrozen),
        Err(Errno::EINVAL) => Ok(Thawed::NotFrozen),
        Err(source) => Err(Error::Sys { op: "thaw", path: mount_point.to_owned(), source }),
    }
}

/// A frozen filesystem: thawed when dropped (and the failure logged), or by [`Freeze::thaw`].
#[derive(Debug)]
pub struct Freeze {
    mount_point: PathBuf,
    thawed: bool,
}

impl Freeze {
    pub fn new(mount_point: &Path) -> Result<Self> {
        freeze(mount_point)?;
        Ok(Self { mount_point: mount_point.to_owned(), thawed: false })
    }

    /// Thaws the filesystem and says whether that worked.
    pub fn thaw(mut self) -> Result<()> {
        self.thawed = true;
        thaw(&self.mount_point).map(drop)
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        if self.thawed {
            return;
        }
        if let Err(e) = thaw(&self.mount_point) {
            tracing::error!(path = %self.mount_point.display(), error = %e, "cannot thaw the filesystem");
        }
    }
}
