//! The one parameter model: StorageClass parameters (CreateVolume), the volume context a
//! node receives back (NodeStage of RBD volumes), and an ephemeral inline volume's
//! attributes are all checked here, with one rule for keys we do not own.
//!
//! The rule: keys under `csi.storage.k8s.io/` (the fstype excepted, which is ours) and
//! `storage.kubernetes.io/` belong to Kubernetes. external-provisioner adds some (the PV and
//! PVC names, `storage.kubernetes.io/csiProvisionerIdentity` in every PV's context), kubelet
//! others (the pod's name, `csi.storage.k8s.io/ephemeral`). They are ignored, never refused,
//! and never kept. Every other key must be one of ours, or the request is refused.

use std::collections::{BTreeMap, HashMap};

use crate::backend::CacheMode;
use crate::blk::qos::QosLimits;
use crate::status::{Error, Result};

/// Filesystem type (external-provisioner usually moves it into the volume capability, but it
/// may arrive here too).
pub const FS_TYPE: &str = "csi.storage.k8s.io/fstype";
/// Number of virtqueues.
pub const QUEUES: &str = "queues";
/// How image I/O uses the node's page cache (`none`, `writeback`).
pub const CACHE: &str = "cache";
/// Where the data lives: `file` (default) or `rbd`.
pub use crate::volume::PARAM_BACKEND as BACKEND;
/// Whose memory the device's bounce pages are: `kernel` (default) or `own` (see
/// `DeviceOptions::own_bounce_pages`).
pub const BOUNCE_PAGES: &str = "bouncePages";
/// Reserve the whole image at creation (`true`) or not (`false`, the default: thin).
pub use crate::volume::PARAM_THICK as THICK;

/// Most queues a volume may ask for.
pub const MAX_QUEUES: u16 = 16;
/// Smallest volume and allocation unit.
pub const MIB: u64 = 1 << 20;
/// Size of a volume created without a capacity range.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;
/// Filesystems we format and grow.
pub use crate::host::SUPPORTED_FS;

/// Whether `key` is Kubernetes' own (see the module's rule).
pub fn is_foreign(key: &str) -> bool {
    (key.starts_with("csi.storage.k8s.io/") && key != FS_TYPE) || key.starts_with("storage.kubernetes.io/")
}

/// The parameters of a node-local volume, checked: its queue count and the ones we keep in
/// its metadata (and hand back as the volume context).
pub fn check_local(params: &HashMap<String, String>) -> Result<(u16, BTreeMap<String, String>)> {
    let mut queues = crate::server::default_queues();
    let mut kept = BTreeMap::new();
    for (k, v) in params.iter().filter(|(k, _)| !is_foreign(k)) {
        match k.as_str() {
            FS_TYPE => {
                check_fs_type(v)?;
            }
            QUEUES => {
                queues = v.parse::<u16>().ok().filter(|q| (1..=MAX_QUEUES).contains(q)).ok_or_else(|| {
                    Error::InvalidArgument(format!("parameter {QUEUES}={v:?}: use 1 to {MAX_QUEUES}"))
                })?;
            }
            CACHE => {
                CacheMode::parse(v)
                    .ok_or_else(|| Error::InvalidArgument(format!("parameter {CACHE}={v:?}: use none or writeback")))?;
            }
            BOUNCE_PAGES => {
                if v != "kernel" && v != "own" {
                    return Err(Error::InvalidArgument(format!("parameter {BOUNCE_PAGES}={v:?}: use kernel or own")));
                }
            }
            THICK => {
                if v != "true" && v != "false" {
                    return Err(Error::InvalidArgument(format!("parameter {THICK}={v:?}: use true or false")));
                }
            }
            k if QosLimits::PARAMETERS.iter().any(|(name, _)| *name == k) => {
                QosLimits::from_parameters([(k, v.as_str())])
                    .map_err(|e| Error::InvalidArgument(format!("parameter {e}")))?;
            }
            // RBD volumes are routed before their parameters get here.
            BACKEND if v == crate::volume::BACKEND_FILE => continue,
            k => {
                let qos: Vec<&str> = QosLimits::PARAMETERS.iter().map(|(name, _)| *name).collect();
                return Err(Error::InvalidArgument(format!(
                    "unknown parameter {k:?}: supported are {FS_TYPE}, {QUEUES}, {CACHE}, {BOUNCE_PAGES}, {THICK} and the QoS limits {}",
                    qos.join(", ")
                )));
            }
        }
        kept.insert(k.clone(), v.clone());
    }
    Ok((queues, kept))
}

