//! The controller's side of RBD volumes: images created (or cloned from a snapshot or a
//! volume, and flattened before CreateVolume returns: a volume then owes nothing to its
//! source), snapshots, deletes and resizes. Each call is idempotent: names derive from the
//! CSI names, and the CSI name is kept in the image's metadata and checked.

use std::collections::HashMap;
use std::sync::Arc;

use super::clusters::{Clusters, connect, identity, pool_of};
use super::ids::{ImageLocation, SnapshotLocation, image_name, location, name_hash, snapshot_name};
use super::params::RbdParameters;
use super::{NAME_KEY, READY_KEY};
use crate::backend::ceph::{self, Pool};
use crate::status::{Error, Result};

/// Where a new volume's data comes from.
pub enum Source {
    Snapshot(SnapshotLocation),
    Volume(ImageLocation),
}

/// Checks that a content source lives in the new volume's cluster.
pub fn check_source_cluster(src: &Source, cluster_id: &str) -> Result<()> {
    let src_cluster = match src {
        Source::Snapshot(s) => &s.volume.cluster_id,
        Source::Volume(v) => &v.cluster_id,
    };
    if src_cluster != cluster_id {
        return Err(Error::InvalidArgument(format!(
            "the source lives in Ceph cluster {src_cluster}, the new volume in {cluster_id}: clones stay in one cluster"
        )));
    }
    Ok(())
}

/// A snapshot taken (or found).
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub id: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    /// Seconds and nanoseconds since the epoch.
    pub created: (i64, i32),
}

/// A created (or found) RBD volume.
pub struct Created {
    pub id: String,
    pub capacity: u64,
}

/// CreateVolume for RBD: creates (or finds, for a retry) the image of `name`, cloning and
/// flattening its source first if it has one.
pub fn create_volume(
    clusters: &Clusters,
    name: &str,
    capacity: u64,
    params: &RbdParameters,
    source: Option<Source>,
    secrets: &HashMap<String, String>,
) -> Result<Created> {
    let (user, key) = identity(secrets);
    let cluster = connect(clusters, &params.cluster_id, user, key)?;
    let pool = Arc::new(cluster.pool(&params.pool)?);
    let image = image_name(name);
    let loc = ImageLocation { cluster_id: params.cluster_id.clone(), pool_id: pool.id(), image: image.clone() };
    // Refused before anything is made: a clone stays in its source's pool, and cannot be
    // smaller than what it copies.
    let source_pool = match &source {
        None => None,
        Some(Source::Snapshot(snap)) => Some(snap.volume.pool_id),
        Some(Source::Volume(vol)) => Some(vol.pool_id),
    };
    if source_pool.is_some_and(|p| p != loc.pool_id) {
        return Err(Error::InvalidArgument(format!(
            "the source lives in another pool than {}: clones stay in their source's pool",
            params.pool
        )));
    }
    let source_size = match &source {
        None => 0,
        Some(Source::Snapshot(snap)) => {
            let parent = pool.open(&snap.volume.image)?;
            let found = parent.snapshots()?.into_iter().find(|s| s.name == snap.snap);
            found.ok_or_else(|| Error::NotFound(format!("snapshot {} does not exist", snap.snapshot_id())))?.size
        }
        Some(Source::Volume(vol)) => pool.open(&vol.image)?.size()?,
    };
    if source_size > capacity {
        return Err(Error::OutOfRange(format!(
            "the source holds {source_size} bytes, more than the requested {capacity}"
        )));
    }
    let created = match &source {
        None => pool.create_image(&image, capacity),
        Some(Source::Snapshot(snap)) => clone_snapshot(&pool, snap, &image),
        Some(Source::Volume(vol)) => clone_volume(&pool, vol, name, &image),
    };
    let fresh = match created {
        Ok(()) => true,
        Err(e) if e.errno() == Some(libc::EEXIST) => false,
        Err(e) => return Err(e.into()),
    };
    let img = pool.open(&image)?;
    match img.metadata(NAME_KEY)? {
        Some(owner) if owner == name => {}
        // Not ours only if it is a complete image of another name: a clone still reading
        // from its parent is ours, interrupted before it was named (it carries the
        // parent's name).
        Some(owner) if !fresh && !img.has_parent()? => {
            return Err(Error::AlreadyExists(format!(
                "image {image} in pool {} belongs to volume {owner:?}, whose name hashes like {name:?}",
                params.pool
            )));
        }
        // New, or a create interrupted before it was named: ours either way (the image name
        // is this name's).
        _ => img.set_metadata(NAME_KEY, name)?,
    }
    if img.metadata(READY_KEY)?.as_deref() != Some(name) {
        if source.is_some() {
            // Copies what the clone still reads from its parent; a retry of an interrupted
            // flatten continues it (EINVAL: not a clone any more).
            match img.flatten() {
                Err(e) if e.errno() != Some(libc::EINVAL) => return Err(e.into()),
                _ => {}
            }
        }
        if img.size()? < capacity {
            img.resize(capacity)?;
        }
        img.set_metadata(READY_KEY, name)?;
    }
    let size = img.size()?;
    drop(img);
    match &source {
        Some(Source::Snapshot(snap)) => release_source_snapshot(&pool, snap),
        Some(Source::Volume(vol)) => remove_clone_snapshot(&pool, vol, name),
        None => {}
    }
    if size < capacity || (source.is_none() && size != capacity) {
        return Err(Error::AlreadyExists(format!(
            "volume {name} exists with {size} bytes, not the requested {capacity}"
        )));
    }
    tracing::info!(volume = %loc.volume_id(), image, pool = %params.pool, size, "RBD volume created");
    Ok(Created { id: loc.volume_id(), capacity: size })
}

