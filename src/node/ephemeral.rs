//! Ephemeral inline volumes: a volume declared in a pod spec lives as long as that pod.
//! kubelet publishes it with `csi.storage.k8s.io/ephemeral: "true"` and no staging path; the
//! agent creates a sparse image of the requested `size`, stages it as any volume (served,
//! formatted, mounted under the state dir) and binds it to the target. The pod's unpublish
//! unstages it and deletes the image. Between the two it is recorded like a staged volume,
//! so a plugin restart serves it again.
//!
//! A pod author writes its attributes, not the admin, and ResourceQuota does not count
//! inline volumes: so `size` (at most `serve --ephemeral-max-size`) is the only attribute,
//! the filesystem type comes from the pod's `fsType`, and everything a StorageClass could
//! set (queues, thickness, cache, QoS) is the node's default. Kubernetes' own keys are
//! ignored (crate::params).

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use super::{MountSpec, NodeAgent, PublishSpec, StageSpec};
use crate::params;
use crate::status::{Error, Result};
use crate::units::parse_size;
use crate::volume::{VolumeMeta, VolumeSpec};

/// The volume attribute that sizes an ephemeral volume (bytes or a K, M, G, T / Ki, Mi, Gi,
/// Ti suffix); CreateVolume's default capacity without it.
pub const ATTR_SIZE: &str = "size";

/// What a pod's inline volume asks for.
#[derive(Debug, Clone)]
pub struct EphemeralSpec {
    pub id: String,
    /// The pod's `volumeAttributes` with kubelet's keys.
    pub attributes: HashMap<String, String>,
    /// The pod's `fsType` and mount flags.
    pub mount: MountSpec,
    /// Where the pod sees it.
    pub target: PathBuf,
    pub read_only: bool,
    pub access_mode: i32,
}

/// The volume an inline volume's attributes describe.
fn volume_spec(spec: &EphemeralSpec, max_bytes: u64) -> Result<VolumeSpec> {
    let own = params::own(&spec.attributes);
    if let Some(key) = own.keys().find(|k| k.as_str() != ATTR_SIZE) {
        return Err(Error::InvalidArgument(format!(
            "volume attribute {key:?} is not allowed on an ephemeral inline volume: only {ATTR_SIZE:?} is (use a PersistentVolumeClaim and a StorageClass for more)"
        )));
    }
    // Sized like CreateVolume sizes a claim (whole MiB; the default without a size).
    let required = match own.get(ATTR_SIZE) {
        None => 0,
        Some(size) => parse_size(size)
            .ok()
            .filter(|s| *s > 0)
            .and_then(|s| i64::try_from(s).ok())
            .ok_or_else(|| Error::InvalidArgument(format!("volume attribute {ATTR_SIZE}={size:?} is not a size")))?,
    };
    let capacity = params::capacity(required, 0)?;
    if capacity > max_bytes {
        return Err(Error::OutOfRange(format!(
            "an ephemeral inline volume may have at most {max_bytes} bytes on this node (serve --ephemeral-max-size), not {capacity}"
        )));
    }
    if let Some(fs) = &spec.mount.fs_type {
        params::check_fs_type(fs)?;
    }
    let (queues, parameters) = params::check_local(&HashMap::new())?;
    Ok(VolumeSpec {
        id: spec.id.clone(),
        capacity_bytes: capacity,
        queues,
        fs_type: spec.mount.fs_type.clone(),
        parameters,
        source: None,
        ephemeral: true,
    })
}

