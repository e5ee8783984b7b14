//! Our own memory as the device's bounce pages (`VDUSE_IOTLB_REG_UMEM`).
//!
//! By default the bounce range is the kernel's: pages allocated one by one, which we reach
//! through the `[vduse-domain]` file. That mapping is `VM_IO`, so the kernel refuses to pin
//! its pages for `O_DIRECT`, and the io_uring engine sends every request through the page
//! cache. Registered instead, the bounce range is an anonymous mapping of ours backed by
//! transparent huge pages: the kernel copies between bio pages and these pages exactly as
//! before, but our own `O_DIRECT` on them pins 2 MiB folios (docs/PERFORMANCE.md, "O_DIRECT
//! into the bounce pages, and our own bounce pages").
//!
//! Rules the kernel sets (`vduse_dev_reg_umem` in drivers/vdpa/vdpa_user/vduse_dev.c, 6.0+):
//! - registration needs the bounce range to exist, which it does from the first DMA mapping
//!   after attach or reset, so it happens at the first request, not at start;
//! - in-use kernel pages are copied into ours when we register, and back when the device fd
//!   closes, so a server killed with requests in flight leaves them intact for the next one;
//! - the pages are pinned and charged to `RLIMIT_MEMLOCK`, even for root;
//! - once registered, the bounce range must not be reached through the domain file any more.
//!
//! [`UserBounce`] registers once per open device fd. Every queue worker asks it for the
//! bounce region before it pops its first request, so no worker can hold a request whose
//! buffers it reached through the domain file when the pages change owner.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestRegionMmap};

use super::VduseDevice;

/// Transparent huge pages are this large on x86_64; the mapping is aligned to it.
const HUGE_PAGE: usize = 2 << 20;

/// Our bounce pages for one device fd: registered at the first request, or declined once.
#[derive(Debug)]
pub struct UserBounce {
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    /// Nothing tried yet, or the bounce range did not exist at the last try.
    Pending,
    Registered(Arc<BouncePages>),
    /// The kernel refused (old kernel, memlock limit, no memory): the kernel's pages stay.
    Declined,
}

/// What a queue worker should use as its bounce region.
#[derive(Debug)]
pub enum BounceLookup {
    /// Our registered pages, and the region that spans them.
    Ours(GuestRegionMmap<()>, Arc<BouncePages>),
    /// The kernel has no bounce range yet: no request can be pending.
    NotYet,
    /// Use the kernel's pages through the domain file.
    Kernel,
}

impl UserBounce {
    pub fn new() -> Self {
        Self { state: Mutex::new(State::Pending) }
    }

    /// The bounce region for a worker about to pop its first request. Registers our pages the
    /// first time the kernel's bounce range exists; the lock keeps every other worker out
    /// until that is settled one way or the other.
    pub fn lookup(&self, dev: &VduseDevice) -> BounceLookup {
        // A worker that panicked while holding the lock left a state that is still valid.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let State::Pending = *state {
            match register(dev) {
                Ok(Some(pages)) => *state = State::Registered(Arc::new(pages)),
                Ok(None) => return BounceLookup::NotYet,
                Err(reason) => {
                    tracing::warn!(device = dev.name(), %reason, "kernel bounce pages kept: cannot register ours");
                    *state = State::Declined;
                }
            }
        }
        match &*state {
            State::Registered(pages) => match pages.region() {
                Ok(region) => BounceLookup::Ours(region, Arc::clone(pages)),
                Err(reason) => {
                    // Cannot happen for a mapping we made; never fall back to the domain
                    // file once registered, so report that nothing can be served yet.
                    tracing::error!(device = dev.name(), %reason, "cannot describe our bounce pages");
                    BounceLookup::NotYet
                }
            },
            State::Declined => BounceLookup::Kernel,
            State::Pending => BounceLookup::NotYet,
        }
    }
}

impl Default for UserBounce {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers fresh pages as the bounce range, if the kernel has created it. `Ok(None)`: not
/// yet; `Err`: the kernel refused, with why.
fn register(dev: &VduseDevice) -> Result<Option<BouncePages>, String> {
    // The bounce range is always [0, bounce_size); GET_FD on IOVA 0 fails until it exists.
    let Ok((_fd, entry)) = dev.iotlb_fd(0, 0) else { return Ok(None) };
    if entry.start != 0 {
        return Ok(None);
    }
    let len = entry
        .last
        .checked_add(1)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| format!("bounce range {entry:?} too large"))?;
    let pages = BouncePages::new(len)?;
    raise_memlock_limit();
    dev.reg_umem(pages.addr.as_ptr() as u64, len as u64).map_err(|e| e.to_string())?;
    tracing::info!(device = dev.name(), bytes = len, "bounce pages are ours");
    Ok(Some(pages))
}

