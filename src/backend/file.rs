//! A sparse raw image file.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::os::unix::fs::OpenOptionsExt;

use nix::sys::statfs::{EXT4_SUPER_MAGIC, FsType, TMPFS_MAGIC, fstatfs};

use super::uring::{ImageFiles, UringQueue};
use super::{Backend, Error, QueueIo, Result, SECTOR_SIZE, image_lock};

/// How image I/O uses the host page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// `O_DIRECT` for every aligned read and write (nearly all of them: the host's block
    /// layer sends page-aligned buffers), straight between the disk and the bounce pages; the
    /// page cache only for misaligned requests. The node's memory is not spent caching what
    /// the volume's own filesystem already caches. Falls back to `writeback` when the image's
    /// filesystem refuses `O_DIRECT`, and on tmpfs, where the page cache is the storage.
    #[default]
    None,
    /// Everything through the host page cache: fast re-reads, but each byte is cached twice
    /// (in the volume's filesystem and in the image's).
    Writeback,
}

impl CacheMode {
    /// Parses a command-line or StorageClass parameter value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(CacheMode::None),
            "writeback" => Some(CacheMode::Writeback),
            _ => None,
        }
    }
}

/// A raw image file; holes read as zeroes, discards punch holes.
#[derive(Debug)]
pub struct FileBackend {
    files: ImageFiles,
    capacity: AtomicU64,
    read_only: bool,
}

/// The magic number of the filesystem `file` lives on, if the kernel tells.
fn filesystem_type(file: &File) -> Option<FsType> {
    fstatfs(file).ok().map(|fs| fs.filesystem_type())
}

/// Opens the image a second time with `O_DIRECT`, or says why not. `memory`: the image is on
/// tmpfs.
fn open_direct(path: &Path, read_only: bool, memory: bool) -> Option<File> {
    // On tmpfs the page cache is the storage: O_DIRECT saves no memory there and, measured in
    // the test guest, costs about a third of the 4 KiB IOPS.
    if memory {
        tracing::debug!(image = %path.display(), "image on tmpfs: I/O through the page cache, which is its storage");
        return None;
    }
    match OpenOptions::new().read(true).write(!read_only).custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => {
            tracing::debug!(image = %path.display(), "aligned I/O bypasses the page cache (O_DIRECT)");
            Some(file)
        }
        Err(e) => {
            tracing::warn!(image = %path.display(), error = %e, "the image's filesystem refuses O_DIRECT; using the page cache");
            None
        }
    }
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || size % SECTOR_SIZE != 0 { Err(Error::InvalidSize { size }) } else { Ok(()) }
}

impl FileBackend {
    /// Opens `path`, creating a sparse image of `create_size` bytes if it does not exist.
    /// An existing image keeps its size.
    /// `cache` chooses how its I/O uses the page cache.
    pub fn open(path: &Path, create_size: Option<u64>, read_only: bool, cache: CacheMode) -> Result<Self> {
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
        let fs = filesystem_type(&file);
        // tmpfs: the page cache is the storage.
        let memory = fs == Some(TMPFS_MAGIC);
        // Where io_uring cannot write through the page cache without possibly blocking
        // (`ImageFiles::writes_punted`).
        let writes_punted = memory || fs == Some(EXT4_SUPER_MAGIC);
        let direct = match cache {
            CacheMode::None => open_direct(path, read_only, memory).map(Arc::new),
            CacheMode::Writeback => None,
        };
        // Before the first request: see image_lock for why.
        let locked = std::iter::once(&file).chain(direct.as_deref()).zip(image_lock::LOCK_OFFSETS);
        for (f, offset) in locked {
            image_lock::lock(f, offset, read_only, image_lock::DEFAULT_WAIT).map_err(|e| match e {
                nix::errno::Errno::EAGAIN => Error::Locked(path.to_owned()),
                other => Error::Io { op: "lock the image", source: other.into() },
            })?;
        }
        Ok(Self {
            files: ImageFiles { buffered: Arc::new(file), direct, memory, writes_punted },
            capacity: AtomicU64::new(size),
            read_only,
        })
    }

