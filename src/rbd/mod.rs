//! The RBD control plane: the volume lives in a Ceph pool as an RBD image, and any
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

//!
//! Split by what it does: [`ids`] (volume and snapshot IDs, image names), [`clusters`] (the
//! `--ceph-clusters` file and the shared connections), [`guard`] (operation guard keys),
//! [`params`] (StorageClass parameters),
//! [`provision`] (the controller's images, snapshots, clones and resizes) and [`node`] (what
//! a node records to stage a volume, and opening its image for a device server). Used by the
//! CSI controller and by the node agent; errors are `status::Error`.

pub mod clusters;
pub mod guard;
pub mod ids;
pub mod node;
pub mod params;
pub mod provision;

use std::collections::HashMap;

use crate::status::{Error, Result};
use crate::volume::{BACKEND_FILE, PARAM_BACKEND, VolumeSpec};

pub use clusters::Clusters;
pub use ids::{ImageLocation, SnapshotLocation, is_rbd_id, location};

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

/// Whether StorageClass parameters ask for an RBD volume.
pub fn requested(params: &HashMap<String, String>) -> bool {
    params.get(PARAM_BACKEND).is_some_and(|b| b == BACKEND_RBD)
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
    use super::clusters::Clusters;
    use super::ids::{image_name, snapshot_name};
    use super::node::NodeRecord;
    use super::params::parameters;
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
        let clusters = Clusters::from_file(&path, clusters::DEFAULT_TIMEOUT);
        assert_eq!(clusters.monitors("c1").ok().as_deref(), Some("127.0.0.1:6789,127.0.0.2:6789"));
        // A StorageClass naming a cluster the file does not list is wrong; an existing volume
        // whose cluster left the file needs the operator to add it back.
        assert!(matches!(clusters.check_listed("c2"), Err(Error::InvalidArgument(_))));
        match clusters.monitors("c2") {
            Err(Error::FailedPrecondition(m)) => assert!(m.contains("add the cluster back"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(clusters.check_listed("c1").is_ok());
        std::fs::write(&path, r#"[{"clusterID": "../x", "monitors": ["a"]}]"#).expect("write");
        assert!(Clusters::load(&path).is_err());
        assert!(matches!(
            Clusters::from_file(&dir.path().join("absent"), clusters::DEFAULT_TIMEOUT).monitors("c1"),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(Clusters::default().monitors("c1"), Err(Error::FailedPrecondition(_))));
    }

    #[test]
    fn an_existing_volume_takes_its_cluster_and_pool_from_its_id() {
        let loc = ImageLocation { cluster_id: "c1".into(), pool_id: 4, image: image_name("pvc-1") };
        let p = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let none = params::for_volume(&HashMap::new(), &loc).expect("no parameters at all");
        assert_eq!((none.cluster_id.as_str(), none.pool.as_str()), ("c1", "4"));
        // A provisioner-made PV's context, with kubelet's keys.
        let context = p(&[
            ("backend", "rbd"),
            ("clusterID", "c1"),
            ("pool", "rbd"),
            ("storage.kubernetes.io/csiProvisionerIdentity", "1700000000000-8081-rbd.vduse.csi.dev"),
            ("csi.storage.k8s.io/pod.name", "app-0"),
            ("csi.storage.k8s.io/ephemeral", "false"),
        ]);
        assert!(params::for_volume(&context, &loc).is_ok());
        for bad in [p(&[("clusterID", "c2")]), p(&[("backend", "file")]), p(&[("cache", "writeback")])] {
            assert!(matches!(params::for_volume(&bad, &loc), Err(Error::InvalidArgument(_))), "{bad:?}");
        }
    }

    #[test]
    fn records_never_print_keys() {
        let r = NodeRecord { user: "k8s".into(), key: Some("AQBsecret==".into()), lock_owner: None };
        assert!(!format!("{r:?}").contains("AQBsecret"));
    }
}