/// Registration pins the pages and charges them to `RLIMIT_MEMLOCK` even for root, whose
/// default soft limit (8 MiB) is below one bounce range. Raise it as far as we may; the
/// registration reports if that was not enough.
fn raise_memlock_limit() {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK) else { return };
    if soft == RLIM_INFINITY {
        return;
    }
    if setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_err() && hard > soft {
        let _ = setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard);
    }
}

/// An anonymous mapping, aligned to huge pages, that the kernel has pinned as bounce pages.
/// Unmapping it while registered is harmless (the pins keep the pages), so dropping it in any
/// order relative to the device fd is safe.
#[derive(Debug)]
pub struct BouncePages {
    /// Start of the mapping as made, and its length.
    map: NonNull<libc::c_void>,
    map_len: usize,
    /// The huge-page-aligned start the kernel was given, and the bounce range's length.
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; every access goes through
// vm-memory's volatile accessors or the kernel, both of which tolerate concurrent use.
unsafe impl Send for BouncePages {}
// SAFETY: as above; `&BouncePages` only exposes addresses.
unsafe impl Sync for BouncePages {}

impl BouncePages {
    fn new(len: usize) -> Result<Self, String> {
        let map_len = len.checked_add(HUGE_PAGE).ok_or("bounce range too large")?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(format!("mmap of {map_len} bytes: {}", std::io::Error::last_os_error()));
        }
        let map = NonNull::new(raw).ok_or("mmap returned null")?;
        // `pad < HUGE_PAGE`, so the aligned start and `len` bytes after it lie in the mapping.
        let pad = (HUGE_PAGE - (raw as usize % HUGE_PAGE)) % HUGE_PAGE;
        let addr = raw.cast::<u8>().wrapping_add(pad);
        let pages = Self { map, map_len, addr: NonNull::new(addr).ok_or("null bounce address")?, len };
        // Huge pages are the point; a kernel with THP disabled still works with small ones.
        let _ = pages.advise(libc::MADV_HUGEPAGE);
        // Pinned anonymous pages are copied eagerly into a child at fork, and the plugin forks
        // mkfs, blkid and mount: keep the range out of children altogether.
        pages.advise(libc::MADV_DONTFORK).map_err(|e| format!("madvise(MADV_DONTFORK): {e}"))?;
        Ok(pages)
    }

    /// `madvise` over the bounce range.
    fn advise(&self, advice: libc::c_int) -> std::io::Result<()> {
        // SAFETY: the range lies inside our own mapping; these advices change how the kernel
        // backs and forks it, not its contents.
        let rc = unsafe { libc::madvise(self.addr.as_ptr().cast(), self.len, advice) };
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }

    /// A region over the pages at IOVA 0. It does not own the mapping: `self` does.
    fn region(&self) -> Result<GuestRegionMmap<()>, String> {
        // SAFETY: `addr..addr+len` is a live read-write mapping that outlives the region,
        // because every holder of the region also holds an `Arc` of `self`.
        let mmap = unsafe {
            MmapRegion::build_raw(
                self.addr.as_ptr(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .map_err(|e| e.to_string())?;
        GuestRegionMmap::new(mmap, GuestAddress(0)).ok_or_else(|| "region wraps the address space".to_owned())
    }
}

impl Drop for BouncePages {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this address and length, and no region
        // over it outlives `self` (see `region`).
        unsafe { libc::munmap(self.map.as_ptr(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress};

    #[test]
    fn pages_are_aligned_to_huge_pages_and_usable() {
        let pages = BouncePages::new(4 << 20).expect("mapping");
        assert_eq!(pages.addr.as_ptr() as usize % HUGE_PAGE, 0);
        let region = pages.region().expect("region");
        assert_eq!(region.len(), 4 << 20);
        region.write_obj(0xdead_beef_u32, MemoryRegionAddress((4 << 20) - 4)).expect("write");
        assert_eq!(region.read_obj::<u32>(MemoryRegionAddress((4 << 20) - 4)).expect("read"), 0xdead_beef);
    }
}
