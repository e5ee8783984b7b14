//! The Ceph clusters RBD volumes may live in (`--ceph-clusters`), and connections to them
//! as the cephx user of a call's secrets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::ids::{ImageLocation, check_cluster_id};
use super::{SECRET_KEY, SECRET_USER};
use crate::backend::ceph::{Cluster, ClusterConfig, Pool};
use crate::status::{Error, Result};

/// How long a control-plane call (create, delete, snapshot, resize, and a node's open and
/// lock of an image) may wait for Ceph by default (`serve --ceph-timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection unused this long, and held by nothing else, is closed.
const IDLE_CLIENT: Duration = Duration::from_secs(600);

/// What a connection is for: how long its calls may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// Provisioning, metadata, locks: calls fail with `ETIMEDOUT` after the timeout.
    Control,
    /// Devices' I/O: waits for ever, as a disk does (a slow pool must not fail writes).
    Data,
}

/// The Ceph clusters this plugin may use: the `--ceph-clusters` file, read at each use, so
/// an edited ConfigMap takes effect without a restart and an absent one only fails RBD calls;
/// and the connections to them, one per (monitors, user, key, purpose), shared by every
/// volume and call (a librados client is a set of threads and sockets: one per volume or
/// per call would not scale).
#[derive(Clone)]
pub struct Clusters {
    file: Option<PathBuf>,
    timeout: Duration,
    clients: Arc<Mutex<HashMap<ClientKey, Client>>>,
    /// What [`Clusters::bounded`] runs now, by what it is about.
    running: Arc<Mutex<HashSet<String>>>,
}

impl Default for Clusters {
    /// No clusters: every RBD call fails, saying `--ceph-clusters` is missing.
    fn default() -> Self {
        Self { file: None, timeout: DEFAULT_TIMEOUT, clients: Arc::default(), running: Arc::default() }
    }
}

impl std::fmt::Debug for Clusters {
    /// Never prints keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clusters").field("file", &self.file).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// What a shared connection is keyed by: a rotated key or edited monitors get a new one.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    monitors: String,
    user: String,
    key: Option<String>,
    purpose: Purpose,
}

struct Client {
    cluster: Arc<Cluster>,
    last_used: Instant,
}

/// One entry of the `--ceph-clusters` file.
#[derive(Debug, Deserialize)]
struct ClusterEntry {
    #[serde(rename = "clusterID")]
    cluster_id: String,
    monitors: Vec<String>,
}

impl Clusters {
    /// The clusters listed in the file at `path`; control-plane calls wait up to `timeout`.
    pub fn from_file(path: &Path, timeout: Duration) -> Self {
        Self { file: Some(path.to_owned()), timeout, clients: Arc::default(), running: Arc::default() }
    }

    /// Whether a clusters file was given.
    pub fn configured(&self) -> bool {
        self.file.is_some()
    }

    /// How long a control-plane call may wait for Ceph.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Reads a JSON list of `{"clusterID": "...", "monitors": ["host:port", ...]}`: clusterID to
    /// monitors (`mon_host` syntax).
    pub fn load(path: &Path) -> std::result::Result<BTreeMap<String, String>, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let entries: Vec<ClusterEntry> =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a list of clusters: {e}", path.display()))?;
        let mut map = BTreeMap::new();
        for e in entries {
            check_cluster_id(&e.cluster_id).map_err(|m| format!("{}: {m}", path.display()))?;
            if e.monitors.is_empty() {
                return Err(format!("{}: cluster {} has no monitors", path.display(), e.cluster_id));
            }
            map.insert(e.cluster_id, e.monitors.join(","));
        }
        Ok(map)
    }

    /// The monitors of `cluster_id`; `None` if the file does not list it.
    fn lookup(&self, cluster_id: &str) -> Result<Option<String>> {
        let Some(path) = &self.file else {
            return Err(Error::FailedPrecondition(
                "this plugin serves no RBD volumes: start it with --ceph-clusters".into(),
            ));
        };
        Ok(Self::load(path).map_err(Error::FailedPrecondition)?.remove(cluster_id))
    }

    fn not_listed(&self, cluster_id: &str) -> String {
        let path = self.file.as_deref().unwrap_or(Path::new("")).display();
        let known = self.file.as_deref().and_then(|p| Self::load(p).ok()).unwrap_or_default();
        let known = known.keys().cloned().collect::<Vec<_>>().join(", ");
        format!("Ceph cluster {cluster_id:?} is not in {path} (known: {known})")
    }

    /// Refuses a StorageClass's `clusterID` that the clusters file does not list.
    pub fn check_listed(&self, cluster_id: &str) -> Result<()> {
        match self.lookup(cluster_id)? {
            Some(_) => Ok(()),
            None => Err(Error::InvalidArgument(self.not_listed(cluster_id))),
        }
    }

    /// The monitors of the cluster an existing volume or snapshot lives in. A cluster that
    /// left the file is FAILED_PRECONDITION, with the fix: the request is right, the
    /// configuration is not.
    pub(super) fn monitors(&self, cluster_id: &str) -> Result<String> {
        self.lookup(cluster_id)?.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "{}: its volumes and snapshots cannot be reached; add the cluster back to the \
                 clusters file (the ConfigMap) to use or delete them",
                self.not_listed(cluster_id)
            ))
        })
    }
}

