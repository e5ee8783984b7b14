//! The control-message thread: answers the kernel's messages on the device fd and starts and
//! stops the queue workers as the driver sets DRIVER_OK or resets the device.

use crate::blk::qos::Throttle;
use crate::blk::stats::DeviceStats;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};

use super::health::{Health, StopSignal};
use super::queue_thread::{self, QueueStart};
use super::{Error, Result};
use crate::backend::Backend;
use crate::blk::{DeviceLimits, config};
use crate::vduse::uapi::{
    VDUSE_GET_VQ_STATE, VDUSE_REQ_RESULT_FAILED, VDUSE_REQ_RESULT_OK, VDUSE_SET_STATUS, VDUSE_UPDATE_IOTLB,
    vduse_dev_request, vduse_dev_response,
};
use crate::vduse::{UserBounce, VduseDevice, sysfs};

/// Upper bound on queues probed when taking over a device of unknown shape.
const MAX_QUEUES: u32 = 64;

/// What the device was created as.
#[derive(Debug, Clone)]
pub(super) struct DeviceShape {
    pub name: String,
    pub offered_features: u64,
    pub num_queues: u16,
    pub queue_size: u16,
    pub limits: DeviceLimits,
    /// Polling ceiling of the queue threads.
    pub poll: Duration,
    /// Whether the queues' interrupts are left to VDUSE's rotation over their CPU masks.
    pub rotate_irqs: bool,
    /// Our bounce pages for this device fd, when they replace the kernel's.
    pub user_bounce: Option<Arc<UserBounce>>,
    /// Where the queues count, if they do.
    pub stats: Option<Arc<DeviceStats>>,
    /// The device's QoS limits, if it has any.
    pub throttle: Option<Arc<Throttle>>,
}

/// Running queue workers of one DRIVER_OK period. Dropping it stops and joins them, so no
/// error path can leave a worker touching rings the driver may reallocate.
struct Datapath {
    stop: Arc<StopSignal>,
    workers: Vec<JoinHandle<()>>,
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.stop.request();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

pub(super) struct ControlLoop {
    dev: Arc<VduseDevice>,
    backend: Arc<dyn Backend>,
    shape: DeviceShape,
    health: Arc<Health>,
    status: u8,
    features: u64,
    datapath: Option<Datapath>,
    /// Per queue: the next available index the worker will consume (for GET_VQ_STATE).
    progress: Vec<Arc<AtomicU16>>,
}

impl ControlLoop {
    pub fn new(dev: Arc<VduseDevice>, backend: Arc<dyn Backend>, shape: DeviceShape, health: Arc<Health>) -> Self {
        Self { dev, backend, shape, health, status: 0, features: 0, datapath: None, progress: Vec::new() }
    }

    /// `VDUSE_VQ_SETUP` for every queue; attach fails with EINVAL if any has size 0.
    pub fn setup_queues(&self) -> Result<()> {
        for index in 0..u32::from(self.shape.num_queues) {
            self.dev.vq_setup(index, self.shape.queue_size)?;
        }
        Ok(())
    }

    /// Takes over a device whose driver is already running (a previous server died): no
    /// SET_STATUS will come, so start the workers now from the rings' used indexes.
    pub fn recover(&mut self) -> Result<()> {
        self.features = self.dev.driver_features()?;
        self.status = (VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK) as u8;
        self.start_datapath(true)
    }

    /// Serves control messages until `stop` is signalled, then stops the workers.
    pub fn run(mut self, stop: &EventFd) {
        loop {
            let mut fds =
                [PollFd::new(self.dev.as_fd(), PollFlags::POLLIN), PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    self.health.degrade(format!("control loop: poll failed: {e}"));
                    break;
                }
            }
            let dev_events = fds[0].revents().unwrap_or(PollFlags::empty());
            if fds[1].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) {
                break;
            }
            if dev_events.contains(PollFlags::POLLERR) {
                self.health.degrade(
                    "the kernel marked the device broken (a control message timed out); it must be removed".into(),
                );
                break;
            }
            loop {
                match self.dev.read_request() {
                    Ok(Some(req)) => {
                        let resp = self.handle(&req);
                        if let Err(e) = self.dev.write_response(&resp) {
                            tracing::error!(device = %self.shape.name, error = %e, "cannot answer a control message");
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // Not EAGAIN: the fd is unusable; polling it again would spin.
                        self.health.degrade(format!("cannot read a control message: {e}"));
                        self.stop_datapath();
                        return;
                    }
                }
            }
        }
        self.stop_datapath();
    }

