//! A node's side of RBD volumes: the record it keeps to stage a volume (and to serve it again
//! after a restart), and opening the image for a device server with its exclusive lock,
//! breaking only this node's dead predecessor's, and fencing when another node took over.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::clusters::{Clusters, Purpose, identity};
use super::ids::{ImageLocation, location};
use super::params::for_volume;
use super::{HOLDER_KEY, NODE_RECORD};
use crate::backend::ceph;
use crate::backend::rbd::RbdBackend;
use crate::status::{Error, Result};
use crate::volume::{VolumeMeta, VolumeSpec, VolumeStore};

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
    store: &VolumeStore,
    id: &str,
    context: &HashMap<String, String>,
    secrets: &HashMap<String, String>,
) -> Result<VolumeMeta> {
    let loc = location(id)?;
    if let Some(meta) = store.volume(id)? {
        // A new key (rotated) replaces the kept one; the lock owner stays.
        let (user, key) = identity(secrets);
        let mut record: NodeRecord = store.read_private(id, NODE_RECORD)?.unwrap_or(NodeRecord {
            user: user.clone(),
            key: None,
            lock_owner: None,
        });
        if !secrets.is_empty() && (record.user != user || record.key != key) {
            record.user = user;
            record.key = key;
            store.write_private(id, NODE_RECORD, &record)?;
        }
        return Ok(meta);
    }
    // The volume context is what CreateVolume kept, plus the keys kubelet and the
    // provisioner add (ignored, never refused); checked like parameters.
    let parsed = for_volume(context, &loc)?;
    let queues = parsed
        .kept
        .get(crate::params::QUEUES)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(crate::server::default_queues);
    let spec = VolumeSpec {
        id: id.to_owned(),
        capacity_bytes: 0,
        queues,
        fs_type: parsed.kept.get(crate::params::FS_TYPE).cloned(),
        parameters: parsed.kept,
        source: None,
        ephemeral: false,
    };
    let meta = VolumeMeta { spec, created_unix: 0, staged: None, published: BTreeMap::new() };
    store.record_volume(&meta)?;
    let (user, key) = identity(secrets);
    store.write_private(id, NODE_RECORD, &NodeRecord { user, key, lock_owner: None })?;
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
///
/// The image is opened with the datapath's connection, whose calls wait for ever (a device's
/// I/O must not fail on a slow pool), so the open runs on a thread of its own and this call
/// waits for it no longer than `--ceph-timeout`: a sick pool makes it UNAVAILABLE, never hangs
/// the caller (a stage, the heal loop, recovery).
pub fn open_backend(store: &VolumeStore, clusters: &Clusters, node_id: &str, meta: &VolumeMeta) -> Result<Opened> {
    let id = &meta.spec.id;
    let loc = location(id)?;
    let mut record: NodeRecord = store.read_private(id, NODE_RECORD)?.ok_or_else(|| {
        Error::FailedPrecondition(format!("volume {id}: this node's record of the RBD image is missing"))
    })?;
    let opened = {
        let (clusters_, node, record) = (clusters.clone(), node_id.to_owned(), record.clone());
        let what = format!("opening image {} of volume {id}", loc.image);
        clusters.bounded(&what, move || open_image(&clusters_, &loc, &node, &record))?
    };
    if let Opened::Served(backend) = &opened {
        if record.lock_owner.as_deref() != Some(backend.lock_owner()) {
            record.lock_owner = Some(backend.lock_owner().to_owned());
            store.write_private(id, NODE_RECORD, &record)?;
        }
    }
    Ok(opened)
}

/// The Ceph side of [`open_backend`].
fn open_image(clusters: &Clusters, loc: &ImageLocation, node_id: &str, record: &NodeRecord) -> Result<Opened> {
    let cluster = clusters.client(&loc.cluster_id, record.user.clone(), record.key.clone(), Purpose::Data)?;
    let lost = |e| clusters.forget_if_lost(&cluster, e);
    let pool = Arc::new(cluster.pool_by_id(loc.pool_id).map_err(lost)?);
    let served_before = record.lock_owner.is_some();
    if served_before {
        let holder = pool.open(&loc.image).and_then(|img| img.metadata(HOLDER_KEY)).map_err(lost)?;
        if let Some(other) = holder.filter(|h| *h != node_id) {
            return Ok(Opened::Fenced(format!("node {other} took image {} over since this node served it", loc.image)));
        }
    }
    let backend = match RbdBackend::open(&pool, &loc.image, record.lock_owner.as_deref()) {
        Err(ceph::Error::Locked { owners, .. }) if served_before => {
            return Ok(Opened::Fenced(format!("client {owners} of another node holds image {}", loc.image)));
        }
        other => other.map_err(lost)?,
    };
    backend.image().set_metadata(HOLDER_KEY, node_id).map_err(lost)?;
    Ok(Opened::Served(backend))
}
