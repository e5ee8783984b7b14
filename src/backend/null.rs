//! A backend with no storage: every operation succeeds at once and no byte is read or
//! written. It measures what the rest of the path costs (the kernel's VDUSE frontend and
//! bounce copy, our queue engine, the interrupt) with the storage taken out, like the
//! kernel's null_blk or rublk's null target. Reads return whatever the bounce pages held.
//!
//! Its failing form ([`NullBackend::fenced`]) fails every request instead, the one "fail
//! everything" backend: it serves a device whose storage this node must not write any more
//! (its RBD image was taken over by another node while this node's server was down), and a
//! device `device remove` takes down (nobody serves it); I/O the kernel still queued then
//! ends with errors rather than waiting for ever, and the filesystem on it can be unmounted.

use std::io;

use super::instant::{Execute, InstantQueue};
use super::{Backend, Error, IoBuf, IoOp, QueueIo, Result, SECTOR_SIZE, SliceSource};

/// A disk of `capacity` bytes that keeps nothing.
#[derive(Debug, Clone, Copy)]
pub struct NullBackend {
    capacity: u64,
    /// The errno every request fails with; `None`: every request succeeds.
    fails_with: Option<i32>,
}

impl NullBackend {
    /// A disk of `capacity` bytes: a non-zero multiple of the sector size.
    pub fn new(capacity: u64) -> Result<Self> {
        if capacity == 0 || capacity % SECTOR_SIZE != 0 {
            return Err(Error::InvalidSize { size: capacity });
        }
        Ok(Self { capacity, fails_with: None })
    }

    /// A fenced disk of `capacity` bytes: every request fails with EIO, except flushes, which
    /// succeed: no write was ever acknowledged, so none is owed.
    pub fn fenced(capacity: u64) -> Self {
        Self { capacity, fails_with: Some(libc::EIO) }
    }
}

impl Execute for NullBackend {
    fn execute(&mut self, _: &dyn SliceSource, _: &[IoBuf], op: &IoOp) -> io::Result<()> {
        match self.fails_with {
            // A flush owes nothing: no write was ever acknowledged (and a failed one would be
            // recorded as lost data, which none was).
            Some(_) if matches!(op, IoOp::Flush) => Ok(()),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }
}

impl Backend for NullBackend {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        false
    }

    fn open_queue(&self, depth: u16) -> Result<Box<dyn QueueIo>> {
        Ok(Box::new(InstantQueue::new(*self, depth)))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn grow(&self, _: u64) -> Result<()> {
        Err(Error::Io { op: "grow", source: io::Error::from_raw_os_error(libc::EOPNOTSUPP) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn every_operation_completes_at_the_next_reap() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
        assert!(NullBackend::new(0).is_err());
        assert!(NullBackend::new(1000).is_err());
        let mut queue = NullBackend::new(1 << 20).expect("size").open_queue(4).expect("queue");
        assert_eq!(queue.capacity(), 4);
        queue.submit(&mem, &[], IoOp::Flush, 3);
        queue.submit(&mem, &[], IoOp::Discard { offset: 0, len: 512 }, 1);
        assert!(queue.has_completions());
        let mut out = Vec::new();
        queue.reap(&mut out);
        assert_eq!(out.iter().map(|c| (c.tag, c.result.is_ok())).collect::<Vec<_>>(), [(3, true), (1, true)]);
        assert_eq!(queue.in_flight(), 0);
    }

    #[test]
    fn a_fenced_disk_fails_every_request_but_flushes_and_owes_nothing() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
        let backend = NullBackend::fenced(1 << 20);
        let bufs = [IoBuf { addr: GuestAddress(0), len: 512 }];
        let mut queue = backend.open_queue(4).expect("queue");
        let ops = [
            IoOp::Read { offset: 0, bufs: super::super::BufRange { start: 0, end: 1 } },
            IoOp::Write { offset: 0, bufs: super::super::BufRange { start: 0, end: 1 } },
            IoOp::Flush,
            IoOp::Discard { offset: 0, len: 512 },
        ];
        for (tag, op) in ops.into_iter().enumerate() {
            queue.submit(&mem, &bufs, op, tag as u16);
        }
        let mut out = Vec::new();
        queue.reap(&mut out);
        assert_eq!(out.len(), 4);
        for c in &out {
            let errno = c.result.as_ref().err().and_then(|e| e.raw_os_error());
            // Tag 2 is the flush: it owes nothing, so it succeeds (a failure would be recorded
            // as lost writes, of which there are none).
            assert_eq!(errno, if c.tag == 2 { None } else { Some(libc::EIO) }, "tag {}", c.tag);
        }
        assert!(backend.flush().is_ok(), "no write was acknowledged, so none is owed");
        assert!(backend.grow(2 << 20).is_err());
    }
}
