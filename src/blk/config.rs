//! Features and config space of the virtio-blk device we expose.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Size of the config space (`struct virtio_blk_config` through the secure-erase fields).
pub const CONFIG_SIZE: usize = 72;
/// Logical block size we advertise.
pub const BLOCK_SIZE: u32 = 512;
/// Largest discard / write-zeroes request, in sectors (1 GiB): large enough that fstrim is a
/// handful of requests, small enough that one request cannot hog a queue for long.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Segments per discard / write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 1;
/// Largest request the host's block layer sends by default: Linux caps `max_sectors_kb` at
/// 1280 KiB (`BLK_DEF_MAX_SECTORS_CAP`) when the device names no limit of its own.
pub const MAX_REQUEST_BYTES: u64 = 1280 << 10;

/// Segments per request we advertise: enough for a [`MAX_REQUEST_BYTES`] request made of
/// 4 KiB pages that do not start on a page boundary, so a 1 MiB request is never split.
/// Indirect descriptors let a request have more segments than the ring has slots.
pub fn seg_max(queue_size: u16) -> u32 {
    let for_largest_request = (MAX_REQUEST_BYTES / 4096) as u32 + 1;
    u32::from(queue_size.saturating_sub(2)).max(for_largest_request)
}

/// Byte offset of `capacity` in the config space.
pub const CAPACITY_OFFSET: u32 = 0;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Feature bits this device model implements. `VIRTIO_F_ACCESS_PLATFORM` is required by VDUSE
/// and `VIRTIO_BLK_F_CONFIG_WCE` is refused by it, so neither is optional here.
pub fn device_features(num_queues: u16, read_only: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_F_ACCESS_PLATFORM)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    if num_queues > 1 {
        f |= bit(VIRTIO_BLK_F_MQ);
    }
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    }
    f
}

/// Whether the driver's accepted features are usable: a subset of what we offered, with the
/// two transport features every VDUSE device needs.
pub fn features_acceptable(offered: u64, accepted: u64) -> bool {
    let required = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_ACCESS_PLATFORM);
    accepted & !offered == 0 && accepted & required == required
}

/// Whether the driver enabled `VIRTIO_RING_F_EVENT_IDX`.
pub fn event_idx(accepted: u64) -> bool {
    accepted & bit(VIRTIO_RING_F_EVENT_IDX) != 0
}

/// The virtio-blk config space for a disk of `capacity_bytes`.
pub fn config_space(capacity_bytes: u64, num_queues: u16, queue_size: u16) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &(capacity_bytes / 512).to_le_bytes());
    put(12, &seg_max(queue_size).to_le_bytes());
    put(20, &BLOCK_SIZE.to_le_bytes());
    put(34, &num_queues.to_le_bytes());
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEG.to_le_bytes());
    put(44, &(BLOCK_SIZE / 512).to_le_bytes());
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(52, &MAX_DISCARD_SEG.to_le_bytes());
    // write_zeroes_may_unmap stays 0: WRITE_ZEROES keeps the range allocated.
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let c = config_space(1 << 30, 4, 256);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), (1 << 30) / 512);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 321, "a 1 MiB request fits in one");
        assert_eq!(seg_max(1024), 1022);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 1);
    }

    #[test]
    fn features_are_what_vduse_accepts() {
        let f = device_features(1, false);
        assert_ne!(f & bit(VIRTIO_F_ACCESS_PLATFORM), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_CONFIG_WCE), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_MQ), 0);
        assert_ne!(device_features(2, true) & (bit(VIRTIO_BLK_F_MQ) | bit(VIRTIO_BLK_F_RO)), 0);
        assert!(features_acceptable(f, bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_ACCESS_PLATFORM)));
        assert!(!features_acceptable(f, bit(VIRTIO_F_VERSION_1)), "ACCESS_PLATFORM is required");
        assert!(!features_acceptable(f, f | bit(VIRTIO_BLK_F_CONFIG_WCE)), "not offered");
    }
}
