//! The RBD backend's I/O engine: librbd's asynchronous calls, straight into the worker's
//! buffers (the VDUSE bounce pages), one engine per queue worker.
//!
//! librbd runs each completion callback on one of its own threads. The callback only records
//! the result in the operation's record, hands the record to the engine's shared list, and
//! signals the engine's eventfd if the list was empty; the queue thread reaps the list. No
//! thread exists per request, and the callback never calls back into librbd beyond reading
//! and releasing its completion. Records (and their iovec tables) are kept per tag and
//! reused, so a request allocates nothing of ours.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::backend::ceph::Image;
use crate::backend::ceph::sys;
use crate::backend::{Completion, IoBuf, IoOp, QueueIo, SliceSource, buffers};

/// What completions the callbacks have posted, shared between librbd's threads and the
/// queue thread.
struct Posted {
    /// Records of finished operations, their results filled in. Boxed: a record's address is
    /// its operation's callback argument, so it moves between owners without moving.
    #[allow(clippy::vec_box)]
    done: Mutex<Vec<Box<InFlight>>>,
    /// Records in `done`, readable without the lock.
    count: AtomicUsize,
    /// Written when `done` stops being empty (never read by the queue thread, which watches
    /// it for edges; [`RbdQueue::wait`] reads it).
    notifier: EventFd,
}

/// One tag's operation record: owned by the completion's callback argument from submission
/// until the callback hands it to [`Posted::done`], then reused for the tag's next operation.
struct InFlight {
    posted: Arc<Posted>,
    tag: u16,
    /// The buffers of a read or write; librbd may read the table until completion.
    iovecs: Vec<libc::iovec>,
    /// Bytes a read must return; 0 for anything else.
    read_len: u64,
    /// Set by the callback.
    result: io::Result<()>,
}

// SAFETY: `iovecs` only names worker memory for librbd (never dereferenced here), and a
// record has one user at a time, handed over through librbd's callback or the `done` lock.
unsafe impl Send for InFlight {}

/// A queue worker's librbd engine.
pub struct RbdQueue {
    image: Arc<Image>,
    posted: Arc<Posted>,
    capacity: usize,
    submitted: usize,
    /// Completions decided without librbd (unresolvable buffers, refused submissions).
    ready: Vec<Completion>,
    /// Each tag's record while it is not in flight (made at the tag's first use).
    spare: Vec<Option<Box<InFlight>>>,
    /// Set once an operation failed because this client lost the image's lock.
    lost: Option<i32>,
    /// Operations that failed so, or came after: never completed here, so the driver still
    /// waits for them and the next server (with the lock back, or fenced) runs them again.
    withheld: usize,
}

/// Whether a result says this client lost the image's exclusive lock: it was blocklisted
/// (librados's EBLOCKLISTED is ESHUTDOWN), or librbd refuses writes without the lock (EROFS).
fn lock_lost(result: &io::Result<()>) -> Option<i32> {
    result.as_ref().err().and_then(io::Error::raw_os_error).filter(|e| [libc::ESHUTDOWN, libc::EROFS].contains(e))
}

impl RbdQueue {
    pub fn new(image: Arc<Image>, depth: u16) -> io::Result<Self> {
        let notifier = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let posted = Arc::new(Posted {
            done: Mutex::new(Vec::with_capacity(depth.into())),
            count: AtomicUsize::new(0),
            notifier,
        });
        let spare = (0..depth).map(|_| None).collect();
        Ok(Self {
            image,
            posted,
            capacity: depth.into(),
            submitted: 0,
            ready: Vec::new(),
            spare,
            lost: None,
            withheld: 0,
        })
    }

    /// Keeps back an operation that failed because the lock is lost: failing it would fail a
    /// write that the image, with its lock back, can still take. Returns whether it did.
    fn withhold(&mut self, result: &io::Result<()>) -> bool {
        let Some(errno) = lock_lost(result) else { return false };
        if self.lost.is_none() {
            tracing::error!(error = %io::Error::from_raw_os_error(errno), "the RBD image's exclusive lock is lost; the queue stops, its requests wait");
        }
        self.lost.get_or_insert(errno);
        self.withheld += 1;
        true
    }

