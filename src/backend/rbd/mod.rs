//! The Ceph RBD backend: a device's storage is an RBD image, reached through librbd.
//!
//! I/O goes through librbd's asynchronous calls straight into the VDUSE bounce pages
//! ([`queue::RbdQueue`]). librbd's cache is off: the kernel above the device already caches,
//! and an acknowledged write must be on the OSDs, not in a process that can be killed.
//!
//! The device server holds the image's exclusive lock for as long as it serves it, so two
//! nodes never write one image. A server that takes over from a killed predecessor on the
//! same node breaks the predecessor's lock first ([`RbdBackend::open`]); breaking blocklists
//! the dead client, so none of its writes still in flight can land after the successor
//! re-runs them.

#[cfg(feature = "rbd")]
mod queue;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(feature = "rbd")]
pub use queue::RbdQueue;

use super::{Backend, QueueIo};
use crate::backend::ceph::{Error, Image, Pool, Result};

/// An RBD image as a device's storage. Holds the image's exclusive lock while it lives.
pub struct RbdBackend {
    image: Arc<Image>,
    capacity: AtomicU64,
    /// Our client's address as the lock records it.
    owner: String,
}

impl RbdBackend {
    /// Opens `name` in `pool` and takes its exclusive lock. If `predecessor` (the lock owner a
    /// previous server of this node recorded) still holds the lock, that server is dead (we
    /// are its successor, on the same node): its lock is broken and it is blocklisted first.
    ///
    /// The connection is shared by the node's volumes, so a lock held under our own address
    /// is never broken (that would blocklist every volume of the connection): it is an earlier
    /// handle of this process still closing, and the open fails `EBUSY` to be retried.
    pub fn open(pool: &Arc<Pool>, name: &str, predecessor: Option<&str>) -> Result<Self> {
        let image = pool.open(name)?;
        let own = pool.cluster().address()?;
        let ours =
            |owner: &str| !owner.is_empty() && own.contains(owner.trim_start_matches("v1:").trim_start_matches("v2:"));
        if let Some(previous) = predecessor.filter(|p| !ours(p)) {
            if image.lock_owners()?.iter().any(|o| o == previous) {
                tracing::warn!(image = name, previous, "breaking the lock of this node's previous server");
                image.break_lock(previous)?;
            }
        }
        if let Err(e) = image.lock_exclusive() {
            return match e.errno() {
                // librbd's answers when a live owner refuses to hand the lock over.
                Some(libc::EROFS | libc::EBUSY | libc::EAGAIN) => {
                    let owners = image.lock_owners().unwrap_or_default();
                    if owners.iter().any(|o| ours(o)) {
                        let source = io::Error::from_raw_os_error(libc::EBUSY);
                        return Err(Error::Call {
                            op: "rbd_lock_acquire: an earlier handle of this process holds the lock",
                            source,
                        });
                    }
                    Err(Error::Locked { image: name.to_owned(), owners: owners.join(", ") })
                }
                _ => Err(e),
            };
        }
        let owner = image.lock_owners()?.into_iter().next().unwrap_or_default();
        let capacity = image.size()?;
        tracing::info!(image = name, owner, capacity, "RBD image opened, exclusive lock held");
        Ok(Self { image: Arc::new(image), capacity: AtomicU64::new(capacity), owner })
    }

    /// Our client's address as the image's lock records it: what a successor must break.
    pub fn lock_owner(&self) -> &str {
        &self.owner
    }

    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }
}

fn backend_err(op: &'static str, e: Error) -> super::Error {
    let errno = e.errno().unwrap_or(libc::EIO);
    tracing::debug!(error = %e, "{op}");
    super::Error::Io { op, source: io::Error::from_raw_os_error(errno) }
}

impl Backend for RbdBackend {
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        false
    }

    #[cfg(feature = "rbd")]
    fn open_queue(&self, depth: u16) -> super::Result<Box<dyn QueueIo>> {
        let queue = RbdQueue::new(Arc::clone(&self.image), depth)
            .map_err(|source| super::Error::Io { op: "eventfd for librbd completions", source })?;
        Ok(Box::new(queue))
    }

    /// Never reached: without librbd no image opens, so no `RbdBackend` exists.
    #[cfg(not(feature = "rbd"))]
    fn open_queue(&self, _depth: u16) -> super::Result<Box<dyn QueueIo>> {
        Err(backend_err("open an RBD queue", Error::NotBuilt))
    }

    fn flush(&self) -> super::Result<()> {
        self.image.flush().map_err(|e| backend_err("flush the RBD image", e))
    }

    /// Grows the image to `bytes` unless it is that large already (the controller usually
    /// resized it), then serves its real size.
    fn grow(&self, bytes: u64) -> super::Result<()> {
        let current = self.image.size().map_err(|e| backend_err("size of the RBD image", e))?;
        if current < bytes {
            self.image.resize(bytes).map_err(|e| backend_err("resize the RBD image", e))?;
        }
        let size = self.image.size().map_err(|e| backend_err("size of the RBD image", e))?;
        self.capacity.fetch_max(size, Ordering::AcqRel);
        Ok(())
    }
}
