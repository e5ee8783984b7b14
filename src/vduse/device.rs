//! `/dev/vduse/$NAME`: control messages, virtqueue setup, interrupts, config space, IOTLB fds.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use nix::errno::Errno;

use super::uapi::{self, vduse_dev_request, vduse_dev_response, vduse_iotlb_entry, vduse_vq_info};
use super::{Error, Result, validate_device_name};

/// An open VDUSE device node. The kernel allows one opener at a time.
#[derive(Debug)]
pub struct VduseDevice {
    file: File,
    name: String,
}

fn ioctl_err(op: &'static str) -> impl FnOnce(Errno) -> Error {
    move |source| Error::Ioctl { op, source }
}

impl VduseDevice {
    /// Opens `/dev/vduse/NAME` non-blocking (the message loop polls it).
    pub fn open(name: &str) -> Result<Self> {
        validate_device_name(name)?;
        let path = PathBuf::from(format!("/dev/vduse/{name}"));
        // The node appears through devtmpfs right after CREATE_DEV; give udev-less hosts a
        // moment instead of failing on a race.
        for _ in 0..100 {
            if path.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|source| {
                if source.raw_os_error() == Some(libc::EBUSY) {
                    Error::Busy(name.to_owned())
                } else {
                    Error::Open { path: path.clone(), source }
                }
            })?;
        Ok(Self { file, name: name.to_owned() })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one pending control message, or `None` if there is none.
    pub fn read_request(&self) -> Result<Option<vduse_dev_request>> {
        let mut req = vduse_dev_request::default();
        loop {
            // SAFETY: the buffer is a live, writable `vduse_dev_request` of exactly the size the
            // kernel writes; the fd stays open for the call.
            let n = unsafe {
                libc::read(self.file.as_raw_fd(), (&raw mut req).cast(), std::mem::size_of::<vduse_dev_request>())
            };
            if n == std::mem::size_of::<vduse_dev_request>() as isize {
                return Ok(Some(req));
            }
            match Errno::last() {
                Errno::EINTR if n < 0 => continue,
                Errno::EAGAIN if n < 0 => return Ok(None),
                e if n < 0 => return Err(Error::Ioctl { op: "read VDUSE message", source: e }),
                // A short read cannot happen with a 152-byte buffer; report it as EIO.
                _ => return Err(Error::Ioctl { op: "read VDUSE message", source: Errno::EIO }),
            }
        }
    }

    /// Answers a control message.
    pub fn write_response(&self, resp: &vduse_dev_response) -> Result<()> {
        loop {
            // SAFETY: `resp` is a live 152-byte `vduse_dev_response` (reserved fields zero).
            let n = unsafe {
                libc::write(self.file.as_raw_fd(), (&raw const *resp).cast(), std::mem::size_of::<vduse_dev_response>())
            };
            if n == std::mem::size_of::<vduse_dev_response>() as isize {
                return Ok(());
            }
            match Errno::last() {
                Errno::EINTR if n < 0 => continue,
                e => return Err(Error::Ioctl { op: "write VDUSE response", source: e }),
            }
        }
    }

    /// `VDUSE_VQ_SETUP`: the maximum ring size of queue `index`.
    pub fn vq_setup(&self, index: u32, max_size: u16) -> Result<()> {
        let cfg = uapi::vduse_vq_config { index, max_size, reserved: [0; 13] };
        // SAFETY: `cfg` is a live `vduse_vq_config` with zeroed reserved fields.
        unsafe { uapi::ioc_vq_setup(self.file.as_raw_fd(), &cfg) }.map(drop).map_err(ioctl_err("VDUSE_VQ_SETUP"))
    }

    /// `VDUSE_VQ_GET_INFO`: ring addresses, size and readiness of queue `index`.
    pub fn vq_info(&self, index: u32) -> Result<vduse_vq_info> {
        let mut info = vduse_vq_info { index, ..Default::default() };
        // SAFETY: `info` is a live `vduse_vq_info` the kernel reads `index` from and fills.
        unsafe { uapi::ioc_vq_get_info(self.file.as_raw_fd(), &mut info) }.map_err(ioctl_err("VDUSE_VQ_GET_INFO"))?;
        Ok(info)
    }

    /// `VDUSE_VQ_SETUP_KICKFD`: where the kernel signals kicks of queue `index`.
    pub fn set_kickfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let arg = uapi::vduse_vq_eventfd { index, fd: fd.map_or(-1, |f| f.as_raw_fd()) };
        // SAFETY: `arg` is a live `vduse_vq_eventfd`; the kernel takes its own eventfd ref.
        unsafe { uapi::ioc_vq_setup_kickfd(self.file.as_raw_fd(), &arg) }
            .map(drop)
            .map_err(ioctl_err("VDUSE_VQ_SETUP_KICKFD"))
    }

