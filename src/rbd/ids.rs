//! RBD volume and snapshot IDs, and the image and snapshot names derived from CSI names.
//!
//! IDs carry the image's location, so every call finds it without state on a node:
//! `rbd.<clusterID>.<poolID>.<image>` for volumes and `<volume ID>.<snapshot>` for snapshots.

use super::ID_PREFIX;
use crate::status::{Error, Result};

/// clusterIDs become part of volume IDs: letters, digits, `-` and `_` only.
pub(super) fn check_cluster_id(id: &str) -> std::result::Result<(), String> {
    let ok = !id.is_empty() && id.len() <= 36 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if ok { Ok(()) } else { Err(format!("clusterID {id:?}: use 1 to 36 letters, digits, '-' or '_'")) }
}

/// Where a volume's image lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLocation {
    pub cluster_id: String,
    pub pool_id: i64,
    pub image: String,
}

impl ImageLocation {
    pub fn volume_id(&self) -> String {
        format!("{ID_PREFIX}.{}.{}.{}", self.cluster_id, self.pool_id, self.image)
    }

    /// Parses a volume ID; `None` if it is not an RBD volume's.
    pub fn parse(id: &str) -> Option<Self> {
        let mut parts = id.split('.');
        let (prefix, cluster, pool, image) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if prefix != ID_PREFIX || parts.next().is_some() || check_cluster_id(cluster).is_err() {
            return None;
        }
        let pool_id = pool.parse::<i64>().ok().filter(|p| *p >= 0)?;
        image.starts_with("csi-vol-").then(|| Self { cluster_id: cluster.to_owned(), pool_id, image: image.to_owned() })
    }
}

/// Where a snapshot lives: its image and its name there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLocation {
    pub volume: ImageLocation,
    pub snap: String,
}

impl SnapshotLocation {
    pub fn snapshot_id(&self) -> String {
        format!("{}.{}", self.volume.volume_id(), self.snap)
    }

    pub fn parse(id: &str) -> Option<Self> {
        let (volume, snap) = id.rsplit_once('.')?;
        let volume = ImageLocation::parse(volume)?;
        snap.starts_with("csi-snap-").then(|| Self { volume, snap: snap.to_owned() })
    }
}

/// Whether a volume ID names an RBD volume (it may still be malformed).
pub fn is_rbd_id(id: &str) -> bool {
    id.starts_with("rbd.")
}

/// The location of an RBD volume ID, or INVALID_ARGUMENT.
pub fn location(id: &str) -> Result<ImageLocation> {
    ImageLocation::parse(id).ok_or_else(|| Error::InvalidArgument(format!("{id:?} is not an RBD volume ID")))
}

/// The hash that names a CSI name's image or snapshot.
pub(super) fn name_hash(name: &str) -> String {
    format!("{:016x}", crate::volume::stable_hash(name))
}

/// Whether `text` has the form of [`name_hash`]'s output.
pub(super) fn is_name_hash(text: &str) -> bool {
    text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The image name of the volume called `name`.
pub fn image_name(name: &str) -> String {
    format!("csi-vol-{}", name_hash(name))
}

/// The snapshot name of the snapshot called `name`.
pub fn snapshot_name(name: &str) -> String {
    format!("csi-snap-{}", name_hash(name))
}