    fn fail(&mut self, tag: u16, errno: i32) {
        let result = Err(io::Error::from_raw_os_error(errno));
        if !self.withhold(&result) {
            self.ready.push(Completion { tag, result });
        }
    }

    /// Fills `table` with the iovecs of `bufs` in `mem`; false if a buffer is not mapped.
    fn fill_iovecs(table: &mut Vec<libc::iovec>, mem: &dyn SliceSource, bufs: &[IoBuf]) -> bool {
        table.clear();
        for b in bufs {
            let Some(slice) = mem.slice(b.addr, b.len as usize) else { return false };
            table.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast::<c_void>(), iov_len: slice.len() });
        }
        true
    }
}

/// Runs on a librbd thread when an operation ends.
extern "C" fn on_complete(completion: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the `Box<InFlight>` leaked at submission for exactly this completion,
    // and librbd calls this once per completion.
    let mut op = unsafe { Box::from_raw(arg.cast::<InFlight>()) };
    // SAFETY: `completion` is the finished completion this callback belongs to; its return
    // value is read before it is released, and it is not used afterwards.
    let ret = unsafe { sys::rbd_aio_get_return_value(completion) };
    // SAFETY: as above; released once, here.
    unsafe { sys::rbd_aio_release(completion) };
    // Writes return 0 on Pacific and the byte count on later releases; reads the byte count.
    op.result = if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret as i32))
    } else if op.read_len != 0 && ret as u64 != op.read_len {
        Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("short read: {ret} of {} bytes", op.read_len)))
    } else {
        Ok(())
    };
    // The record goes back to the queue thread; this clone keeps the list and the eventfd
    // alive until we are done with them, even if the engine is dropped meanwhile.
    let posted = Arc::clone(&op.posted);
    // A poisoned lock only means another callback panicked; the list itself is intact.
    let mut done = posted.done.lock().unwrap_or_else(|e| e.into_inner());
    done.push(op);
    let was_empty = posted.count.fetch_add(1, Ordering::Release) == 0;
    drop(done);
    // One signal per batch: the queue thread reaps the whole list, and a completion that
    // finds it non-empty is reaped with the one that signalled. A full counter (EAGAIN)
    // still left an edge pending.
    if was_empty {
        let _ = posted.notifier.write(1);
    }
}

impl QueueIo for RbdQueue {
    fn capacity(&self) -> usize {
        self.capacity
    }

