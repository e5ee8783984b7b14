//! io_uring engine of the file backend: one ring per queue worker, one submission per batch.
//!
//! Every operation of a drained batch is queued, the batch is submitted with one
//! `io_uring_enter` that waits for all of it, and the results are handed back in order. The
//! kernel reads and writes straight between the image's page cache and the buffers (the VDUSE
//! bounce pages), so there is no copy in our process.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};

use super::{IoBuf, IoOp, QueueIo, SliceSource, buffers};

/// A queue worker's ring. The iovec table is reused across batches so the hot path does not
/// allocate once it has grown to the largest batch seen.
pub struct UringQueue {
    ring: IoUring,
    file: Arc<File>,
    iovecs: Vec<libc::iovec>,
    /// Progress of each op of the batch.
    spans: Vec<Span>,
    /// Ops to submit in the current round, and those that came back short.
    todo: Vec<usize>,
    again: Vec<usize>,
    /// `(user_data, result)` of the completions reaped by one wait.
    completions: Vec<(usize, i32)>,
    /// Set when io_uring_enter failed in a way that leaves in-flight I/O unknown.
    broken: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Span {
    /// First iovec not yet transferred in full.
    first: usize,
    /// Iovecs left from `first`.
    count: usize,
    /// Bytes left to transfer.
    remaining: u64,
    /// Bytes transferred so far (the file offset advances by this much on a retry).
    done: u64,
}

// SAFETY: the raw pointers in `iovecs` only ever point into memory of the batch being executed
// and are not dereferenced by us; the table is rebuilt for every batch on the worker's thread.
unsafe impl Send for UringQueue {}

impl UringQueue {
    pub fn new(file: Arc<File>, entries: u32) -> io::Result<Self> {
        Ok(Self {
            ring: IoUring::new(entries.max(8))?,
            file,
            iovecs: Vec::new(),
            spans: Vec::new(),
            todo: Vec::new(),
            again: Vec::new(),
            completions: Vec::new(),
            broken: false,
        })
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// Builds the iovec table for `ops`; an op whose buffer cannot be resolved fails at once.
    fn build_iovecs(&mut self, mem: &dyn SliceSource, table: &[IoBuf], ops: &[IoOp], results: &mut [io::Result<()>]) {
        let total: usize = ops
            .iter()
            .map(|op| match op {
                IoOp::Read { bufs, .. } | IoOp::Write { bufs, .. } => bufs.end.saturating_sub(bufs.start),
                _ => 0,
            })
            .sum();
        self.iovecs.clear();
        // Reserve before taking any pointer into the table: it must not move during the batch.
        self.iovecs.reserve(total);
        self.spans.clear();
        for (op, result) in ops.iter().zip(results.iter_mut()) {
            let first = self.iovecs.len();
            let mut expected = 0;
            if let IoOp::Read { bufs, .. } | IoOp::Write { bufs, .. } = *op {
                let bufs = match buffers(table, bufs) {
                    Ok(b) => b,
                    Err(e) => {
                        *result = Err(e);
                        &[]
                    }
                };
                for buf in bufs {
                    match resolve(mem, buf) {
                        Some(iov) => {
                            expected += iov.iov_len as u64;
                            self.iovecs.push(iov);
                        }
                        None => {
                            *result = Err(io::Error::from_raw_os_error(libc::EFAULT));
                            break;
                        }
                    }
                }
            }
            self.spans.push(Span { first, count: self.iovecs.len() - first, remaining: expected, done: 0 });
        }
    }

    /// The SQE that (re)starts op `index` from where it stands.
    fn sqe(&self, index: usize, op: &IoOp) -> squeue::Entry {
        let span = self.spans[index];
        let entry = match *op {
            IoOp::Read { offset, .. } | IoOp::Write { offset, .. } => {
                let (iov, count) = self.remaining_iovecs(index);
                let offset = offset + span.done;
                if matches!(op, IoOp::Read { .. }) {
                    opcode::Readv::new(self.fd(), iov, count).offset(offset).build()
                } else {
                    opcode::Writev::new(self.fd(), iov, count).offset(offset).build()
                }
            }
            IoOp::Flush => opcode::Fsync::new(self.fd()).flags(types::FsyncFlags::DATASYNC).build(),
            IoOp::Discard { offset, len } => opcode::Fallocate::new(self.fd(), len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoOp::WriteZeroes { offset, len } => opcode::Fallocate::new(self.fd(), len)
                .offset(offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        entry.user_data(index as u64)
    }

    /// The iovecs op `index` still has to transfer.
    fn remaining_iovecs(&self, index: usize) -> (*const libc::iovec, u32) {
        let span = self.spans[index];
        (self.iovecs[span.first..].as_ptr(), span.count as u32)
    }

    /// Records `n` more bytes transferred by op `index`: drops the iovecs that are complete
    /// and shortens a partially transferred one.
    fn advance(&mut self, index: usize, mut n: u64) {
        let span = &mut self.spans[index];
        span.done += n;
        span.remaining -= n;
        while n > 0 && span.count > 0 {
            let iov = &mut self.iovecs[span.first];
            let len = iov.iov_len as u64;
            if n >= len {
                n -= len;
                span.first += 1;
                span.count -= 1;
            } else {
                iov.iov_base = iov.iov_base.wrapping_add(n as usize);
                iov.iov_len -= n as usize;
                n = 0;
            }
        }
    }

    /// Submits every op in `self.todo` and waits for all of them; ops that came back short
    /// are left in `self.todo` for another round.
    fn submit_round(&mut self, ops: &[IoOp], results: &mut [io::Result<()>]) {
        let capacity = self.ring.params().sq_entries() as usize;
        let todo = std::mem::take(&mut self.todo);
        let mut again = std::mem::take(&mut self.again);
        again.clear();
        for chunk in todo.chunks(capacity) {
            let mut queued = 0;
            for &i in chunk {
                let sqe = self.sqe(i, &ops[i]);
                // The iovec table was reserved before the first pointer into it was taken, and
                // the caller keeps the memory its entries point to mapped for the whole batch.
                // SAFETY: every buffer the SQE names stays alive and unmoved until the loop
                // below has reaped every completion of this chunk.
                let pushed = unsafe { self.ring.submission().push(&sqe) };
                match pushed {
                    Ok(()) => queued += 1,
                    Err(_) => results[i] = Err(io::Error::other("io_uring submission queue full")),
                }
            }
            let mut reaped = 0;
            while reaped < queued {
                if let Err(e) = self.ring.submit_and_wait(queued - reaped) {
                    match e.raw_os_error() {
                        // Interrupted, or the kernel is short of resources or completion-queue
                        // room: reap what is there and enter again.
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                        _ => {
                            // We cannot tell what is in flight: never touch this ring again.
                            tracing::error!(error = %e, "io_uring_enter failed; the queue's I/O engine is broken");
                            self.broken = true;
                            for &i in chunk {
                                results[i] = Err(io::Error::new(e.kind(), e.to_string()));
                            }
                            break;
                        }
                    }
                }
                self.completions.clear();
                self.completions.extend(self.ring.completion().map(|c| (c.user_data() as usize, c.result())));
                reaped += self.completions.len();
                for n in 0..self.completions.len() {
                    let (i, res) = self.completions[n];
                    if i >= results.len() {
                        // Not ours: every SQE of this ring carries an index into this batch.
                        tracing::error!(user_data = i, "completion for an unknown operation");
                        continue;
                    }
                    if res < 0 {
                        results[i] = Err(io::Error::from_raw_os_error(-res));
                        continue;
                    }
                    if (res as u64) < self.spans[i].remaining {
                        if res == 0 {
                            results[i] = Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                        } else {
                            self.advance(i, res as u64);
                            again.push(i);
                        }
                    }
                }
            }
            if self.broken {
                again.clear();
                break;
            }
        }
        self.todo = todo;
        self.todo.clear();
        self.todo.extend_from_slice(&again);
        self.again = again;
    }

    /// Zeroes a range on filesystems without `FALLOC_FL_ZERO_RANGE` (tmpfs): punch a hole and
    /// allocate it again, which reads back as zeroes and stays allocated.
    fn write_zeroes_fallback(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{FallocateFlags, fallocate};
        let (off, len) = (offset as libc::off_t, len as libc::off_t);
        fallocate(&*self.file, FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, off, len)?;
        fallocate(&*self.file, FallocateFlags::FALLOC_FL_KEEP_SIZE, off, len)?;
        Ok(())
    }
}

fn resolve(mem: &dyn SliceSource, buf: &IoBuf) -> Option<libc::iovec> {
    let slice = mem.slice(buf.addr, buf.len as usize)?;
    Some(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() })
}

impl QueueIo for UringQueue {
    fn healthy(&self) -> bool {
        !self.broken
    }

    fn execute(&mut self, mem: &dyn SliceSource, bufs: &[IoBuf], ops: &[IoOp], results: &mut Vec<io::Result<()>>) {
        results.clear();
        if self.broken {
            results.extend(ops.iter().map(|_| Err(io::Error::other("the queue's io_uring is broken"))));
            return;
        }
        results.resize_with(ops.len(), || Ok(()));
        self.build_iovecs(mem, bufs, ops, results);
        self.todo.clear();
        self.todo.extend((0..ops.len()).filter(|&i| results[i].is_ok()));
        while !self.todo.is_empty() {
            self.submit_round(ops, results);
        }
        for (op, result) in ops.iter().zip(results.iter_mut()) {
            if let IoOp::WriteZeroes { offset, len } = *op {
                if matches!(result, Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP)) {
                    *result = self.write_zeroes_fallback(offset, len);
                }
            }
        }
    }
}
