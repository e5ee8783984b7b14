//! RBD volumes in the CSI services: the volume lives in a Ceph pool as an RBD image, and any
//! node can stage it (one at a time: the node's device server holds the image's exclusive
//! lock).
//!
//! IDs carry the image's location, so every call finds it without state on a node:
//! `rbd.<clusterID>.<poolID>.<image>` for volumes and `<volume ID>.<snapshot>` for snapshots.
//! The pool is named by its ID, which never changes (a name can). Image and snapshot names
//! are derived from the CSI names (`csi-vol-<hash>`, `csi-snap-<hash>`), so a retried create
//! finds what the first attempt made; the CSI name is kept in the image's metadata
//! ([`NAME_KEY`]) and checked, so two names that hash alike can never share an image.
//!
//! Clones (from a snapshot or a volume) are flattened before CreateVolume returns: a volume
//! then owes nothing to its source, and snapshots and volumes can be deleted in any order.
//!
//! Monitors come from the `--ceph-clusters` file (ceph-csi's `config.json` shape), keyed by
//! the StorageClass's `clusterID`; the cephx user and key from the call's secrets (`userID`,
//! `userKey`). Keys are never logged. A node keeps the key of a staged volume in a root-only
//! file beside its record, to serve the volume again after a restart without kubelet.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::controller::check_parameters;
use super::proto::*;
use super::{Error, PARAM_CACHE, Plugin, Result};
use crate::backend::rbd::{self as ceph, Cluster, ClusterConfig, Pool, RbdBackend};
use crate::volume::{BACKEND_FILE, PARAM_BACKEND, PARAM_THICK, VolumeMeta, VolumeSpec};

/// The CSI driver name of RBD volumes (see `serve --rbd-driver-name`).
pub const RBD_DRIVER_NAME: &str = "rbd.vduse.csi.dev";
/// `backend` value of RBD volumes.
pub const BACKEND_RBD: &str = "rbd";
/// StorageClass parameter: the cluster, a key of the `--ceph-clusters` file.
pub const PARAM_CLUSTER_ID: &str = "clusterID";
/// StorageClass parameter: the pool of the volume's image.
pub const PARAM_POOL: &str = "pool";
/// Secret keys (ceph-csi's names): the cephx user without `client.`, and its key.
pub const SECRET_USER: &str = "userID";
pub const SECRET_KEY: &str = "userKey";
/// Image metadata: the CSI name the image was created for.
pub const NAME_KEY: &str = "vduse-csi.name";
/// Image metadata: the CSI name again, set once the image is complete (cloned data flattened,
/// resized). A clone inherits its parent's metadata, so both keys hold the parent's name
/// until the clone is made ours.
const READY_KEY: &str = "vduse-csi.ready";
/// Image metadata: the node that last took the image's lock to serve it. A node whose server
/// restarts finds another node's name there if the image was taken over meanwhile.
const HOLDER_KEY: &str = "vduse-csi.holder";
/// The node's private record beside a staged RBD volume's metadata.
const NODE_RECORD: &str = "rbd.json";
const ID_PREFIX: &str = "rbd";

/// The Ceph clusters this plugin may use: the `--ceph-clusters` file, read at each use, so
/// an edited ConfigMap takes effect without a restart and an absent one only fails RBD calls.
#[derive(Debug, Clone, Default)]
pub struct Clusters(Option<std::path::PathBuf>);

/// One entry of the `--ceph-clusters` file.
#[derive(Debug, Deserialize)]
struct ClusterEntry {
    #[serde(rename = "clusterID")]
    cluster_id: String,
    monitors: Vec<String>,
}

impl Clusters {
    /// The clusters listed in the file at `path`.
    pub fn from_file(path: &Path) -> Self {
        Self(Some(path.to_owned()))
    }

    /// Whether a clusters file was given.
    pub fn configured(&self) -> bool {
        self.0.is_some()
    }