    fn submit(&mut self, mem: &dyn SliceSource, bufs: &[IoBuf], op: IoOp, tag: u16) {
        if usize::from(tag) >= self.capacity {
            return self.fail(tag, libc::EINVAL);
        }
        if self.lost.is_some() {
            // Without the lock it would fail: kept back for the next server at once.
            self.withheld += 1;
            return;
        }
        let mut record = self.spare[usize::from(tag)].take().unwrap_or_else(|| {
            Box::new(InFlight {
                posted: Arc::clone(&self.posted),
                tag,
                iovecs: Vec::new(),
                read_len: 0,
                result: Ok(()),
            })
        });
        record.iovecs.clear();
        record.read_len = 0;
        if let IoOp::Read { bufs: range, .. } | IoOp::Write { bufs: range, .. } = op {
            let mapped = buffers(bufs, range).is_ok_and(|b| Self::fill_iovecs(&mut record.iovecs, mem, b));
            if !mapped {
                self.spare[usize::from(tag)] = Some(record);
                return self.fail(tag, libc::EFAULT);
            }
            if matches!(op, IoOp::Read { .. }) {
                record.read_len = record.iovecs.iter().map(|v| v.iov_len as u64).sum();
            }
        }
        let arg = Box::into_raw(record);
        let mut completion: sys::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `arg` stays valid until the callback reclaims it (or we do, below, if the
        // completion is never handed to librbd); `completion` is an out-pointer.
        let ret = unsafe { sys::rbd_aio_create_completion(arg.cast::<c_void>(), Some(on_complete), &mut completion) };
        if ret < 0 {
            // SAFETY: librbd did not take `arg`; it is still ours.
            self.spare[usize::from(tag)] = Some(unsafe { Box::from_raw(arg) });
            return self.fail(tag, -ret);
        }
        let image = self.image.handle;
        // SAFETY: `arg` is valid (see above) and only read here, before librbd can complete.
        let table = unsafe { &(*arg).iovecs };
        // bindgen declares its own `struct iovec`, laid out as libc's.
        let (iov, iovcnt) = (table.as_ptr().cast::<sys::iovec>(), table.len() as i32);
        // SAFETY: the image is open; the table (owned by `arg`) and the buffers it names (mapped
        // until every operation is reaped) stay valid until the callback runs.
        let ret = unsafe {
            match op {
                IoOp::Read { offset, .. } => sys::rbd_aio_readv(image, iov, iovcnt, offset, completion),
                IoOp::Write { offset, .. } => sys::rbd_aio_writev(image, iov, iovcnt, offset, completion),
                IoOp::Flush => sys::rbd_aio_flush(image, completion),
                IoOp::Discard { offset, len } => sys::rbd_aio_discard(image, offset, len, completion),
                IoOp::WriteZeroes { offset, len } => match usize::try_from(len) {
                    Ok(len) => sys::rbd_aio_write_zeroes(image, offset, len, completion, 0, 0),
                    Err(_) => -libc::EINVAL,
                },
            }
        };
        if ret < 0 {
            // SAFETY: a refused submission never calls back: librbd did not start the
            // operation, so the completion is unused (released here) and `arg` is ours again.
            self.spare[usize::from(tag)] = Some(unsafe {
                sys::rbd_aio_release(completion);
                Box::from_raw(arg)
            });
            return self.fail(tag, -ret);
        }
        self.submitted += 1;
    }

    fn commit(&mut self) {
        // librbd sends each operation as it is submitted.
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.ready);
        if self.posted.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let posted = Arc::clone(&self.posted);
        let mut done = posted.done.lock().unwrap_or_else(|e| e.into_inner());
        posted.count.fetch_sub(done.len(), Ordering::Release);
        self.submitted -= done.len();
        for mut record in done.drain(..) {
            let result = std::mem::replace(&mut record.result, Ok(()));
            let tag = record.tag;
            self.spare[usize::from(tag)] = Some(record);
            if !self.withhold(&result) {
                out.push(Completion { tag, result });
            }
        }
    }

    /// Withheld operations are not counted: nothing of theirs runs any more, and they are
    /// never reaped (the worker leaves them unanswered, for the next server).
    fn in_flight(&self) -> usize {
        self.submitted + self.ready.len()
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty() || self.posted.count.load(Ordering::Acquire) != 0
    }

    fn wait(&mut self) {
        // The eventfd is written when the list stops being empty: consume its count, then
        // sleep until the next write unless the list has filled meanwhile.
        while !self.has_completions() && self.submitted > 0 {
            let mut fds = [PollFd::new(self.posted.notifier.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::NONE).is_err_and(|e| e != nix::errno::Errno::EINTR) {
                return;
            }
            let _ = self.posted.notifier.read();
        }
    }

    fn notifier(&self) -> Option<BorrowedFd<'_>> {
        Some(self.posted.notifier.as_fd())
    }

    /// Once the lock is lost, and every operation librbd still ran has come back (they fail
    /// fast on a blocklisted client): the worker then stops with nothing in flight, so the
    /// queue's memory can go and a new server can take the device over.
    fn fault(&self) -> Option<String> {
        if self.submitted > 0 || !self.ready.is_empty() {
            return None;
        }
        self.lost.map(|errno| {
            format!(
                "the RBD image's exclusive lock is lost ({}): this client was blocklisted, or another took the lock; \
                 {} requests wait for the next server",
                io::Error::from_raw_os_error(errno),
                self.withheld
            )
        })
    }
}

impl Drop for RbdQueue {
    fn drop(&mut self) {
        // Operations still in librbd's hands own their buffers' addresses: wait for them, so
        // the memory can be unmapped after us. Workers normally reap everything first.
        while self.submitted > 0 {
            self.wait();
            let mut sink = Vec::new();
            self.reap(&mut sink);
        }
    }
}
