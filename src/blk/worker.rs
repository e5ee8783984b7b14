//! The queue worker: a pipelined engine. It pops chains whenever the backend has room,
//! submits them under their head index, reaps completions in whatever order the backend
//! finishes them, and publishes used entries strictly in pop order through a reorder window.
//!
//! Publishing in pop order keeps `used.idx` equal to the number of chains fully handled, and
//! everything past it still owned by the device. That is what lets a server that takes a
//! device over resume at `used.idx` without an in-flight log (VDUSE.md §6), while requests
//! still run concurrently: a slow request delays the publication of later ones, never their
//! execution.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestRegionMmap};

use super::flush_failure::FlushFailure;
use super::qos::{Admission, Throttle};
use super::request::{self, Action, DataWindow, DeviceLimits, ParseScratch, RequestKind, STATUS_IOERR, STATUS_OK};
use super::stats::{DeviceStats, QueueStats};
use crate::backend::{Backend, Completion, IoBuf, IoOp, QueueIo, region_slice};

/// A ring-level fault: the queue cannot be trusted any more and must stop.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// virtio-queue refused the ring (bad avail index, unreadable ring memory...).
    #[error("virtqueue error: {0}")]
    Ring(virtio_queue::Error),
    /// A head index outside the ring.
    #[error("descriptor head {head} is outside a ring of {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    /// The same head was made available twice while in flight.
    #[error("descriptor head {0} is already in flight")]
    DuplicateHead(u16),
    /// A chain without a writable byte inside the data window: no status could reach the
    /// driver, which would read whatever byte was there as the answer.
    #[error("chain {0} has no writable status byte in the mapped buffers")]
    NoStatus(u16),
    /// The backend's I/O engine failed for good.
    #[error("the backend cannot run I/O any more: {0}")]
    Backend(String),
}

/// The memory a worker runs on: the vrings, and the data window its requests' buffers must
/// lie in. The window may appear only after the rings (VDUSE creates the bounce range at the
/// driver's first DMA mapping), so the worker asks for it before it pops.
pub trait QueueMemory: GuestMemoryBackend<R = GuestRegionMmap<()>> {
    /// The data window, if it is mapped.
    fn data_region(&self) -> Option<&GuestRegionMmap<()>>;
    /// Maps the data window if it is not mapped yet; returns whether it is mapped now.
    fn map_data_region(&mut self) -> bool;
    /// Whether the data window is memory the kernel can pin for `O_DIRECT`
    /// ([`crate::backend::SliceSource::pinnable`]).
    fn data_pinnable(&self) -> bool {
        false
    }
}

/// One popped chain, from pop to publication.
#[derive(Debug, Clone, Copy)]
struct Pending {
    head: u16,
    status_addr: GuestAddress,
    used_len_ok: u32,
    /// The final status once known.
    status: Option<u8>,
    kind: RequestKind,
    /// Data bytes, for the counters.
    bytes: u64,
    /// When it was popped, in nanoseconds since the worker's epoch (only while counting).
    popped_ns: u64,
}

impl Default for Pending {
    fn default() -> Self {
        Self {
            head: 0,
            status_addr: GuestAddress(0),
            used_len_ok: 0,
            status: None,
            kind: RequestKind::Other,
            bytes: 0,
            popped_ns: 0,
        }
    }
}

/// The bytes a request moves or covers.
fn op_bytes(op: &IoOp, bufs: &[IoBuf]) -> u64 {
    match op {
        IoOp::Read { bufs: r, .. } | IoOp::Write { bufs: r, .. } => {
            bufs.get(r.start..r.end).map_or(0, |b| b.iter().map(|b| u64::from(b.len)).sum())
        }
        IoOp::Discard { len, .. } | IoOp::WriteZeroes { len, .. } => *len,
        IoOp::Flush => 0,
    }
}

/// A queue's own counters inside its device's.
struct Counting {
    device: Arc<DeviceStats>,
    index: usize,
    /// Zero of the pop timestamps.
    epoch: Instant,
}

