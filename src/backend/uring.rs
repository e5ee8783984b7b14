//! io_uring engine of the file backend: one ring per queue worker; operations are submitted
//! under their tag and reaped in whatever order they finish.
//!
//! The kernel moves bytes straight between the image and the buffers (the VDUSE bounce pages):
//! with `O_DIRECT` when an operation's offset, lengths and addresses are aligned, through the
//! page cache otherwise. There is no copy in our process. The ring is set up for a single
//! issuer with cooperative task work where the kernel has it, and the image is a registered
//! (fixed) file, so the hot path takes no file reference per request.
//!
//! Why a killed server's writes cannot land after its successor re-runs them: the successor
//! can only open `/dev/vduse/NAME` once the dead process's device fd is released (the open is
//! exclusive), and the kernel releases a dying task's files only after `io_uring`'s exit-time
//! cancellation has waited for every request that task issued to finish. So by the time a new
//! server re-runs the unfinished chains from `used.idx`, nothing of the old one is in flight.
//! The guest kill test (SIGKILL under `fio --verify`) checks exactly that.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{Completion, IoBuf, IoOp, QueueIo, SliceSource, buffers};

/// Alignment (offset, lengths, addresses) that lets an operation use the `O_DIRECT` file: the
/// page size, which covers disks with 4 KiB logical blocks as well as 512-byte ones, and is
/// what the host's page-aligned requests have anyway. A filesystem that wants more answers
/// EINVAL, and the operation is retried through the page cache.
const DIRECT_ALIGN: u64 = 4096;

/// Smallest buffered read handed to io_uring's worker threads rather than copied inline, and
/// the smallest buffered operation that goes through io_uring at all where small ones are
/// copied inline ([`UringQueue::runs_inline`]).
const ASYNC_READ_BYTES: u64 = 256 << 10;

/// Fixed-file index of the image opened without `O_DIRECT`.
const BUFFERED: types::Fixed = types::Fixed(0);
/// Fixed-file index of the image opened with `O_DIRECT`.
const DIRECT: types::Fixed = types::Fixed(1);

/// The image as the engine sees it.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    pub buffered: Arc<File>,
    /// The same image opened with `O_DIRECT`; `None` when the cache mode or the filesystem
    /// rules it out.
    pub direct: Option<Arc<File>>,
    /// The image is in memory (tmpfs): buffered I/O never waits for a device.
    pub memory: bool,
    /// io_uring hands every buffered write on the image's filesystem to a worker thread,
    /// because it cannot write there without blocking: tmpfs (no `FMODE_NOWAIT`) and ext4 (no
    /// `FMODE_BUF_WASYNC`, 6.12).
    pub writes_punted: bool,
}

/// One tag's operation while it is in flight.
#[derive(Debug)]
struct Slot {
    op: IoOp,
    /// The buffers still to transfer; the first one may be partly done.
    iovecs: Vec<libc::iovec>,
    first: usize,
    /// Bytes left to transfer, and bytes already transferred (the file offset advances by
    /// this much when a short transfer is continued).
    remaining: u64,
    done: u64,
    direct: bool,
    busy: bool,
}

impl Default for Slot {
    fn default() -> Self {
        Self { op: IoOp::Flush, iovecs: Vec::new(), first: 0, remaining: 0, done: 0, direct: false, busy: false }
    }
}

/// A queue worker's ring.
pub struct UringQueue {
    ring: IoUring,
    files: ImageFiles,
    slots: Vec<Slot>,
    /// Operations handed to the ring and not reaped yet.
    submitted: usize,
    /// Completions decided without the kernel (unresolvable buffers, fallbacks); handed out at
    /// the next reap.
    ready: Vec<Completion>,
    /// `(user_data, result)` of the CQEs of one reap.
    cqes: Vec<(u64, i32)>,
    /// Signalled by the kernel when CQEs are posted.
    notifier: EventFd,
    /// Set when the ring failed in a way that leaves in-flight I/O unknown.
    broken: bool,
}

