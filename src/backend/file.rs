//! A sparse raw image file.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::uring::UringQueue;
use super::{Backend, Error, QueueIo, Result, SECTOR_SIZE};

/// Submission queue depth of each worker's ring: a drained batch is at most one ring's worth
/// of requests, larger batches are submitted in chunks.
const RING_ENTRIES: u32 = 256;

/// A raw image file; holes read as zeroes, discards punch holes.
#[derive(Debug)]
pub struct FileBackend {
    file: Arc<File>,
    capacity: AtomicU64,
    read_only: bool,
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || size % SECTOR_SIZE != 0 { Err(Error::InvalidSize { size }) } else { Ok(()) }
}

impl FileBackend {
    /// Opens `path`, creating a sparse image of `create_size` bytes if it does not exist.
    /// An existing image keeps its size.
    pub fn open(path: &Path, create_size: Option<u64>, read_only: bool) -> Result<Self> {
        let open_err = |source| Error::Open { path: path.to_owned(), source };
        let file = match OpenOptions::new().read(true).write(!read_only).open(path) {
            Ok(file) => {
                if let Some(size) = create_size {
                    let current = file.metadata().map_err(open_err)?.len();
                    if size != current {
                        tracing::warn!(image = %path.display(), current, requested = size, "image exists; keeping its size");
                    }
                }
                file
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let size = create_size.ok_or_else(|| Error::Missing(path.to_owned()))?;
                check_size(size)?;
                if read_only {
                    return Err(Error::Missing(path.to_owned()));
                }
                let file = OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(open_err)?;
                // set_len makes a sparse file: nothing is allocated until written.
                if let Err(source) = file.set_len(size) {
                    drop(file);
                    let _ = std::fs::remove_file(path);
                    return Err(Error::Io { op: "size the new image", source });
                }
                tracing::info!(image = %path.display(), size, "created sparse image");
                file
            }
            Err(e) => return Err(open_err(e)),
        };
        let size = file.metadata().map_err(open_err)?.len();
        check_size(size)?;
        Ok(Self { file: Arc::new(file), capacity: AtomicU64::new(size), read_only })
    }

    fn grow_image(&self, size: u64) -> Result<()> {
        check_size(size)?;
        let current = self.capacity();
        if size < current {
            return Err(Error::Shrink { current, requested: size });
        }
        self.file.set_len(size).map_err(|source| Error::Io { op: "grow the image", source })?;
        self.capacity.store(size, Ordering::Release);
        Ok(())
    }
}

impl Backend for FileBackend {
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn open_queue(&self) -> Result<Box<dyn QueueIo>> {
        let queue = UringQueue::new(Arc::clone(&self.file), RING_ENTRIES)
            .map_err(|source| Error::Io { op: "set up io_uring", source })?;
        Ok(Box::new(queue))
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|source| Error::Io { op: "fdatasync the image", source })
    }

    fn grow(&self, bytes: u64) -> Result<()> {
        self.grow_image(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BufRange, IoBuf, IoOp};
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("test memory")
    }

    #[test]
    fn absent_image_without_size_is_an_error_and_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        assert!(matches!(FileBackend::open(&path, None, false), Err(Error::Missing(_))));
        assert!(!path.exists());
        assert!(matches!(FileBackend::open(&path, Some(1000), false), Err(Error::InvalidSize { .. })));
        assert!(!path.exists());
    }

    #[test]
    fn new_image_is_sparse_and_round_trips_through_io_uring() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let backend = FileBackend::open(&path, Some(64 << 20), false).expect("create");
        assert_eq!(backend.capacity(), 64 << 20);
        assert_eq!(std::fs::metadata(&path).expect("stat").blocks(), 0);

        let mem = mem();
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x1000)).expect("fill");
        let mut io = backend.open_queue().expect("queue");
        let table = [
            IoBuf { addr: GuestAddress(0x1000), len: 4096 },
            IoBuf { addr: GuestAddress(0x2000), len: 4096 },
            IoBuf { addr: GuestAddress(0x10000), len: 512 },
            IoBuf { addr: GuestAddress(0x20000), len: 7680 },
        ];
        let write = BufRange { start: 0, end: 2 };
        let read = BufRange { start: 2, end: 4 };
        let mut results = Vec::new();
        io.execute(&mem, &table, &[IoOp::Write { offset: 1 << 20, bufs: write }, IoOp::Flush], &mut results);
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        io.execute(&mem, &table, &[IoOp::Read { offset: 1 << 20, bufs: read }], &mut results);
        assert!(results[0].is_ok(), "{results:?}");
        let mut back = vec![0u8; 8192];
        mem.read_slice(&mut back[..512], GuestAddress(0x10000)).expect("read");
        mem.read_slice(&mut back[512..], GuestAddress(0x20000)).expect("read");
        assert_eq!(back, pattern);
        assert!(std::fs::metadata(&path).expect("stat").blocks() > 0);

        io.execute(&mem, &table, &[IoOp::Discard { offset: 1 << 20, len: 8192 }], &mut results);
        assert!(results[0].is_ok(), "{results:?}");
        io.execute(&mem, &table, &[IoOp::Read { offset: 1 << 20, bufs: read }], &mut results);
        mem.read_slice(&mut back[..512], GuestAddress(0x10000)).expect("read");
        assert!(back[..512].iter().all(|b| *b == 0));
        io.execute(&mem, &table, &[IoOp::WriteZeroes { offset: 0, len: 4096 }], &mut results);
        assert!(results[0].is_ok(), "{results:?}");
    }

    #[test]
    fn unresolvable_buffer_fails_only_its_op() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = FileBackend::open(&dir.path().join("img"), Some(1 << 20), false).expect("create");
        let mem = mem();
        let mut io = backend.open_queue().expect("queue");
        let table = [IoBuf { addr: GuestAddress((1 << 20) - 10), len: 512 }, IoBuf { addr: GuestAddress(0), len: 512 }];
        let (bad, good) = (BufRange { start: 0, end: 1 }, BufRange { start: 1, end: 2 });
        let mut results = Vec::new();
        io.execute(
            &mem,
            &table,
            &[IoOp::Read { offset: 0, bufs: bad }, IoOp::Read { offset: 0, bufs: good }],
            &mut results,
        );
        assert_eq!(results[0].as_ref().map_err(|e| e.raw_os_error()), Err(Some(libc::EFAULT)));
        assert!(results[1].is_ok());
    }

    #[test]
    fn grow_never_shrinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = FileBackend::open(&dir.path().join("img"), Some(1 << 20), false).expect("create");
        backend.grow(2 << 20).expect("grow");
        assert_eq!(backend.capacity(), 2 << 20);
        assert!(matches!(backend.grow(1 << 20), Err(Error::Shrink { .. })));
    }
}