/// Clones `snap` as `child` in `pool`, the snapshot's own (CreateVolume checked that).
fn clone_snapshot(pool: &Arc<Pool>, snap: &SnapshotLocation, child: &str) -> ceph::Result<()> {
    let parent = pool.open(&snap.volume.image)?;
    parent.protect_snapshot(&snap.snap)?;
    drop(parent);
    pool.clone_image(&snap.volume.image, &snap.snap, child)
}

/// Unprotects a snapshot once the flattened clone no longer needs it. Another clone may still
/// be in progress (EBUSY): it unprotects when it is done; DeleteSnapshot unprotects too.
fn release_source_snapshot(pool: &Arc<Pool>, snap: &SnapshotLocation) {
    let result = pool.open(&snap.volume.image).and_then(|p| p.unprotect_snapshot(&snap.snap));
    if let Err(e) = result {
        tracing::debug!(snapshot = %snap.snapshot_id(), error = %e, "snapshot stays protected for now");
    }
}

/// The snapshot of a volume taken for the clone called `name` alone.
fn clone_snapshot_name(name: &str) -> String {
    format!("csi-clone-{}", name_hash(name))
}

/// Clones the volume `source` as `child`, through a snapshot taken for this clone alone
/// ([`remove_clone_snapshot`] removes it once the clone is flattened).
fn clone_volume(pool: &Arc<Pool>, source: &ImageLocation, name: &str, child: &str) -> ceph::Result<()> {
    let snap = clone_snapshot_name(name);
    let parent = pool.open(&source.image)?;
    match parent.create_snapshot(&snap) {
        Err(e) if e.errno() != Some(libc::EEXIST) => return Err(e),
        _ => {}
    }
    parent.protect_snapshot(&snap)?;
    pool.clone_image(&source.image, &snap, child)
}

/// Removes the snapshot [`clone_volume`] took. A failure only leaves a snapshot that a retry
/// reuses (and that keeps the source from being deleted until then).
fn remove_clone_snapshot(pool: &Arc<Pool>, source: &ImageLocation, name: &str) {
    let snap = clone_snapshot_name(name);
    let removed = pool.open(&source.image).and_then(|parent| {
        if !parent.snapshots()?.iter().any(|s| s.name == snap) {
            return Ok(());
        }
        parent.unprotect_snapshot(&snap)?;
        parent.remove_snapshot(&snap)
    });
    if let Err(e) = removed {
        tracing::warn!(image = %source.image, snap, error = %e, "cannot remove the clone's temporary snapshot");
    }
}

