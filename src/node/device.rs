//! Starting, healing and stopping a volume's device server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::table::into_owned;
use super::{NodeAgent, NotServed};
use crate::backend::{Backend, CacheMode, FileBackend, NullBackend};
use crate::rbd::node::Opened;
use crate::server::{DeviceOptions, DeviceServer, HealthState, StopError};
use crate::status::{Error, Result};
use crate::volume::VolumeMeta;

/// Ring size of every volume's queues.
const QUEUE_SIZE: u16 = 256;
/// How long a server taken out of the table may still be borrowed (a scrape, a stats call)
/// before whoever wants to stop or replace it gives up.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The VDUSE device name of a volume: its ID when that fits the 64-character device-name
/// limit, else a stable hash of it. Two volumes can want one name (an ID may be another's
/// hash): the state dir's device records keep them apart (see [`NodeAgent::start_device`]).
pub fn device_name(volume_id: &str) -> String {
    if crate::vduse::validate_device_name(volume_id).is_ok() {
        return volume_id.to_owned();
    }
    format!("vcsi-{:016x}", crate::volume::stable_hash(volume_id))
}

impl NodeAgent {
    /// Starts serving a volume's image and returns the server. A device of the volume's name
    /// that is attached already is taken over only if the state dir records it as this
    /// volume's.
    pub(super) fn start_device(&self, meta: &VolumeMeta) -> Result<DeviceServer> {
        let id = &meta.spec.id;
        let name = device_name(id);
        let claimed = self.store.claim_device(&name, id).map_err(|e| match e {
            crate::volume::Error::Conflict { .. } => {
                Error::FailedPrecondition(format!("volume {id}: {e}; unstage that volume first"))
            }
            other => other.into(),
        })?;
        let backend: Arc<dyn Backend> = if crate::rbd::is_rbd(&meta.spec) {
            match crate::rbd::node::open_backend(&self.store, &self.opts.ceph, &self.opts.node_id, meta)? {
                Opened::Served(backend) => Arc::new(backend),
                Opened::Fenced(reason) => {
                    tracing::error!(volume = %id, reason, "fenced: every request to this device fails until it is unstaged");
                    self.set_fenced(id, Some(reason));
                    Arc::new(NullBackend::fenced(meta.spec.capacity_bytes))
                }
            }
        } else {
            let image = self.store.image_path(id)?;
            // Validated at CreateVolume; metadata from an older release has none.
            let cache =
                meta.spec.parameters.get(crate::params::CACHE).and_then(|c| CacheMode::parse(c)).unwrap_or_default();
            Arc::new(FileBackend::open(&image, None, false, cache).map_err(|e| match e {
                crate::backend::Error::Locked(_) => Error::Unavailable(e.to_string()),
                other => Error::Internal(other.to_string()),
            })?)
        };
        let qos = volume_qos(meta).map_err(|e| Error::FailedPrecondition(format!("volume {id}: {e}")))?;
        let opts = DeviceOptions {
            name,
            num_queues: meta.spec.queues.max(1),
            queue_size: QUEUE_SIZE,
            msg_timeout: 0,
            poll: crate::server::DEFAULT_POLL,
            counters: self.opts.counters,
            qos,
            rotate_irqs: false,
            // Node-local images only: they are the ones read and written with O_DIRECT.
            own_bounce_pages: meta.spec.is_local()
                && meta.spec.parameters.get(crate::params::BOUNCE_PAGES).is_some_and(|v| v == "own"),
        };
        let started = DeviceServer::start(&opts, backend);
        if started.is_err() && claimed && !crate::vduse::sysfs::device_exists(&opts.name) {
            if let Err(e) = self.store.release_device(&opts.name) {
                tracing::warn!(device = %opts.name, error = %e, "cannot remove the record of a device that never came up");
            }
        }
        Ok(started?)
    }