    fn grow_image(&self, size: u64) -> Result<()> {
        check_size(size)?;
        let current = self.capacity();
        if size < current {
            return Err(Error::Shrink { current, requested: size });
        }
        self.files.buffered.set_len(size).map_err(|source| Error::Io { op: "grow the image", source })?;
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

    fn open_queue(&self, depth: u16) -> Result<Box<dyn QueueIo>> {
        let queue =
            UringQueue::new(self.files.clone(), depth).map_err(|source| Error::Io { op: "set up io_uring", source })?;
        Ok(Box::new(queue))
    }

    fn flush(&self) -> Result<()> {
        self.files.buffered.sync_data().map_err(|source| Error::Io { op: "fdatasync the image", source })
    }

    fn grow(&self, bytes: u64) -> Result<()> {
        self.grow_image(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BufRange, Completion, IoBuf, IoOp};
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("test memory")
    }

    /// Submits `ops` under tags 0.., waits for all of them and returns their results by tag.
    fn run(io: &mut dyn QueueIo, mem: &GuestMemoryMmap<()>, table: &[IoBuf], ops: &[IoOp]) -> Vec<std::io::Result<()>> {
        for (tag, op) in ops.iter().enumerate() {
            io.submit(mem, table, *op, tag as u16);
        }
        io.commit();
        let mut done: Vec<Completion> = Vec::new();
        while io.in_flight() > 0 {
            io.wait();
            io.reap(&mut done);
        }
        done.sort_by_key(|c| c.tag);
        assert_eq!(done.len(), ops.len(), "every operation completes exactly once");
        done.into_iter().map(|c| c.result).collect()
    }

    fn open(path: &Path, size: Option<u64>, cache: CacheMode) -> Result<FileBackend> {
        FileBackend::open(path, size, false, cache)
    }

    #[test]
    fn absent_image_without_size_is_an_error_and_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        assert!(matches!(open(&path, None, CacheMode::None), Err(Error::Missing(_))));
        assert!(!path.exists());
        assert!(matches!(open(&path, Some(1000), CacheMode::None), Err(Error::InvalidSize { .. })));
        assert!(!path.exists());
    }

    /// Write, flush, read back across buffers of odd sizes, discard, write zeroes: the same
    /// bytes whichever way the page cache is used (aligned buffers go through O_DIRECT with
    /// `none`, the 512-byte-misaligned ones through the page cache).
    #[test]
    fn new_image_is_sparse_and_round_trips_through_io_uring() {
        for cache in [CacheMode::None, CacheMode::Writeback] {
            let dir = tempfile::tempdir().expect("tempdir");
            round_trip(dir.path(), cache);
        }
    }

