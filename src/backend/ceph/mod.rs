//! The Ceph binding: librados and librbd, bound by bindgen at build time from the installed
//! headers (`build.rs`, [`sys`]), behind safe handles ([`client`]): a connection, a pool, an
//! image. Used by the RBD backend (I/O) and by the RBD control plane (provisioning, locks).
//!
//! With `unsafe` code: the FFI calls, each with its `// SAFETY:` line (docs/ARCHITECTURE.md
//! lists every such place).

#[cfg(feature = "rbd")]
pub mod client;
#[cfg(feature = "rbd")]
pub(crate) mod sys;

/// A build without the `rbd` feature: the same API, whose connections all fail.
#[cfg(not(feature = "rbd"))]
#[path = "absent.rs"]
pub mod client;

use std::io;

pub use client::{Cluster, Image, Pool, SnapInfo};

/// Errors of the RBD backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A librados or librbd call failed.
    #[error("{op}: {source}")]
    Call { op: &'static str, source: io::Error },
    /// The same, with what it was about.
    #[error("{what}: {source}")]
    About { what: String, source: Box<Error> },
    /// The cluster could not be reached.
    #[error("cannot connect to the Ceph cluster at {monitors}: {source}")]
    Connect { monitors: String, source: Box<Error> },
    /// A name or option contains a NUL byte (the value is not repeated: it may be a key).
    #[error("the {what} contains a NUL byte")]
    Nul { what: &'static str },
    /// This build has no librados/librbd.
    #[error("this vduse-csi was built without RBD support (cargo feature `rbd`)")]
    NotBuilt,
    /// Another live client holds the image's exclusive lock.
    #[error("image {image} is locked by {owners}, a live client (another node serves it)")]
    Locked { image: String, owners: String },
}

impl Error {
    /// Wraps the error with what it was about.
    pub fn context(self, what: String) -> Self {
        Error::About { what, source: Box::new(self) }
    }

    /// The errno of the failed call, if one failed.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Call { source, .. } => source.raw_os_error(),
            Error::About { source, .. } | Error::Connect { source, .. } => source.errno(),
            Error::Nul { .. } | Error::Locked { .. } | Error::NotBuilt => None,
        }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// How to reach a cluster: its monitors and a cephx user.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `mon_host` syntax: `10.0.0.1:6789,10.0.0.2:6789` or `v2:...`.
    pub monitors: String,
    /// The cephx user without its `client.` prefix.
    pub user: String,
    /// The user's key; `None` for a cluster without cephx.
    pub key: Option<String>,
    /// How long a call may wait for the monitors and OSDs before it fails with `ETIMEDOUT`:
    /// bounded for the control plane, `None` (wait like a disk) for a device's I/O.
    pub op_timeout: Option<std::time::Duration>,
}

impl std::fmt::Debug for ClusterConfig {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("monitors", &self.monitors)
            .field("user", &self.user)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}
