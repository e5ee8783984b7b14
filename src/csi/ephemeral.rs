//! CSI ephemeral inline volumes: a volume declared in a pod spec (`csi:` with
//! `volumeAttributes`) lives as long as that pod. kubelet calls NodePublishVolume with
//! `csi.storage.k8s.io/ephemeral: "true"` and no staging path; we create a sparse image of the
//! requested `size`, stage it as any volume (its device served, formatted, mounted under the
//! state dir) and bind it to the target. The pod's NodeUnpublishVolume unstages it and deletes
//! the image. Between the two it is recorded like a staged volume, so a plugin restart serves
//! it again.

use std::collections::HashMap;
use std::fs;

use super::controller::{capacity_for, check_parameters, fs_type_of};
use super::node::{publish as publish_staged, stage, unstage};
use super::proto::{CapacityRange, NodePublishVolumeRequest, VolumeCapability, volume_capability};
use super::{Error, Plugin, Result};
use crate::units::parse_size;
use crate::volume::{VolumeMeta, VolumeSpec};

/// The volume-context key kubelet sets on an ephemeral volume's publish.
pub const CONTEXT_EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
/// The volume attribute that sizes an ephemeral volume (bytes or a K, M, G, T / Ki, Mi, Gi,
/// Ti suffix); CreateVolume's default capacity without it.
pub const ATTR_SIZE: &str = "size";
/// Prefix of the keys kubelet adds to the volume context (pod name, namespace, ...).
const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";

/// Whether a publish is for an ephemeral inline volume.
pub fn requested(context: &HashMap<String, String>) -> bool {
    context.get(CONTEXT_EPHEMERAL).is_some_and(|v| v == "true")
}

/// What the pod's attributes ask for: the same parameters a StorageClass takes, plus `size`.
fn spec_of(req: &NodePublishVolumeRequest, cap: &VolumeCapability) -> Result<VolumeSpec> {
    if !matches!(cap.access_type, Some(volume_capability::AccessType::Mount(_))) {
        return Err(Error::InvalidArgument(
            "an ephemeral inline volume is a filesystem: raw block access needs a PersistentVolumeClaim".into(),
        ));
    }
    // Sized like CreateVolume sizes a claim (whole MiB; the default without a size).
    let range = match req.volume_context.get(ATTR_SIZE) {
        None => None,
        Some(size) => Some(CapacityRange {
            required_bytes: parse_size(size).ok().filter(|s| *s > 0).and_then(|s| i64::try_from(s).ok()).ok_or_else(
                || Error::InvalidArgument(format!("volume attribute {ATTR_SIZE}={size:?} is not a size")),
            )?,
            limit_bytes: 0,
        }),
    };
    let capacity = capacity_for(range.as_ref())?;
    let params: HashMap<String, String> = req
        .volume_context
        .iter()
        .filter(|(k, _)| k.as_str() != ATTR_SIZE && !k.starts_with(KUBELET_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (queues, parameters) = check_parameters(&params)?;
    let fs_type = fs_type_of(std::slice::from_ref(cap), &params)?;
    Ok(VolumeSpec {
        id: req.volume_id.clone(),
        capacity_bytes: capacity,
        queues,
        fs_type,
        parameters,
        source: None,
        ephemeral: true,
    })
}

/// Creates, stages and publishes an ephemeral volume; idempotent. On failure nothing of a
/// volume this call created is left.
pub fn publish(plugin: &Plugin, req: &NodePublishVolumeRequest, cap: &VolumeCapability) -> Result<()> {
    let spec = spec_of(req, cap)?;
    let id = spec.id.clone();
    if let Some(existing) = plugin.store.volume(&id)? {
        if !existing.spec.ephemeral {
            return Err(Error::AlreadyExists(format!("volume {id} exists and is not ephemeral")));
        }
    }
    let (_, created) = plugin.store.create_volume(&spec)?;
    let staging = plugin.store.ephemeral_staging_path(&id)?;
    let published = fs::create_dir_all(&staging)
        .map_err(|source| Error::from(crate::host::Error::Io { op: "create", path: staging.clone(), source }))
        .and_then(|()| stage(plugin, &id, &staging, cap))
        .and_then(|()| {
            let staged =
                NodePublishVolumeRequest { staging_target_path: staging.to_string_lossy().into_owned(), ..req.clone() };
            publish_staged(plugin, &staged, cap)
        });
    if let Err(e) = published {
        if created {
            let cleanup =
                plugin.store.existing_volume(&id).map_err(Error::from).and_then(|m| remove_if_unused(plugin, &m));
            if let Err(cleanup) = cleanup {
                tracing::error!(volume = %id, error = %cleanup, "cannot remove the ephemeral volume after a failed publish");
            }
        }
        return Err(e);
    }
    tracing::info!(volume = %id, capacity = spec.capacity_bytes, "ephemeral volume published");
    Ok(())
}

/// Unstages and deletes an ephemeral volume that no pod uses any more; nothing for any other.
pub fn remove_if_unused(plugin: &Plugin, meta: &VolumeMeta) -> Result<()> {
    if !meta.spec.ephemeral || !meta.published.is_empty() {
        return Ok(());
    }
    let id = &meta.spec.id;
    let staging = plugin.store.ephemeral_staging_path(id)?;
    unstage(plugin, id, &staging)?;
    match fs::remove_dir(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(crate::host::Error::Io { op: "remove", path: staging, source }.into()),
    }
    plugin.store.delete_volume(id)?;
    tracing::info!(volume = %id, "ephemeral volume deleted");
    Ok(())
}
