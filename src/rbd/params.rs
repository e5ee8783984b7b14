//! An RBD StorageClass's parameters (and the volume context that carries them to a node):
//! a cluster and a pool, plus what node-local volumes take, minus what does not apply.

use std::collections::{BTreeMap, HashMap};

use super::ids::{ImageLocation, check_cluster_id};
use super::{BACKEND_RBD, PARAM_CLUSTER_ID, PARAM_POOL};
use crate::params::{CACHE, THICK, check_local};
use crate::status::{Error, Result};
use crate::volume::PARAM_BACKEND;

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
    for k in [CACHE, THICK] {
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
    let (_, mut kept) = check_local(&rest)?;
    kept.insert(PARAM_BACKEND.into(), BACKEND_RBD.into());
    kept.insert(PARAM_CLUSTER_ID.into(), cluster_id.clone());
    kept.insert(PARAM_POOL.into(), pool.clone());
    Ok(RbdParameters { cluster_id, pool, kept })
}

/// The parameters of an existing volume at `loc`, from what a call brings (a volume context,
/// ValidateVolumeCapabilities's parameters): the ID names the cluster and the pool, so they may
/// be left out; given, they must be the volume's. Keys kubelet and the CSI sidecars add
/// (`csi.storage.k8s.io/...`, `storage.kubernetes.io/csiProvisionerIdentity`) are ignored.
pub fn for_volume(given: &HashMap<String, String>, loc: &ImageLocation) -> Result<RbdParameters> {
    let mut params = crate::params::own(given);
    if params.get(PARAM_BACKEND).is_some_and(|b| b != BACKEND_RBD) {
        return Err(Error::InvalidArgument(format!(
            "volume {} is an RBD volume, not {PARAM_BACKEND}={}",
            loc.volume_id(),
            params[PARAM_BACKEND]
        )));
    }
    params.insert(PARAM_BACKEND.into(), BACKEND_RBD.into());
    params.entry(PARAM_CLUSTER_ID.into()).or_insert_with(|| loc.cluster_id.clone());
    params.entry(PARAM_POOL.into()).or_insert_with(|| loc.pool_id.to_string());
    let parsed = parameters(&params)?;
    if parsed.cluster_id != loc.cluster_id {
        return Err(Error::InvalidArgument(format!(
            "volume {} lives in Ceph cluster {}, not {}",
            loc.volume_id(),
            loc.cluster_id,
            parsed.cluster_id
        )));
    }
    Ok(parsed)
}
