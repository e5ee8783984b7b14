//! The controller's side of RBD volumes: images created (or cloned from a snapshot or a
//! volume, and flattened before CreateVolume returns: a volume then owes nothing to its
//! source), snapshots, deletes and resizes. Each call is idempotent: names derive from the
//! CSI names, and the CSI name is kept in the image's metadata and checked.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::clusters::{Clusters, Purpose, identity};
use super::guard::{snapshot_of_snap, volume_of_image};
use super::ids::{ImageLocation, SnapshotLocation, image_name, is_name_hash, location, name_hash, snapshot_name};
use super::params::RbdParameters;
use super::{NAME_KEY, READY_KEY};
use crate::backend::ceph::{self, Pool};
use crate::node::guard::{VolumeGuard, VolumeGuards};
use crate::status::{Error, Result};

/// Prefix of a clone's temporary snapshot of its source volume ([`clone_volume`]).
const CLONE_SNAPSHOT_PREFIX: &str = "csi-clone-";
/// Pool metadata: the CSI snapshot a snapshot name was taken for, and of which image
/// ([`SnapshotRecord`]). Snapshot names derive from CSI names alone, so without it the same
/// CSI name on two volumes would make two snapshots.
const SNAPSHOT_KEY_PREFIX: &str = "vduse-csi.snapshot.";

/// What the pool records of each CSI snapshot.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotRecord {
    name: String,
    image: String,
}

