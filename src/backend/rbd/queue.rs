//! The RBD backend's I/O engine: librbd's asynchronous calls, straight into the worker's
//! buffers (the VDUSE bounce pages), one engine per queue worker.
//!
//! librbd runs each completion callback on one of its own threads. The callback only records
//! `(tag, result)` in the engine's shared list and signals the engine's eventfd; the queue
//! thread reaps the list. No thread exists per request, and the callback never calls back
//! into librbd beyond reading and releasing its completion.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::client::Image;
use super::sys;
use crate::backend::{Completion, IoBuf, IoOp, QueueIo, SliceSource, buffers};

/// What completions the callbacks have posted, shared between librbd's threads and the
/// queue thread.
struct Posted {
    done: Mutex<Vec<Completion>>,
    /// Completions in `done`, readable without the lock.
    count: AtomicUsize,
    ready: Condvar,
    notifier: EventFd,
}

/// One operation in librbd's hands: owned by the completion's callback argument from
/// submission until the callback runs.
struct InFlight {
    posted: Arc<Posted>,
    tag: u16,
    /// The buffers of a read or write; librbd may read the table until completion.
    iovecs: Vec<libc::iovec>,
    /// Bytes a read must return; 0 for anything else.
    read_len: u64,
}

/// A queue worker's librbd engine.
pub struct RbdQueue {
    image: Arc<Image>,
    posted: Arc<Posted>,
    capacity: usize,
    submitted: usize,
    /// Completions decided without librbd (unresolvable buffers, refused submissions).
    ready: Vec<Completion>,
}

impl RbdQueue {
    pub fn new(image: Arc<Image>, depth: u16) -> io::Result<Self> {
        let notifier = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let posted = Arc::new(Posted {
            done: Mutex::new(Vec::with_capacity(depth.into())),
            count: AtomicUsize::new(0),
            ready: Condvar::new(),
            notifier,
        });
        Ok(Self { image, posted, capacity: depth.into(), submitted: 0, ready: Vec::new() })
    }

    fn fail(&mut self, tag: u16, errno: i32) {
        self.ready.push(Completion { tag, result: Err(io::Error::from_raw_os_error(errno)) });
    }

    /// The iovec table of `bufs` in `mem`, or `None` if a buffer is not mapped.
    fn iovecs(mem: &dyn SliceSource, bufs: &[IoBuf]) -> Option<Vec<libc::iovec>> {
        bufs.iter()
            .map(|b| {
                let slice = mem.slice(b.addr, b.len as usize)?;
                Some(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast::<c_void>(), iov_len: slice.len() })
            })
            .collect()
    }
}

/// Runs on a librbd thread when an operation ends.
extern "C" fn on_complete(completion: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the `Box<InFlight>` leaked at submission for exactly this completion,
    // and librbd calls this once per completion.
    let op = unsafe { Box::from_raw(arg.cast::<InFlight>()) };
    // SAFETY: `completion` is the finished completion this callback belongs to; its return
    // value is read before it is released, and it is not used afterwards.
    let ret = unsafe { sys::rbd_aio_get_return_value(completion) };
    // SAFETY: as above; released once, here.
    unsafe { sys::rbd_aio_release(completion) };
    // Writes return 0 on Pacific and the byte count on later releases; reads the byte count.
    let result = if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret as i32))
    } else if op.read_len != 0 && ret as u64 != op.read_len {
        Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("short read: {ret} of {} bytes", op.read_len)))
    } else {
        Ok(())
    };
    let posted = Arc::clone(&op.posted);
    let tag = op.tag;
    // The iovec table may go now: the operation is over.
    drop(op);
    // A poisoned lock only means another callback panicked; the list itself is intact.
    let mut done = posted.done.lock().unwrap_or_else(|e| e.into_inner());
    done.push(Completion { tag, result });
    posted.count.fetch_add(1, Ordering::Release);
    drop(done);
    posted.ready.notify_one();
    // The counter is never read (the queue thread watches for edges): a full counter
    // (EAGAIN) still left an edge pending.
    let _ = posted.notifier.write(1);
}

impl QueueIo for RbdQueue {
    fn capacity(&self) -> usize {
        self.capacity
    }

    fn submit(&mut self, mem: &dyn SliceSource, bufs: &[IoBuf], op: IoOp, tag: u16) {
        if usize::from(tag) >= self.capacity {
            return self.fail(tag, libc::EINVAL);
        }
        let (iovecs, read_len) = match op {
            IoOp::Read { bufs: range, .. } | IoOp::Write { bufs: range, .. } => {
                let Some(iovecs) = buffers(bufs, range).ok().and_then(|b| Self::iovecs(mem, b)) else {
                    return self.fail(tag, libc::EFAULT);
                };
                let len = iovecs.iter().map(|v| v.iov_len as u64).sum();
                (iovecs, if matches!(op, IoOp::Read { .. }) { len } else { 0 })
            }
            _ => (Vec::new(), 0),
        };
        let arg = Box::into_raw(Box::new(InFlight { posted: Arc::clone(&self.posted), tag, iovecs, read_len }));
        let mut completion: sys::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `arg` stays valid until the callback reclaims it (or we do, below, if the
        // completion is never handed to librbd); `completion` is an out-pointer.
        let ret = unsafe { sys::rbd_aio_create_completion(arg.cast::<c_void>(), Some(on_complete), &mut completion) };
        if ret < 0 {
            // SAFETY: librbd did not take `arg`; it is still ours.
            drop(unsafe { Box::from_raw(arg) });
            return self.fail(tag, -ret);
        }
        let image = self.image.handle;
        // SAFETY: `arg` is valid (see above) and only read here, before librbd can complete.
        let table = unsafe { &(*arg).iovecs };
        // bindgen declares its own `struct iovec`, laid out as libc's.
        let (iov, iovcnt) = (table.as_ptr().cast::<sys::iovec>(), table.len() as i32);
        // SAFETY: the image is open; the iovec table and the buffers it points to (the
        // worker's mapped memory) stay valid until the callback runs: the table is owned by
        // `arg`, and workers reap every operation before unmapping.
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
            // A refused submission never calls back: release the completion and take the
            // argument back.
            // SAFETY: librbd did not start the operation, so the completion is unused and
            // `arg` is ours again.
            unsafe {
                sys::rbd_aio_release(completion);
                drop(Box::from_raw(arg));
            }
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
        let mut done = self.posted.done.lock().unwrap_or_else(|e| e.into_inner());
        let n = done.len();
        self.posted.count.fetch_sub(n, Ordering::Release);
        self.submitted -= n;
        out.append(&mut done);
    }

    fn in_flight(&self) -> usize {
        self.submitted + self.ready.len()
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty() || self.posted.count.load(Ordering::Acquire) != 0
    }

    fn wait(&mut self) {
        if !self.ready.is_empty() || self.submitted == 0 {
            return;
        }
        let done = self.posted.done.lock().unwrap_or_else(|e| e.into_inner());
        let _done = self.posted.ready.wait_while(done, |d| d.is_empty()).unwrap_or_else(|e| e.into_inner());
    }

    fn notifier(&self) -> Option<BorrowedFd<'_>> {
        Some(self.posted.notifier.as_fd())
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
