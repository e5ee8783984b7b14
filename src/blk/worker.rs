//! The queue worker: drain available chains, validate, run them on the backend as one batch,
//! complete them in order, and ask for one interrupt per batch.
//!
//! Completion is strictly in the order chains were popped. That keeps `used.idx` equal to the
//! number of chains fully handled, which is what lets a restarted server resume at
//! `used.idx` without an in-flight log (VDUSE.md §6).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestRegionMmap};

use super::request::{self, Action, DeviceLimits, ParseScratch, STATUS_IOERR, STATUS_OK};
use crate::backend::{Backend, IoBuf, IoOp, QueueIo};

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
    /// The backend's I/O engine failed for good.
    #[error("the backend cannot run I/O any more")]
    Backend,
}

/// One popped chain waiting for completion.
#[derive(Debug, Clone, Copy)]
struct Pending {
    head: u16,
    status_addr: Option<GuestAddress>,
    used_len_ok: u32,
    /// Index into the batch's ops, or the final status.
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Op(usize),
    Status(u8),
}

/// Serves one virtqueue. Owns everything it touches, so queues share no lock.
pub struct QueueWorker {
    queue: Queue,
    backend: Arc<dyn Backend>,
    io: Box<dyn QueueIo>,
    limits: DeviceLimits,
    // Tables reused across batches: no allocation per request once warmed up.
    scratch: ParseScratch,
    pending: Vec<Pending>,
    bufs: Vec<IoBuf>,
    ops: Vec<IoOp>,
    results: Vec<io::Result<()>>,
    in_flight: Vec<bool>,
    /// How long to poll the ring for more work before waiting for a kick.
    poll: Duration,
}

impl QueueWorker {
    /// A worker for `queue`, which must be configured and valid for the memory it will be
    /// driven with.
    /// A worker for `queue`. `poll` is how long it polls the ring for more work before it
    /// re-enables kicks and returns (zero: not at all).
    pub fn new(
        queue: Queue,
        backend: Arc<dyn Backend>,
        io: Box<dyn QueueIo>,
        limits: DeviceLimits,
        poll: Duration,
    ) -> Self {
        let size = usize::from(queue.size());
        Self {
            queue,
            poll,
            backend,
            io,
            limits,
            scratch: ParseScratch::default(),
            pending: Vec::with_capacity(size),
            bufs: Vec::with_capacity(size * 4),
            ops: Vec::with_capacity(size),
            results: Vec::with_capacity(size),
            in_flight: vec![false; size],
        }
    }

    /// The queue state (for recovery and tests).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Whether the driver has made chains available that are not processed yet. One
    /// acquire load of the avail index: cheap enough to poll.
    pub fn has_pending<M>(&self, mem: &M) -> bool
    where
        M: GuestMemoryBackend<R = GuestRegionMmap<()>>,
    {
        self.queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != self.queue.next_avail())
    }

    /// Handles everything the driver has made available, re-checking after re-enabling
    /// notifications so a kick that raced with the drain is not lost. Calls `notify` once per
    /// batch that needs an interrupt.
    pub fn process<M>(&mut self, mem: &M, notify: &mut dyn FnMut()) -> Result<(), QueueError>
    where
        M: GuestMemoryBackend<R = GuestRegionMmap<()>>,
    {
        loop {
            self.queue.disable_notification(mem).map_err(QueueError::Ring)?;
            while self.drain_batch(mem)? > 0 {
                if self.queue.needs_notification(mem).map_err(QueueError::Ring)? {
                    notify();
                }
            }
            // Poll briefly with kicks still off: at low queue depth the driver's next request
            // usually comes within microseconds, and taking it here saves its kick and our
            // wake-up.
            if self.poll_for_work(mem) {
                continue;
            }
            if !self.queue.enable_notification(mem).map_err(QueueError::Ring)? {
                return Ok(());
            }
        }
    }

    fn poll_for_work<M>(&self, mem: &M) -> bool
    where
        M: GuestMemoryBackend<R = GuestRegionMmap<()>>,
    {
        if self.poll.is_zero() {
            return false;
        }
        let deadline = Instant::now() + self.poll;
        loop {
            if self.has_pending(mem) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Pops at most one ring's worth of chains, runs them, completes them. Returns how many.
    fn drain_batch<M>(&mut self, mem: &M) -> Result<usize, QueueError>
    where
        M: GuestMemoryBackend<R = GuestRegionMmap<()>>,
    {
        let size = self.queue.size();
        // Capacity can grow while we serve (online expansion); read it once per batch.
        self.limits.capacity_sectors = self.backend.capacity() / 512;
        self.pending.clear();
        self.bufs.clear();
        self.ops.clear();

        let mut fatal = None;
        let mut iter = self.queue.iter(mem).map_err(QueueError::Ring)?;
        // Cap the drain at the ring size: a driver that keeps adding cannot starve the rest.
        for chain in iter.by_ref().take(usize::from(size)) {
            let head = chain.head_index();
            if head >= size {
                fatal = Some(QueueError::HeadOutOfRange { head, size });
                break;
            }
            let slot = &mut self.in_flight[usize::from(head)];
            if *slot {
                fatal = Some(QueueError::DuplicateHead(head));
                break;
            }
            *slot = true;
            let parsed = request::parse(chain, mem, &self.limits, &mut self.scratch, &mut self.bufs);
            let outcome = match parsed.action {
                Action::Io(op) => {
                    self.ops.push(op);
                    Outcome::Op(self.ops.len() - 1)
                }
                Action::Complete(status) => Outcome::Status(status),
            };
            self.pending.push(Pending {
                head,
                status_addr: parsed.status_addr,
                used_len_ok: parsed.used_len_ok,
                outcome,
            });
        }
        drop(iter);

        self.results.clear();
        if !self.ops.is_empty() {
            self.io.execute(mem, &self.bufs, &self.ops, &mut self.results);
        }

        // One log line per batch, not per request: a failing disk must not flood the logs.
        if let Some((i, e)) = self.results.iter().enumerate().find_map(|(i, r)| r.as_ref().err().map(|e| (i, e))) {
            let failed = self.results.iter().filter(|r| r.is_err()).count();
            tracing::warn!(error = %e, op = ?self.ops[i], failed, "backend I/O failed");
        }
        for p in &self.pending {
            let status = match p.outcome {
                Outcome::Status(s) => s,
                Outcome::Op(i) => match self.results.get(i) {
                    Some(Ok(())) => STATUS_OK,
                    Some(Err(_)) | None => STATUS_IOERR,
                },
            };
            if status != STATUS_OK {
                tracing::debug!(head = p.head, status, "request completed with an error");
            }
            let mut used_len = 0;
            if let Some(addr) = p.status_addr {
                // The status address was validated by the parser; a failure here means the
                // mapping went away under us, and the chain still gets completed.
                if mem.write_obj(status, addr).is_ok() {
                    used_len = if status == STATUS_OK { p.used_len_ok } else { 1 };
                }
            }
            self.in_flight[usize::from(p.head)] = false;
            self.queue.add_used(mem, p.head, used_len).map_err(QueueError::Ring)?;
        }
        // The chains popped before a ring fault were valid and are completed above, so the
        // driver is not left waiting on them; the queue itself stops here.
        if let Some(fault) = fatal {
            return Err(fault);
        }
        if !self.io.healthy() {
            return Err(QueueError::Backend);
        }
        Ok(self.pending.len())
    }
}
