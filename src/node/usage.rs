//! Expansion and what a staged volume looks like from outside: its usage and its condition
//! (the first of: a degraded server, a failed flush, fencing, a lost device or mount, a full
//! backing store).

use std::path::Path;
use std::time::{Duration, Instant};

use super::NodeAgent;
use super::stage::mounted_from;
use crate::host;
use crate::params::MIB;
use crate::server::HealthState;
use crate::status::{Error, Result};
use crate::volume::VolumeMeta;

/// How long to wait for the host to see a new capacity after the config interrupt.
const RESIZE_TIMEOUT: Duration = Duration::from_secs(30);

/// A volume's condition (CSI's VolumeCondition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

/// A staged volume's usage.
#[derive(Debug, Clone, Copy)]
pub enum VolumeUsage {
    /// Raw block: only its size is known.
    Block { total_bytes: u64 },
    /// The staged filesystem's space and inodes.
    Filesystem(host::FsUsage),
}

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone)]
pub struct VolumeStats {
    pub usage: VolumeUsage,
    pub condition: Condition,
}

impl NodeAgent {
    /// Grows a staged volume to `wanted` bytes (default: its recorded capacity, which the
    /// controller grew): the image, the device's capacity (a config interrupt), and its
    /// filesystem. Returns the capacity.
    pub fn expand(&self, id: &str, path: &Path, wanted: Option<u64>) -> Result<u64> {
        let meta = self.store.existing_volume(id)?;
        let staged = meta
            .staged
            .clone()
            .ok_or_else(|| Error::FailedPrecondition(format!("volume {id} is not staged on this node")))?;
        if path != staged.staging_path && !meta.published.contains_key(path) {
            return Err(Error::NotFound(format!("{} is not a path of volume {id}", path.display())));
        }
        let wanted = wanted.unwrap_or(meta.spec.capacity_bytes);
        let meta = if crate::rbd::is_rbd(&meta.spec) {
            // The controller resized the image; the device server learns it below.
            let mut meta = meta;
            meta.spec.capacity_bytes = meta.spec.capacity_bytes.max(wanted);
            self.store.save_volume(&meta)?;
            meta
        } else {
            self.store.grow_volume(id, wanted)?
        };
        let dev = {
            let server = self.served_or_unavailable(&meta)?;
            server.resize(meta.spec.capacity_bytes)?;
            server.block_device().to_owned()
        };
        let deadline = Instant::now() + RESIZE_TIMEOUT;
        while host::block_device_size(&dev)? < meta.spec.capacity_bytes {
            if Instant::now() > deadline {
                return Err(Error::Internal(format!(
                    "{} did not grow to {} bytes",
                    dev.display(),
                    meta.spec.capacity_bytes
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !staged.block {
            let fs_type = host::mount_at(&staged.staging_path)?
                .map(|m| m.fs_type)
                .or(staged.fs_type)
                .unwrap_or_else(|| "ext4".into());
            host::grow_fs(&dev, &staged.staging_path, &fs_type)?;
        }
        tracing::info!(volume = id, capacity = meta.spec.capacity_bytes, "expanded");
        Ok(meta.spec.capacity_bytes)
    }

    /// The usage and condition of a staged volume seen at `path` (its staging path or a
    /// target). Reads only: it never waits on the device.
    pub fn stats(&self, id: &str, path: &Path) -> Result<VolumeStats> {
        let meta = self.store.existing_volume(id)?;
        let staged =
            meta.staged.clone().ok_or_else(|| Error::NotFound(format!("volume {id} is not staged on this node")))?;
        if path != staged.staging_path && !meta.published.contains_key(path) {
            return Err(Error::NotFound(format!("{} is not a path of volume {id}", path.display())));
        }
        let dev = self.block_device(id);
        let server = self.servers.get(id);
        let health = server.as_ref().map(|s| s.health());
        let flush_failure = server.as_ref().and_then(|s| s.flush_failure());
        drop(server);
        let condition = match &dev {
            _ if let Some(why) = &flush_failure => {
                abnormal(format!("a flush of volume {id} failed ({why}): writes it acknowledged may be lost"))
            }
            // A queue or control thread of the server stopped on a fault: the reason says which.
            _ if let Some(HealthState::Degraded(reason)) = &health => {
                abnormal(format!("the device server of volume {id} is degraded: {reason}"))
            }
            _ if let Some(reason) = self.fenced_reason(id) => {
                abnormal(format!("volume {id} is fenced on this node, every request fails: {reason}; unstage it"))
            }
            Some(d) if !d.exists() => abnormal(format!("{} of volume {id} is gone", d.display())),
            Some(d) if !staged.block && !mounted_from(&staged.staging_path, d) => abnormal(format!(
                "the filesystem at {} is not on {} (the device was lost); unstage and stage the volume again",
                staged.staging_path.display(),
                d.display()
            )),
            Some(d) => match store_full(&self.store, &meta)? {
                Some(message) => abnormal(message),
                None => Condition { abnormal: false, message: format!("served as {}", d.display()) },
            },
            None => abnormal(match self.unserved_reason(id) {
                Some(why) => format!("the device server of volume {id} is not running: {why}"),
                None => format!("the device server of volume {id} is not running"),
            }),
        };
        let usage = if staged.block {
            let total = dev.as_deref().map(host::block_device_size).transpose()?.unwrap_or(meta.spec.capacity_bytes);
            VolumeUsage::Block { total_bytes: total }
        } else {
            VolumeUsage::Filesystem(host::fs_usage(path)?)
        };
        Ok(VolumeStats { usage, condition })
    }
}

/// Free bytes of the backing filesystem below which a thin volume's writes to blocks it has
/// not allocated yet may fail.
const BACKING_FULL_BYTES: u64 = MIB;

/// Whether writes of a thin volume can fail because its store's filesystem is full: the
/// message for its condition, or `None`. Also for callers without a running plugin.
pub fn store_full(store: &crate::volume::VolumeStore, meta: &VolumeMeta) -> crate::volume::Result<Option<String>> {
    if !meta.spec.is_local() {
        return Ok(None);
    }
    let free = store.available_bytes()?;
    let allocated = crate::volume::allocated_bytes(&store.image_path(&meta.spec.id)?)?;
    Ok(full_message(&meta.spec.id, free, allocated, meta.spec.capacity_bytes))
}

fn full_message(id: &str, free: u64, allocated: u64, capacity: u64) -> Option<String> {
    (free < BACKING_FULL_BYTES && allocated < capacity).then(|| {
        format!(
            "backing store full: {free} bytes free on the node's state dir, and {} bytes of volume {id} are not allocated yet; writes to them fail with I/O errors",
            capacity - allocated
        )
    })
}

fn abnormal(message: String) -> Condition {
    Condition { abnormal: true, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thin_volume_on_a_full_backing_store_is_reported() {
        let message = full_message("pvc-1", 4096, 10 * MIB, 100 * MIB).expect("full");
        assert!(message.starts_with("backing store full"), "{message}");
        assert_eq!(full_message("pvc-1", 4096, 100 * MIB, 100 * MIB), None, "fully allocated: writes cannot fail");
        assert_eq!(full_message("pvc-1", 64 * MIB, 10 * MIB, 100 * MIB), None, "room left");
    }
}