/// Where [`Clusters::bounded`]'s work leaves its outcome for the caller.
struct Handoff<T> {
    slot: Mutex<Slot<T>>,
    ready: Condvar,
}

enum Slot<T> {
    Waiting,
    Done(Result<T>),
    /// The caller gave up: the work drops its outcome itself.
    Abandoned,
}

/// Marks what [`Clusters::bounded`] runs, until dropped.
struct Running {
    set: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

/// Whether an error means the connection itself is finished (blocklisted, shut down), so a
/// new one is needed.
fn connection_lost(e: &crate::backend::ceph::Error) -> bool {
    e.errno() == Some(libc::ESHUTDOWN)
}

impl Clusters {
    /// The shared connection to `cluster_id` as `user` for `purpose`, made on first use.
    pub fn client(
        &self,
        cluster_id: &str,
        user: String,
        key: Option<String>,
        purpose: Purpose,
    ) -> Result<Arc<Cluster>> {
        let monitors = self.monitors(cluster_id)?;
        let wanted = ClientKey { monitors, user, key, purpose };
        let (found, idle) = {
            let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let expired: Vec<ClientKey> = clients
                .iter()
                .filter(|(_, c)| Arc::strong_count(&c.cluster) == 1 && now.duration_since(c.last_used) >= IDLE_CLIENT)
                .map(|(k, _)| k.clone())
                .collect();
            let idle: Vec<Client> = expired.iter().filter_map(|k| clients.remove(k)).collect();
            let found = clients.get_mut(&wanted).map(|client| {
                client.last_used = now;
                Arc::clone(&client.cluster)
            });
            (found, idle)
        };
        // Shut down outside the lock (rados_shutdown waits for the client's threads).
        drop(idle);
        if let Some(found) = found {
            return Ok(found);
        }
        // Connected outside the lock: a cluster that does not answer must not hold up
        // calls to the others. Two first calls may both connect; one connection is kept.
        let op_timeout = (purpose == Purpose::Control).then_some(self.timeout);
        let config = ClusterConfig {
            monitors: wanted.monitors.clone(),
            user: wanted.user.clone(),
            key: wanted.key.clone(),
            op_timeout,
        };
        let cluster = Cluster::connect(&config)?;
        tracing::info!(cluster = cluster_id, user = %wanted.user, ?purpose, "connected to Ceph");
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(first) = clients.get(&wanted) {
            // Another call connected meanwhile: keep its connection; ours shuts down outside
            // the lock.
            let first = Arc::clone(&first.cluster);
            drop(clients);
            drop(cluster);
            return Ok(first);
        }
        clients.insert(wanted, Client { cluster: Arc::clone(&cluster), last_used: Instant::now() });
        Ok(cluster)
    }

    /// Drops `cluster` from the shared connections if `error` says it is finished (its client
    /// was blocklisted): the next call connects anew. Returns the error.
    pub fn forget_if_lost(&self, cluster: &Arc<Cluster>, error: crate::backend::ceph::Error) -> Error {
        if connection_lost(&error) {
            tracing::warn!(error = %error, "the Ceph connection is lost (blocklisted?); the next call reconnects");
            self.clients
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, c| !Arc::ptr_eq(&c.cluster, cluster));
        }
        error.into()
    }

