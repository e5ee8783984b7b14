//! What went wrong in the control plane, in the terms its callers act on: fix the request,
//! retry later, or fix the node. The node agent, the RBD control plane and the CSI services
//! share it; the CSI layer maps each kind to a gRPC code in one place (`csi::status_of`).
//! Every lower layer's error (volume store, host tools, device server, Ceph) is classified
//! here, once.

/// A control-plane failure, by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("an operation on volume {0} is already in progress")]
    Aborted(String),
    /// A paging token this plugin did not issue.
    #[error("{0}")]
    InvalidToken(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<crate::volume::Error> for Error {
    fn from(e: crate::volume::Error) -> Self {
        use crate::volume::Error as V;
        match e {
            V::InvalidId { .. } => Error::InvalidArgument(e.to_string()),
            V::NotFound { .. } => Error::NotFound(e.to_string()),
            V::Conflict { .. } => Error::AlreadyExists(e.to_string()),
            V::NoSpace { .. } | V::Overcommitted { .. } => Error::ResourceExhausted(e.to_string()),
            V::SmallerThanSource { .. } => Error::OutOfRange(e.to_string()),
            V::Io { .. } | V::Corrupt { .. } => Error::Internal(e.to_string()),
        }
    }
}

impl From<crate::host::Error> for Error {
    fn from(e: crate::host::Error) -> Self {
        match e {
            crate::host::Error::UnsupportedFs(_) | crate::host::Error::BadFlag(_) => {
                Error::InvalidArgument(e.to_string())
            }
            _ => Error::Internal(e.to_string()),
        }
    }
}

/// The device server's errors as CSI sees them: what the node lacks or another process holds
/// is UNAVAILABLE (kubelet retries, and it can heal), what an operator must fix on the node is
/// FAILED_PRECONDITION with the fix in the message, the rest INTERNAL.
impl From<crate::server::Error> for Error {
    fn from(e: crate::server::Error) -> Self {
        use crate::server::Error as S;
        use crate::vduse::Error as V;
        match e {
            S::Vduse(V::ControlMissing | V::Busy(_)) => Error::Unavailable(e.to_string()),
            S::Vduse(V::WrongDriver { .. }) => Error::FailedPrecondition(e.to_string()),
            S::NoDevice(_) => Error::NotFound(e.to_string()),
            S::InvalidOption(_) => Error::InvalidArgument(e.to_string()),
            _ => Error::Internal(e.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// librbd's and librados' errors.
impl From<crate::backend::ceph::Error> for Error {
    fn from(e: crate::backend::ceph::Error) -> Self {
        if let crate::backend::ceph::Error::Locked { .. } = e {
            return Error::FailedPrecondition(e.to_string());
        }
        if let crate::backend::ceph::Error::NotBuilt = e {
            return Error::FailedPrecondition(e.to_string());
        }
        if let crate::backend::ceph::Error::Connect { .. } = e {
            return match e.errno() {
                Some(libc::EACCES | libc::EPERM) => Error::FailedPrecondition(format!(
                    "{e}: the cephx user or key of the secret (userID, userKey) was refused"
                )),
                _ => Error::Unavailable(e.to_string()),
            };
        }
        match e.errno() {
            Some(libc::ENOENT) => Error::NotFound(e.to_string()),
            Some(libc::EEXIST) => Error::AlreadyExists(e.to_string()),
            Some(libc::EBUSY | libc::ENOTEMPTY | libc::EROFS) => Error::FailedPrecondition(e.to_string()),
            Some(libc::ENOSPC | libc::EDQUOT) => Error::ResourceExhausted(e.to_string()),
            Some(libc::ETIMEDOUT | libc::ENOTCONN | libc::ECONNREFUSED | libc::ESHUTDOWN) => {
                Error::Unavailable(e.to_string())
            }
            Some(libc::EPERM | libc::EACCES) => Error::FailedPrecondition(format!("{e} (check the cephx user's caps)")),
            _ => Error::Internal(e.to_string()),
        }
    }
}
