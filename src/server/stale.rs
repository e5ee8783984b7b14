//! Removing a device that no server serves (`device remove`, and a node agent's leftover):
//! taken over with a backend that fails every request, so the kernel's drain and reset
//! complete, then detached and destroyed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::control_loop::{ControlLoop, DeviceShape};
use super::{DeviceServer, Error, Health, Result, limits};
use crate::backend::Backend;
use crate::vduse::{self, VduseControl, VduseDevice, sysfs};

/// Removes a device no server is serving: takes it over with a backend that fails all I/O, so
/// the kernel's drain and reset complete, then detaches and destroys it.
pub fn remove_stale(name: &str) -> Result<()> {
    vduse::validate_device_name(name)?;
    if !sysfs::device_exists(name) {
        return Err(Error::NoDevice(name.to_owned()));
    }
    let control = VduseControl::open()?;
    if !sysfs::is_attached(name) {
        control.destroy(name)?;
        return Ok(());
    }
    let backend: Arc<dyn Backend> = Arc::new(crate::backend::NullBackend::fenced(0));
    let dev = Arc::new(VduseDevice::open(name)?);
    let shape = DeviceShape {
        name: name.to_owned(),
        offered_features: u64::MAX,
        num_queues: 0,
        queue_size: 0,
        limits: limits(name, 1024, backend.as_ref()),
        poll: Duration::ZERO,
        // A fenced device that only fails requests until it is removed: not worth a binding.
        rotate_irqs: true,
        user_bounce: None,
        stats: None,
        throttle: None,
    };
    let stop = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(Error::EventFd)?);
    let health = Arc::new(Health::new().map_err(Error::EventFd)?);
    let mut control_loop = ControlLoop::new(Arc::clone(&dev), Arc::clone(&backend), shape, Arc::clone(&health));
    control_loop.recover()?;
    let stop_thread = Arc::clone(&stop);
    let handle = std::thread::Builder::new()
        .name(format!("vduse-rm-{name}"))
        .spawn(move || control_loop.run(&stop_thread))
        .map_err(Error::Thread)?;
    let mut server = DeviceServer::from_parts(name, backend, dev, stop, handle, health);
    server.teardown()
}

impl DeviceServer {
    fn from_parts(
        name: &str,
        backend: Arc<dyn Backend>,
        dev: Arc<VduseDevice>,
        stop: Arc<EventFd>,
        control: JoinHandle<()>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            block_device: PathBuf::new(),
            backend,
            dev: Some(dev),
            stop,
            control: Some(control),
            recovered: true,
            detached: AtomicBool::new(false),
            health,
            stats: None,
        }
    }
}
