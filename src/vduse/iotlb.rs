//! IOVA → our address translation for one virtqueue worker.
//!
//! In the virtio_vdpa path every IOTLB range is backed by the same `[vduse-domain]` file with
//! file offset == IOVA (VDUSE.md §5): one RW bounce range `[0, bounce_size)` holds every
//! streaming mapping (headers, data, status bytes, indirect tables) and each vring lives in its
//! own coherent range above it. We map the bounce range once as a single contiguous region, so
//! translating a data descriptor is one comparison and one addition; vrings are mapped
//! separately when the queue starts. Nothing here issues an ioctl per request.

use std::fs::File;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::uapi::{VDUSE_ACCESS_RO, VDUSE_ACCESS_RW, VDUSE_ACCESS_WO};
use super::umem::{BounceLookup, BouncePages, UserBounce};
use super::{Error, Result, VduseDevice};

/// The IOVA ranges one queue worker has mapped. Dropping it unmaps everything.
#[derive(Debug, Default)]
pub struct IovaMemory {
    /// The bounce range, which always starts at IOVA 0.
    bounce: Option<GuestRegionMmap<()>>,
    /// Coherent ranges (vrings), sorted by start address, at most a handful.
    coherent: Vec<GuestRegionMmap<()>>,
    /// Where the bounce pages come from when they are ours instead of the kernel's.
    user_bounce: Option<Arc<UserBounce>>,
    /// Keeps our bounce pages mapped while `bounce` spans them.
    own_pages: Option<Arc<BouncePages>>,
}

impl IovaMemory {
    /// An empty address space; map ranges with [`Self::map_iova`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty address space whose bounce range will be our registered pages, if the kernel
    /// takes them (see [`UserBounce`]).
    pub fn with_user_bounce(user_bounce: Arc<UserBounce>) -> Self {
        Self { user_bounce: Some(user_bounce), ..Self::default() }
    }

    /// Maps the IOTLB range that contains `iova`, unless it is already mapped.
    pub fn map_iova(&mut self, dev: &VduseDevice, iova: u64) -> Result<()> {
        if self.find_region(GuestAddress(iova)).is_some() {
            return Ok(());
        }
        let (fd, entry) = dev.iotlb_fd(iova, iova)?;
        if entry.start > iova || entry.last < iova || entry.last < entry.start {
            return Err(Error::Map { iova, reason: format!("kernel returned range {entry:?}") });
        }
        let len = entry
            .last
            .checked_sub(entry.start)
            .and_then(|l| l.checked_add(1))
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| Error::Map { iova, reason: format!("range {entry:?} too large") })?;
        let prot = match entry.perm {
            VDUSE_ACCESS_RO => libc::PROT_READ,
            VDUSE_ACCESS_WO => libc::PROT_WRITE,
            VDUSE_ACCESS_RW => libc::PROT_READ | libc::PROT_WRITE,
            p => return Err(Error::Map { iova, reason: format!("unknown permission {p}") }),
        };
        let region = MmapRegionBuilder::<()>::new(len)
            .with_file_offset(FileOffset::new(File::from(fd), entry.offset))
            .with_mmap_prot(prot)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|e| Error::Map { iova, reason: e.to_string() })?;
        let region = GuestRegionMmap::new(region, GuestAddress(entry.start))
            .ok_or_else(|| Error::Map { iova, reason: "range wraps the address space".into() })?;
        if entry.start == 0 {
            self.bounce = Some(region);
        } else {
            let at = self.coherent.partition_point(|r| r.start_addr().0 < entry.start);
            self.coherent.insert(at, region);
        }
        tracing::debug!(device = dev.name(), start = entry.start, last = entry.last, "mapped IOVA range");
        Ok(())
    }

    /// Maps the bounce range if the kernel has created it; returns whether it is mapped. The
    /// range appears with the first DMA mapping after attach or reset, which is after the
    /// vrings exist, so workers call this before they pop; once mapped it is a single
    /// `is_some` check.
    pub fn ensure_bounce(&mut self, dev: &VduseDevice) -> bool {
        if self.bounce.is_some() {
            return true;
        }
        if let Some(user_bounce) = &self.user_bounce {
            match user_bounce.lookup(dev) {
                BounceLookup::Ours(region, pages) => {
                    self.bounce = Some(region);
                    self.own_pages = Some(pages);
                    return true;
                }
                BounceLookup::NotYet => return false,
                BounceLookup::Kernel => {}
            }
        }
        if let Err(e) = self.map_iova(dev, 0) {
            tracing::debug!(device = dev.name(), error = %e, "bounce range not mapped yet");
        }
        self.bounce.is_some()
    }

    /// Whether the bounce range is our registered memory, which `O_DIRECT` can pin (the
    /// kernel's is mapped `VM_IO` through the domain file, which it cannot).
    pub fn bounce_is_ours(&self) -> bool {
        self.own_pages.is_some()
    }

    /// The bounce range, where every request buffer lies, if mapped.
    pub fn bounce(&self) -> Option<&GuestRegionMmap<()>> {
        self.bounce.as_ref()
    }
}

impl GuestMemoryBackend for IovaMemory {
    type R = GuestRegionMmap<()>;

    fn num_regions(&self) -> usize {
        usize::from(self.bounce.is_some()) + self.coherent.len()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&Self::R> {
        // O(1) for everything in the bounce range, which is every data buffer.
        if let Some(bounce) = &self.bounce {
            if addr.0 < bounce.len() {
                return Some(bounce);
            }
        }
        self.coherent.iter().find(|r| addr >= r.start_addr() && addr <= r.last_addr())
    }

    fn iter(&self) -> impl Iterator<Item = &Self::R> {
        self.bounce.iter().chain(self.coherent.iter())
    }
}