    fn handle(&mut self, req: &vduse_dev_request) -> vduse_dev_response {
        let ok = vduse_dev_response::new(req.request_id, VDUSE_REQ_RESULT_OK);
        let failed = vduse_dev_response::new(req.request_id, VDUSE_REQ_RESULT_FAILED);
        match req.type_ {
            VDUSE_SET_STATUS => {
                if self.set_status(req.status()) {
                    ok
                } else {
                    failed
                }
            }
            VDUSE_GET_VQ_STATE => {
                let index = req.vq_index();
                match self.progress.get(index as usize) {
                    Some(p) => {
                        let mut resp = ok;
                        resp.set_vq_state(index, p.load(Ordering::Acquire));
                        resp
                    }
                    None => failed,
                }
            }
            VDUSE_UPDATE_IOTLB => {
                // Mappings changed under the workers: restart them so they map afresh. Only
                // vhost-vdpa sends this; the virtio_vdpa path never does.
                let (start, last) = req.iova_range();
                tracing::info!(device = %self.shape.name, start, last, "IOTLB update: remapping");
                if self.datapath.is_some() {
                    self.stop_datapath();
                    if let Err(e) = self.start_datapath(true) {
                        self.health.degrade(format!("cannot restart the datapath: {e}"));
                        return failed;
                    }
                }
                ok
            }
            other => {
                tracing::warn!(device = %self.shape.name, message = other, "unknown control message");
                failed
            }
        }
    }

    /// Applies a new status byte; returns false to refuse it.
    fn set_status(&mut self, status: u8) -> bool {
        tracing::debug!(device = %self.shape.name, status, "SET_STATUS");
        if status == 0 {
            // Reset: stop touching the rings and drop every mapping before we answer; the
            // kernel clears the queues right after our reply.
            self.stop_datapath();
            self.status = 0;
            self.features = 0;
            return true;
        }
        let newly = status & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK as u8 != 0 {
            match self.dev.driver_features() {
                Ok(f) if config::features_acceptable(self.shape.offered_features, f) => self.features = f,
                Ok(f) => {
                    tracing::error!(device = %self.shape.name, features = f, "driver accepted unusable features");
                    return false;
                }
                Err(e) => {
                    tracing::error!(device = %self.shape.name, error = %e, "cannot read driver features");
                    return false;
                }
            }
        }
        if newly & VIRTIO_CONFIG_S_DRIVER_OK as u8 != 0 {
            if let Err(e) = self.start_datapath(false) {
                self.health.degrade(format!("cannot start the datapath: {e}"));
                return false;
            }
        }
        self.status = status;
        true
    }

    fn start_datapath(&mut self, recover: bool) -> Result<()> {
        self.stop_datapath();
        let stop = Arc::new(StopSignal::new().map_err(Error::EventFd)?);
        let mut datapath = Datapath { stop: Arc::clone(&stop), workers: Vec::new() };
        self.progress.clear();
        for index in 0..MAX_QUEUES {
            let info = match self.dev.vq_info(index) {
                Ok(info) => info,
                // EINVAL: past the last queue.
                Err(crate::vduse::Error::Ioctl { source: nix::errno::Errno::EINVAL, .. }) => break,
                Err(e) => return Err(e.into()),
            };
            let progress = Arc::new(AtomicU16::new(info.avail_index));
            self.progress.push(Arc::clone(&progress));
            if info.ready == 0 {
                // virtio_blk uses min(queues, CPUs) queues; the rest stay unready.
                continue;
            }
            let kick = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(Error::EventFd)?;
            self.dev.set_kickfd(index, Some(kick.as_fd()))?;
            if !self.shape.rotate_irqs {
                self.bind_irq(index);
            }
            let start = QueueStart {
                dev: Arc::clone(&self.dev),
                index,
                info,
                event_idx: config::event_idx(self.features),
                backend: Arc::clone(&self.backend),
                limits: self.shape.limits.clone(),
                kick,
                stop: Arc::clone(&stop),
                recover,
                progress,
                poll: self.shape.poll,
                stats: self.shape.stats.clone(),
                throttle: self.shape.throttle.clone(),
                user_bounce: self.shape.user_bounce.clone(),
                health: Arc::clone(&self.health),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vduse-q{index}-{}", self.shape.name))
                .spawn(move || queue_thread::run(start))
                .map_err(Error::Thread)?;
            datapath.workers.push(handle);
        }
        tracing::info!(device = %self.shape.name, workers = datapath.workers.len(), recover, "datapath started");
        self.datapath = Some(datapath);
        Ok(())
    }

    /// Binds queue `index`'s interrupt to one CPU of its mask. virtio_vdpa sets the masks
    /// before DRIVER_OK, and again at every probe, which also restarts the datapath, so the
    /// binding holds for as long as these queues run. A kernel without the attribute (before
    /// 6.4) or a refused write leaves the kernel's rotation, which is slower, not wrong.
    fn bind_irq(&self, index: u32) {
        let seed = name_seed(&self.shape.name);
        match sysfs::bind_vq_irq(&self.shape.name, index, seed) {
            Ok(Some(cpu)) => tracing::debug!(device = %self.shape.name, queue = index, cpu, "interrupt bound"),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(device = %self.shape.name, queue = index, error = %e, "interrupt left rotating")
            }
        }
    }

    fn stop_datapath(&mut self) {
        if let Some(datapath) = self.datapath.take() {
            drop(datapath);
            tracing::info!(device = %self.shape.name, "datapath stopped");
        }
    }
}

/// A number that depends only on the device's name (FNV-1a), so each device binds its
/// interrupts to the same CPUs at every start, and different devices to different ones.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}
