//! The FIFREEZE and FITHAW ioctls, for `host::Freeze`. They live with the backends' other
//! kernel bindings because those are the places where this crate's `unsafe` code is allowed
//! (docs/ARCHITECTURE.md). The kernel answers EINVAL to a thaw of a filesystem that is not
//! frozen, so the caller tells "not frozen" by the errno, never by a tool's message.

use std::fs::File;
use std::os::fd::AsRawFd;

// linux/fs.h: #define FIFREEZE _IOWR('X', 119, int), FITHAW _IOWR('X', 120, int). The int
// argument is not read by the kernel.
nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// Freezes the filesystem that `dir` (opened on its mount point) belongs to.
pub fn freeze(dir: &File) -> nix::Result<()> {
    let mut unused: libc::c_int = 0;
    // SAFETY: `dir` is an open fd for the whole call, and FIFREEZE takes a pointer to an int
    // that lives on this stack frame (the kernel does not even read it).
    unsafe { fifreeze(dir.as_raw_fd(), &mut unused) }.map(drop)
}

/// Thaws the filesystem that `dir` (opened on its mount point) belongs to.
pub fn thaw(dir: &File) -> nix::Result<()> {
    let mut unused: libc::c_int = 0;
    // SAFETY: as in `freeze`: a valid fd and a pointer to a live int.
    unsafe { fithaw(dir.as_raw_fd(), &mut unused) }.map(drop)
}