    /// On tmpfs, small reads and writes are copied in the queue thread, not through the ring.
    #[test]
    fn a_tmpfs_image_round_trips_through_inline_copies() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
        let probe = File::create(dir.path().join("probe")).expect("probe");
        assert_eq!(filesystem_type(&probe), Some(TMPFS_MAGIC), "/dev/shm must be tmpfs for this test");
        round_trip(dir.path(), CacheMode::None);
    }

    fn round_trip(dir: &Path, cache: CacheMode) {
        let path = dir.join("img");
        let backend = open(&path, Some(64 << 20), cache).expect("create");
        assert_eq!(backend.capacity(), 64 << 20);
        assert_eq!(std::fs::metadata(&path).expect("stat").blocks(), 0);

        let mem = mem();
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x1000)).expect("fill");
        let mut io = backend.open_queue(8).expect("queue");
        let table = [
            IoBuf { addr: GuestAddress(0x1000), len: 4096 },
            IoBuf { addr: GuestAddress(0x2000), len: 4096 },
            IoBuf { addr: GuestAddress(0x10000), len: 512 },
            IoBuf { addr: GuestAddress(0x20000), len: 7680 },
            // Misaligned in memory: must take the buffered path.
            IoBuf { addr: GuestAddress(0x30010), len: 8192 },
        ];
        let write = BufRange { start: 0, end: 2 };
        let read = BufRange { start: 2, end: 4 };
        let odd = BufRange { start: 4, end: 5 };
        let ok = |r: &[std::io::Result<()>]| r.iter().all(|r| r.is_ok());
        let r = run(&mut *io, &mem, &table, &[IoOp::Write { offset: 1 << 20, bufs: write }, IoOp::Flush]);
        assert!(ok(&r), "{cache:?}: {r:?}");
        let r = run(
            &mut *io,
            &mem,
            &table,
            &[IoOp::Read { offset: 1 << 20, bufs: read }, IoOp::Read { offset: 1 << 20, bufs: odd }],
        );
        assert!(ok(&r), "{cache:?}: {r:?}");
        let mut back = vec![0u8; 8192];
        mem.read_slice(&mut back[..512], GuestAddress(0x10000)).expect("read");
        mem.read_slice(&mut back[512..], GuestAddress(0x20000)).expect("read");
        assert_eq!(back, pattern, "{cache:?}");
        mem.read_slice(&mut back, GuestAddress(0x30010)).expect("read");
        assert_eq!(back, pattern, "{cache:?}: misaligned read");
        assert!(std::fs::metadata(&path).expect("stat").blocks() > 0);

        let r = run(&mut *io, &mem, &table, &[IoOp::Discard { offset: 1 << 20, len: 8192 }]);
        assert!(ok(&r), "{cache:?}: {r:?}");
        let r = run(&mut *io, &mem, &table, &[IoOp::Read { offset: 1 << 20, bufs: read }]);
        assert!(ok(&r), "{cache:?}: {r:?}");
        mem.read_slice(&mut back[..512], GuestAddress(0x10000)).expect("read");
        assert!(back[..512].iter().all(|b| *b == 0));
        let r = run(&mut *io, &mem, &table, &[IoOp::WriteZeroes { offset: 0, len: 4096 }]);
        assert!(ok(&r), "{cache:?}: {r:?}");
    }

    #[test]
    fn unresolvable_buffer_fails_only_its_op() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = open(&dir.path().join("img"), Some(1 << 20), CacheMode::None).expect("create");
        let mem = mem();
        let mut io = backend.open_queue(4).expect("queue");
        let table = [IoBuf { addr: GuestAddress((1 << 20) - 10), len: 512 }, IoBuf { addr: GuestAddress(0), len: 512 }];
        let (bad, good) = (BufRange { start: 0, end: 1 }, BufRange { start: 1, end: 2 });
        let r =
            run(&mut *io, &mem, &table, &[IoOp::Read { offset: 0, bufs: bad }, IoOp::Read { offset: 0, bufs: good }]);
        assert_eq!(r[0].as_ref().map_err(|e| e.raw_os_error()), Err(Some(libc::EFAULT)));
        assert!(r[1].is_ok());
    }

    #[test]
    fn tags_outside_the_depth_or_in_flight_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = open(&dir.path().join("img"), Some(1 << 20), CacheMode::None).expect("create");
        let mem = mem();
        let mut io = backend.open_queue(2).expect("queue");
        assert_eq!(io.capacity(), 2);
        io.submit(&mem, &[], IoOp::Flush, 5);
        io.submit(&mem, &[], IoOp::Flush, 1);
        io.submit(&mem, &[], IoOp::Flush, 1);
        io.commit();
        let mut done = Vec::new();
        while io.in_flight() > 0 {
            io.wait();
            io.reap(&mut done);
        }
        let mut results: Vec<(u16, bool)> = done.iter().map(|c| (c.tag, c.result.is_ok())).collect();
        results.sort();
        assert_eq!(results, [(1, false), (1, true), (5, false)]);
    }

    #[test]
    fn many_operations_in_flight_complete_with_their_tags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = open(&dir.path().join("img"), Some(8 << 20), CacheMode::None).expect("create");
        let mem = mem();
        let depth = 64u16;
        let mut io = backend.open_queue(depth).expect("queue");
        let table: Vec<IoBuf> =
            (0..u64::from(depth)).map(|i| IoBuf { addr: GuestAddress(i * 4096), len: 4096 }).collect();
        for i in 0..u64::from(depth) {
            mem.write_slice(&[i as u8; 4096], GuestAddress(i * 4096)).expect("fill");
        }
        let writes: Vec<IoOp> = (0..depth as usize)
            .map(|i| IoOp::Write { offset: i as u64 * 8192, bufs: BufRange { start: i, end: i + 1 } })
            .collect();
        assert!(run(&mut *io, &mem, &table, &writes).iter().all(|r| r.is_ok()));
        mem.write_slice(&vec![0xffu8; 64 * 4096], GuestAddress(0)).expect("clear");
        let reads: Vec<IoOp> = (0..depth as usize)
            .map(|i| IoOp::Read { offset: i as u64 * 8192, bufs: BufRange { start: i, end: i + 1 } })
            .collect();
        assert!(run(&mut *io, &mem, &table, &reads).iter().all(|r| r.is_ok()));
        for i in 0..u64::from(depth) {
            let b: u8 = mem.read_obj(GuestAddress(i * 4096 + 100)).expect("byte");
            assert_eq!(b, i as u8);
        }
    }

    /// Large buffered reads go to io_uring's worker threads (`IOSQE_ASYNC`): same bytes.
    #[test]
    fn large_buffered_reads_return_their_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = open(&dir.path().join("img"), Some(4 << 20), CacheMode::Writeback).expect("create");
        let mem = mem();
        let mut io = backend.open_queue(4).expect("queue");
        let pattern: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 253) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0)).expect("fill");
        let table = [IoBuf { addr: GuestAddress(0), len: 512 * 1024 }];
        let all = BufRange { start: 0, end: 1 };
        let r = run(&mut *io, &mem, &table, &[IoOp::Write { offset: 1 << 20, bufs: all }]);
        assert!(r[0].is_ok(), "{r:?}");
        mem.write_slice(&vec![0u8; 512 * 1024], GuestAddress(0)).expect("clear");
        let r = run(&mut *io, &mem, &table, &[IoOp::Read { offset: 1 << 20, bufs: all }]);
        assert!(r[0].is_ok(), "{r:?}");
        let mut back = vec![0u8; 512 * 1024];
        mem.read_slice(&mut back, GuestAddress(0)).expect("read");
        assert_eq!(back, pattern);
    }

    #[test]
    fn grow_never_shrinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = open(&dir.path().join("img"), Some(1 << 20), CacheMode::Writeback).expect("create");
        backend.grow(2 << 20).expect("grow");
        assert_eq!(backend.capacity(), 2 << 20);
        assert!(matches!(backend.grow(1 << 20), Err(Error::Shrink { .. })));
    }
}
