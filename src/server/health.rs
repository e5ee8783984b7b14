//! Whether a device server still serves its device: a queue or control thread that stops on
//! a fault says so here instead of vanishing, and whoever owns the server (`device serve`,
//! the CSI node service) reads it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::hold::QueueGate;
use crate::blk::FlushFailure;

/// The state a device server reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthState {
    /// Every thread that should run is running.
    Serving,
    /// Something stopped; the reason says what. I/O on the affected queues waits until a new
    /// server takes the device over (or the device is removed).
    Degraded(String),
}

/// Shared by a server's threads. The first fault's reason is kept: later ones are usually
/// its consequences. Beside the threads' state it carries the device's sticky flush failure
/// and the gate that holds its queues.
#[derive(Debug)]
pub struct Health {
    reason: Mutex<Option<String>>,
    pub(super) flush_failure: Arc<FlushFailure>,
    pub(super) gate: QueueGate,
}

impl Health {
    pub(super) fn new() -> nix::Result<Self> {
        Ok(Self { reason: Mutex::new(None), flush_failure: Arc::default(), gate: QueueGate::new()? })
    }

    /// Why the device's writes may have been lost (a flush failed), if they may.
    pub fn flush_failure(&self) -> Option<String> {
        self.flush_failure.get()
    }

    /// The current state.
    pub fn state(&self) -> HealthState {
        match self.reason.lock().map(|r| r.clone()) {
            Ok(None) => HealthState::Serving,
            Ok(Some(reason)) => HealthState::Degraded(reason),
            Err(_) => HealthState::Degraded("a server thread panicked".into()),
        }
    }

    /// Records a fault.
    pub(super) fn degrade(&self, reason: String) {
        if let Ok(mut r) = self.reason.lock() {
            if r.is_none() {
                tracing::error!(%reason, "device server degraded");
                *r = Some(reason);
            }
        }
    }
}

/// Tells a set of threads to stop: a flag they check between passes (cheap under load) and an
/// eventfd that stays readable for the ones asleep in `poll`.
#[derive(Debug)]
pub(super) struct StopSignal {
    requested: AtomicBool,
    fd: EventFd,
}

impl StopSignal {
    pub fn new() -> nix::Result<Self> {
        Ok(Self {
            requested: AtomicBool::new(false),
            fd: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
        })
    }

    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
        // Never read back, so it wakes every poller; EAGAIN only if the counter is saturated.
        let _ = self.fd.write(1);
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    pub fn fd(&self) -> &EventFd {
        &self.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_fault_is_kept() {
        let h = Health::new().expect("health");
        assert_eq!(h.state(), HealthState::Serving);
        h.degrade("queue 1 stopped: ring fault".into());
        h.degrade("consequence".into());
        assert_eq!(h.state(), HealthState::Degraded("queue 1 stopped: ring fault".into()));
    }
}
