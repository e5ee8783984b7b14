//! The operation guard keys of RBD volumes and snapshots. CreateVolume and CreateSnapshot know
//! a volume or snapshot by its CSI name, the other calls by its ID: both derive the image or
//! snapshot name ([`super::ids`]), so every call on one volume or snapshot takes one key.

use super::ids::{SnapshotLocation, image_name, location, snapshot_name};
use crate::status::{Error, Result};

pub(super) fn volume_of_image(image: &str) -> String {
    format!("rbd-volume/{image}")
}

pub(super) fn snapshot_of_snap(snap: &str) -> String {
    format!("rbd-snapshot/{snap}")
}

/// The key of the volume CreateVolume names `name`.
pub fn volume_of_name(name: &str) -> String {
    volume_of_image(&image_name(name))
}

/// The key of volume `id`.
pub fn volume_of_id(id: &str) -> Result<String> {
    Ok(volume_of_image(&location(id)?.image))
}

/// The key of the snapshot CreateSnapshot names `name`.
pub fn snapshot_of_name(name: &str) -> String {
    snapshot_of_snap(&snapshot_name(name))
}

/// The key of snapshot `id`.
pub fn snapshot_of_id(id: &str) -> Result<String> {
    SnapshotLocation::parse(id)
        .map(|loc| snapshot_of_snap(&loc.snap))
        .ok_or_else(|| Error::InvalidArgument(format!("{id:?} is not an RBD snapshot ID")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rbd::ids::ImageLocation;

    #[test]
    fn a_name_and_its_id_take_one_key() {
        let loc = ImageLocation { cluster_id: "c1".into(), pool_id: 3, image: image_name("pvc-1") };
        assert_eq!(volume_of_name("pvc-1"), volume_of_id(&loc.volume_id()).expect("id"));
        assert_ne!(volume_of_name("pvc-1"), volume_of_name("pvc-2"));
        let snap = SnapshotLocation { volume: loc, snap: snapshot_name("snap-1") };
        assert_eq!(snapshot_of_name("snap-1"), snapshot_of_id(&snap.snapshot_id()).expect("id"));
        assert_ne!(snapshot_of_name("snap-1"), volume_of_name("snap-1"));
        assert!(snapshot_of_id("rbd.c1.3.csi-vol-0").is_err());
    }
}