/// Waits for the guard of a snapshot shared by clones: its protection is changed by one of
/// them at a time (and never while DeleteSnapshot runs).
fn snapshot_guard(guards: &VolumeGuards, timeout: std::time::Duration, snap: &str) -> Result<VolumeGuard> {
    Ok(guards.acquire_within(&snapshot_of_snap(snap), timeout)?)
}

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
    guards: &VolumeGuards,
    name: &str,
    capacity: u64,
    params: &RbdParameters,
    source: Option<Source>,
    secrets: &HashMap<String, String>,
) -> Result<Created> {
    clusters.check_listed(&params.cluster_id)?;
    let (user, key) = identity(secrets);
    let cluster = clusters.client(&params.cluster_id, user, key, Purpose::Control)?;
    let pool = Arc::new(cluster.pool(&params.pool).map_err(|e| clusters.forget_if_lost(&cluster, e))?);
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
        Some(Source::Snapshot(snap)) => {
            let _snapshot = snapshot_guard(guards, clusters.timeout(), &snap.snap)?;
            clone_snapshot(&pool, snap, &image)
        }
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
        Some(Source::Snapshot(snap)) => {
            let _snapshot = snapshot_guard(guards, clusters.timeout(), &snap.snap)?;
            release_source_snapshot(&pool, snap);
        }
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
    format!("{CLONE_SNAPSHOT_PREFIX}{}", name_hash(name))
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
pub fn delete_volume(
    clusters: &Clusters,
    guards: &VolumeGuards,
    id: &str,
    secrets: &HashMap<String, String>,
) -> Result<()> {
    let loc = location(id)?;
    let pool = match clusters.pool_of(&loc, secrets) {
        Err(Error::NotFound(_)) => return Ok(()),
        other => other?,
    };
    let img = match pool.open(&loc.image) {
        Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(()),
        other => other?,
    };
    let mut snaps: Vec<String> = img.snapshots()?.into_iter().map(|s| s.name).collect();
    drop(img);
    // A clone's temporary snapshot is left behind when that clone was abandoned (its
    // CreateVolume interrupted and never retried): it is not a user's snapshot, and must not
    // keep this volume for ever.
    for snap in snaps.iter().filter(|s| s.starts_with(CLONE_SNAPSHOT_PREFIX)) {
        remove_abandoned_clone(&pool, guards, &loc.image, snap)?;
    }
    snaps.retain(|s| !s.starts_with(CLONE_SNAPSHOT_PREFIX));
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

/// Removes `source`'s temporary clone snapshot `snap` and the clone it was taken for, if that
/// clone was never finished: a clone still being made holds its guard (FAILED_PRECONDITION:
/// retry), and a finished one (flattened) owes the snapshot nothing and is kept.
fn remove_abandoned_clone(pool: &Arc<Pool>, guards: &VolumeGuards, source: &str, snap: &str) -> Result<()> {
    // The clone's image has the snapshot's hash: csi-clone-<hash> was taken for csi-vol-<hash>.
    let Some(hash) = snap.strip_prefix(CLONE_SNAPSHOT_PREFIX).filter(|h| is_name_hash(h)) else {
        return Err(Error::FailedPrecondition(format!(
            "image {source} has a snapshot {snap} that vduse-csi did not take; remove it first"
        )));
    };
    let child = format!("csi-vol-{hash}");
    let _clone = guards.acquire(&volume_of_image(&child)).map_err(|_| {
        Error::FailedPrecondition(format!("a clone of image {source} ({child}) is being made; retry when it is done"))
    })?;
    match pool.open(&child) {
        Err(e) if e.errno() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e.into()),
        Ok(img) => {
            // Only the clone of exactly this snapshot, still reading from it, is removed.
            let unfinished = img.parent()?.is_some_and(|(pool_id, image, parent_snap)| {
                pool_id == pool.id() && image == source && parent_snap == snap
            });
            drop(img);
            if unfinished {
                tracing::warn!(image = child, source, "removing a clone whose CreateVolume was abandoned");
                match pool.remove_image(&child) {
                    Err(e) if e.errno() != Some(libc::ENOENT) => return Err(e.into()),
                    _ => {}
                }
            }
        }
    }
    let img = pool.open(source)?;
    img.unprotect_snapshot(snap)?;
    match img.remove_snapshot(snap) {
        Err(e) if e.errno() != Some(libc::ENOENT) => Err(e.into()),
        _ => Ok(()),
    }
}

/// CreateSnapshot for RBD: an RBD snapshot of the volume's image, crash-consistent (librbd
/// has the node serving the image take it). The pool records which image each CSI snapshot
/// name was taken of: the same name for another volume is ALREADY_EXISTS.
pub fn create_snapshot(
    clusters: &Clusters,
    source_id: &str,
    name: &str,
    secrets: &HashMap<String, String>,
) -> Result<SnapshotInfo> {
    let loc = location(source_id)?;
    let pool = clusters.pool_of(&loc, secrets)?;
    let snap = snapshot_name(name);
    let key = format!("{SNAPSHOT_KEY_PREFIX}{snap}");
    let ours = SnapshotRecord { name: name.to_owned(), image: loc.image.clone() };
    if let Some(text) = pool.metadata(&key)? {
        let record: Option<SnapshotRecord> = serde_json::from_str(&text).ok();
        if let Some(other) = record.filter(|r| r.name != ours.name || r.image != ours.image) {
            if snapshot_exists(&pool, &other.image, &snap)? {
                let other_id = ImageLocation { image: other.image, ..loc.clone() }.volume_id();
                return Err(Error::AlreadyExists(format!(
                    "snapshot {:?} exists already, of volume {other_id}, not of {source_id}",
                    other.name
                )));
            }
        }
    }
    let record = serde_json::to_string(&ours).map_err(|e| Error::Internal(e.to_string()))?;
    pool.set_metadata(&key, &record)?;
    let img = pool.open(&loc.image)?;
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

/// Whether `image` in `pool` has snapshot `snap` (a missing image has none).
fn snapshot_exists(pool: &Arc<Pool>, image: &str, snap: &str) -> Result<bool> {
    match pool.open(image) {
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
        Ok(img) => Ok(img.snapshots()?.iter().any(|s| s.name == snap)),
    }
}

/// DeleteSnapshot for RBD; a missing snapshot or image is success.
pub fn delete_snapshot(clusters: &Clusters, id: &str, secrets: &HashMap<String, String>) -> Result<()> {
    let Some(loc) = SnapshotLocation::parse(id) else {
        return Err(Error::InvalidArgument(format!("{id:?} is not an RBD snapshot ID")));
    };
    let pool = match clusters.pool_of(&loc.volume, secrets) {
        Err(Error::NotFound(_)) => return Ok(()),
        other => other?,
    };
    let img = match pool.open(&loc.volume.image) {
        Err(e) if e.errno() == Some(libc::ENOENT) => return forget_snapshot(&pool, &loc),
        other => other?,
    };
    if img.snapshots()?.iter().any(|s| s.name == loc.snap) {
        if let Err(e) = img.unprotect_snapshot(&loc.snap) {
            return Err(match e.errno() {
                Some(libc::EBUSY) => Error::FailedPrecondition(format!(
                    "snapshot {id} is being cloned into a new volume; retry when it is done"
                )),
                _ => e.into(),
            });
        }
        match img.remove_snapshot(&loc.snap) {
            Err(e) if e.errno() != Some(libc::ENOENT) => return Err(e.into()),
            _ => {}
        }
    }
    forget_snapshot(&pool, &loc)
}

/// Removes the pool's record of a deleted snapshot, if it is this one's.
fn forget_snapshot(pool: &Arc<Pool>, loc: &SnapshotLocation) -> Result<()> {
    let key = format!("{SNAPSHOT_KEY_PREFIX}{}", loc.snap);
    let record: Option<SnapshotRecord> = pool.metadata(&key)?.and_then(|t| serde_json::from_str(&t).ok());
    if record.is_some_and(|r| r.image == loc.volume.image) {
        pool.remove_metadata(&key)?;
    }
    Ok(())
}

/// ControllerExpandVolume for RBD: resizes the image (librbd has the node serving it do it).
pub fn expand_volume(clusters: &Clusters, id: &str, capacity: u64, secrets: &HashMap<String, String>) -> Result<u64> {
    let loc = location(id)?;
    let img = clusters.pool_of(&loc, secrets)?.open(&loc.image)?;
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
    Ok(clusters.pool_of(&loc, secrets)?.open(&loc.image)?.size()?)
}