    /// Runs `work`, which may wait on Ceph for ever, on a thread of its own, and waits for it
    /// up to the timeout: then UNAVAILABLE, and the work goes on alone (what it returns late is
    /// dropped: an image it opened is closed). The same `what` is not started twice: while
    /// one is still running, another is UNAVAILABLE at once, so a sick pool piles up no threads.
    pub fn bounded<T: Send + 'static>(
        &self,
        what: &str,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        if !self.running.lock().unwrap_or_else(PoisonError::into_inner).insert(what.to_owned()) {
            return Err(Error::Unavailable(format!(
                "{what}: an earlier attempt still waits for Ceph; try again later"
            )));
        }
        let handoff = Arc::new(Handoff { slot: Mutex::new(Slot::Waiting), ready: Condvar::new() });
        let running = Running { set: Arc::clone(&self.running), key: what.to_owned() };
        let worker = Arc::clone(&handoff);
        let what_owned = what.to_owned();
        let spawned = std::thread::Builder::new().name("ceph-bounded".into()).spawn(move || {
            // A guard, so that even a thread that dies some other way frees its key.
            let running = running;
            // A panic in `work` is an answer too: the caller gets INTERNAL now, not
            // UNAVAILABLE at the deadline (which would read as a sick pool).
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|_| {
                Err(Error::Internal(format!("{what_owned}: the call into Ceph panicked (see the log)")))
            });
            let mut slot = worker.slot.lock().unwrap_or_else(PoisonError::into_inner);
            if matches!(*slot, Slot::Abandoned) {
                drop(slot);
                // Nobody waits any more: what came too late is dropped here, not in the
                // caller, and only then may another attempt start (an open image holds its
                // lock until dropped).
                drop(outcome);
                drop(running);
                return;
            }
            // Freed before the outcome is handed over (under the slot's lock, so the caller
            // cannot see one without the other): a caller that retries at once is not told
            // that this attempt still runs.
            drop(running);
            *slot = Slot::Done(outcome);
            worker.ready.notify_one();
        });
        if let Err(e) = spawned {
            // The closure, and the `Running` in it, were dropped with the error.
            return Err(Error::Internal(format!("{what}: cannot start a thread: {e}")));
        }
        let deadline = Instant::now() + self.timeout;
        let mut slot = handoff.slot.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match std::mem::replace(&mut *slot, Slot::Waiting) {
                Slot::Done(outcome) => return outcome,
                Slot::Waiting | Slot::Abandoned => {}
            }
            let now = Instant::now();
            if now >= deadline {
                *slot = Slot::Abandoned;
                return Err(Error::Unavailable(format!(
                    "{what}: Ceph did not answer within {:?} (are the pool's placement groups active?); \
                     it goes on in the background, try again later",
                    self.timeout
                )));
            }
            slot = handoff.ready.wait_timeout(slot, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// The pool of `loc`, reached as the secrets' user, for the control plane.
    pub fn pool_of(&self, loc: &ImageLocation, secrets: &HashMap<String, String>) -> Result<Arc<Pool>> {
        let (user, key) = identity(secrets);
        let cluster = self.client(&loc.cluster_id, user, key, Purpose::Control)?;
        Ok(Arc::new(cluster.pool_by_id(loc.pool_id).map_err(|e| self.forget_if_lost(&cluster, e))?))
    }
}

/// The cephx identity of a call's secrets: `userID` (default `admin`) and `userKey` (none: a
/// cluster without cephx).
pub(super) fn identity(secrets: &HashMap<String, String>) -> (String, Option<String>) {
    let user = secrets.get(SECRET_USER).filter(|u| !u.is_empty()).cloned().unwrap_or_else(|| "admin".into());
    (user, secrets.get(SECRET_KEY).filter(|k| !k.is_empty()).cloned())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn clusters(timeout: Duration) -> Clusters {
        Clusters { timeout, ..Clusters::default() }
    }

    #[test]
    fn bounded_work_that_answers_in_time_gives_its_answer() {
        let c = clusters(Duration::from_secs(10));
        assert_eq!(c.bounded("open a", || Ok(7)).unwrap(), 7);
        // Done, so the same call may start again at once.
        assert!(matches!(c.bounded("open a", || Err::<(), _>(Error::NotFound("x".into()))), Err(Error::NotFound(_))));
    }

    #[test]
    fn bounded_work_that_waits_too_long_is_unavailable_and_blocks_only_its_own_retry() {
        let c = clusters(Duration::from_millis(100));
        let (release, released) = mpsc::channel::<()>();
        let (dropped, late_dropped) = mpsc::channel::<()>();
        /// What the late work hands back: its drop is the sign it was not lost.
        struct Late(mpsc::Sender<()>);
        impl Drop for Late {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let started = Instant::now();
        let late = c.bounded("open a", move || {
            let _ = released.recv();
            Ok(Late(dropped))
        });
        assert!(matches!(late, Err(Error::Unavailable(_))), "a call past its timeout is UNAVAILABLE");
        assert!(started.elapsed() < Duration::from_secs(5));
        // The same call while the first still waits: refused at once, no second thread.
        assert!(matches!(c.bounded("open a", || Ok(())), Err(Error::Unavailable(m)) if m.contains("earlier attempt")));
        // Another call is not held up by it.
        assert_eq!(c.bounded("open b", || Ok(1)).unwrap(), 1);
        release.send(()).unwrap();
        // The late outcome is dropped by the worker, not leaked.
        late_dropped.recv_timeout(Duration::from_secs(10)).expect("the late outcome was dropped");
        // Once the worker is gone, the call may be tried again.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match c.bounded("open a", || Ok(2)) {
                Ok(v) => break assert_eq!(v, 2),
                Err(Error::Unavailable(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("retry after the late outcome: {e:?}"),
            }
        }
    }

    #[test]
    fn bounded_work_that_panics_is_internal_at_once_and_may_be_retried() {
        let c = clusters(Duration::from_secs(30));
        let started = Instant::now();
        let r = c.bounded("open a", || -> Result<()> { panic!("librados misbehaved") });
        assert!(matches!(r, Err(Error::Internal(m)) if m.contains("panicked")));
        assert!(started.elapsed() < Duration::from_secs(10), "not held until the deadline");
        // Its key was freed with its answer: a retry starts at once.
        assert_eq!(c.bounded("open a", || Ok(3)).unwrap(), 3);
    }
}
