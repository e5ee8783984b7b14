//! An in-memory backend: the disk of the device-model unit tests and of the engine benchmark.

use std::io;
use std::sync::{Arc, Mutex};

use super::instant::{Execute, InstantQueue};
use super::{Backend, IoBuf, IoOp, QueueIo, Result, SliceSource, buffers};

/// A RAM disk. Clones share the same bytes.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    data: Arc<Mutex<Vec<u8>>>,
    read_only: bool,
    flushes: Arc<Mutex<u64>>,
}

impl MemoryBackend {
    /// A zero-filled disk of `capacity` bytes.
    pub fn new(capacity: u64, read_only: bool) -> Self {
        Self { data: Arc::new(Mutex::new(vec![0; capacity as usize])), read_only, flushes: Arc::new(Mutex::new(0)) }
    }

    /// A copy of the disk contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Overwrites bytes at `offset` (test setup).
    pub fn fill(&self, offset: usize, bytes: &[u8]) {
        if let Ok(mut d) = self.data.lock() {
            d[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
    }

    /// How many flushes were executed.
    pub fn flush_count(&self) -> u64 {
        self.flushes.lock().map(|f| *f).unwrap_or(0)
    }

    fn run(&self, mem: &dyn SliceSource, table: &[IoBuf], op: &IoOp) -> io::Result<()> {
        let mut data = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
        let size = data.len() as u64;
        let range = |offset: u64, len: u64| -> io::Result<std::ops::Range<usize>> {
            let end = offset.checked_add(len).filter(|e| *e <= size);
            end.map(|e| offset as usize..e as usize).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
        };
        match *op {
            IoOp::Read { offset, bufs } | IoOp::Write { offset, bufs } => {
                let mut pos = offset;
                for buf in buffers(table, bufs)? {
                    let r = range(pos, u64::from(buf.len))?;
                    let slice = mem
                        .slice(buf.addr, buf.len as usize)
                        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
                    if matches!(op, IoOp::Read { .. }) {
                        slice.copy_from(&data[r]);
                    } else {
                        slice.copy_to(&mut data[r]);
                    }
                    pos += u64::from(buf.len);
                }
            }
            IoOp::Flush => *self.flushes.lock().map_err(|_| io::Error::other("poisoned"))? += 1,
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len } => {
                let r = range(offset, len)?;
                data[r].fill(0);
            }
        }
        Ok(())
    }
}

impl Execute for MemoryBackend {
    fn execute(&mut self, mem: &dyn SliceSource, bufs: &[IoBuf], op: &IoOp) -> io::Result<()> {
        self.run(mem, bufs, op)
    }
}

impl Backend for MemoryBackend {
    fn capacity(&self) -> u64 {
        self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn open_queue(&self, depth: u16) -> Result<Box<dyn QueueIo>> {
        Ok(Box::new(InstantQueue::new(self.clone(), depth)))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn grow(&self, bytes: u64) -> Result<()> {
        let mut data =
            self.data.lock().map_err(|_| super::Error::Io { op: "grow", source: io::Error::other("poisoned") })?;
        if (bytes as usize) < data.len() {
            return Err(super::Error::Shrink { current: data.len() as u64, requested: bytes });
        }
        data.resize(bytes as usize, 0);
        Ok(())
    }
}
