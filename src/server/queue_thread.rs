//! One virtqueue's thread: maps the ring, then alternates between passes of the blk worker
//! and one wait on its kick eventfd, the backend's completion notifier and the stop signal.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use std::os::fd::BorrowedFd;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::EventFd;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestRegionMmap};

use super::health::{Health, StopSignal};
use crate::backend::Backend;
use crate::blk::qos::Throttle;
use crate::blk::stats::DeviceStats;
use crate::blk::{DeviceLimits, QueueMemory, QueueWorker};
use crate::vduse::uapi::vduse_vq_info;
use crate::vduse::{IovaMemory, UserBounce, VduseDevice};

/// Everything a queue thread needs.
pub(super) struct QueueStart {
    pub dev: Arc<VduseDevice>,
    pub index: u32,
    pub info: vduse_vq_info,
    pub event_idx: bool,
    pub backend: Arc<dyn Backend>,
    pub limits: DeviceLimits,
    pub kick: EventFd,
    pub stop: Arc<StopSignal>,
    /// Resume from the used ring instead of the driver's initial index.
    pub recover: bool,
    pub progress: Arc<AtomicU16>,
    /// Longest time to poll for more work after the last request before sleeping.
    pub poll: Duration,
    pub health: Arc<Health>,
    pub stats: Option<Arc<DeviceStats>>,
    pub throttle: Option<Arc<Throttle>>,
    /// Our bounce pages, when they replace the kernel's.
    pub user_bounce: Option<Arc<UserBounce>>,
}

/// The device's IOVA space as the blk worker sees it: the bounce range is the data window.
struct DeviceMemory {
    dev: Arc<VduseDevice>,
    iova: IovaMemory,
}

impl GuestMemoryBackend for DeviceMemory {
    type R = GuestRegionMmap<()>;

    fn num_regions(&self) -> usize {
        self.iova.num_regions()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&Self::R> {
        self.iova.find_region(addr)
    }

    fn iter(&self) -> impl Iterator<Item = &Self::R> {
        self.iova.iter()
    }
}

impl QueueMemory for DeviceMemory {
    fn data_region(&self) -> Option<&GuestRegionMmap<()>> {
        self.iova.bounce()
    }

    fn map_data_region(&mut self) -> bool {
        self.iova.ensure_bounce(&self.dev)
    }

