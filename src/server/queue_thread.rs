//! One virtqueue's thread: maps the ring, then waits for kicks and runs the blk worker.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use crate::backend::Backend;
use crate::blk::{DeviceLimits, QueueWorker};
use crate::vduse::uapi::vduse_vq_info;
use crate::vduse::{IovaMemory, VduseDevice};

/// Everything a queue thread needs.
pub(super) struct QueueStart {
    pub dev: Arc<VduseDevice>,
    pub index: u32,
    pub info: vduse_vq_info,
    pub event_idx: bool,
    pub backend: Arc<dyn Backend>,
    pub limits: DeviceLimits,
    pub kick: EventFd,
    pub stop: Arc<EventFd>,
    /// Resume from the used ring instead of the driver's initial index.
    pub recover: bool,
    pub progress: Arc<AtomicU16>,
}

/// How long a queue thread polls its ring for new work before it waits for a kick.
const POLL_BEFORE_SLEEP: Duration = Duration::from_micros(50);

pub(super) fn run(start: QueueStart) {
    let name = start.dev.name().to_owned();
    let index = start.index;
    if let Err(e) = serve(start) {
        tracing::error!(device = %name, queue = index, error = %e, "queue stopped");
    }
}

fn serve(s: QueueStart) -> Result<(), String> {
    let mut mem = IovaMemory::new();
    for addr in [s.info.desc_addr, s.info.driver_addr, s.info.device_addr] {
        mem.map_iova(&s.dev, addr).map_err(|e| e.to_string())?;
    }
    mem.ensure_bounce(&s.dev);

    let size = u16::try_from(s.info.num).map_err(|_| format!("ring size {} too large", s.info.num))?;
    let mut queue = Queue::new(size.max(1)).map_err(|e| e.to_string())?;
    queue.set_size(size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(s.info.desc_addr);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(s.info.driver_addr);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(s.info.device_addr);
    queue.set_used_ring_address(lo, hi);
    queue.set_event_idx(s.event_idx);
    queue.set_ready(true);
    // is_valid checks alignment and that each ring structure lies in mapped memory.
    if !queue.is_valid(&mem) {
        return Err(format!("ring addresses are invalid: {:?}", s.info));
    }
    if s.recover {
        // Completion is in order, so everything before used.idx is done and everything after
        // it is still owned by us: resume there.
        let used = queue.used_idx(&mem, Ordering::Acquire).map_err(|e| e.to_string())?;
        queue.set_next_avail(used.0);
        queue.set_next_used(used.0);
    } else {
        queue.set_next_avail(s.info.avail_index);
        queue.set_next_used(s.info.avail_index);
    }
    tracing::debug!(
        device = s.dev.name(),
        queue = s.index,
        size,
        next_avail = queue.next_avail(),
        regions = mem.num_regions(),
        "queue started"
    );

    let io = s.backend.open_queue().map_err(|e| e.to_string())?;
    let mut worker = QueueWorker::new(queue, Arc::clone(&s.backend), io, s.limits, POLL_BEFORE_SLEEP);
    let dev = Arc::clone(&s.dev);
    let index = s.index;
    let mut notify = || {
        if let Err(e) = dev.inject_irq(index) {
            tracing::debug!(device = dev.name(), queue = index, error = %e, "interrupt not injected");
        }
    };
    if s.recover {
        // Completions may have been published but not signalled before the old server died.
        notify();
    }
    loop {
        // Process first: a kick that came before our kickfd existed, or work left by a
        // previous server, must not wait for the next kick.
        mem.ensure_bounce(&s.dev);
        worker.process(&mem, &mut notify).map_err(|e| e.to_string())?;
        s.progress.store(worker.queue().next_avail(), Ordering::Release);

        let mut fds = [PollFd::new(s.kick.as_fd(), PollFlags::POLLIN), PollFd::new(s.stop.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        if fds[1].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) {
            return Ok(());
        }
        // Reset the kick counter; EAGAIN just means a spurious wake-up.
        let _ = s.kick.read();
    }
}
