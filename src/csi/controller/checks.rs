//! What the controller checks in a request before it acts: capabilities, capacity ranges and
//! the filesystem type.

use std::collections::HashMap;

use crate::csi::proto::*;
use crate::csi::{Error, Result};
use crate::params;

/// Checks the volume capabilities we can honour: mount (ext4/xfs) or block, single node.
pub fn check_capabilities(caps: &[VolumeCapability]) -> Result<()> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument("volume_capabilities are required".into()));
    }
    for cap in caps {
        check_capability(cap)?;
    }
    Ok(())
}

pub fn check_capability(cap: &VolumeCapability) -> Result<()> {
    use volume_capability::access_mode::Mode;
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode)
        .ok_or_else(|| Error::InvalidArgument("access_mode is required".into()))?;
    match Mode::try_from(mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => {}
        Ok(m) => {
            return Err(Error::InvalidArgument(format!(
                "access mode {m:?} is not supported: volumes are local to one node"
            )));
        }
        Err(_) => return Err(Error::InvalidArgument(format!("unknown access mode {mode}"))),
    }
    match &cap.access_type {
        Some(volume_capability::AccessType::Block(_)) => Ok(()),
        Some(volume_capability::AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() {
                params::check_fs_type(&m.fs_type)?;
            }
            Ok(())
        }
        None => Err(Error::InvalidArgument("access_type (mount or block) is required".into())),
    }
}

/// The size to provision for a capacity range: at least 1 MiB, rounded up to MiB.
pub fn capacity_for(range: Option<&CapacityRange>) -> Result<u64> {
    range.map_or(Ok(params::DEFAULT_CAPACITY), |r| params::capacity(r.required_bytes, r.limit_bytes))
}

/// The filesystem of a new volume: the capabilities' `fs_type`, else the StorageClass's.
pub(super) fn fs_type_of(caps: &[VolumeCapability], parameters: &HashMap<String, String>) -> Result<Option<String>> {
    let from_cap = caps.iter().find_map(|c| match &c.access_type {
        Some(volume_capability::AccessType::Mount(m)) if !m.fs_type.is_empty() => Some(m.fs_type.clone()),
        _ => None,
    });
    let fs = from_cap.or_else(|| parameters.get(params::FS_TYPE).cloned());
    if let Some(fs) = &fs {
        params::check_fs_type(fs)?;
    }
    Ok(fs)
}
