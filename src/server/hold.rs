//! Holding a device's queues still: no request is taken off a ring and none is in flight
//! while a hold lasts. A snapshot or clone of a block volume copies the image under a hold,
//! so the copy is one point in time, like a crash at that instant (a filesystem volume is
//! frozen instead, which holds its writers one level up).
//!
//! The queue threads check the gate between passes (one atomic load). A hold wakes the ones
//! asleep through an eventfd in their wait set, and waits until each has completed what it
//! had in flight and parked. Queue threads that start during a hold park before their first
//! pass.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::health::{Health, StopSignal};

#[derive(Debug, Default)]
struct Counts {
    /// Queue threads that serve a ring now.
    running: usize,
    /// Of those, the ones parked by the hold.
    parked: usize,
}

/// The gate of one device's queues.
#[derive(Debug)]
pub(super) struct QueueGate {
    held: AtomicBool,
    counts: Mutex<Counts>,
    changed: Condvar,
    /// Readable while held: wakes the queue threads asleep in their wait.
    wake: EventFd,
}

/// Why a hold could not be had.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("the queues are held already")]
    AlreadyHeld,
    #[error("{0} of the device's queue threads did not finish their requests within {1:?}")]
    Timeout(usize, Duration),
    #[error("eventfd: {0}")]
    EventFd(nix::Error),
}

impl QueueGate {
    pub fn new() -> nix::Result<Self> {
        Ok(Self {
            held: AtomicBool::new(false),
            counts: Mutex::new(Counts::default()),
            changed: Condvar::new(),
            wake: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
        })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The eventfd queue threads add to their wait set (level-triggered).
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Whether a hold asks the queues to park (checked between passes).
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// A queue thread starts serving its ring; `Running` says it stopped when dropped.
    pub fn enter(&self) -> Running<'_> {
        self.counts().running += 1;
        Running(self)
    }

    /// Called by a queue thread that saw [`QueueGate::held`] and has nothing in flight: waits
    /// until the hold ends or `stop` is requested.
    pub fn park(&self, stop: &StopSignal) {
        let mut counts = self.counts();
        counts.parked += 1;
        self.changed.notify_all();
        while self.held() && !stop.requested() {
            counts = match self.changed.wait_timeout(counts, Duration::from_millis(50)) {
                Ok((c, _)) => c,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        counts.parked -= 1;
    }

    /// Holds the queues: returns once every running queue thread has parked, or gives up
    /// (and releases them) after `timeout`. Each successful hold must be followed by one
    /// [`QueueGate::release`].
    pub fn hold(&self, timeout: Duration) -> Result<(), HoldError> {
        if self.held.swap(true, Ordering::AcqRel) {
            return Err(HoldError::AlreadyHeld);
        }
        // Never read while held, so the threads' level-triggered wait keeps waking.
        if let Err(e) = self.wake.write(1) {
            self.release();
            return Err(HoldError::EventFd(e));
        }
        let deadline = Instant::now() + timeout;
        let mut counts = self.counts();
        while counts.parked < counts.running {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let stuck = counts.running - counts.parked;
                drop(counts);
                self.release();
                return Err(HoldError::Timeout(stuck, timeout));
            }
            counts = match self.changed.wait_timeout(counts, left) {
                Ok((c, _)) => c,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        Ok(())
    }

    /// Ends a hold: the parked queue threads run again.
    pub fn release(&self) {
        // Reset the eventfd first: a thread that wakes must not find it readable again.
        let _ = self.wake.read();
        self.held.store(false, Ordering::Release);
        let _counts = self.counts();
        self.changed.notify_all();
    }
}

/// A queue thread that serves its ring; dropped when it stops.
pub(super) struct Running<'a>(&'a QueueGate);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut counts = self.0.counts();
        counts.running -= 1;
        self.0.changed.notify_all();
    }
}

/// A device's queues are held until this is dropped.
#[must_use = "the queues run again as soon as the hold is dropped"]
pub struct Hold(pub(super) Arc<Health>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.gate.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_waits_for_every_running_queue_to_park() {
        let gate = Arc::new(QueueGate::new().expect("gate"));
        let stop = Arc::new(StopSignal::new().expect("stop"));
        let (parked_tx, parked_rx) = std::sync::mpsc::channel();
        let queue = {
            let (gate, stop) = (Arc::clone(&gate), Arc::clone(&stop));
            std::thread::spawn(move || {
                let _running = gate.enter();
                let mut passes = 0u64;
                while !stop.requested() {
                    if gate.held() {
                        parked_tx.send(passes).expect("send");
                        gate.park(&stop);
                    }
                    passes += 1;
                    std::thread::yield_now();
                }
            })
        };
        gate.hold(Duration::from_secs(10)).expect("hold");
        let at = parked_rx.recv().expect("parked");
        assert!(matches!(gate.hold(Duration::from_secs(1)), Err(HoldError::AlreadyHeld)));
        std::thread::sleep(Duration::from_millis(100));
        assert!(parked_rx.try_recv().is_err(), "the queue ran during the hold (parked at pass {at})");
        gate.release();
        gate.hold(Duration::from_secs(10)).expect("a second hold after the first ended");
        gate.release();
        stop.request();
        queue.join().expect("queue thread");
        // Nothing runs now: a hold is immediate.
        gate.hold(Duration::from_millis(1)).expect("no running queue");
        gate.release();
    }

    #[test]
    fn a_queue_that_never_parks_times_the_hold_out() {
        let gate = QueueGate::new().expect("gate");
        let _running = gate.enter();
        let err = gate.hold(Duration::from_millis(50)).expect_err("timeout");
        assert!(matches!(err, HoldError::Timeout(1, _)), "{err}");
        assert!(!gate.held(), "released after the timeout");
    }
}