    /// `VDUSE_VQ_INJECT_IRQ`: signals used buffers on queue `index`.
    pub fn inject_irq(&self, index: u32) -> Result<()> {
        // SAFETY: the kernel reads one u32 queue index from the pointer.
        unsafe { uapi::ioc_vq_inject_irq(self.file.as_raw_fd(), &index) }
            .map(drop)
            .map_err(ioctl_err("VDUSE_VQ_INJECT_IRQ"))
    }

    /// `VDUSE_DEV_GET_FEATURES`: what the driver accepted.
    pub fn driver_features(&self) -> Result<u64> {
        let mut features = 0u64;
        // SAFETY: the kernel writes one u64 to the pointer.
        unsafe { uapi::ioc_get_features(self.file.as_raw_fd(), &mut features) }
            .map_err(ioctl_err("VDUSE_DEV_GET_FEATURES"))?;
        Ok(features)
    }

    /// `VDUSE_DEV_SET_CONFIG`: rewrites `bytes` at `offset` of the config space.
    pub fn set_config(&self, offset: u32, bytes: &[u8]) -> Result<()> {
        let mut arg = uapi::vduse_config_data_with_space {
            hdr: uapi::vduse_config_data { offset, length: bytes.len() as u32 },
            buffer: [0; uapi::MAX_CONFIG_SIZE],
        };
        if bytes.is_empty() || bytes.len() > arg.buffer.len() {
            return Err(Error::Ioctl { op: "VDUSE_DEV_SET_CONFIG", source: Errno::EINVAL });
        }
        arg.buffer[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: `arg` is the 8-byte header followed by `length` valid bytes.
        unsafe { uapi::ioc_set_config(self.file.as_raw_fd(), &arg) }
            .map(drop)
            .map_err(ioctl_err("VDUSE_DEV_SET_CONFIG"))
    }

    /// `VDUSE_DEV_INJECT_CONFIG_IRQ`: tells the driver the config space changed.
    pub fn inject_config_irq(&self) -> Result<()> {
        // SAFETY: the ioctl takes no argument.
        unsafe { uapi::ioc_inject_config_irq(self.file.as_raw_fd()) }
            .map(drop)
            .map_err(ioctl_err("VDUSE_DEV_INJECT_CONFIG_IRQ"))
    }

    /// `VDUSE_IOTLB_GET_FD`: the first IOTLB range overlapping `[start, last]` and an fd to
    /// map it with.
    pub fn iotlb_fd(&self, start: u64, last: u64) -> Result<(OwnedFd, vduse_iotlb_entry)> {
        let mut entry = vduse_iotlb_entry { start, last, ..Default::default() };
        // SAFETY: `entry` is a live `vduse_iotlb_entry` the kernel reads and fills.
        let fd: RawFd = unsafe { uapi::ioc_iotlb_get_fd(self.file.as_raw_fd(), &mut entry) }
            .map_err(ioctl_err("VDUSE_IOTLB_GET_FD"))?;
        // SAFETY: on success the ioctl returns a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The kernel hands it out without O_CLOEXEC: a child (mkfs, blkid, fsfreeze) must not
        // inherit a mapping of every device's bounce pages.
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
            .map_err(ioctl_err("F_SETFD FD_CLOEXEC"))?;
        Ok((fd, entry))
    }

    /// `VDUSE_IOTLB_REG_UMEM`: `size` bytes of our memory at `uaddr` become the bounce range
    /// (which starts at IOVA 0 and must be exactly `size` long). The kernel pins them until
    /// the device fd closes.
    pub fn reg_umem(&self, uaddr: u64, size: u64) -> Result<()> {
        let umem = uapi::vduse_iova_umem { uaddr, iova: 0, size, reserved: [0; 3] };
        // SAFETY: `umem` is a live `vduse_iova_umem` the kernel only reads; the memory it names
        // is the caller's to give (the kernel pins it and checks it is mapped writable).
        unsafe { uapi::ioc_iotlb_reg_umem(self.file.as_raw_fd(), &umem) }
            .map(drop)
            .map_err(ioctl_err("VDUSE_IOTLB_REG_UMEM"))
    }
}

impl AsFd for VduseDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