    /// The server of a volume, healthy: a missing or degraded one is replaced first (the
    /// device stays attached and the new server takes it over where the old one stopped).
    /// Whatever writes to the device (umount, fsfreeze, syncfs, a detach's drain) runs only
    /// behind this. The caller holds the volume's guard.
    pub(super) fn served(&self, meta: &VolumeMeta) -> Result<Arc<DeviceServer>> {
        let id = &meta.spec.id;
        let why = match self.servers.get(id) {
            Some(server) => match server.health() {
                HealthState::Serving => return Ok(server),
                HealthState::Degraded(reason) => format!("its device server is degraded: {reason}"),
            },
            None => match self.unserved_reason(id) {
                Some(earlier) => earlier.fault,
                None => "it has no device server".to_owned(),
            },
        };
        if let Some(old) = self.servers.remove(id) {
            // Its threads are joined when the last reference goes, outside the table's lock.
            match into_owned(old, RELEASE_TIMEOUT) {
                Ok(old) => drop(old),
                Err(old) => {
                    self.servers.insert(id, old);
                    return Err(Error::Unavailable(format!("volume {id}: {why}, and its old server is still in use")));
                }
            }
        }
        let server = match self.start_device(meta) {
            Ok(server) => Arc::new(server),
            Err(e) => {
                if meta.staged.is_some() {
                    self.set_unserved(id, Some(NotServed { fault: why, retry_error: e.to_string() }));
                }
                return Err(e);
            }
        };
        self.set_unserved(id, None);
        if meta.staged.is_some() {
            tracing::warn!(volume = %id, device = %server.block_device().display(), "served again: {why}");
        }
        self.servers.insert(id, Arc::clone(&server));
        Ok(server)
    }

    /// Like [`NodeAgent::served`], for an operation on a volume that is staged already: a
    /// volume that cannot be served is UNAVAILABLE (the caller retries; the heal loop keeps
    /// trying meanwhile).
    pub(super) fn served_or_unavailable(&self, meta: &VolumeMeta) -> Result<Arc<DeviceServer>> {
        self.served(meta).map_err(|e| {
            Error::Unavailable(format!(
                "the device of volume {} is not served, and cannot be served again now ({e}); try again later",
                meta.spec.id
            ))
        })
    }

    /// Stops the server of `id` and removes its device. A server that cannot detach keeps
    /// serving and stays in the table.
    pub(super) fn take_down(&self, id: &str) -> Result<()> {
        let Some(server) = self.servers.remove(id) else { return Ok(()) };
        let server = into_owned(server, RELEASE_TIMEOUT).map_err(|server| {
            self.servers.insert(id, server);
            Error::Unavailable(format!("the device server of volume {id} is in use; try again"))
        })?;
        match server.stop() {
            Ok(()) => Ok(self.store.release_device(&device_name(id))?),
            Err(StopError::StillServing(still)) => {
                self.servers.insert(id, Arc::new(*still.server));
                Err(still.error.into())
            }
            Err(StopError::Failed(e)) => Err(e.into()),
        }
    }

    /// Removes a device of this volume that no server of ours serves (a leftover), failing
    /// its pending I/O; never one the state dir records for another volume.
    pub(super) fn remove_leftover_device(&self, id: &str) -> Result<()> {
        let name = device_name(id);
        if !crate::vduse::sysfs::device_exists(&name) {
            return Ok(());
        }
        if self.store.device_owner(&name)?.is_some_and(|owner| owner != id) {
            return Err(Error::FailedPrecondition(format!("device {name} serves another volume; not removing it")));
        }
        crate::server::remove_stale(&name)?;
        Ok(self.store.release_device(&name)?)
    }

    /// The block device of a volume's device as sysfs knows it, served or not.
    pub(super) fn attached_block_device(&self, id: &str) -> Option<PathBuf> {
        self.block_device(id).or_else(|| {
            crate::vduse::sysfs::block_device_name(&device_name(id)).map(|name| PathBuf::from("/dev").join(name))
        })
    }
}

/// A volume's QoS limits, from the parameters kept in its metadata.
pub fn volume_qos(meta: &VolumeMeta) -> std::result::Result<crate::blk::qos::QosLimits, String> {
    crate::blk::qos::QosLimits::from_parameters(meta.spec.parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

#[cfg(test)]
mod tests {
    use super::device_name;

    #[test]
    fn device_names_fit_vduse_limits() {
        assert_eq!(device_name("pvc-1"), "pvc-1");
        let long = "x".repeat(100);
        let name = device_name(&long);
        assert!(name.len() <= 64);
        assert_eq!(name, device_name(&long));
        assert!(crate::vduse::validate_device_name(&name).is_ok());
    }
}
