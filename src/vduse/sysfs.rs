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

/// Binds the interrupt callback of virtqueue `index` to one CPU of the mask virtio_vdpa gave
/// it: one this process may run on if the mask has any (a server pinned with taskset or a
/// cpuset keeps its completions on its own CPUs), chosen by `seed` so that the queues of
/// different devices spread over the mask. Returns the CPU, or `None` when the mask is one
/// CPU already (nothing to do).
///
/// Why: VDUSE runs each injected interrupt's callback from a work item, and with a mask of
/// several CPUs it moves that work to the next CPU of the mask at every injection
/// (`vduse_vq_update_effective_cpu`), so one queue's completions alternate between CPUs, each
/// a cross-CPU wake-up of a kworker. One CPU per queue keeps its completions where the last
/// ones ran (docs/PERFORMANCE.md has the measurement).
pub fn bind_vq_irq(name: &str, index: u32, seed: u64) -> Result<Option<usize>> {
    let path = PathBuf::from(format!("{VDUSE_CLASS}/{name}/vq{index}/irq_cb_affinity"));
    let text = std::fs::read_to_string(&path).map_err(sysfs_err(&path))?;
    let mask = parse_cpu_mask(text.trim()).ok_or_else(|| Error::Sysfs {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a CPU mask: {:?}", text.trim())),
    })?;
    let Some(cpu) = pick_irq_cpu(&mask, &allowed_cpus(), seed) else { return Ok(None) };
    std::fs::write(&path, format_cpu_mask(cpu)).map_err(sysfs_err(&path))?;
    Ok(Some(cpu))
}

/// The CPU of `mask` an interrupt is bound to: of those in `allowed` too if there are any,
/// the one `seed` picks. `None` if the mask has fewer than two CPUs.
fn pick_irq_cpu(mask: &[usize], allowed: &[usize], seed: u64) -> Option<usize> {
    if mask.len() < 2 {
        return None;
    }
    let ours: Vec<usize> = mask.iter().copied().filter(|c| allowed.contains(c)).collect();
    let from = if ours.is_empty() { mask } else { &ours };
    Some(from[(seed % from.len() as u64) as usize])
}

/// The CPUs this thread may run on (`Cpus_allowed` of /proc/thread-self/status); empty if
/// unreadable, which leaves the whole mask to choose from.
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed:"))
        .and_then(|m| parse_cpu_mask(m.trim()))
        .unwrap_or_default()
}

/// The CPUs of a kernel CPU mask (`%*pb`: hexadecimal words of 32 bits, most significant
/// first, separated by commas), lowest first.
fn parse_cpu_mask(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for (word, group) in text.rsplit(',').enumerate() {
        if group.is_empty() || group.len() > 8 {
            return None;
        }
        let bits = u32::from_str_radix(group, 16).ok()?;
        cpus.extend((0..32).filter(|b| bits & (1 << b) != 0).map(|b| word * 32 + b));
    }
    cpus.sort_unstable();
    Some(cpus)
}

/// A kernel CPU mask holding `cpu` alone, in the format `cpumask_parse` reads.
fn format_cpu_mask(cpu: usize) -> String {
    let mut words = vec![format!("{:x}", 1u32 << (cpu % 32))];
    words.extend(std::iter::repeat_n("00000000".to_owned(), cpu / 32));
    words.join(",")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_masks_are_read_word_by_word() {
        assert_eq!(parse_cpu_mask("3"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_mask("00000004"), Some(vec![2]));
        assert_eq!(parse_cpu_mask("1,80000000"), Some(vec![31, 32]));
        assert_eq!(parse_cpu_mask("ff,00000000,00000001"), Some(vec![0, 64, 65, 66, 67, 68, 69, 70, 71]));
        assert_eq!(parse_cpu_mask("0"), Some(vec![]));
    }

    #[test]
    fn a_mangled_cpu_mask_is_refused() {
        for bad in ["", "x", "1,,2", "123456789", "3\n4"] {
            assert_eq!(parse_cpu_mask(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn one_cpu_masks_read_back_as_that_cpu() {
        for cpu in [0, 1, 5, 31, 32, 63, 64, 200] {
            assert_eq!(parse_cpu_mask(&format_cpu_mask(cpu)), Some(vec![cpu]), "cpu {cpu}");
        }
        assert_eq!(format_cpu_mask(1), "2");
        assert_eq!(format_cpu_mask(33), "2,00000000");
    }

    #[test]
    fn interrupts_go_to_one_cpu_we_may_run_on() {
        assert_eq!(pick_irq_cpu(&[3], &[0, 1, 2, 3], 7), None, "one CPU already");
        assert_eq!(pick_irq_cpu(&[], &[0], 7), None);
        assert_eq!(pick_irq_cpu(&[0, 1], &[1], 0), Some(1), "pinned to CPU 1");
        assert_eq!(pick_irq_cpu(&[0, 1], &[1], 1), Some(1));
        assert_eq!(pick_irq_cpu(&[0, 1], &[4, 5], 1), Some(1), "none of ours in the mask: any of it");
        assert_eq!(pick_irq_cpu(&[0, 1], &[], 0), Some(0));
        let spread: std::collections::BTreeSet<_> =
            (0..8).filter_map(|seed| pick_irq_cpu(&[2, 3, 4, 5], &[0, 1, 2, 3, 4, 5], seed)).collect();
        assert_eq!(spread.into_iter().collect::<Vec<_>>(), vec![2, 3, 4, 5], "seeds spread over the mask");
    }

    #[test]
    fn this_thread_may_run_somewhere() {
        assert!(!allowed_cpus().is_empty());
    }
}
