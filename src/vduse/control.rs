//! `/dev/vduse/control`: API version, device creation and destruction.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;

use super::uapi::{self, vduse_dev_config, vduse_dev_config_with_space};
use super::{CONTROL_PATH, Error, Result, validate_device_name};

/// What a new VDUSE device looks like to the kernel.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub name: String,
    /// Virtio device id (2 = block).
    pub device_id: u32,
    /// Feature bits the device offers.
    pub features: u64,
    pub num_queues: u32,
    /// The virtio config space (at most 4096 bytes).
    pub config: Vec<u8>,
}

/// An open control node, with API version 0 negotiated.
pub struct VduseControl {
    file: File,
}

impl VduseControl {
    /// Opens the control node and sets API version 0 explicitly (VDUSE.md §1 step 2).
    pub fn open() -> Result<Self> {
        let path = Path::new(CONTROL_PATH);
        if !path.exists() {
            return Err(Error::ControlMissing);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| Error::Open { path: path.into(), source })?;
        let version = uapi::VDUSE_API_VERSION;
        // SAFETY: the fd is a VDUSE control node and `version` is a live u64 the kernel reads.
        unsafe { uapi::ioc_set_api_version(file.as_raw_fd(), &version) }
            .map_err(|source| Error::Ioctl { op: "VDUSE_SET_API_VERSION", source })?;
        Ok(Self { file })
    }

    /// Creates a device. `EEXIST` is reported as [`Error::Exists`] so callers can recover.
    pub fn create(&self, cfg: &DeviceConfig) -> Result<()> {
        validate_device_name(&cfg.name)?;
        let mut name = [0u8; uapi::VDUSE_NAME_MAX];
        name[..cfg.name.len()].copy_from_slice(cfg.name.as_bytes());
        if cfg.config.is_empty() || cfg.config.len() > uapi::MAX_CONFIG_SIZE {
            return Err(Error::Ioctl { op: "VDUSE_CREATE_DEV", source: Errno::EINVAL });
        }
        let mut space = [0u8; uapi::MAX_CONFIG_SIZE];
        space[..cfg.config.len()].copy_from_slice(&cfg.config);
        let arg = vduse_dev_config_with_space {
            hdr: vduse_dev_config {
                name,
                vendor_id: 0,
                device_id: cfg.device_id,
                features: cfg.features,
                vq_num: cfg.num_queues,
                // The split-ring alignment the kernel allocates with; QEMU uses the page size.
                vq_align: 4096,
                reserved: [0; 13],
                config_size: cfg.config.len() as u32,
            },
            config: space,
        };
        // SAFETY: `arg` is the 336-byte header immediately followed by `config_size` bytes,
        // exactly what the kernel copies; it outlives the call.
        match unsafe { uapi::ioc_create_dev(self.file.as_raw_fd(), &arg) } {
            Ok(_) => Ok(()),
            Err(Errno::EEXIST) => Err(Error::Exists(cfg.name.clone())),
            Err(source) => Err(Error::Ioctl { op: "VDUSE_CREATE_DEV", source }),
        }
    }

    /// Destroys a device. The kernel copies a full 256-byte name buffer, so pass one.
    /// Returns `Ok(false)` if no such device exists.
    pub fn destroy(&self, dev_name: &str) -> Result<bool> {
        validate_device_name(dev_name)?;
        let mut name = [0u8; uapi::VDUSE_NAME_MAX];
        name[..dev_name.len()].copy_from_slice(dev_name.as_bytes());
        // SAFETY: `name` is a 256-byte buffer that outlives the call.
        match unsafe { uapi::ioc_destroy_dev(self.file.as_raw_fd(), &name) } {
            Ok(_) => Ok(true),
            Err(Errno::EINVAL) => Ok(false),
            Err(source) => Err(Error::Ioctl { op: "VDUSE_DESTROY_DEV", source }),
        }
    }
}