/// Refuses a filesystem we do not make.
pub fn check_fs_type(fs: &str) -> Result<()> {
    if SUPPORTED_FS.contains(&fs) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("filesystem {fs:?} is not supported: use {}", SUPPORTED_FS.join(" or "))))
    }
}

/// The size to provision for a capacity range (CSI's `required_bytes` and `limit_bytes`, 0
/// for unset): at least 1 MiB, rounded up to MiB.
pub fn capacity(required_bytes: i64, limit_bytes: i64) -> Result<u64> {
    if required_bytes < 0 || limit_bytes < 0 {
        return Err(Error::OutOfRange("capacity_range bytes must not be negative".into()));
    }
    let (required, limit) = (required_bytes as u64, limit_bytes as u64);
    let wanted =
        if required == 0 { if limit > 0 { limit.min(DEFAULT_CAPACITY) } else { DEFAULT_CAPACITY } } else { required };
    let size =
        wanted.div_ceil(MIB).max(1).checked_mul(MIB).ok_or_else(|| Error::OutOfRange("capacity too large".into()))?;
    if limit > 0 && size > limit {
        return Err(Error::OutOfRange(format!(
            "no size in [{required}, {limit}] bytes is a whole number of MiB (volumes are allocated in MiB)"
        )));
    }
    Ok(size)
}

/// The parameters of a volume context (or attributes) without Kubernetes' keys.
pub fn own(context: &HashMap<String, String>) -> HashMap<String, String> {
    context.iter().filter(|(k, _)| !is_foreign(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn kubernetes_keys_are_ignored_and_never_kept() {
        let params = map(&[
            ("queues", "2"),
            ("csi.storage.k8s.io/fstype", "xfs"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pod.name", "web-0"),
            ("storage.kubernetes.io/csiProvisionerIdentity", "1733-8081-vduse.csi.dev"),
        ]);
        let (queues, kept) = check_local(&params).expect("accepted");
        assert_eq!(queues, 2);
        assert!(check_local(&map(&[("bouncePages", "own")])).is_ok());
        let keys: Vec<&str> = kept.keys().map(String::as_str).collect();
        assert_eq!(keys, ["csi.storage.k8s.io/fstype", "queues"]);
        assert!(own(&params).keys().all(|k| !k.contains("kubernetes.io") && !k.contains("pvc/")));
    }

    #[test]
    fn our_keys_are_checked_and_others_refused() {
        for bad in [
            map(&[("queues", "0")]),
            map(&[("queues", "17")]),
            map(&[("cache", "sometimes")]),
            map(&[("thick", "yes")]),
            map(&[("bouncePages", "user")]),
            map(&[("maxIops", "0")]),
            map(&[("csi.storage.k8s.io/fstype", "btrfs")]),
            map(&[("colour", "blue")]),
        ] {
            assert!(matches!(check_local(&bad), Err(Error::InvalidArgument(_))), "{bad:?}");
        }
    }

    #[test]
    fn capacity_rounds_up_to_mib_and_honours_limits() {
        assert_eq!(capacity(0, 0).ok(), Some(DEFAULT_CAPACITY));
        assert_eq!(capacity(1, 0).ok(), Some(MIB));
        assert_eq!(capacity(MIB as i64 + 1, 0).ok(), Some(2 * MIB));
        assert_eq!(capacity(0, 5 * MIB as i64).ok(), Some(5 * MIB));
        assert!(capacity(MIB as i64 + 1, MIB as i64 + 100).is_err());
        assert!(capacity(-1, 0).is_err());
    }
}
