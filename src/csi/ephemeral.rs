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
/// Default of `serve --ephemeral-max-size`.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 30;

/// Whether a publish is for an ephemeral inline volume.
pub fn requested(context: &HashMap<String, String>) -> bool {
    context.get(CONTEXT_EPHEMERAL).is_some_and(|v| v == "true")
}

/// What the pod's attributes ask for. A pod author writes them, not the admin, and
/// ResourceQuota does not count inline volumes: so `size` (at most `max_bytes`) is the only
/// attribute, the filesystem type comes from the pod's `fsType`, and everything a
/// StorageClass could set (queues, thickness, cache, QoS) is the node's default. Keys kubelet
/// adds (`csi.storage.k8s.io/...`) are its own and ignored.
fn spec_of(req: &NodePublishVolumeRequest, cap: &VolumeCapability, max_bytes: u64) -> Result<VolumeSpec> {
    if !matches!(cap.access_type, Some(volume_capability::AccessType::Mount(_))) {
        return Err(Error::InvalidArgument(
            "an ephemeral inline volume is a filesystem: raw block access needs a PersistentVolumeClaim".into(),
        ));
    }
    if let Some(key) = req.volume_context.keys().find(|k| k.as_str() != ATTR_SIZE && !k.starts_with(KUBELET_PREFIX)) {
        return Err(Error::InvalidArgument(format!(
            "volume attribute {key:?} is not allowed on an ephemeral inline volume: only {ATTR_SIZE:?} is (use a PersistentVolumeClaim and a StorageClass for more)"
        )));
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
    if capacity > max_bytes {
        return Err(Error::OutOfRange(format!(
            "an ephemeral inline volume may have at most {max_bytes} bytes on this node (serve --ephemeral-max-size), not {capacity}"
        )));
    }
    let (queues, parameters) = check_parameters(&HashMap::new())?;
    let fs_type = fs_type_of(std::slice::from_ref(cap), &HashMap::new())?;
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
    let spec = spec_of(req, cap, plugin.ephemeral_max_bytes)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::proto::volume_capability::{AccessMode, MountVolume, access_mode};

    fn request(attributes: &[(&str, &str)]) -> NodePublishVolumeRequest {
        let mut volume_context: HashMap<String, String> =
            attributes.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        volume_context.insert(CONTEXT_EPHEMERAL.into(), "true".into());
        volume_context.insert("csi.storage.k8s.io/pod.name".into(), "web-0".into());
        NodePublishVolumeRequest { volume_id: "csi-0123abcd".into(), volume_context, ..Default::default() }
    }

    fn mount(fs_type: &str) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: access_mode::Mode::SingleNodeWriter as i32 }),
            access_type: Some(volume_capability::AccessType::Mount(MountVolume {
                fs_type: fs_type.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_pod_may_choose_only_the_size_and_the_filesystem() {
        let spec = spec_of(&request(&[("size", "256Mi")]), &mount("xfs"), 1 << 30).expect("size only");
        assert_eq!(spec.capacity_bytes, 256 << 20);
        assert_eq!(spec.fs_type.as_deref(), Some("xfs"));
        assert!(spec.parameters.is_empty() && !spec.thick(), "{spec:?}");
        for attribute in [("thick", "true"), ("queues", "16"), ("maxIops", "1"), ("cache", "writeback")] {
            let refused = spec_of(&request(&[attribute]), &mount("ext4"), 1 << 30).expect_err("refused");
            assert!(matches!(refused, Error::InvalidArgument(_)), "{attribute:?}: {refused}");
        }
    }

    #[test]
    fn the_admin_caps_the_size() {
        let big = spec_of(&request(&[("size", "2Gi")]), &mount("ext4"), 1 << 30).expect_err("over the cap");
        assert!(matches!(big, Error::OutOfRange(_)), "{big}");
        assert!(big.to_string().contains("--ephemeral-max-size"), "{big}");
        assert!(spec_of(&request(&[("size", "1Gi")]), &mount("ext4"), 1 << 30).is_ok(), "at the cap");
        // Without a size: CreateVolume's default, which must fit the cap too.
        assert!(spec_of(&request(&[]), &mount("ext4"), 512 << 20).is_err());
    }
}
