//! Copies of images that cost what they hold: only the data extents of a sparse image are
//! copied (`SEEK_DATA`/`SEEK_HOLE`), each with `copy_file_range`, which shares the blocks
//! (a reflink) on filesystems that can (XFS, btrfs) and copies them in the kernel elsewhere.
//! Holes stay holes, so a snapshot of a 1 GiB volume holding 10 MiB allocates about 10 MiB.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

use super::{Error, Result, io_err};

/// Copies `src` to a new file `dst` of the same length, keeping holes. `dst` must not exist.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<()> {
    let from = File::open(src).map_err(io_err("open", src))?;
    let len = from.metadata().map_err(io_err("stat", src))?.len();
    let to = OpenOptions::new().write(true).create_new(true).open(dst).map_err(io_err("create", dst))?;
    to.set_len(len).map_err(io_err("size", dst))?;
    let mut pos = 0i64;
    while (pos as u64) < len {
        let start = match lseek(from.as_fd(), pos, Whence::SeekData) {
            Ok(start) => start,
            // No data after `pos`: the rest is a hole, which set_len already made.
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(errno_err("seek data in", src, e)),
        };
        let end = lseek(from.as_fd(), start, Whence::SeekHole).map_err(|e| errno_err("seek hole in", src, e))?;
        copy_range(&from, &to, start, end, src)?;
        pos = end;
    }
    Ok(())
}

fn errno_err(op: &'static str, path: &Path, e: Errno) -> Error {
    Error::Io { op, path: path.to_owned(), source: e.into() }
}

/// Copies bytes `start..end` of `from` to the same offsets of `to`.
fn copy_range(from: &File, to: &File, start: i64, end: i64, src: &Path) -> Result<()> {
    let (mut off_in, mut off_out) = (start, start);
    while off_in < end {
        let chunk = usize::try_from(end - off_in).unwrap_or(usize::MAX).min(1 << 30);
        match nix::fcntl::copy_file_range(from.as_fd(), Some(&mut off_in), to.as_fd(), Some(&mut off_out), chunk) {
            // The source shrank under us; what is left reads as zeroes.
            Ok(0) => break,
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(e) => return Err(errno_err("copy", src, e)),
        }
    }
    Ok(())
}

/// Bytes the filesystem allocated for `path`.
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path).map_err(io_err("stat", path))?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_stay_holes_and_data_is_equal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        let f = File::create(&src).expect("create");
        f.set_len(256 << 20).expect("size");
        let data: Vec<u8> = (0..(4 << 20)).map(|i: u32| (i % 251) as u8 + 1).collect();
        f.write_all_at(&data, 16 << 20).expect("write");
        f.write_all_at(&data, 200 << 20).expect("write");
        f.write_all_at(b"tail", (256 << 20) - 4).expect("write");
        f.sync_all().expect("sync");
        sparse_copy(&src, &dst).expect("copy");
        assert_eq!(std::fs::read(&src).expect("read"), std::fs::read(&dst).expect("read"));
        let (a, b) = (allocated_bytes(&src).expect("src"), allocated_bytes(&dst).expect("dst"));
        assert!(b <= a + (1 << 20), "copy allocated {b} bytes, source {a}");
        assert!(b < 16 << 20, "the holes of a 256 MiB image were filled: {b} bytes");
        assert!(sparse_copy(&src, &dst).is_err(), "never overwrites");
    }
}
