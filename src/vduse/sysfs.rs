//! Per-device sysfs attributes and discovery of the host block device (VDUSE.md §0, §2).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Error, Result};

const VDUSE_CLASS: &str = "/sys/class/vduse";
const VDPA_DEVICES: &str = "/sys/bus/vdpa/devices";

fn sysfs_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Sysfs { path: path.to_owned(), source }
}

/// Sets how long the kernel waits for an answer to a control message before it marks the
/// device broken for good (0 = wait forever, killable).
pub fn set_msg_timeout(name: &str, seconds: u32) -> Result<()> {
    let path = PathBuf::from(format!("{VDUSE_CLASS}/{name}/msg_timeout"));
    std::fs::write(&path, seconds.to_string()).map_err(sysfs_err(&path))
}

/// Sets the size of the device's bounce region, where every in-flight request's buffers live.
/// Only possible before the device is first attached (the kernel answers EPERM after).
pub fn set_bounce_size(name: &str, bytes: u64) -> Result<()> {
    let path = PathBuf::from(format!("{VDUSE_CLASS}/{name}/bounce_size"));
    std::fs::write(&path, bytes.to_string()).map_err(sysfs_err(&path))
}

/// Reads the message timeout of a device.
pub fn msg_timeout(name: &str) -> Result<u32> {
    let path = PathBuf::from(format!("{VDUSE_CLASS}/{name}/msg_timeout"));
    let text = std::fs::read_to_string(&path).map_err(sysfs_err(&path))?;
    text.trim().parse().map_err(|_| Error::Sysfs {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, text.trim().to_owned()),
    })
}

/// Names of all VDUSE devices on this host.
pub fn list_devices() -> Result<Vec<String>> {
    let dir = Path::new(VDUSE_CLASS);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(sysfs_err(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != "control")
        .collect();
    names.sort();
    Ok(names)
}

/// Whether a VDUSE device of that name exists.
pub fn device_exists(name: &str) -> bool {
    Path::new(VDUSE_CLASS).join(name).exists()
}

/// Whether the device is attached to the vdpa bus.
pub fn is_attached(name: &str) -> bool {
    Path::new(VDPA_DEVICES).join(name).exists()
}

/// The vdpa bus driver bound to the device (`virtio_vdpa`, `vhost_vdpa`), if any.
pub fn bound_driver(name: &str) -> Option<String> {
    let link = std::fs::read_link(Path::new(VDPA_DEVICES).join(name).join("driver")).ok()?;
    link.file_name()?.to_str().map(str::to_owned)
}

/// The host block device (`vdX`) virtio_blk created for the attached device, if any.
pub fn block_device_name(name: &str) -> Option<String> {
    let dev_dir = Path::new(VDPA_DEVICES).join(name);
    for entry in std::fs::read_dir(&dev_dir).ok()?.filter_map(|e| e.ok()) {
        let file_name = entry.file_name();
        if !file_name.to_string_lossy().starts_with("virtio") {
            continue;
        }
        // The virtio device exists a moment before its disk does; keep looking.
        let Ok(disks) = std::fs::read_dir(entry.path().join("block")) else { continue };
        if let Some(disk) = disks.filter_map(|e| e.ok()).next() {
            return disk.file_name().into_string().ok();
        }
    }
    None
}

/// Waits until the attached device has a block device and its node exists in `/dev`.
pub fn wait_for_block_device(name: &str, timeout: Duration) -> Result<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(driver) = bound_driver(name) {
            if driver != "virtio_vdpa" {
                return Err(Error::WrongDriver { name: name.to_owned(), driver });
            }
        }
        if let Some(disk) = block_device_name(name) {
            let node = PathBuf::from("/dev").join(&disk);
            if node.exists() {
                return Ok(node);
            }
        }
        if Instant::now() >= deadline {
            let reason = if bound_driver(name).is_none() {
                "no driver bound to the vdpa device: load virtio_vdpa and virtio_blk".to_owned()
            } else {
                format!("timed out after {timeout:?}")
            };
            return Err(Error::NoBlockDevice { name: name.to_owned(), reason });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
