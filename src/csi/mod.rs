//! The CSI gRPC services (tonic over a unix socket): identity, controller, node.
//!
//! Thin adapters: they validate and translate requests, take the volume's guard, and call
//! the node agent (crate::node), the volume store and the RBD control plane (crate::rbd).
//! Failures are `status::Error`, mapped to gRPC codes in one place ([`status_of`]).

pub mod client;
pub mod controller;
pub mod identity;
pub mod inventory;
pub mod metrics;
pub mod node;
pub mod registration;
pub mod serve;
pub mod token;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tonic::{Code, Status};

use crate::node::NodeAgent;
use crate::rbd::Clusters;

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
    /// The node agent: volumes, their devices and their state on this node.
    pub agent: NodeAgent,
    /// The Ceph clusters RBD volumes may live in (`--ceph-clusters`).
    pub ceph: Clusters,
    /// Set once staged volumes are served again after a restart.
    pub recovered: AtomicBool,
    /// Why the node cannot serve volumes, if it cannot.
    pub not_ready_reason: Mutex<Option<String>>,
}

impl Plugin {
    pub fn new(driver_name: String, mode: Mode, agent: NodeAgent, ceph: Clusters) -> Arc<Self> {
        Arc::new(Self {
            driver_name,
            node_id: agent.node_id().to_owned(),
            mode,
            agent,
            ceph,
            recovered: AtomicBool::new(false),
            not_ready_reason: Mutex::new(None),
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
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() { Err(Error::InvalidArgument(format!("{field} is required"))) } else { Ok(value) }
}

/// Validates a volume ID from a request.
pub fn volume_id(id: &str) -> Result<&str> {
    required("volume_id", id)?;
    crate::volume::validate_id("volume ID", id)?;
    Ok(id)
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
