//! One VDUSE device serving one backend: create (or recover) → control-message thread →
//! attach → per-queue workers at DRIVER_OK → detach → destroy.

mod control_loop;
mod health;
mod hold;
mod queue_thread;
mod stale;
mod stop;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::backend::Backend;
use crate::blk::qos::{QosLimits, Throttle};
use crate::blk::stats::DeviceStats;
use crate::blk::{DeviceLimits, config};
use crate::vduse::{self, VduseControl, VduseDevice, control::DeviceConfig, netlink, sysfs};

use control_loop::{ControlLoop, DeviceShape};
pub use health::{Health, HealthState};
pub use hold::{Hold, HoldError};
pub use stale::remove_stale;
pub use stop::{StillServing, StopError};

/// How long a queue thread polls for more work after its last request, by default.
pub const DEFAULT_POLL: Duration = Duration::from_micros(50);

/// Queues a device gets by default: one per CPU, at most four. virtio_blk maps its blk-mq
/// hardware queues onto them, so requests from different CPUs stop contending for one ring.
pub fn default_queues() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.clamp(1, 4) as u16
}

/// How long to wait for `/dev/vdX` after attach returned.
const BLOCK_DEVICE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the device server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel interface failed.
    #[error(transparent)]
    Vduse(#[from] vduse::Error),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] crate::backend::Error),
    /// A device option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// No VDUSE device of that name exists.
    #[error("no VDUSE device named {0:?}")]
    NoDevice(String),
    /// The server was already stopped.
    #[error("device {0:?} is not being served")]
    Stopped(String),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(nix::Error),
    /// The queues could not be held still.
    #[error("cannot hold the queues of {0}: {1}")]
    Hold(String, HoldError),
    /// A flush failed earlier: completed writes may be lost.
    #[error("a flush of device {0} failed ({1}): writes it acknowledged may be lost")]
    FlushFailed(String, String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What device to serve.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// VDUSE, vdpa and GET_ID name.
    pub name: String,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Seconds the kernel waits for a control-message answer; 0 = forever.
    pub msg_timeout: u32,
    /// Longest time a queue thread polls for more work after its last request before it
    /// sleeps until a kick; zero never polls.
    pub poll: Duration,
    /// Whether the queues count requests for the metrics endpoint.
    pub counters: bool,
    /// QoS limits enforced in the datapath.
    pub qos: QosLimits,
    /// Leaves each queue's interrupt moving over its CPU mask, as VDUSE does by itself,
    /// instead of binding it to one CPU of that mask (see `sysfs::bind_vq_irq`).
    pub rotate_irqs: bool,
    /// Registers memory of ours, on huge pages, as the bounce pages instead of the kernel's
    /// (`crate::vduse::umem`). It pins the whole bounce region for as long as the device
    /// is served, so the region is smaller then ([`DeviceOptions::bounce_size`]).
    pub own_bounce_pages: bool,
}

impl DeviceOptions {
    /// Checks the options without touching the host.
    pub fn validate(&self) -> Result<()> {
        vduse::validate_device_name(&self.name)?;
        if self.num_queues == 0 || self.num_queues > 64 {
            return Err(Error::InvalidOption(format!("queues must be 1..=64, not {}", self.num_queues)));
        }
        if !self.queue_size.is_power_of_two() || !(4..=1024).contains(&self.queue_size) {
            return Err(Error::InvalidOption(format!(
                "queue size must be a power of two in 4..=1024, not {}",
                self.queue_size
            )));
        }
        if self.poll > Duration::from_millis(10) {
            return Err(Error::InvalidOption(format!("poll time must be at most 10 ms, not {:?}", self.poll)));
        }
        Ok(())
    }

    /// Size of the bounce region. With the kernel's pages, every request the queues can
    /// hold, each as large as the host sends them, fits at once: the kernel allocates its
    /// pages only as they are used, so room costs nothing until it is needed. A request that
    /// finds no room is not failed: virtio_blk answers BLK_STS_RESOURCE and the block layer
    /// sends it again a moment later, a throughput cliff. Our own pages are pinned as a
    /// whole, so they get [`OWN_BOUNCE_PER_QUEUE`] per queue: room for 32 requests of 1 MiB
    /// in flight on each, or a full ring of small ones. Clamped to what the kernel accepts.
    pub fn bounce_size(&self) -> u64 {
        // Pages per request: the data at the host's largest request size, plus a header, a
        // status byte and an indirect table, each of which takes a page of its own.
        let pages = config::MAX_REQUEST_BYTES.div_ceil(4096) + 3;
        let full_rings = u64::from(self.num_queues) * u64::from(self.queue_size) * pages * 4096;
        let want = if self.own_bounce_pages {
            full_rings.min(u64::from(self.num_queues) * OWN_BOUNCE_PER_QUEUE)
        } else {
            full_rings
        };
        want.clamp(MIN_BOUNCE_SIZE, MAX_BOUNCE_SIZE)
    }
}

/// Bounce room per queue when the pages are ours (pinned for as long as the device is served).
/// 1 MiB requests at QD8 need 8 MiB of it, 4 KiB requests 16 KiB each.
const OWN_BOUNCE_PER_QUEUE: u64 = 32 << 20;

/// The kernel's default bounce region, also our floor.
const MIN_BOUNCE_SIZE: u64 = 64 << 20;
/// The largest bounce region VDUSE accepts.
const MAX_BOUNCE_SIZE: u64 = 1 << 30;

/// A running device. Stop it with [`DeviceServer::stop`]; dropping it leaves the device
/// attached but unserved, exactly like a crash, so the next server can recover it.
pub struct DeviceServer {
    name: String,
    block_device: PathBuf,
    backend: Arc<dyn Backend>,
    /// Our handle on the device node; `None` once closed for destruction.
    dev: Option<Arc<VduseDevice>>,
    stop: Arc<EventFd>,
    control: Option<JoinHandle<()>>,
    recovered: bool,
    /// Set once the vdpa device is deleted.
    detached: AtomicBool,
    health: Arc<Health>,
    stats: Option<Arc<DeviceStats>>,
}

impl DeviceServer {
    /// Brings the device up and returns once `/dev/vdX` exists. A device of the same name left
    /// attached by a server that died is taken over and served again; one left detached is
    /// destroyed and created afresh.
    pub fn start(opts: &DeviceOptions, backend: Arc<dyn Backend>) -> Result<Self> {
        opts.validate()?;
        let control = VduseControl::open()?;
        let shape = DeviceShape {
            name: opts.name.clone(),
            offered_features: config::device_features(opts.num_queues, backend.read_only()),
            num_queues: opts.num_queues,
            queue_size: opts.queue_size,
            limits: limits(&opts.name, opts.queue_size, backend.as_ref()),
            poll: opts.poll,
            rotate_irqs: opts.rotate_irqs,
            user_bounce: opts.own_bounce_pages.then(|| Arc::new(vduse::UserBounce::new())),
            stats: opts.counters.then(|| Arc::new(DeviceStats::new(opts.num_queues))),
            throttle: Throttle::new(&opts.qos).map(Arc::new),
        };
        let stats = shape.stats.clone();
        let cfg = DeviceConfig {
            name: opts.name.clone(),
            device_id: config::VIRTIO_ID_BLOCK,
            features: shape.offered_features,
            num_queues: u32::from(opts.num_queues),
            config: config::config_space(backend.capacity(), opts.num_queues, opts.queue_size).to_vec(),
        };
        let health = Arc::new(Health::new().map_err(Error::EventFd)?);

        let recovered = match control.create(&cfg) {
            Ok(()) => false,
            Err(vduse::Error::Exists(_)) if sysfs::is_attached(&opts.name) => {
                tracing::warn!(device = %opts.name, "device exists and is attached: taking it over");
                true
            }
            Err(vduse::Error::Exists(_)) => {
                tracing::warn!(device = %opts.name, "stale detached device: destroying and recreating it");
                control.destroy(&opts.name)?;
                control.create(&cfg)?;
                false
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(stats) = stats.as_ref().filter(|_| recovered) {
            stats.takeovers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let started = Self::start_serving(opts, &backend, shape, recovered, &health);
        let (dev, stop, control_thread) = match started {
            Ok(parts) => parts,
            Err(e) => {
                // Everything that held the device fd is gone by now; a device we created
                // must not outlive the failure.
                if !recovered {
                    let _ = control.destroy(&opts.name);
                }
                return Err(e);
            }
        };

        let mut server = Self {
            name: opts.name.clone(),
            block_device: PathBuf::new(),
            backend,
            dev: Some(dev),
            stop,
            control: Some(control_thread),
            recovered,
            detached: AtomicBool::new(false),
            health,
            stats,
        };
        if !recovered {
            if let Err(e) = netlink::dev_add(&opts.name) {
                server.shutdown_threads();
                server.dev = None;
                let _ = control.destroy(&opts.name);
                return Err(e.into());
            }
        }
        match sysfs::wait_for_block_device(&opts.name, BLOCK_DEVICE_TIMEOUT) {
            Ok(path) => server.block_device = path,
            Err(e) => {
                if let Err(teardown) = server.teardown() {
                    tracing::error!(device = %opts.name, error = %teardown, "cannot take the device down again");
                }
                return Err(e.into());
            }
        }
        tracing::info!(device = %server.name, block = %server.block_device.display(), recovered, "device up");
        Ok(server)
    }

    /// Opens the device and starts its control-message thread (and, for a device taken
    /// over, its queue workers).
    fn start_serving(
        opts: &DeviceOptions,
        backend: &Arc<dyn Backend>,
        shape: DeviceShape,
        recovered: bool,
        health: &Arc<Health>,
    ) -> Result<(Arc<VduseDevice>, Arc<EventFd>, JoinHandle<()>)> {
        // Raise the message timeout before anything can send a message: a slow moment must
        // not mark the device broken for good.
        sysfs::set_msg_timeout(&opts.name, opts.msg_timeout)?;
        if !recovered {
            // Only possible before the first attach; a device taken over keeps its size.
            let bytes = opts.bounce_size();
            match sysfs::set_bounce_size(&opts.name, bytes) {
                Ok(()) => tracing::debug!(device = %opts.name, bytes, "bounce region sized"),
                // Kernels before 6.4 have a fixed 64 MiB region.
                Err(e) => tracing::warn!(device = %opts.name, error = %e, "cannot size the bounce region"),
            }
        }
        let dev = Arc::new(VduseDevice::open(&opts.name)?);
        let stop =
            Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(Error::EventFd)?);
        let mut control_loop = ControlLoop::new(Arc::clone(&dev), Arc::clone(backend), shape, Arc::clone(health));
        control_loop.setup_queues()?;
        if recovered {
            control_loop.recover()?;
            // The image may have grown while nobody served the device.
            update_capacity(&dev, backend.capacity())?;
        }
        let stop_thread = Arc::clone(&stop);
        let control_thread = std::thread::Builder::new()
            .name(format!("vduse-ctl-{}", opts.name))
            .spawn(move || control_loop.run(&stop_thread))
            .map_err(Error::Thread)?;
        Ok((dev, stop, control_thread))
    }

    /// The host block device (`/dev/vdX`).
    pub fn block_device(&self) -> &Path {
        &self.block_device
    }

    /// Whether every thread of the server still runs.
    pub fn health(&self) -> HealthState {
        self.health.state()
    }

    /// The device's counters, if it counts.
    pub fn stats(&self) -> Option<&Arc<DeviceStats>> {
        self.stats.as_ref()
    }

    /// Whether this server took over a device left by a previous one.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// Grows the backend to `bytes` and tells the driver, which picks up the new capacity
    /// online (a config interrupt).
    pub fn resize(&self, bytes: u64) -> Result<()> {
        let dev = self.dev.as_ref().ok_or_else(|| Error::Stopped(self.name.clone()))?;
        self.backend.grow(bytes)?;
        update_capacity(dev, self.backend.capacity())
    }

    /// Makes every completed write durable. Fails for good once any flush of this device
    /// failed (see [`crate::blk::FlushFailure`]).
    pub fn flush(&self) -> Result<()> {
        self.check_flushes()?;
        if let Err(e) = self.backend.flush() {
            self.health.flush_failure.record(e.to_string());
            return Err(e.into());
        }
        Ok(())
    }

    /// Why writes of this device may have been lost (a flush failed), if they may.
    pub fn flush_failure(&self) -> Option<String> {
        self.health.flush_failure()
    }

    /// Fails if a flush of this device ever failed.
    pub fn check_flushes(&self) -> Result<()> {
        match self.health.flush_failure() {
            Some(why) => Err(Error::FlushFailed(self.name.clone(), why)),
            None => Ok(()),
        }
    }

    /// Holds the queues still: nothing is taken off a ring or in flight, and every completed
    /// write is flushed, until the hold is dropped. Gives up after `timeout` (a backend whose
    /// requests never complete).
    pub fn hold(&self, timeout: Duration) -> Result<Hold> {
        self.health.gate.hold(timeout).map_err(|e| Error::Hold(self.name.clone(), e))?;
        let hold = Hold(Arc::clone(&self.health));
        self.flush()?;
        Ok(hold)
    }

    /// Detaches (the kernel drains outstanding I/O through us first), makes every completed
    /// write durable, and destroys the device. If the device cannot be detached, it stays
    /// attached and this server keeps serving it: the server comes back in the error.
    pub fn stop(mut self) -> std::result::Result<(), StopError> {
        if let Err(error) = self.detach() {
            tracing::error!(device = %self.name, error = %error, "detach failed; still serving the device");
            return Err(StopError::StillServing(StillServing { server: Box::new(self), error }));
        }
        Ok(self.teardown()?)
    }

    /// Detaches the device from the host (the kernel drains outstanding I/O through us
    /// first). On failure the device stays attached and this server keeps serving it, so the
    /// caller can keep it and try again rather than strand the host's I/O.
    pub fn detach(&self) -> Result<()> {
        if !self.detached.load(Ordering::Acquire) {
            netlink::dev_del(&self.name)?;
            self.detached.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn teardown(&mut self) -> Result<()> {
        let detach = self.detach();
        if let Err(e) = &detach {
            tracing::error!(device = %self.name, error = %e, "detach failed");
        }
        let flushed = self.flush();
        self.shutdown_threads();
        // Closing our fd is required before DESTROY (EBUSY while open); the threads that held
        // clones of it have been joined.
        self.dev = None;
        let control = VduseControl::open()?;
        let mut destroyed = false;
        for _ in 0..50 {
            match control.destroy(&self.name) {
                Ok(_) => {
                    destroyed = true;
                    break;
                }
                Err(vduse::Error::Ioctl { source: nix::errno::Errno::EBUSY, .. }) => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        }
        detach?;
        flushed?;
        if !destroyed {
            return Err(vduse::Error::Ioctl { op: "VDUSE_DESTROY_DEV", source: nix::errno::Errno::EBUSY }.into());
        }
        tracing::info!(device = %self.name, "device destroyed");
        Ok(())
    }

    fn shutdown_threads(&mut self) {
        let _ = self.stop.write(1);
        if let Some(handle) = self.control.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        self.shutdown_threads();
    }
}

pub(crate) fn limits(name: &str, queue_size: u16, backend: &dyn Backend) -> DeviceLimits {
    let mut serial = [0u8; crate::blk::request::ID_BYTES];
    let n = name.len().min(serial.len());
    serial[..n].copy_from_slice(&name.as_bytes()[..n]);
    DeviceLimits {
        capacity_sectors: backend.capacity() / 512,
        read_only: backend.read_only(),
        // Linux uses at most seg_max + 2 descriptors (header and status).
        max_descriptors: config::seg_max(queue_size) as usize + 2,
        // Far above what the host sends by default (an operator may raise max_sectors_kb).
        max_request_bytes: 256 << 20,
        max_discard_sectors: config::MAX_DISCARD_SECTORS,
        serial,
    }
}

fn update_capacity(dev: &VduseDevice, capacity: u64) -> Result<()> {
    // One SET_CONFIG for all 8 bytes, then the interrupt (VDUSE.md §7).
    dev.set_config(config::CAPACITY_OFFSET, &(capacity / 512).to_le_bytes())?;
    match dev.inject_config_irq() {
        Ok(()) => Ok(()),
        // EINVAL before DRIVER_OK: the driver reads the new value when it probes.
        Err(vduse::Error::Ioctl { source: nix::errno::Errno::EINVAL, .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(num_queues: u16, queue_size: u16) -> DeviceOptions {
        DeviceOptions {
            name: "t".into(),
            num_queues,
            queue_size,
            msg_timeout: 0,
            poll: DEFAULT_POLL,
            counters: false,
            qos: QosLimits::default(),
            rotate_irqs: false,
            own_bounce_pages: false,
        }
    }

    #[test]
    fn bounce_region_fits_full_rings_of_the_largest_requests_within_kernel_limits() {
        // One queue of 256: 256 requests x (320 data pages + 3) pages.
        assert_eq!(opts(1, 256).bounce_size(), 256 * 323 * 4096);
        assert_eq!(opts(1, 4).bounce_size(), 64 << 20, "never below the kernel default");
        assert_eq!(opts(16, 1024).bounce_size(), 1 << 30, "never above the kernel maximum");
    }

    #[test]
    fn own_bounce_pages_get_a_budget_per_queue() {
        let own = |queues, size| DeviceOptions { own_bounce_pages: true, ..opts(queues, size) };
        assert_eq!(own(2, 256).bounce_size(), 64 << 20, "the kernel default is the floor");
        assert_eq!(own(4, 256).bounce_size(), 4 * (32 << 20));
        assert_eq!(own(64, 256).bounce_size(), 1 << 30, "never above the kernel maximum");
        assert_eq!(own(4, 4).bounce_size(), 64 << 20, "full rings of tiny queues fit in the floor");
    }

    #[test]
    fn options_are_checked_before_touching_the_host() {
        assert!(opts(2, 256).validate().is_ok());
        assert!(opts(0, 256).validate().is_err());
        assert!(opts(2, 100).validate().is_err());
        let mut o = opts(2, 256);
        o.poll = Duration::from_secs(1);
        assert!(o.validate().is_err());
    }
}
