//! Per-volume operation guard: a second concurrent call on the same volume gets ABORTED,
//! as the CSI spec asks, instead of racing the first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::Error;

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

impl VolumeGuards {
    /// Takes the guard of `id`, or fails with ABORTED if an operation holds it.
    pub fn acquire(&self, id: &str) -> Result<VolumeGuard, Error> {
        let mut busy = self.busy.lock().map_err(|_| Error::Internal("guard lock poisoned".into()))?;
        if !busy.insert(id.to_owned()) {
            return Err(Error::Aborted(id.to_owned()));
        }
        Ok(VolumeGuard { busy: Arc::clone(&self.busy), id: id.to_owned() })
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.busy.lock() {
            busy.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_is_aborted_until_the_first_ends() {
        let guards = VolumeGuards::default();
        let first = guards.acquire("v").expect("first");
        assert!(matches!(guards.acquire("v"), Err(Error::Aborted(_))));
        assert!(guards.acquire("w").is_ok());
        drop(first);
        assert!(guards.acquire("v").is_ok());
    }
}
