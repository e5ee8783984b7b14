//! The image's lock against a predecessor's I/O. After `kill -9`, requests the old server had
//! in flight can still be running in the kernel (io_uring cancels only what it tracks; a bio
//! queued below the image's filesystem, for example during its device's error recovery,
//! finishes later). A successor that re-ran those requests and wrote newer data could then
//! have it overwritten by the stale bio.
//!
//! So every open file description a server does I/O through holds an OFD write lock on a
//! byte of its own, far past the end of any image. Such a lock belongs to the open file
//! description, not the process: it goes only when the last reference to that description
//! goes, and an in-flight request holds one (the ring's fixed-file table, or the request's
//! own file reference) until it completes. A successor takes the same locks before it serves:
//! it cannot start before the predecessor's last request on the image is gone. The same locks
//! keep two live servers off one image.

use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};

/// The locked byte of each file an image is opened as: the buffered one, the O_DIRECT one.
/// Past any image size (2^62), so they never meet data.
pub const LOCK_OFFSETS: [i64; 2] = [1 << 62, (1 << 62) + 1];

/// How long a server waits for the previous one's I/O by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

fn lock_request(offset: i64, kind: libc::c_short) -> libc::flock {
    libc::flock { l_type: kind, l_whence: libc::SEEK_SET as libc::c_short, l_start: offset, l_len: 1, l_pid: 0 }
}

/// Takes the lock on byte `offset` through `file`'s open file description, waiting up to
/// `wait` for whoever holds it; `Err(EAGAIN)` if it is still held then. A write lock (the
/// file must be open for writing) unless `shared`: a read-only server's reads cannot hurt a
/// successor, so read-only servers share theirs, and only a writer waits for them.
pub fn lock(file: &File, offset: i64, shared: bool, wait: Duration) -> nix::Result<()> {
    let deadline = Instant::now() + wait;
    let kind = if shared { libc::F_RDLCK } else { libc::F_WRLCK };
    let request = lock_request(offset, kind as libc::c_short);
    let mut logged = false;
    loop {
        match fcntl(file.as_fd(), FcntlArg::F_OFD_SETLK(&request)) {
            Ok(_) => return Ok(()),
            Err(Errno::EAGAIN | Errno::EACCES) if Instant::now() < deadline => {
                if !logged {
                    tracing::warn!(wait = ?wait, "the image is locked: waiting for the previous server's I/O to end");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(Errno::EACCES) => return Err(Errno::EAGAIN),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_waits_for_the_open_file_that_holds_it() {
        let dir = std::env::temp_dir().join(format!("vduse-csi-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("image");
        std::fs::write(&path, b"x").expect("image");
        let predecessor = File::options().read(true).write(true).open(&path).expect("open");
        lock(&predecessor, LOCK_OFFSETS[0], false, Duration::ZERO).expect("first lock");
        // A second open file description of the same process is another owner.
        let successor = File::options().read(true).write(true).open(&path).expect("open");
        assert_eq!(lock(&successor, LOCK_OFFSETS[0], false, Duration::from_millis(50)), Err(Errno::EAGAIN));
        // Another byte is another lock.
        lock(&successor, LOCK_OFFSETS[1], false, Duration::ZERO).expect("other byte");
        // A duplicate of the predecessor's descriptor keeps its lock alive (as an in-flight
        // request's file reference does).
        let in_flight = predecessor.try_clone().expect("dup");
        drop(predecessor);
        assert_eq!(lock(&successor, LOCK_OFFSETS[0], false, Duration::from_millis(50)), Err(Errno::EAGAIN));
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(in_flight);
        });
        let started = Instant::now();
        lock(&successor, LOCK_OFFSETS[0], false, Duration::from_secs(10)).expect("lock once the last reference went");
        assert!(started.elapsed() >= Duration::from_millis(150), "took the lock before it was released");
        releaser.join().expect("releaser");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