impl Counting {
    fn queue(&self) -> Option<&QueueStats> {
        self.device.queues.get(self.index)
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// What one pass of [`QueueWorker::run`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Chains popped from the avail ring.
    pub popped: usize,
    /// Chains published to the used ring.
    pub published: usize,
}

impl Pass {
    /// Whether the pass did anything.
    pub fn busy(&self) -> bool {
        self.popped > 0 || self.published > 0
    }
}

/// Serves one virtqueue. Owns everything it touches, so queues share no lock.
pub struct QueueWorker {
    queue: Queue,
    backend: Arc<dyn Backend>,
    io: Box<dyn QueueIo>,
    limits: DeviceLimits,
    // Tables reused across requests: no allocation per request once warmed up.
    scratch: ParseScratch,
    bufs: Vec<IoBuf>,
    completions: Vec<Completion>,
    /// The reorder window: popped chains in pop order, `window[pos % len]` for the positions
    /// `front..back`. It never holds more than the ring size, since heads in it are distinct.
    window: Vec<Pending>,
    front: u64,
    back: u64,
    /// Window position of each head in flight.
    position: Vec<u64>,
    in_flight: Vec<bool>,
    counting: Option<Counting>,
    throttle: Option<Arc<Throttle>>,
    /// Set while the throttle holds the queue: nothing is popped before it.
    throttled_until: Option<Instant>,
    flush_failure: Option<Arc<FlushFailure>>,
}

impl QueueWorker {
    /// A worker for `queue`, which must be configured and valid for the memory it will be
    /// driven with. `io` must take tags up to the ring size.
    pub fn new(queue: Queue, backend: Arc<dyn Backend>, io: Box<dyn QueueIo>, limits: DeviceLimits) -> Self {
        let size = usize::from(queue.size()).max(1);
        Self {
            queue,
            backend,
            io,
            limits,
            scratch: ParseScratch::default(),
            bufs: Vec::with_capacity(16),
            completions: Vec::with_capacity(size),
            window: vec![Pending::default(); size],
            front: 0,
            back: 0,
            position: vec![0; size],
            in_flight: vec![false; size],
            counting: None,
            throttle: None,
            throttled_until: None,
            flush_failure: None,
        }
    }

    /// Counts into queue `index` of `device`.
    pub fn with_stats(mut self, device: Arc<DeviceStats>, index: usize) -> Self {
        self.counting = Some(Counting { device, index, epoch: Instant::now() });
        self
    }

    /// Records every failed FLUSH in `failure`.
    pub fn with_flush_failure(mut self, failure: Arc<FlushFailure>) -> Self {
        self.flush_failure = Some(failure);
        self
    }

    /// Pops only what `throttle` admits.
    pub fn with_throttle(mut self, throttle: Arc<Throttle>) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// This queue's counters, if it counts.
    pub fn stats(&self) -> Option<&QueueStats> {
        self.counting.as_ref().and_then(Counting::queue)
    }

    /// While the throttle holds the queue: how long it still does (zero once the tokens are
    /// due, until the next pass pops again). A thread that sleeps must wake by then: the
    /// chains held back will bring no kick.
    pub fn throttled_for(&self) -> Option<Duration> {
        self.throttled_until.map(|until| until.saturating_duration_since(Instant::now()))
    }

    /// Whether the throttle holds the queue now.
    fn held_back(&self) -> bool {
        self.throttled_for().is_some_and(|d| !d.is_zero())
    }

    /// Asks for an interrupt, and counts it.
    fn interrupt(&self, notify: &mut dyn FnMut()) {
        if let Some(q) = self.stats() {
            q.interrupts.add(1);
        }
        notify();
    }

    /// The queue state (for recovery and tests).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Popped chains not yet published.
    pub fn outstanding(&self) -> usize {
        (self.back - self.front) as usize
    }

    /// Operations submitted to the backend and not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.io.in_flight()
    }

