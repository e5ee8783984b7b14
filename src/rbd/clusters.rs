//! The Ceph clusters RBD volumes may live in (`--ceph-clusters`), and connections to them
//! as the cephx user of a call's secrets.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::ids::{ImageLocation, check_cluster_id};
use super::{SECRET_KEY, SECRET_USER};
use crate::backend::ceph::{Cluster, ClusterConfig, Pool};
use crate::status::{Error, Result};

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

    pub(super) fn monitors(&self, cluster_id: &str) -> Result<String> {
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

/// The cephx identity of a call's secrets: `userID` (default `admin`) and `userKey` (none: a
/// cluster without cephx).
pub(super) fn identity(secrets: &HashMap<String, String>) -> (String, Option<String>) {
    let user = secrets.get(SECRET_USER).filter(|u| !u.is_empty()).cloned().unwrap_or_else(|| "admin".into());
    (user, secrets.get(SECRET_KEY).filter(|k| !k.is_empty()).cloned())
}

/// Connects to `cluster_id` as `user`.
pub fn connect(clusters: &Clusters, cluster_id: &str, user: String, key: Option<String>) -> Result<Arc<Cluster>> {
    let monitors = clusters.monitors(cluster_id)?;
    Ok(Cluster::connect(&ClusterConfig { monitors, user, key })?)
}

/// The pool of `loc`, reached as the secrets' user.
pub fn pool_of(clusters: &Clusters, loc: &ImageLocation, secrets: &HashMap<String, String>) -> Result<Arc<Pool>> {
    let (user, key) = identity(secrets);
    let cluster = connect(clusters, &loc.cluster_id, user, key)?;
    Ok(Arc::new(cluster.pool_by_id(loc.pool_id)?))
}