// SAFETY: the raw pointers in the slots' iovec tables point into the worker's mapped memory;
// they are only handed to the kernel, never dereferenced here, and the engine is used by one
// thread at a time (it moves to the queue thread once, before any submission).
unsafe impl Send for UringQueue {}

/// Builds a ring for one issuer with cooperative task work (5.19+; no inter-processor
/// interrupt to run completions, which run at our next `io_uring_enter`), falling back to the
/// default mode on older kernels. `DEFER_TASKRUN` was measured too: it costs a second
/// `io_uring_enter` per request (to collect each completion), for no gain.
fn build_ring(entries: u32) -> io::Result<IoUring> {
    let attempts: [fn(&mut io_uring::Builder); 2] = [
        |b| {
            b.setup_single_issuer().setup_coop_taskrun().setup_taskrun_flag();
        },
        |_| {},
    ];
    let mut last = None;
    for setup in attempts {
        let mut builder = IoUring::builder();
        setup(&mut builder);
        // Room for every operation twice over in the completion queue: a short transfer
        // posts a CQE and is continued before the first is reaped.
        builder.setup_cqsize(entries * 2);
        match builder.build(entries) {
            Ok(ring) => return Ok(ring),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)))
}

impl UringQueue {
    /// A ring with room for `depth` operations (tags `0..depth`).
    pub fn new(files: ImageFiles, depth: u16) -> io::Result<Self> {
        let depth = depth.max(1);
        let entries = u32::from(depth).next_power_of_two().max(8);
        let ring = build_ring(entries)?;
        let mut fds = vec![files.buffered.as_raw_fd()];
        if let Some(direct) = &files.direct {
            fds.push(direct.as_raw_fd());
        }
        ring.submitter().register_files(&fds)?;
        let notifier = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(io::Error::from)?;
        ring.submitter().register_eventfd(notifier.as_fd().as_raw_fd())?;
        Ok(Self {
            ring,
            files,
            slots: (0..depth).map(|_| Slot::default()).collect(),
            submitted: 0,
            ready: Vec::new(),
            cqes: Vec::with_capacity(usize::from(depth)),
            notifier,
            broken: false,
        })
    }

    /// Fills `tag`'s slot for `op`; an error completes the operation at once.
    fn prepare(&mut self, mem: &dyn SliceSource, table: &[IoBuf], op: IoOp, tag: usize) -> io::Result<()> {
        let direct_ok = self.files.direct.is_some();
        let slot = &mut self.slots[tag];
        slot.op = op;
        slot.iovecs.clear();
        slot.first = 0;
        slot.done = 0;
        slot.remaining = 0;
        slot.direct = false;
        if let IoOp::Read { offset, bufs } | IoOp::Write { offset, bufs } = op {
            let mut aligned = direct_ok && offset % DIRECT_ALIGN == 0;
            for buf in buffers(table, bufs)? {
                let slice =
                    mem.slice(buf.addr, buf.len as usize).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
                let base = slice.ptr_guard_mut().as_ptr();
                aligned &= (base as u64) % DIRECT_ALIGN == 0 && (slice.len() as u64) % DIRECT_ALIGN == 0;
                slot.remaining += slice.len() as u64;
                slot.iovecs.push(libc::iovec { iov_base: base.cast(), iov_len: slice.len() });
            }
            if !aligned && direct_ok {
                tracing::debug!(offset, "misaligned request; through the page cache");
            }
            // O_DIRECT pins the buffers, and the kernel will not pin its own bounce pages.
            slot.direct = aligned && mem.pinnable();
            tracing::trace!(
                offset,
                bytes = slot.remaining,
                iovecs = slot.iovecs.len(),
                direct = slot.direct,
                "prepared"
            );
        }
        Ok(())
    }