    /// The backend's completion notifier, if it has one (see [`QueueIo::notifier`]).
    pub fn notifier(&self) -> Option<BorrowedFd<'_>> {
        self.io.notifier()
    }

    /// Whether the driver has made chains available that are not popped yet. One acquire
    /// load of the avail index: cheap enough to poll.
    fn has_avail<M: QueueMemory>(&self, mem: &M) -> bool {
        self.queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != self.queue.next_avail())
    }

    /// Whether a pass would find work: chains to pop (with room to run them) or completions.
    pub fn has_work<M: QueueMemory>(&mut self, mem: &M) -> bool {
        self.io.has_completions() || (self.can_pop(mem) && self.has_avail(mem))
    }

    /// Turns kicks off while the worker keeps coming back on its own.
    pub fn disable_notifications<M: QueueMemory>(&mut self, mem: &M) -> Result<(), QueueError> {
        self.queue.disable_notification(mem).map_err(QueueError::Ring)
    }

    /// Turns kicks on before sleeping. Returns true if chains arrived meanwhile, so the
    /// caller must run another pass instead of sleeping (a kick for them may never come).
    /// Without a data window nothing can be popped, so chains waiting for it do not count:
    /// the thread sleeps until the next kick and tries to map it again then.
    pub fn enable_notifications<M: QueueMemory>(&mut self, mem: &M) -> Result<bool, QueueError> {
        let more = self.queue.enable_notification(mem).map_err(QueueError::Ring)?;
        Ok(more && self.can_pop(mem))
    }

    /// Whether a chain could be popped now: the engine has room and the data window is
    /// mapped. Chains that cannot be popped are no reason to stay awake.
    fn can_pop<M: QueueMemory>(&self, mem: &M) -> bool {
        self.room() > 0 && mem.data_region().is_some() && !self.held_back()
    }

    /// Where window position `pos` lives.
    fn window_index(&self, pos: u64) -> usize {
        (pos % self.window.len() as u64) as usize
    }

    /// How many more chains the backend can take now.
    fn room(&self) -> usize {
        self.io.capacity().saturating_sub(self.io.in_flight()).min(self.window.len() - self.outstanding())
    }

    /// One pass: reap what finished, pop and submit what fits, publish the finished prefix of
    /// the window, and ask for one interrupt if anything was published. On a ring fault the
    /// queue is drained (every popped chain completed) before the error is returned.
    pub fn run<M: QueueMemory>(&mut self, mem: &mut M, notify: &mut dyn FnMut()) -> Result<Pass, QueueError> {
        let mut pass = Pass::default();
        self.reap();
        let popped = self.pop(mem);
        pass.popped = match popped {
            Ok(n) => n,
            Err(fault) => {
                self.drain(mem, notify)?;
                return Err(fault);
            }
        };
        self.io.commit();
        // A synchronous engine has finished already; an asynchronous one may have too.
        self.reap();
        pass.published = self.publish(mem)?;
        if pass.published > 0 && self.queue.needs_notification(mem).map_err(QueueError::Ring)? {
            self.interrupt(notify);
        }
        if let Some(q) = self.stats() {
            q.in_flight.set(self.outstanding() as u64);
        }
        if let Some(why) = self.io.fault() {
            self.drain(mem, notify)?;
            return Err(QueueError::Backend(why));
        }
        Ok(pass)
    }

    /// Waits for every submitted operation and publishes every popped chain: nothing of this
    /// worker is in flight afterwards, so its memory may be unmapped. Chains not popped stay
    /// in the avail ring for whoever serves the queue next. Fails, with operations still in
    /// flight, only if the backend broke: the caller must then keep the memory mapped.
    pub fn drain<M: QueueMemory>(&mut self, mem: &mut M, notify: &mut dyn FnMut()) -> Result<(), QueueError> {
        let mut published = 0;
        let mut fault = None;
        loop {
            self.reap();
            if fault.is_none() {
                match self.publish(mem) {
                    Ok(n) => published += n,
                    // Keep reaping: the operations still own their buffers.
                    Err(e) => fault = Some(e),
                }
            }
            if self.io.in_flight() == 0 {
                break;
            }
            if let Some(why) = self.io.fault() {
                return Err(QueueError::Backend(why));
            }
            self.io.wait();
        }
        if let Some(fault) = fault {
            return Err(fault);
        }
        if published > 0 && self.queue.needs_notification(mem).map_err(QueueError::Ring)? {
            self.interrupt(notify);
        }
        if let Some(q) = self.stats() {
            q.in_flight.set(self.outstanding() as u64);
        }
        Ok(())
    }

    /// Moves finished operations into the window.
    fn reap(&mut self) {
        self.completions.clear();
        self.io.reap(&mut self.completions);
        if self.completions.is_empty() {
            return;
        }
        // One log line per reap, not per request: a failing disk must not flood the logs.
        let mut failed = 0;
        for c in &self.completions {
            let head = usize::from(c.tag);
            if !self.in_flight.get(head).copied().unwrap_or(false) {
                tracing::error!(head, "the backend completed a request that is not in flight");
                continue;
            }
            let at = self.window_index(self.position[head]);
            let slot = &mut self.window[at];
            slot.status = Some(match &c.result {
                Ok(()) => STATUS_OK,
                Err(e) => {
                    if failed == 0 {
                        tracing::warn!(error = %e, head, "backend I/O failed");
                    }
                    if let Some(record) = self.flush_failure.as_ref().filter(|_| slot.kind == RequestKind::Flush) {
                        record.record(e.to_string());
                    }
                    failed += 1;
                    STATUS_IOERR
                }
            });
        }
        if failed > 1 {
            tracing::warn!(failed, "backend I/O failed for several requests");
        }
    }

    /// Pops as many chains as there is room for and submits them. A chain that needs no I/O
    /// (a bad request, GET_ID) gets its status at once.
    fn pop<M: QueueMemory>(&mut self, mem: &mut M) -> Result<usize, QueueError> {
        if self.held_back() {
            return Ok(0);
        }
        self.throttled_until = None;
        let room = self.room();
        if room == 0 || !self.has_avail(mem) {
            return Ok(0);
        }
        // The driver mapped these chains' buffers before it made them available, so the data
        // window exists now if it ever will. Until it is mapped, nothing is popped: a chain
        // read without it could not even be given a status.
        if !mem.map_data_region() {
            return Ok(0);
        }
        let mem = &*mem;
        let Some(region) = mem.data_region() else { return Ok(0) };
        let data = DataWindow::new(region, mem.data_pinnable());
        // Capacity can grow while we serve (online expansion).
        self.limits.capacity_sectors = self.backend.capacity() / 512;
        let size = self.queue.size();
        let mut popped = 0;
        let popped_ns = self.counting.as_ref().map_or(0, Counting::now_ns);
        let throttle = self.throttle.clone();
        let mut gate = throttle.as_ref().map(|t| t.gate(Instant::now()));
        // With a throttle, the chains waiting now: it is asked only for a chain that is there,
        // so an idle queue is never left throttled.
        let limit = match gate {
            Some(_) => {
                let avail =
                    self.queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire).map_err(QueueError::Ring)?;
                room.min(usize::from(avail.0.wrapping_sub(self.queue.next_avail())))
            }
            None => room,
        };
        // Request sizes only for whoever reads them.
        let sized = gate.is_some() || self.counting.is_some();
        let mut iter = self.queue.iter(mem).map_err(QueueError::Ring)?;
        while popped < limit {
            if let Some(Admission::Closed(wait)) = gate.as_mut().map(|g| g.admission()) {
                self.throttled_until = Some(Instant::now() + wait);
                if let Some(q) = self.counting.as_ref().and_then(Counting::queue) {
                    q.throttled_ns.add(wait.as_nanos() as u64);
                }
                break;
            }
            let Some(chain) = iter.next() else { break };
            let head = chain.head_index();
            if head >= size {
                return Err(QueueError::HeadOutOfRange { head, size });
            }
            if self.in_flight[usize::from(head)] {
                return Err(QueueError::DuplicateHead(head));
            }
            self.bufs.clear();
            let parsed = request::parse(chain, &data, &self.limits, &mut self.scratch, &mut self.bufs);
            let Some(status_addr) = parsed.status_addr else {
                return Err(QueueError::NoStatus(head));
            };
            let (status, bytes) = match &parsed.action {
                Action::Complete(status) => (Some(*status), 0),
                Action::Io(op) => (None, if sized { op_bytes(op, &self.bufs) } else { 0 }),
            };
            if let Some(s) = status.filter(|s| *s != STATUS_OK) {
                tracing::debug!(head, status = s, "request refused");
            }
            let pos = self.back;
            let at = (pos % self.window.len() as u64) as usize;
            self.window[at] = Pending {
                head,
                status_addr,
                used_len_ok: parsed.used_len_ok,
                status,
                kind: parsed.kind,
                bytes,
                popped_ns,
            };
            self.position[usize::from(head)] = pos;
            self.in_flight[usize::from(head)] = true;
            self.back += 1;
            popped += 1;
            if let Action::Io(op) = parsed.action {
                if let Some(g) = gate.as_mut() {
                    g.charge(&op, bytes);
                }
                self.io.submit(&data, &self.bufs, op, head);
            }
        }
        Ok(popped)
    }

    /// Publishes the finished prefix of the window, in pop order. Returns how many.
    fn publish<M: QueueMemory>(&mut self, mem: &M) -> Result<usize, QueueError> {
        let mut published = 0;
        // One clock read per batch: every request published now has the same end time.
        let mut now_ns = None;
        while self.front < self.back {
            let p = self.window[self.window_index(self.front)];
            let Some(status) = p.status else { break };
            // The status byte was validated inside the data window, which stays mapped while
            // anything is in flight.
            let written = mem
                .data_region()
                .and_then(|r| region_slice(r, p.status_addr, 1).map(|s| s.copy_from(&[status])))
                .is_some();
            let used_len = match (written, status) {
                (false, _) => 0,
                (true, STATUS_OK) => p.used_len_ok,
                (true, _) => 1,
            };
            if let Some(c) = &self.counting {
                let now = *now_ns.get_or_insert_with(|| c.now_ns());
                if let Some(q) = c.queue() {
                    q.record(p.kind, status, p.bytes, now.saturating_sub(p.popped_ns));
                }
            }
            self.in_flight[usize::from(p.head)] = false;
            self.front += 1;
            self.queue.add_used(mem, p.head, used_len).map_err(QueueError::Ring)?;
            published += 1;
        }
        Ok(published)
    }
}