    fn data_pinnable(&self) -> bool {
        self.iova.bounce_is_ours()
    }
}

pub(super) fn run(start: QueueStart) {
    let name = start.dev.name().to_owned();
    let index = start.index;
    let health = Arc::clone(&start.health);
    let stats = start.stats.clone();
    if let Err(e) = serve(start) {
        tracing::error!(device = %name, queue = index, error = %e, "queue stopped");
        if let Some(stats) = stats {
            stats.queue_faults.fetch_add(1, Ordering::Relaxed);
        }
        health.degrade(format!("queue {index} stopped: {e}"));
    }
}

fn serve(s: QueueStart) -> Result<(), String> {
    let iova = match &s.user_bounce {
        Some(user_bounce) => IovaMemory::with_user_bounce(Arc::clone(user_bounce)),
        None => IovaMemory::new(),
    };
    let mut mem = DeviceMemory { dev: Arc::clone(&s.dev), iova };
    for addr in [s.info.desc_addr, s.info.driver_addr, s.info.device_addr] {
        mem.iova.map_iova(&s.dev, addr).map_err(|e| e.to_string())?;
    }
    mem.map_data_region();

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
        // Publication is in pop order, so everything before used.idx is done and everything
        // after it is still owned by us: resume there.
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

    let io = s.backend.open_queue(size).map_err(|e| e.to_string())?;
    let mut worker = QueueWorker::new(queue, Arc::clone(&s.backend), io, s.limits.clone())
        .with_flush_failure(Arc::clone(&s.health.flush_failure));
    if let Some(stats) = &s.stats {
        worker = worker.with_stats(Arc::clone(stats), s.index as usize);
    }
    if let Some(throttle) = &s.throttle {
        worker = worker.with_throttle(Arc::clone(throttle));
    }
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
    // Counted by the gate from here on: a hold waits for this thread to park.
    let running = s.health.gate.enter();
    let result = serve_loop(&s, &mut mem, &mut worker, &mut notify);
    drop(running);
    // Whatever ended the loop, nothing may stay in flight once `mem` is unmapped.
    if let Err(e) = worker.drain(&mut mem, &mut notify) {
        tracing::warn!(device = s.dev.name(), queue = s.index, error = %e, "draining the queue failed");
        if worker.in_flight() > 0 {
            // The kernel may still be moving bytes into these buffers: leak the mapping (and
            // the engine whose operations point into it) rather than unmap it under them.
            tracing::error!(
                device = s.dev.name(),
                queue = s.index,
                in_flight = worker.in_flight(),
                "leaking the queue's mappings: I/O is still in flight in a broken engine"
            );
            std::mem::forget(worker);
            std::mem::forget(mem);
            return Err(format!("{e}; I/O still in flight"));
        }
    }
    result.map_err(|e| e.to_string())
}

/// Passes and waits until the stop signal or a fault. Kicks stay off while the worker keeps
/// finding work. After the last request it may poll for more before sleeping (requests from
/// several submitters usually follow within microseconds, and taking them here saves a kick
/// and a wake-up), but only while polling pays: a window that finds nothing halves the next
/// one, down to none, and a pass that pops several chains at once (requests arriving while
/// others run) restores it to `s.poll`. A lone submitter at queue depth 1 waits for our
/// interrupt before its next request, so polling then would only keep the CPU from running
/// that interrupt. While polling the thread yields, so whatever else is runnable on its CPU
/// still runs. Then kicks are re-enabled and the thread sleeps in one wait on the kick
/// eventfd, the backend's completion notifier and the stop signal ([`Sleeper`]).
fn serve_loop(
    s: &QueueStart,
    mem: &mut DeviceMemory,
    worker: &mut QueueWorker,
    notify: &mut dyn FnMut(),
) -> Result<(), String> {
    let mut last_work: Option<Instant> = None;
    let mut window = s.poll;
    let gate = &s.health.gate;
    let mut sleeper =
        Sleeper::new(&s.kick, s.stop.fd(), gate.wake_fd(), worker.notifier()).map_err(|e| format!("epoll: {e}"))?;
    loop {
        if s.stop.requested() {
            return Ok(());
        }
        if gate.held() {
            // Complete what is in flight, then take nothing off the ring until released.
            worker.drain(mem, notify).map_err(|e| e.to_string())?;
            gate.park(&s.stop);
            continue;
        }
        let pass = worker.run(mem, notify).map_err(|e| e.to_string())?;
        if pass.popped > 0 {
            s.progress.store(worker.queue().next_avail(), Ordering::Release);
        }
        if pass.popped > 1 {
            window = s.poll;
        }
        if pass.busy() {
            last_work = Some(Instant::now());
            continue;
        }
        if let Some(t) = last_work.filter(|_| !window.is_zero()) {
            let deadline = t + window;
            while !worker.has_work(mem) && !s.stop.requested() && !gate.held() && Instant::now() < deadline {
                std::thread::yield_now();
            }
            if worker.has_work(mem) {
                continue;
            }
            window /= 2;
            if window < Duration::from_micros(2) {
                window = Duration::ZERO;
            }
        }
        if worker.enable_notifications(mem).map_err(|e| e.to_string())? {
            continue;
        }
        last_work = None;
        let kicked = sleeper.sleep(worker.in_flight() > 0, worker.throttled_for(), worker.notifier())?;
        if let Some(q) = worker.stats().filter(|_| kicked) {
            q.kicks.add(1);
        }
        worker.disable_notifications(mem).map_err(|e| e.to_string())?;
    }
}

/// One wait on everything that can give a queue thread work: its kick eventfd, the backend's
/// completion notifier, the stop signal and the hold gate. The kick and the notifier are
/// edge-triggered and never read: every signal is a new edge, so a wake-up costs one
/// `epoll_wait` and no `read`. The
/// notifier is watched only while operations are in flight; otherwise a completion that
/// finished during submission (and was reaped) would wake the thread for nothing.
struct Sleeper {
    epoll: Epoll,
    /// Whether the notifier is in the interest set with EPOLLIN now.
    watching_notifier: bool,
}

/// Longest sleep, in milliseconds, while operations are in flight.
const IN_FLIGHT_WAIT_MS: u16 = 100;

const KICK: u64 = 0;
const STOP: u64 = 1;
const NOTIFIER: u64 = 2;
const GATE: u64 = 3;

impl Sleeper {
    /// Registers the fds; `notifier` must be the same fd at every [`Sleeper::sleep`].
    fn new(kick: &EventFd, stop: &EventFd, gate: &EventFd, notifier: Option<BorrowedFd<'_>>) -> nix::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let edge = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        epoll.add(kick.as_fd(), EpollEvent::new(edge, KICK))?;
        // Level-triggered: it is never reset, so it wakes every wait once stop is requested.
        epoll.add(stop.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, STOP))?;
        // Level-triggered too: readable exactly while a hold lasts.
        epoll.add(gate.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, GATE))?;
        if let Some(fd) = notifier {
            epoll.add(fd, EpollEvent::new(edge, NOTIFIER))?;
        }
        Ok(Self { epoll, watching_notifier: notifier.is_some() })
    }

    /// Sleeps until a kick, a completion (if `in_flight`), the end of a throttle (`throttled`)
    /// or the stop signal. Returns whether a kick woke it.
    fn sleep(
        &mut self,
        in_flight: bool,
        throttled: Option<Duration>,
        notifier: Option<BorrowedFd<'_>>,
    ) -> Result<bool, String> {
        if let Some(fd) = notifier.filter(|_| in_flight != self.watching_notifier) {
            let flags = if in_flight { EpollFlags::EPOLLIN | EpollFlags::EPOLLET } else { EpollFlags::empty() };
            self.epoll.modify(fd, &mut EpollEvent::new(flags, NOTIFIER)).map_err(|e| format!("epoll_ctl: {e}"))?;
            self.watching_notifier = in_flight;
        }
        // While operations are in flight, wake up now and then even without an event: a
        // completion's wake-up is the kernel's to deliver (io_uring task work interrupts the
        // wait, which then reaps it), and this bounds the cost should one ever be missed.
        let mut wait = in_flight.then_some(Duration::from_millis(IN_FLIGHT_WAIT_MS.into()));
        if let Some(t) = throttled {
            // Rounded up: waking before the tokens are due would only sleep again.
            let t = t.max(Duration::from_millis(1));
            wait = Some(wait.map_or(t, |w| w.min(t)));
        }
        let timeout = match wait {
            Some(w) => EpollTimeout::try_from(w.as_micros().div_ceil(1000)).unwrap_or(EpollTimeout::MAX),
            None => EpollTimeout::NONE,
        };
        let mut events = [EpollEvent::empty(); 4];
        match self.epoll.wait(&mut events, timeout) {
            Ok(n) => Ok(events[..n].iter().any(|e| e.data() == KICK)),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(format!("epoll_wait: {e}")),
        }
    }
}
