//! The node's device servers, by volume ID. The table's lock covers only the map: callers
//! take an `Arc` out and drop the lock before they touch the server, so a flush, a resize or
//! a teardown that waits on a slow disk or a sick Ceph pool never stalls the calls of other
//! volumes (docs/ARCHITECTURE.md, "Locks").

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::server::DeviceServer;

/// The servers of the volumes this process serves. Generic only so that its locking can be
/// tested without a kernel.
#[derive(Debug)]
pub struct ServerTable<S = DeviceServer> {
    servers: Mutex<HashMap<String, Arc<S>>>,
}

impl<S> Default for ServerTable<S> {
    fn default() -> Self {
        Self { servers: Mutex::new(HashMap::new()) }
    }
}

impl<S> ServerTable<S> {
    /// The map. A panic while it was held cannot leave it half-updated (every change is one
    /// insert or remove), so a poisoned lock is taken as it is.
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<S>>> {
        self.servers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The server of `id`, if any.
    pub fn get(&self, id: &str) -> Option<Arc<S>> {
        self.map().get(id).cloned()
    }

    /// Records `server` as `id`'s and returns it; a server it replaces is returned too (the
    /// caller drops it outside the lock).
    pub fn insert(&self, id: &str, server: Arc<S>) -> Option<Arc<S>> {
        self.map().insert(id.to_owned(), server)
    }

    /// Takes `id`'s server out of the table.
    pub fn remove(&self, id: &str) -> Option<Arc<S>> {
        self.map().remove(id)
    }

    /// Every server, with its volume ID.
    pub fn all(&self) -> Vec<(String, Arc<S>)> {
        self.map().iter().map(|(id, s)| (id.clone(), Arc::clone(s))).collect()
    }

    /// Takes every server out of the table.
    pub fn drain(&self) -> Vec<(String, Arc<S>)> {
        self.map().drain().collect()
    }
}

/// Sole ownership of a server taken out of the table, once whoever borrowed it for a moment
/// (a metrics scrape, a stats call) has let go; `Err` gives it back after `timeout`.
pub fn into_owned<S>(mut server: Arc<S>, timeout: Duration) -> Result<S, Arc<S>> {
    let deadline = Instant::now() + timeout;
    loop {
        match Arc::try_unwrap(server) {
            Ok(owned) => return Ok(owned),
            Err(shared) if Instant::now() >= deadline => return Err(shared),
            Err(shared) => {
                server = shared;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Stands for a device server whose flush waits on a disk that does not answer.
    #[derive(Debug)]
    struct SlowServer {
        release: Mutex<mpsc::Receiver<()>>,
    }

    impl SlowServer {
        fn flush(&self) {
            let _ = self.release.lock().map(|r| r.recv());
        }
    }

    #[test]
    fn a_slow_server_never_blocks_the_table() {
        let table: Arc<ServerTable<SlowServer>> = Arc::default();
        let (release, wait) = mpsc::channel();
        table.insert("slow", Arc::new(SlowServer { release: Mutex::new(wait) }));
        let (_, never) = mpsc::channel();
        table.insert("other", Arc::new(SlowServer { release: Mutex::new(never) }));
        let (borrowed, has_borrowed) = mpsc::channel();
        let flusher = {
            let table = Arc::clone(&table);
            std::thread::spawn(move || {
                let server = table.get("slow").expect("slow");
                borrowed.send(()).expect("send");
                server.flush();
            })
        };
        has_borrowed.recv().expect("the flusher holds the server");
        // While the flush waits, every other use of the table answers at once.
        let started = Instant::now();
        assert!(table.get("other").is_some());
        assert_eq!(table.all().len(), 2);
        let other = table.remove("other").expect("other");
        assert!(into_owned(other, Duration::from_secs(1)).is_ok(), "nobody borrows it");
        assert!(started.elapsed() < Duration::from_secs(1), "the table waited for the slow flush");
        // The slow server cannot be owned while its flush runs, and can once it ended.
        let slow = table.remove("slow").expect("slow");
        let slow = into_owned(slow, Duration::from_millis(50)).expect_err("still borrowed");
        release.send(()).expect("release");
        flusher.join().expect("flusher");
        assert!(into_owned(slow, Duration::from_secs(1)).is_ok());
    }
}
