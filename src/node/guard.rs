//! Per-volume operation guard: a second concurrent operation on the same volume is refused
//! (the CSI layer answers ABORTED, as the spec asks) instead of racing the first. Every
//! operation on a volume, the heal loop's included, holds its guard for as long as it runs.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Another operation holds the guard of this volume (or snapshot key).
#[derive(Debug, thiserror::Error)]
#[error("an operation on volume {0} is already in progress")]
pub struct Busy(pub String);

impl From<Busy> for crate::status::Error {
    fn from(e: Busy) -> Self {
        crate::status::Error::Aborted(e.0)
    }
}

#[derive(Debug, Default, Clone)]
pub struct VolumeGuards {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs on a volume; releases it on drop.
#[derive(Debug)]
pub struct VolumeGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    id: String,
}

/// The set of busy keys. Each change is one insert or remove, so a poisoned lock still holds
/// a consistent set.
fn lock(busy: &Mutex<HashSet<String>>) -> MutexGuard<'_, HashSet<String>> {
    busy.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VolumeGuards {
    /// Takes the guard of `id`, or fails if an operation holds it.
    pub fn acquire(&self, id: &str) -> Result<VolumeGuard, Busy> {
        if !lock(&self.busy).insert(id.to_owned()) {
            return Err(Busy(id.to_owned()));
        }
        Ok(VolumeGuard { busy: Arc::clone(&self.busy), id: id.to_owned() })
    }

    /// Takes the guard of `id`, waiting up to `wait` for the operation that holds it: for a
    /// short step that many operations share (the protection of a snapshot being cloned),
    /// where a refusal would only make the caller retry. Blocks the calling thread.
    pub fn acquire_within(&self, id: &str, wait: Duration) -> Result<VolumeGuard, Busy> {
        let deadline = Instant::now() + wait;
        loop {
            match self.acquire(id) {
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                other => return other,
            }
        }
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        lock(&self.busy).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_is_refused_until_the_first_ends() {
        let guards = VolumeGuards::default();
        let first = guards.acquire("v").expect("first");
        assert!(guards.acquire("v").is_err());
        assert!(guards.acquire("w").is_ok());
        drop(first);
        assert!(guards.acquire("v").is_ok());
    }

    #[test]
    fn a_waiting_acquire_gets_the_guard_once_it_is_released() {
        let guards = VolumeGuards::default();
        let held = guards.acquire("snap").expect("first");
        assert!(guards.acquire_within("snap", Duration::from_millis(50)).is_err(), "still held");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        let started = Instant::now();
        guards.acquire_within("snap", Duration::from_secs(10)).expect("taken once released");
        assert!(started.elapsed() >= Duration::from_millis(80));
        releaser.join().expect("releaser");
    }
}
