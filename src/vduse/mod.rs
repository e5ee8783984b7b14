//! The Linux VDUSE interface: uapi structs and ioctls, the control and device fds, IOVA
//! mappings, vdpa generic netlink and sysfs discovery.
//!
//! This module knows nothing about block devices or CSI. It is one of the few places with
//! `unsafe` code; docs/ARCHITECTURE.md lists them all.

pub mod control;
pub mod device;
pub mod iotlb;
pub mod netlink;
pub mod sysfs;
pub mod uapi;
pub mod umem;

use std::io;
use std::path::PathBuf;

pub use control::VduseControl;
pub use device::VduseDevice;
pub use iotlb::IovaMemory;
pub use umem::UserBounce;

/// Path of the VDUSE control node.
pub const CONTROL_PATH: &str = "/dev/vduse/control";

/// Kernel modules a host needs for vduse-csi, in load order.
pub const REQUIRED_MODULES: &str = "vduse vdpa virtio_vdpa virtio_blk";

/// Errors of the VDUSE layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/vduse/control` does not exist.
    #[error(
        "{CONTROL_PATH} does not exist: load the kernel modules with `modprobe -a {REQUIRED_MODULES}` (kernel >= 6.4 with CONFIG_VDPA_USER)"
    )]
    ControlMissing,
    /// Opening a VDUSE node failed.
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// The device node is held open by another process.
    #[error("VDUSE device {0:?} is being served by another process (its device node is busy)")]
    Busy(String),
    /// A VDUSE ioctl or fd operation failed.
    #[error("{op} failed: {source}")]
    Ioctl { op: &'static str, source: nix::Error },
    /// A device with that name already exists.
    #[error("VDUSE device {0:?} already exists")]
    Exists(String),
    /// The device name cannot be used.
    #[error(
        "invalid device name {0:?}: use 1-64 characters of [A-Za-z0-9._-], not starting with '.', other than \"control\""
    )]
    InvalidName(String),
    /// A vdpa generic-netlink request failed.
    #[error("vdpa netlink {op} for {name:?} failed: {reason}")]
    Netlink { op: &'static str, name: String, reason: String },
    /// A sysfs attribute could not be read or written.
    #[error("sysfs {path}: {source}")]
    Sysfs { path: PathBuf, source: io::Error },
    /// Mapping an IOVA range of the device into our address space failed.
    #[error("cannot map IOVA {iova:#x}: {reason}")]
    Map { iova: u64, reason: String },
    /// The attached device was claimed by another vdpa bus driver (vhost_vdpa), so the host
    /// gets no block device.
    #[error(
        "vdpa device {name:?} is bound to {driver}, not virtio_vdpa, so the host gets no block device: unload vhost_vdpa (modprobe -r vhost_vdpa) or blacklist it on this node"
    )]
    WrongDriver { name: String, driver: String },
    /// The host block device of an attached device could not be found.
    #[error("no block device appeared for vdpa device {name:?}: {reason}")]
    NoBlockDevice { name: String, reason: String },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Checks that `name` can be a VDUSE device, device node, sysfs and vdpa device name.
pub fn validate_device_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        // The control node shares the device namespace (/dev/vduse/control).
        && name != "control";
    if ok { Ok(()) } else { Err(Error::InvalidName(name.to_owned())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_validated() {
        for good in ["vol-1", "a", "pvc-0123.x_y", &"x".repeat(64)] {
            assert!(validate_device_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "a b", "control", "control\0", &"x".repeat(65), ".hidden"] {
            assert!(validate_device_name(bad).is_err(), "{bad:?}");
        }
    }
}
