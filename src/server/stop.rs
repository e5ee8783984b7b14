//! What a stop that failed leaves: a device still attached and still served, or one detached
//! whose teardown failed.

use super::{DeviceServer, Error};

/// A stop that could not detach the device: the server still serves it (so the host's I/O
/// is never stranded on a device nobody answers) and is handed back with the error.
pub struct StillServing {
    pub server: Box<DeviceServer>,
    pub error: Error,
}

impl std::fmt::Debug for StillServing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StillServing({}: {})", self.server.name, self.error)
    }
}

/// Why [`DeviceServer::stop`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// The device is still attached and served.
    #[error("cannot detach device {}: {}; it stays attached and served", .0.server.name, .0.error)]
    StillServing(StillServing),
    /// Detached, but the rest of the teardown failed.
    #[error(transparent)]
    Failed(#[from] Error),
}