impl NodeAgent {
    /// Creates, stages and publishes an ephemeral volume; idempotent. On failure nothing of a
    /// volume this call created is left. The caller holds the volume's guard.
    pub fn publish_ephemeral(&self, spec: &EphemeralSpec) -> Result<()> {
        let volume = volume_spec(spec, self.opts.ephemeral_max_bytes)?;
        let id = &volume.id;
        if let Some(existing) = self.store.volume(id)? {
            if !existing.spec.ephemeral {
                return Err(Error::AlreadyExists(format!("volume {id} exists and is not ephemeral")));
            }
        }
        let (_, created) = self.store.create_volume(&volume)?;
        let staging = self.store.ephemeral_staging_path(id)?;
        let stage = StageSpec {
            path: staging.clone(),
            mount: Some(spec.mount.clone()),
            access_mode: spec.access_mode,
            read_only: spec.read_only,
        };
        let publish = PublishSpec {
            target: spec.target.clone(),
            staging_path: staging.clone(),
            block: false,
            read_only: spec.read_only,
            access_mode: spec.access_mode,
        };
        let published = fs::create_dir_all(&staging)
            .map_err(|source| Error::from(crate::host::Error::Io { op: "create", path: staging.clone(), source }))
            .and_then(|()| self.stage(id, &stage))
            .and_then(|()| self.publish(id, &publish));
        if let Err(e) = published {
            if created {
                let cleanup = self
                    .store
                    .existing_volume(id)
                    .map_err(Error::from)
                    .and_then(|m| self.remove_ephemeral_if_unused(&m));
                if let Err(cleanup) = cleanup {
                    tracing::error!(volume = %id, error = %cleanup, "cannot remove the ephemeral volume after a failed publish");
                }
            }
            return Err(e);
        }
        tracing::info!(volume = %id, capacity = volume.capacity_bytes, "ephemeral volume published");
        Ok(())
    }

    /// Unstages and deletes an ephemeral volume that no pod uses any more; nothing for any other.
    pub(super) fn remove_ephemeral_if_unused(&self, meta: &VolumeMeta) -> Result<()> {
        if !meta.spec.ephemeral || !meta.published.is_empty() {
            return Ok(());
        }
        let id = &meta.spec.id;
        let staging = self.store.ephemeral_staging_path(id)?;
        self.unstage(id, &staging)?;
        match fs::remove_dir(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(crate::host::Error::Io { op: "remove", path: staging, source }.into()),
        }
        self.store.delete_volume(id)?;
        tracing::info!(volume = %id, "ephemeral volume deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(attributes: &[(&str, &str)], fs_type: &str) -> EphemeralSpec {
        let mut attributes: HashMap<String, String> =
            attributes.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        attributes.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
        attributes.insert("csi.storage.k8s.io/pod.name".into(), "web-0".into());
        EphemeralSpec {
            id: "csi-0123abcd".into(),
            attributes,
            mount: MountSpec { fs_type: Some(fs_type.to_owned()).filter(|f| !f.is_empty()), flags: vec![] },
            target: "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/scratch/mount".into(),
            read_only: false,
            access_mode: 1,
        }
    }

    #[test]
    fn a_pod_may_choose_only_the_size_and_the_filesystem() {
        let volume = volume_spec(&spec(&[("size", "256Mi")], "xfs"), 1 << 30).expect("size only");
        assert_eq!(volume.capacity_bytes, 256 << 20);
        assert_eq!(volume.fs_type.as_deref(), Some("xfs"));
        assert!(volume.parameters.is_empty() && !volume.thick(), "{volume:?}");
        for attribute in [("thick", "true"), ("queues", "16"), ("maxIops", "1"), ("cache", "writeback")] {
            let refused = volume_spec(&spec(&[attribute], "ext4"), 1 << 30).expect_err("refused");
            assert!(matches!(refused, Error::InvalidArgument(_)), "{attribute:?}: {refused}");
        }
        assert!(matches!(volume_spec(&spec(&[], "btrfs"), 1 << 30), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn the_admin_caps_the_size() {
        let big = volume_spec(&spec(&[("size", "2Gi")], "ext4"), 1 << 30).expect_err("over the cap");
        assert!(matches!(big, Error::OutOfRange(_)), "{big}");
        assert!(big.to_string().contains("--ephemeral-max-size"), "{big}");
        assert!(volume_spec(&spec(&[("size", "1Gi")], "ext4"), 1 << 30).is_ok(), "at the cap");
        // Without a size: CreateVolume's default, which must fit the cap too.
        assert!(volume_spec(&spec(&[], "ext4"), 512 << 20).is_err());
    }
}