/// DeleteVolume for RBD. A missing image or pool is success (a retry).
pub fn delete_volume(clusters: &Clusters, id: &str, secrets: &HashMap<String, String>) -> Result<()> {
    let loc = location(id)?;
    let pool = match pool_of(clusters, &loc, secrets) {
        Err(Error::NotFound(_)) => return Ok(()),
        other => other?,
    };
    let img = match pool.open(&loc.image) {
        Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(()),
        other => other?,
    };
    let snaps: Vec<String> = img.snapshots()?.into_iter().map(|s| s.name).collect();
    drop(img);
    if !snaps.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} has snapshots ({}); delete them first",
            snaps.join(", ")
        )));
    }
    match pool.remove_image(&loc.image) {
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
        Err(e) if e.errno() == Some(libc::EBUSY) => Err(Error::FailedPrecondition(format!(
            "volume {id} is in use: a node still has its image open (unstage it first)"
        ))),
        other => Ok(other?),
    }
}

/// CreateSnapshot for RBD: an RBD snapshot of the volume's image, crash-consistent (librbd
/// has the node serving the image take it).
pub fn create_snapshot(
    clusters: &Clusters,
    source_id: &str,
    name: &str,
    secrets: &HashMap<String, String>,
) -> Result<SnapshotInfo> {
    let loc = location(source_id)?;
    let pool = pool_of(clusters, &loc, secrets)?;
    let img = pool.open(&loc.image)?;
    let snap = snapshot_name(name);
    let found = img.snapshots()?.into_iter().find(|s| s.name == snap);
    let info = match found {
        Some(info) => info,
        None => {
            img.create_snapshot(&snap)?;
            img.snapshots()?
                .into_iter()
                .find(|s| s.name == snap)
                .ok_or_else(|| Error::Internal(format!("snapshot {snap} vanished after it was taken")))?
        }
    };
    let id = SnapshotLocation { volume: loc, snap }.snapshot_id();
    tracing::info!(volume = source_id, snapshot = id, "RBD snapshot taken");
    Ok(SnapshotInfo { id, source_volume_id: source_id.to_owned(), size_bytes: info.size, created: info.created })
}

/// DeleteSnapshot for RBD; a missing snapshot or image is success.
pub fn delete_snapshot(clusters: &Clusters, id: &str, secrets: &HashMap<String, String>) -> Result<()> {
    let Some(loc) = SnapshotLocation::parse(id) else {
        return Err(Error::InvalidArgument(format!("{id:?} is not an RBD snapshot ID")));
    };
    let pool = match pool_of(clusters, &loc.volume, secrets) {
        Err(Error::NotFound(_)) => return Ok(()),
        other => other?,
    };
    let img = match pool.open(&loc.volume.image) {
        Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(()),
        other => other?,
    };
    if !img.snapshots()?.iter().any(|s| s.name == loc.snap) {
        return Ok(());
    }
    if let Err(e) = img.unprotect_snapshot(&loc.snap) {
        return Err(match e.errno() {
            Some(libc::EBUSY) => Error::FailedPrecondition(format!(
                "snapshot {id} is being cloned into a new volume; retry when it is done"
            )),
            _ => e.into(),
        });
    }
    match img.remove_snapshot(&loc.snap) {
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
        other => Ok(other?),
    }
}

/// ControllerExpandVolume for RBD: resizes the image (librbd has the node serving it do it).
pub fn expand_volume(clusters: &Clusters, id: &str, capacity: u64, secrets: &HashMap<String, String>) -> Result<u64> {
    let loc = location(id)?;
    let img = pool_of(clusters, &loc, secrets)?.open(&loc.image)?;
    if img.size()? < capacity {
        img.resize(capacity)?;
    }
    let size = img.size()?;
    tracing::info!(volume = id, size, "RBD image resized");
    Ok(size)
}

/// Whether the volume's image exists (ValidateVolumeCapabilities); NotFound if not.
pub fn check_exists(clusters: &Clusters, id: &str, secrets: &HashMap<String, String>) -> Result<u64> {
    let loc = location(id)?;
    Ok(pool_of(clusters, &loc, secrets)?.open(&loc.image)?.size()?)
}