    /// Reads a JSON list of `{"clusterID": "...", "monitors": ["host:port", ...]}`: clusterID to
    /// monitors (`mon_host` syntax).
    pub fn load(path: &Path) -> std::result::Result<BTreeMap<String, String>, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let entries: Vec<ClusterEntry> =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a list of clusters: {e}", path.display()))?;
        let mut map = BTreeMap::new();
        for e in entries {
            check_cluster_id(&e.cluster_id).map_err(|m| format!("{}: {m}", path.display()))?;
            if e.monitors.is_empty() {
                return Err(format!("{}: cluster {} has no monitors", path.display(), e.cluster_id));
            }
            map.insert(e.cluster_id, e.monitors.join(","));
        }
        Ok(map)
    }

    fn monitors(&self, cluster_id: &str) -> Result<String> {
        let Some(path) = &self.0 else {
            return Err(Error::FailedPrecondition(
                "this plugin serves no RBD volumes: start it with --ceph-clusters".into(),
            ));
        };
        let mut clusters = Self::load(path).map_err(Error::FailedPrecondition)?;
        clusters.remove(cluster_id).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "Ceph cluster {cluster_id:?} is not in {} (known: {})",
                path.display(),
                clusters.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

/// clusterIDs become part of volume IDs: letters, digits, `-` and `_` only.
fn check_cluster_id(id: &str) -> std::result::Result<(), String> {
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

/// Whether StorageClass parameters ask for an RBD volume.
pub fn requested(params: &HashMap<String, String>) -> bool {
    params.get(PARAM_BACKEND).is_some_and(|b| b == BACKEND_RBD)
}

/// The location of an RBD volume ID, or INVALID_ARGUMENT.
pub fn location(id: &str) -> Result<ImageLocation> {
    ImageLocation::parse(id).ok_or_else(|| Error::InvalidArgument(format!("{id:?} is not an RBD volume ID")))
}

/// The hash that names a CSI name's image or snapshot.
fn name_hash(name: &str) -> String {
    format!("{:016x}", super::stable_hash(name))
}

/// The image name of the volume called `name`.
pub fn image_name(name: &str) -> String {
    format!("csi-vol-{}", name_hash(name))
}

/// The snapshot name of the snapshot called `name`.
pub fn snapshot_name(name: &str) -> String {
    format!("csi-snap-{}", name_hash(name))
}

/// The cephx identity of a call's secrets: `userID` (default `admin`) and `userKey` (none: a
/// cluster without cephx).
fn identity(secrets: &HashMap<String, String>) -> (String, Option<String>) {
    let user = secrets.get(SECRET_USER).filter(|u| !u.is_empty()).cloned().unwrap_or_else(|| "admin".into());
    (user, secrets.get(SECRET_KEY).filter(|k| !k.is_empty()).cloned())
}

/// Connects to `cluster_id` as the secrets' user.
fn connect(plugin: &Plugin, cluster_id: &str, user: String, key: Option<String>) -> Result<Arc<Cluster>> {
    let monitors = plugin.ceph.monitors(cluster_id)?;
    Ok(Cluster::connect(&ClusterConfig { monitors, user, key })?)
}

fn pool_of(plugin: &Plugin, loc: &ImageLocation, secrets: &HashMap<String, String>) -> Result<Arc<Pool>> {
    let (user, key) = identity(secrets);
    let cluster = connect(plugin, &loc.cluster_id, user, key)?;
    Ok(Arc::new(cluster.pool_by_id(loc.pool_id)?))
}

/// librbd's errors as CSI sees them.
impl From<ceph::Error> for Error {
    fn from(e: ceph::Error) -> Self {
        if let ceph::Error::Locked { .. } = e {
            return Error::FailedPrecondition(e.to_string());
        }
        if let ceph::Error::Connect { .. } = e {
            return Error::Unavailable(e.to_string());
        }
        match e.errno() {
            Some(libc::ENOENT) => Error::NotFound(e.to_string()),
            Some(libc::EEXIST) => Error::AlreadyExists(e.to_string()),
            Some(libc::EBUSY | libc::ENOTEMPTY | libc::EROFS) => Error::FailedPrecondition(e.to_string()),
            Some(libc::ENOSPC | libc::EDQUOT) => Error::ResourceExhausted(e.to_string()),
            Some(libc::ETIMEDOUT | libc::ENOTCONN | libc::ECONNREFUSED | libc::ESHUTDOWN) => {
                Error::Unavailable(e.to_string())
            }
            Some(libc::EPERM | libc::EACCES) => Error::FailedPrecondition(format!("{e} (check the cephx user's caps)")),
            _ => Error::Internal(e.to_string()),
        }
    }
}

/// What an RBD StorageClass asks for.
#[derive(Debug)]
pub struct RbdParameters {
    pub cluster_id: String,
    pub pool: String,
    /// Parameters the node needs (filesystem, queues, QoS), returned as the volume context.
    pub kept: BTreeMap<String, String>,
}

/// Validates an RBD StorageClass's parameters.
pub fn parameters(params: &HashMap<String, String>) -> Result<RbdParameters> {
    let get = |k: &str| {
        params
            .get(k)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("parameter {k} is required with {PARAM_BACKEND}: rbd")))
    };
    let (cluster_id, pool) = (get(PARAM_CLUSTER_ID)?, get(PARAM_POOL)?);
    check_cluster_id(&cluster_id).map_err(Error::InvalidArgument)?;
    for k in [PARAM_CACHE, PARAM_THICK] {
        if params.contains_key(k) {
            return Err(Error::InvalidArgument(format!(
                "parameter {k} does not apply to RBD volumes (librbd's cache is off; images are thin)"
            )));
        }
    }
    let rest: HashMap<String, String> = params
        .iter()
        .filter(|(k, _)| ![PARAM_BACKEND, PARAM_CLUSTER_ID, PARAM_POOL].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (_, mut kept) = check_parameters(&rest)?;
    kept.insert(PARAM_BACKEND.into(), BACKEND_RBD.into());
    kept.insert(PARAM_CLUSTER_ID.into(), cluster_id.clone());
    kept.insert(PARAM_POOL.into(), pool.clone());
    Ok(RbdParameters { cluster_id, pool, kept })
}

/// Where a new volume's data comes from.
pub enum Source {
    Snapshot(SnapshotLocation),
    Volume(ImageLocation),
}

/// Parses a content source for an RBD volume: only RBD snapshots and volumes of the same
/// cluster qualify.
pub fn source(src: Option<volume_content_source::Type>, cluster_id: &str) -> Result<Option<Source>> {
    let src = match src {
        None => return Ok(None),
        Some(volume_content_source::Type::Snapshot(s)) => {
            Source::Snapshot(SnapshotLocation::parse(&s.snapshot_id).ok_or_else(|| {
                Error::NotFound(format!("snapshot {:?} is not an RBD snapshot of this driver", s.snapshot_id))
            })?)
        }
        Some(volume_content_source::Type::Volume(v)) => {
            Source::Volume(ImageLocation::parse(&v.volume_id).ok_or_else(|| {
                Error::NotFound(format!("volume {:?} is not an RBD volume of this driver", v.volume_id))
            })?)
        }
    };
    let src_cluster = match &src {
        Source::Snapshot(s) => &s.volume.cluster_id,
        Source::Volume(v) => &v.cluster_id,
    };
    if src_cluster != cluster_id {
        return Err(Error::InvalidArgument(format!(
            "the source lives in Ceph cluster {src_cluster}, the new volume in {cluster_id}: clones stay in one cluster"
        )));
    }
    Ok(Some(src))
}

/// A created (or found) RBD volume.
pub struct Created {
    pub id: String,
    pub capacity: u64,
}

/// CreateVolume for RBD: creates (or finds, for a retry) the image of `name`, cloning and
/// flattening its source first if it has one.
pub fn create_volume(
    plugin: &Plugin,
    name: &str,
    capacity: u64,
    params: &RbdParameters,
    source: Option<Source>,
    secrets: &HashMap<String, String>,
) -> Result<Created> {
    let (user, key) = identity(secrets);
    let cluster = connect(plugin, &params.cluster_id, user, key)?;
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
pub fn delete_volume(plugin: &Plugin, id: &str, secrets: &HashMap<String, String>) -> Result<()> {
    let loc = location(id)?;
    let pool = match pool_of(plugin, &loc, secrets) {
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
    plugin: &Plugin,
    source_id: &str,
    name: &str,
    secrets: &HashMap<String, String>,
) -> Result<Snapshot> {
    let loc = location(source_id)?;
    let pool = pool_of(plugin, &loc, secrets)?;
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
    Ok(Snapshot {
        size_bytes: info.size as i64,
        snapshot_id: id,
        source_volume_id: source_id.to_owned(),
        creation_time: Some(prost_types::Timestamp { seconds: info.created.0, nanos: info.created.1 }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    })
}

/// DeleteSnapshot for RBD; a missing snapshot or image is success.
pub fn delete_snapshot(plugin: &Plugin, id: &str, secrets: &HashMap<String, String>) -> Result<()> {
    let Some(loc) = SnapshotLocation::parse(id) else {
        return Err(Error::InvalidArgument(format!("{id:?} is not an RBD snapshot ID")));
    };
    let pool = match pool_of(plugin, &loc.volume, secrets) {
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
pub fn expand_volume(plugin: &Plugin, id: &str, capacity: u64, secrets: &HashMap<String, String>) -> Result<u64> {
    let loc = location(id)?;
    let img = pool_of(plugin, &loc, secrets)?.open(&loc.image)?;
    if img.size()? < capacity {
        img.resize(capacity)?;
    }
    let size = img.size()?;
    tracing::info!(volume = id, size, "RBD image resized");
    Ok(size)
}

/// Whether the volume's image exists (ValidateVolumeCapabilities); NotFound if not.
pub fn check_exists(plugin: &Plugin, id: &str, secrets: &HashMap<String, String>) -> Result<u64> {
    let loc = location(id)?;
    Ok(pool_of(plugin, &loc, secrets)?.open(&loc.image)?.size()?)
}

/// What a node keeps about an RBD volume it stages, root-only: how to reach the image again
/// after a restart, and which client held its lock last.
#[derive(Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub user: String,
    pub key: Option<String>,
    /// The lock owner (client address) of this node's last server of the volume: a successor
    /// breaks that lock, nobody else's.
    pub lock_owner: Option<String>,
}

impl std::fmt::Debug for NodeRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRecord")
            .field("user", &self.user)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("lock_owner", &self.lock_owner)
            .finish()
    }
}

/// Records an RBD volume that this node is about to stage (once: a record that exists is
/// kept, with its lock owner), and returns its metadata.
pub fn record_for_stage(
    plugin: &Plugin,
    id: &str,
    context: &HashMap<String, String>,
    secrets: &HashMap<String, String>,
) -> Result<VolumeMeta> {
    let loc = location(id)?;
    if let Some(meta) = plugin.store.volume(id)? {
        // A new key (rotated) replaces the kept one; the lock owner stays.
        let (user, key) = identity(secrets);
        let mut record: NodeRecord = plugin.store.read_private(id, NODE_RECORD)?.unwrap_or(NodeRecord {
            user: user.clone(),
            key: None,
            lock_owner: None,
        });
        if !secrets.is_empty() && (record.user != user || record.key != key) {
            record.user = user;
            record.key = key;
            plugin.store.write_private(id, NODE_RECORD, &record)?;
        }
        return Ok(meta);
    }
    // The volume context is what CreateVolume kept; check it like parameters.
    let mut params: HashMap<String, String> = context
        .iter()
        // kubelet may add its own keys (pod info); the filesystem type is one of ours.
        .filter(|(k, _)| !k.starts_with("csi.storage.k8s.io/") || k.as_str() == super::PARAM_FS_TYPE)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    params.insert(PARAM_BACKEND.into(), BACKEND_RBD.into());
    params.entry(PARAM_CLUSTER_ID.into()).or_insert_with(|| loc.cluster_id.clone());
    params.entry(PARAM_POOL.into()).or_insert_with(|| loc.pool_id.to_string());
    let parsed = parameters(&params)?;
    let queues =
        parsed.kept.get(super::PARAM_QUEUES).and_then(|q| q.parse().ok()).unwrap_or_else(crate::server::default_queues);
    let spec = VolumeSpec {
        id: id.to_owned(),
        capacity_bytes: 0,
        queues,
        fs_type: parsed.kept.get(super::PARAM_FS_TYPE).cloned(),
        parameters: parsed.kept,
        source: None,
        ephemeral: false,
    };
    let meta = VolumeMeta { spec, created_unix: 0, staged: None, published: BTreeMap::new() };
    plugin.store.record_volume(&meta)?;
    let (user, key) = identity(secrets);
    plugin.store.write_private(id, NODE_RECORD, &NodeRecord { user, key, lock_owner: None })?;
    Ok(meta)
}

/// How a staged volume's image opened for its device server.
pub enum Opened {
    Served(RbdBackend),
    /// Another node took the image over since this node served it: whatever this node still
    /// has queued for it must fail, not land (the reason says who).
    Fenced(String),
}

/// Opens a staged (or being staged) RBD volume's image for its device server, taking its
/// lock (from this node's dead previous server if need be), and records the new lock owner.
///
/// A volume this node served before (its record names a lock owner) is fenced rather than
/// served if another node holds the lock or took it since: the kernel here may still queue
/// writes from before the takeover, and replaying them would overwrite the other node's.
pub fn open_backend(plugin: &Plugin, meta: &VolumeMeta) -> Result<Opened> {
    let id = &meta.spec.id;
    let loc = location(id)?;
    let mut record: NodeRecord = plugin.store.read_private(id, NODE_RECORD)?.ok_or_else(|| {
        Error::FailedPrecondition(format!("volume {id}: this node's record of the RBD image is missing"))
    })?;
    let cluster = connect(plugin, &loc.cluster_id, record.user.clone(), record.key.clone())?;
    let pool = Arc::new(cluster.pool_by_id(loc.pool_id)?);
    let served_before = record.lock_owner.is_some();
    if served_before {
        let holder = pool.open(&loc.image)?.metadata(HOLDER_KEY)?;
        if let Some(other) = holder.filter(|h| *h != plugin.node_id) {
            return Ok(Opened::Fenced(format!("node {other} took image {} over since this node served it", loc.image)));
        }
    }
    let backend = match RbdBackend::open(&pool, &loc.image, record.lock_owner.as_deref()) {
        Err(ceph::Error::Locked { owners, .. }) if served_before => {
            return Ok(Opened::Fenced(format!("client {owners} of another node holds image {}", loc.image)));
        }
        other => other?,
    };
    backend.image().set_metadata(HOLDER_KEY, &plugin.node_id)?;
    if record.lock_owner.as_deref() != Some(backend.lock_owner()) {
        record.lock_owner = Some(backend.lock_owner().to_owned());
        plugin.store.write_private(id, NODE_RECORD, &record)?;
    }
    Ok(Opened::Served(backend))
}

/// Whether a volume record is an RBD volume's.
pub fn is_rbd(spec: &VolumeSpec) -> bool {
    spec.parameters.get(PARAM_BACKEND).is_some_and(|b| b == BACKEND_RBD)
}

/// Refuses `backend` values other than ours; `file` is the default.
pub fn check_backend(params: &HashMap<String, String>) -> Result<()> {
    match params.get(PARAM_BACKEND).map(String::as_str) {
        None | Some(BACKEND_FILE) | Some(BACKEND_RBD) => Ok(()),
        Some(other) => Err(Error::InvalidArgument(format!(
            "parameter {PARAM_BACKEND}={other:?}: use {BACKEND_FILE} or {BACKEND_RBD}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_hostile_ones_are_refused() {
        let loc = ImageLocation { cluster_id: "ceph-1".into(), pool_id: 7, image: image_name("pvc-1") };
        let id = loc.volume_id();
        assert!(crate::volume::validate_id("volume ID", &id).is_ok(), "{id}");
        assert_eq!(ImageLocation::parse(&id), Some(loc.clone()));
        let snap = SnapshotLocation { volume: loc, snap: snapshot_name("snap-1") };
        assert_eq!(SnapshotLocation::parse(&snap.snapshot_id()), Some(snap.clone()));
        assert_eq!(ImageLocation::parse(&snap.snapshot_id()), None, "a snapshot ID is no volume ID");
        for bad in
            ["rbd.c.1", "rbd.c.-1.csi-vol-0", "rbd.c.1.other", "rbd.c/../x.1.csi-vol-0", "rbd..1.csi-vol-0", "pvc-1"]
        {
            assert_eq!(ImageLocation::parse(bad), None, "{bad}");
        }
        assert_ne!(image_name("a"), image_name("b"));
        assert_eq!(image_name("pvc-1"), image_name("pvc-1"));
    }

    #[test]
    fn parameters_need_a_cluster_and_a_pool_and_refuse_file_only_options() {
        let p = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let ok = parameters(&p(&[("backend", "rbd"), ("clusterID", "c1"), ("pool", "rbd"), ("queues", "2")]))
            .expect("valid");
        assert_eq!(ok.kept.get("queues").map(String::as_str), Some("2"));
        assert_eq!(ok.kept.get("clusterID").map(String::as_str), Some("c1"));
        for bad in [
            p(&[("backend", "rbd"), ("pool", "rbd")]),
            p(&[("backend", "rbd"), ("clusterID", "c1")]),
            p(&[("backend", "rbd"), ("clusterID", "c/1"), ("pool", "rbd")]),
            p(&[("backend", "rbd"), ("clusterID", "c1"), ("pool", "rbd"), ("cache", "writeback")]),
            p(&[("backend", "rbd"), ("clusterID", "c1"), ("pool", "rbd"), ("thick", "true")]),
            p(&[("backend", "rbd"), ("clusterID", "c1"), ("pool", "rbd"), ("colour", "blue")]),
        ] {
            assert!(matches!(parameters(&bad), Err(Error::InvalidArgument(_))), "{bad:?}");
        }
        assert!(check_backend(&p(&[("backend", "nfs")])).is_err());
    }

    #[test]
    fn the_clusters_file_is_ceph_csi_shaped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clusters.json");
        std::fs::write(&path, r#"[{"clusterID": "c1", "monitors": ["127.0.0.1:6789", "127.0.0.2:6789"]}]"#)
            .expect("write");
        let clusters = Clusters::from_file(&path);
        assert_eq!(clusters.monitors("c1").ok().as_deref(), Some("127.0.0.1:6789,127.0.0.2:6789"));
        assert!(matches!(clusters.monitors("c2"), Err(Error::InvalidArgument(_))));
        std::fs::write(&path, r#"[{"clusterID": "../x", "monitors": ["a"]}]"#).expect("write");
        assert!(Clusters::load(&path).is_err());
        assert!(matches!(
            Clusters::from_file(&dir.path().join("absent")).monitors("c1"),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(Clusters::default().monitors("c1"), Err(Error::FailedPrecondition(_))));
    }

    #[test]
    fn records_never_print_keys() {
        let r = NodeRecord { user: "k8s".into(), key: Some("AQBsecret==".into()), lock_owner: None };
        assert!(!format!("{r:?}").contains("AQBsecret"));
    }
}
