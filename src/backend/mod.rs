//! Where the bytes live: the backend contract, a sparse raw image file, and an in-memory
//! backend for tests.
//!
//! A backend knows nothing about virtio. A queue worker submits [`IoOp`]s whose buffers are
//! addresses in the worker's memory ([`SliceSource`]) and reaps them as they finish; the
//! backend moves bytes between those buffers and its storage without an intermediate copy.

pub mod ceph;
pub mod file;
pub mod freeze_ioctl;
pub mod image_lock;
mod instant;
pub mod memory;
pub mod null;
pub mod rbd;
mod uring;

use std::io;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress, VolatileSlice,
};

pub use file::{CacheMode, FileBackend};
pub use memory::MemoryBackend;
pub use null::NullBackend;

/// Sector size of the block device model; capacities are multiples of it.
pub const SECTOR_SIZE: u64 = 512;

/// Errors of the backend layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image does not exist and no size was given to create it.
    #[error("image {0} does not exist; pass --size to create it")]
    Missing(PathBuf),
    /// Opening or creating the image failed.
    #[error("cannot open image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// The size is not usable for a block device.
    #[error("invalid image size {size} bytes: it must be a non-zero multiple of {SECTOR_SIZE}")]
    InvalidSize { size: u64 },
    /// Shrinking would lose data.
    #[error("cannot shrink image from {current} to {requested} bytes")]
    Shrink { current: u64, requested: u64 },
    /// Another server's I/O on the image has not ended.
    #[error("image {0} is still in use by another server (its I/O has not ended); try again")]
    Locked(PathBuf),
    /// Any other I/O failure.
    #[error("{op}: {source}")]
    Io { op: &'static str, source: io::Error },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A buffer of an I/O operation: `len` bytes at `addr` in the worker's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoBuf {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A run of buffers in the batch's buffer table: `bufs[start..end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufRange {
    pub start: usize,
    pub end: usize,
}

/// One operation. Buffers are named by index into a table the worker passes along, so that
/// parsing can append to one reused table without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Fill the buffers, in order, from the image starting at byte `offset`.
    Read { offset: u64, bufs: BufRange },
    /// Write the buffers, in order, to the image starting at byte `offset`.
    Write { offset: u64, bufs: BufRange },
    /// Make every completed write durable.
    Flush,
    /// Deallocate a byte range; it reads back as zeroes.
    Discard { offset: u64, len: u64 },
    /// Zero a byte range, keeping it allocated where the filesystem can.
    WriteZeroes { offset: u64, len: u64 },
}

/// Resolves buffer addresses to memory. Implemented for every vm-memory address space whose
/// regions are mmaps, which covers both the VDUSE IOVA space and test memory.
pub trait SliceSource {
    /// The `len` bytes at `addr`, if they lie entirely inside one region.
    fn slice(&self, addr: GuestAddress, len: usize) -> Option<VolatileSlice<'_, ()>>;

    /// Whether the kernel can pin these bytes for `O_DIRECT`. Not the kernel's own VDUSE
    /// bounce pages, whose mapping is `VM_IO`; our registered bounce pages are plain memory
    /// (docs/PERFORMANCE.md, "O_DIRECT into the bounce pages, and our own bounce pages").
    fn pinnable(&self) -> bool {
        false
    }
}

impl<M: GuestMemoryBackend<R = GuestRegionMmap<()>>> SliceSource for M {
    fn slice(&self, addr: GuestAddress, len: usize) -> Option<VolatileSlice<'_, ()>> {
        region_slice(self.find_region(addr)?, addr, len)
    }
}

/// The `len` bytes at `addr` if they lie entirely inside `region` (overflow-safe).
pub fn region_slice(region: &GuestRegionMmap<()>, addr: GuestAddress, len: usize) -> Option<VolatileSlice<'_, ()>> {
    let offset = addr.0.checked_sub(region.start_addr().0)?;
    region.get_slice(MemoryRegionAddress(offset), len).ok()
}

/// A finished operation: the tag it was submitted under and how it ended.
#[derive(Debug)]
pub struct Completion {
    pub tag: u16,
    pub result: io::Result<()>,
}

/// The I/O engine of one queue worker, shaped like cloud-hypervisor's `AsyncIo`: operations
/// are submitted under a tag, a notifier fd becomes readable when some have finished, and the
/// worker reaps whatever has finished, in any order. Not shared between queues, so it needs
/// no lock.
///
/// The buffers of a submitted operation must stay mapped until its completion is reaped: the
/// engine keeps raw pointers into them. Workers therefore reap every operation before they
/// unmap anything ([`QueueIo::in_flight`] reaches zero).
pub trait QueueIo: Send {
    /// Operations that may be in flight at once; tags must be below this.
    fn capacity(&self) -> usize;

    /// Queues `op` under `tag`, which no operation in flight may carry. An operation that
    /// cannot start (a buffer outside `mem`, a tag out of range) still completes, with an
    /// error, at the next reap.
    fn submit(&mut self, mem: &dyn SliceSource, bufs: &[IoBuf], op: IoOp, tag: u16);

    /// Hands every queued operation to the kernel without waiting for any.
    fn commit(&mut self);

    /// Moves the operations that have finished into `out`, without blocking.
    fn reap(&mut self, out: &mut Vec<Completion>);

    /// Submitted operations not reaped yet.
    fn in_flight(&self) -> usize;

    /// Whether a reap would find something (cheap enough to poll).
    fn has_completions(&mut self) -> bool;

    /// Blocks until at least one operation can be reaped (or none is in flight).
    fn wait(&mut self);

    /// An eventfd signalled whenever completions are posted (watch it edge-triggered: it is
    /// never reset); `None` for an engine whose operations finish inside `submit`.
    fn notifier(&self) -> Option<BorrowedFd<'_>>;

    /// Why the engine cannot run I/O any more, once it cannot; the queue using it must stop.
    /// Operations still counted in flight then may still be running in the kernel (their
    /// memory must stay mapped), or be kept back for the next server to run again.
    fn fault(&self) -> Option<String> {
        None
    }
}

/// A block device's storage.
pub trait Backend: Send + Sync {
    /// Size in bytes, a multiple of [`SECTOR_SIZE`].
    fn capacity(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// An I/O engine for one queue worker, with room for `depth` operations in flight.
    fn open_queue(&self, depth: u16) -> Result<Box<dyn QueueIo>>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Grows the storage to `bytes` (never shrinks).
    fn grow(&self, bytes: u64) -> Result<()>;
}

/// The buffers of `range`, or an error if the range is not inside the table.
pub fn buffers(bufs: &[IoBuf], range: BufRange) -> io::Result<&[IoBuf]> {
    bufs.get(range.start..range.end).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn slices_never_cross_regions() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .expect("test memory");
        assert!(mem.slice(GuestAddress(0xff0), 0x10).is_some());
        assert!(mem.slice(GuestAddress(0xff0), 0x11).is_none(), "spans two regions");
        assert!(mem.slice(GuestAddress(0x1ff0), 0x11).is_none(), "past the end");
        assert!(mem.slice(GuestAddress(u64::MAX), 2).is_none());
    }
}
