//! The CSI gRPC services (tonic over a unix socket): identity, controller, node.
//!
//! Handlers are thin: they validate the request, take the volume's guard, and call the
//! volume store, the device server and the host operations. Errors become `tonic::Status` in
//! one place ([`Error::into_status`]).

pub mod client;
pub mod controller;
pub mod ephemeral;
pub mod identity;
pub mod inventory;
pub mod metrics;
pub mod node;
pub mod rbd;
pub mod registration;
pub mod serve;
pub mod token;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tonic::{Code, Status};

use crate::node::{ServerTable, VolumeGuards};
use crate::volume::VolumeStore;

/// Generated CSI v1 types and service traits.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

/// CSI driver name.
pub const DRIVER_NAME: &str = "vduse.csi.dev";
/// Topology key whose value is the node ID.
pub const TOPOLOGY_KEY: &str = "vduse.csi.dev/node";
/// Default state dir.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vduse-csi";
/// Default endpoint.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/vduse-csi/csi.sock";
/// StorageClass parameter: filesystem type (external-provisioner usually moves it into the
/// volume capability, but it may arrive here too).
pub const PARAM_FS_TYPE: &str = "csi.storage.k8s.io/fstype";
/// StorageClass parameter: number of virtqueues.
pub const PARAM_QUEUES: &str = "queues";
/// StorageClass parameter: how image I/O uses the node's page cache (`none`, `writeback`).
pub const PARAM_CACHE: &str = "cache";
/// StorageClass parameter: reserve the whole image at creation (`true`) or not (`false`,
/// the default: thin).
pub use crate::volume::PARAM_THICK;
/// Smallest volume and allocation unit.
pub const MIB: u64 = 1 << 20;
/// Size of a volume created without a capacity range.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    All,
    Controller,
    Node,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::All | Mode::Controller)
    }
    pub fn node(self) -> bool {
        matches!(self, Mode::All | Mode::Node)
    }
}

/// State shared by the three services.
pub struct Plugin {
    pub driver_name: String,
    pub node_id: String,
    pub mode: Mode,
    pub store: VolumeStore,
    pub guards: VolumeGuards,
    /// Device servers of staged volumes, by volume ID.
    pub servers: ServerTable,
    /// Set once staged volumes are served again after a restart.
    pub recovered: AtomicBool,
    /// Why the node cannot serve volumes, if it cannot.
    pub not_ready_reason: Mutex<Option<String>>,
    /// Whether device servers count requests for the metrics endpoint.
    pub counters: AtomicBool,
    /// The Ceph clusters RBD volumes may live in (`--ceph-clusters`).
    pub ceph: rbd::Clusters,
    /// RBD volumes whose device this node serves fenced (every request fails), with why.
    pub fenced: Mutex<HashMap<String, String>>,
    /// Largest ephemeral inline volume a pod may declare.
    pub ephemeral_max_bytes: u64,
}

impl Plugin {
    pub fn new(driver_name: String, node_id: String, mode: Mode, store: VolumeStore, ceph: rbd::Clusters) -> Arc<Self> {
        Arc::new(Self {
            driver_name,
            node_id,
            mode,
            store,
            guards: VolumeGuards::default(),
            servers: ServerTable::default(),
            recovered: AtomicBool::new(false),
            not_ready_reason: Mutex::new(None),
            counters: AtomicBool::new(false),
            ceph,
            fenced: Mutex::new(HashMap::new()),
            ephemeral_max_bytes: ephemeral::DEFAULT_MAX_BYTES,
        })
    }

    /// Whether this is the cluster-wide controller of RBD volumes (`--mode controller` with
    /// Ceph clusters): it provisions RBD volumes only, and expands them itself.
    pub fn rbd_controller(&self) -> bool {
        self.mode == Mode::Controller && self.ceph.configured()
    }

    /// The topology segment of this node.
    pub fn topology(&self) -> proto::Topology {
        proto::Topology { segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), self.node_id.clone())]) }
    }
}

pub use crate::status::{Error, Result};

/// The gRPC code of each kind of failure: the one mapping (README, "CSI support").
pub fn status_of(e: Error) -> Status {
    let code = match &e {
        Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::OutOfRange(_) => Code::OutOfRange,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::Aborted(_) | Error::InvalidToken(_) => Code::Aborted,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Internal(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        status_of(e)
    }
}

impl From<crate::node::guard::Busy> for Status {
    fn from(e: crate::node::guard::Busy) -> Self {
        status_of(e.into())
    }
}

/// Checks a required string field.
/// A volume's QoS limits, from the parameters kept in its metadata.
pub fn volume_qos(spec: &crate::volume::VolumeSpec) -> std::result::Result<crate::blk::qos::QosLimits, String> {
    crate::blk::qos::QosLimits::from_parameters(spec.parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() { Err(Error::InvalidArgument(format!("{field} is required"))) } else { Ok(value) }
}

/// Validates a volume ID from a request.
pub fn volume_id(id: &str) -> Result<&str> {
    required("volume_id", id)?;
    crate::volume::validate_id("volume ID", id)?;
    Ok(id)
}

/// A hash of `s` that stays the same across releases and machines (a std hasher does not):
/// FNV-1a, 64 bits. It names things that must be found again (devices, RBD images).
pub(crate) fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Runs blocking work (netlink attach, mkfs, copies) off the async runtime.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("worker task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::Error as S;
    use crate::vduse::Error as V;

    #[test]
    fn device_server_errors_map_to_csi_codes() {
        let code = |e: S| status_of(Error::from(e)).code();
        assert_eq!(code(S::Vduse(V::Busy("pvc-1".into()))), Code::Unavailable);
        assert_eq!(code(S::Vduse(V::ControlMissing)), Code::Unavailable);
        let wrong = Error::from(S::Vduse(V::WrongDriver { name: "pvc-1".into(), driver: "vhost_vdpa".into() }));
        assert!(wrong.to_string().contains("modprobe -r vhost_vdpa"), "{wrong}");
        assert_eq!(status_of(wrong).code(), Code::FailedPrecondition);
        assert_eq!(code(S::NoDevice("pvc-1".into())), Code::NotFound);
        assert_eq!(code(S::Thread(std::io::Error::other("x"))), Code::Internal);
    }
}
