//! An RBD StorageClass's parameters (and the volume context that carries them to a node):
//! a cluster and a pool, plus what node-local volumes take, minus what does not apply.

use std::collections::{BTreeMap, HashMap};

use super::ids::check_cluster_id;
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