    /// The SQE that (re)starts `tag`'s operation from where it stands.
    fn sqe(&self, tag: usize) -> squeue::Entry {
        let slot = &self.slots[tag];
        let file = if slot.direct { DIRECT } else { BUFFERED };
        let entry = match slot.op {
            IoOp::Read { offset, .. } | IoOp::Write { offset, .. } => {
                let offset = offset + slot.done;
                let iov = &slot.iovecs[slot.first..];
                let read = matches!(slot.op, IoOp::Read { .. });
                match iov {
                    // One buffer (most 4 KiB requests): no iovec import in the kernel.
                    [one] if read => {
                        opcode::Read::new(file, one.iov_base.cast(), one.iov_len as u32).offset(offset).build()
                    }
                    [one] => {
                        opcode::Write::new(file, one.iov_base as *const u8, one.iov_len as u32).offset(offset).build()
                    }
                    _ if read => opcode::Readv::new(file, iov.as_ptr(), iov.len() as u32).offset(offset).build(),
                    _ => opcode::Writev::new(file, iov.as_ptr(), iov.len() as u32).offset(offset).build(),
                }
            }
            IoOp::Flush => opcode::Fsync::new(BUFFERED).flags(types::FsyncFlags::DATASYNC).build(),
            IoOp::Discard { offset, len } => opcode::Fallocate::new(BUFFERED, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoOp::WriteZeroes { offset, len } => opcode::Fallocate::new(BUFFERED, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        // A large read through the page cache is one long memcpy that would otherwise run
        // inside our `io_uring_enter`, one request after another. Punted to io_uring's
        // workers, several run at once while this thread keeps serving the ring (measured in
        // the guest: 1 MiB reads at QD8 +19%, 409 vs 343 IOPS, median of 3). Writes gained
        // nothing, and O_DIRECT reads are asynchronous already.
        let large_buffered_read =
            !slot.direct && matches!(slot.op, IoOp::Read { .. }) && slot.remaining >= ASYNC_READ_BYTES;
        let entry = if large_buffered_read { entry.flags(squeue::Flags::ASYNC) } else { entry };
        entry.user_data(tag as u64)
    }

    /// Whether `tag`'s prepared operation is copied in this thread instead of through the
    /// ring: a small buffered read of a tmpfs image, or a small buffered write where io_uring
    /// would hand it to a worker thread anyway ([`ImageFiles::writes_punted`]). Traced in the
    /// test guest (6.12), 2000 of 2000 4 KiB reads of a tmpfs image went to io-wq, and so did
    /// every buffered write to an ext4 one. A page-cache copy in this thread costs one
    /// syscall and no thread hand-off. On tmpfs, 4 KiB QD1 reads went from about 1300 to about
    /// 2600 IOPS and QD32 writes from about 12500 to about 18100 (medians of 3); the ext4
    /// figures are in docs/PERFORMANCE.md. Several workers would not write in parallel
    /// either: a buffered write holds the inode's lock. Large operations still go to the
    /// workers, where several copies run at once. The cost: a write that the kernel throttles
    /// (too much dirty memory) holds this queue's other requests for that long, where a
    /// worker would have held only itself.
    fn runs_inline(&self, tag: usize) -> bool {
        let slot = &self.slots[tag];
        let small_buffered = !slot.direct && slot.remaining < ASYNC_READ_BYTES;
        match slot.op {
            IoOp::Read { .. } => small_buffered && self.files.memory,
            IoOp::Write { .. } => small_buffered && self.files.writes_punted,
            _ => false,
        }
    }

    /// Reads or writes `tag`'s prepared buffers with `preadv`/`pwritev`, continuing short
    /// transfers.
    fn transfer_inline(&mut self, tag: usize) -> io::Result<()> {
        let fd = self.files.buffered.as_raw_fd();
        while self.slots[tag].remaining > 0 {
            let slot = &self.slots[tag];
            let (IoOp::Read { offset, .. } | IoOp::Write { offset, .. }) = slot.op else {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            };
            let iov = &slot.iovecs[slot.first..];
            let (ptr, count, at) = (iov.as_ptr(), iov.len() as libc::c_int, (offset + slot.done) as libc::off_t);
            // The iovecs were built by `prepare` from slices of the worker's mapped memory,
            // which stays mapped for the whole (synchronous) call.
            let n = if matches!(slot.op, IoOp::Read { .. }) {
                // SAFETY: the kernel writes only inside the iovecs, all in mapped memory.
                unsafe { libc::preadv(fd, ptr, count, at) }
            } else {
                // SAFETY: the kernel only reads the iovecs, all in mapped memory.
                unsafe { libc::pwritev(fd, ptr, count, at) }
            };
            match n {
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                n if n > 0 => self.advance(tag, n as u64),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Queues `tag`'s SQE, entering the kernel first if the submission queue is full.
    fn push(&mut self, tag: usize) -> io::Result<()> {
        let sqe = self.sqe(tag);
        for _ in 0..2 {
            // SAFETY: the SQE points at the slot's iovec table and at buffers in the worker's
            // memory; the table is left alone and the memory stays mapped until the CQE is reaped.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.commit();
        }
        Err(io::Error::other("io_uring submission queue full"))
    }

    /// Records `n` more bytes transferred by `tag`: drops the iovecs that are complete and
    /// shortens a partly transferred one.
    fn advance(&mut self, tag: usize, mut n: u64) {
        let slot = &mut self.slots[tag];
        slot.done += n;
        slot.remaining -= n;
        while n > 0 && slot.first < slot.iovecs.len() {
            let iov = &mut slot.iovecs[slot.first];
            let len = iov.iov_len as u64;
            if n >= len {
                n -= len;
                slot.first += 1;
            } else {
                iov.iov_base = iov.iov_base.wrapping_add(n as usize);
                iov.iov_len -= n as usize;
                n = 0;
            }
        }
        // What is left of a partial direct transfer may no longer be aligned.
        let misaligned = slot.iovecs[slot.first..]
            .iter()
            .any(|v| (v.iov_base as u64) % DIRECT_ALIGN != 0 || (v.iov_len as u64) % DIRECT_ALIGN != 0);
        if misaligned {
            slot.direct = false;
        }
    }

    /// Handles one CQE of `tag`: `Some(result)` when the operation is finished, `None` when
    /// it was continued (short transfer, retryable error, fallback).
    fn finish(&mut self, tag: usize, res: i32) -> Option<io::Result<()>> {
        let slot = &mut self.slots[tag];
        if res < 0 {
            let errno = -res;
            let retry = match errno {
                libc::EINTR | libc::EAGAIN => true,
                // The device under the image wants more alignment than we checked, or the
                // kernel would not pin a buffer after all (`prepare` sends only memory that
                // says it is pinnable; tests/guest/device-tests.sh odirect_first_reads covers
                // the kernel's bounce pages): go through the page cache for this operation.
                libc::EINVAL | libc::EFAULT if slot.direct => {
                    tracing::debug!(
                        errno,
                        done = slot.done,
                        left = slot.remaining,
                        "O_DIRECT refused; through the page cache"
                    );
                    slot.direct = false;
                    true
                }
                _ => false,
            };
            if retry {
                return self.push(tag).err().map(Err);
            }
            if let (IoOp::WriteZeroes { offset, len }, libc::EOPNOTSUPP) = (slot.op, errno) {
                return Some(self.write_zeroes_fallback(offset, len));
            }
            return Some(Err(io::Error::from_raw_os_error(errno)));
        }
        match slot.op {
            IoOp::Read { .. } | IoOp::Write { .. } if (res as u64) < slot.remaining => {
                if res == 0 {
                    return Some(Err(io::Error::from(io::ErrorKind::UnexpectedEof)));
                }
                tracing::debug!(direct = slot.direct, done = res, left = slot.remaining, "short transfer; continuing");
                self.advance(tag, res as u64);
                self.push(tag).err().map(Err)
            }
            _ => Some(Ok(())),
        }
    }

    /// Zeroes a range on filesystems without `FALLOC_FL_ZERO_RANGE` (tmpfs): punch a hole and
    /// allocate it again, which reads back as zeroes and stays allocated.
    fn write_zeroes_fallback(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{FallocateFlags, fallocate};
        let (off, len) = (offset as libc::off_t, len as libc::off_t);
        let file = &*self.files.buffered;
        fallocate(file, FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, off, len)?;
        fallocate(file, FallocateFlags::FALLOC_FL_KEEP_SIZE, off, len)?;
        Ok(())
    }

    /// Gives up on the ring after the kernel refused `io_uring_enter` itself. Operations it
    /// already accepted may still be running and writing into their buffers, so they are
    /// never reported finished: they stay in flight, the engine reports itself unhealthy,
    /// and the worker must keep their memory mapped (it leaks it rather than unmap).
    fn fail_all(&mut self, why: &io::Error) {
        tracing::error!(error = %why, in_flight = self.submitted, "io_uring_enter failed; the queue's I/O engine is broken");
        self.broken = true;
    }

    /// `io_uring_enter`, treating transient refusals as "try again later".
    fn enter(&mut self, wait: usize) {
        if self.broken {
            return;
        }
        match self.ring.submit_and_wait(wait) {
            Ok(_) => {}
            // Interrupted, or short of resources or completion-queue room: the next reap or
            // commit enters again.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
            Err(e) => self.fail_all(&e),
        }
    }
}

impl QueueIo for UringQueue {
    fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn submit(&mut self, mem: &dyn SliceSource, bufs: &[IoBuf], op: IoOp, tag: u16) {
        let t = usize::from(tag);
        let refused = if self.broken {
            Some(io::Error::other("the queue's io_uring is broken"))
        } else if self.slots.get(t).is_none_or(|s| s.busy) {
            Some(io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            self.prepare(mem, bufs, op, t).err()
        };
        if let Some(e) = refused {
            self.ready.push(Completion { tag, result: Err(e) });
            return;
        }
        if self.runs_inline(t) {
            let result = self.transfer_inline(t);
            self.ready.push(Completion { tag, result });
            return;
        }
        self.slots[t].busy = true;
        self.submitted += 1;
        if let Err(e) = self.push(t) {
            // Never queued, so the kernel has nothing of it.
            self.slots[t].busy = false;
            self.submitted -= 1;
            self.ready.push(Completion { tag, result: Err(e) });
        }
    }

    fn commit(&mut self) {
        if !self.ring.submission().is_empty() {
            self.enter(0);
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.ready);
        if self.submitted == 0 {
            return;
        }
        // Pending task work and overflowed CQEs reach the ring only through an enter, and
        // entries a refused enter left in the submission queue must still go out.
        let needs_enter = {
            let sq = self.ring.submission();
            sq.taskrun() || sq.cq_overflow() || !sq.is_empty()
        };
        if needs_enter {
            self.enter(0);
        }
        self.cqes.clear();
        self.cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let mut continued = false;
        for n in 0..self.cqes.len() {
            let (user_data, res) = self.cqes[n];
            let tag = user_data as usize;
            if !self.slots.get(tag).is_some_and(|s| s.busy) {
                // Every SQE of this ring carries the tag of a busy slot.
                tracing::error!(user_data, "completion for an operation not in flight");
                continue;
            }
            match self.finish(tag, res) {
                // Not busy any more: the ring broke while continuing it, and `fail_all`
                // already reported it.
                Some(result) if self.slots[tag].busy => {
                    self.slots[tag].busy = false;
                    self.submitted -= 1;
                    out.push(Completion { tag: tag as u16, result });
                }
                Some(_) => {}
                None => continued = true,
            }
        }
        if continued {
            self.commit();
        }
        out.append(&mut self.ready);
    }

    fn in_flight(&self) -> usize {
        self.submitted + self.ready.len()
    }

    fn has_completions(&mut self) -> bool {
        if !self.ready.is_empty() {
            return true;
        }
        if self.submitted == 0 {
            return false;
        }
        // Only the indexes and flags are read; nothing is consumed.
        let cq_ready = !self.ring.completion().is_empty();
        let sq = self.ring.submission();
        // Entries still queued count: a refused enter left them, and a reap sends them.
        cq_ready || sq.taskrun() || (!self.broken && !sq.is_empty())
    }

    fn wait(&mut self) {
        if self.ready.is_empty() && self.submitted > 0 && !self.broken {
            self.enter(1);
        }
    }

    fn notifier(&self) -> Option<BorrowedFd<'_>> {
        Some(self.notifier.as_fd())
    }

    fn fault(&self) -> Option<String> {
        self.broken.then(|| "its io_uring failed (io_uring_enter)".to_owned())
    }
}
