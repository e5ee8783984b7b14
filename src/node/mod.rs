//! The node agent: the one owner of each volume's life on this node. It alone holds the
//! table of device servers, the volume guards, the freeze records and the fencing state, and
//! it alone starts, heals, quiesces and stops devices. The CSI Node and Controller services
//! are thin adapters over its API: they translate requests into the specs below and its
//! errors (`status::Error`) into gRPC codes.
//!
//! docs/ARCHITECTURE.md has the layer map, the states a staged volume goes through, and
//! which lock guards what. The rules, in short:
//! - every operation on a volume holds its guard for as long as it runs, the heal loop's
//!   included, so no two ever interleave (a thaw never meets a running snapshot);
//! - nothing that writes to a device (unmount, freeze, sync, a detach's drain) runs unless
//!   the device is served and healthy (`NodeAgent::served`): otherwise it waits in D state
//!   for ever; such a call heals the device first or answers UNAVAILABLE;
//! - the server table's lock covers the map only, never a server's I/O ([`table`]);
//! - a device is formatted only when no signature at all is on it.

pub mod device;
mod ephemeral;
pub mod guard;
mod publish;
mod quiesce;
mod recovery;
mod stage;
pub mod table;
mod usage;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use crate::rbd::Clusters;
use crate::server::DeviceServer;
use crate::volume::VolumeStore;

pub use device::device_name;
pub use ephemeral::EphemeralSpec;
pub use guard::{VolumeGuard, VolumeGuards};
pub use publish::PublishSpec;
pub use quiesce::Quiesced;
pub use stage::{MountSpec, StageSpec};
pub use table::{ServerTable, into_owned};
pub use usage::{VolumeStats, VolumeUsage, store_full};

/// The CSI access mode SINGLE_NODE_SINGLE_WRITER as it is recorded in volume metadata (the
/// CSI wire value; csi/node.rs checks it against the generated enum).
pub const ACCESS_SINGLE_NODE_SINGLE_WRITER: i32 = 6;
/// The CSI access mode SINGLE_NODE_READER_ONLY, likewise.
pub const ACCESS_SINGLE_NODE_READER_ONLY: i32 = 2;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// This node's name (RBD images record it as their holder).
    pub node_id: String,
    /// Whether device servers count requests for the metrics endpoint.
    pub counters: bool,
    /// Largest ephemeral inline volume a pod may declare.
    pub ephemeral_max_bytes: u64,
    /// The Ceph clusters RBD volumes may live in.
    pub ceph: Clusters,
}

/// The node agent. See the module documentation.
pub struct NodeAgent {
    opts: AgentOptions,
    store: VolumeStore,
    guards: VolumeGuards,
    servers: ServerTable,
    /// RBD volumes whose device this node serves fenced (every request fails), with why.
    fenced: Reasons<String>,
    /// Staged volumes whose device server is not running, with why. Their condition says it
    /// until a server runs again: a heal round may come right after a fault and fail (as when
    /// the Ceph client it would reuse was blocklisted along with the lock), and "not running"
    /// alone would hide the fault.
    unserved: Reasons<NotServed>,
}

/// Why a staged volume has no running device server.
#[derive(Debug, Clone)]
struct NotServed {
    /// What stopped its last server (or that none ran since the plugin started).
    fault: String,
    /// Why the last attempt to serve it again failed.
    retry_error: String,
}

impl std::fmt::Display for NotServed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; serving it again failed: {}", self.fault, self.retry_error)
    }
}

/// A state some volumes are in (fenced, not served), with its details, by volume ID.
struct Reasons<T>(Mutex<HashMap<String, T>>);

impl<T> Default for Reasons<T> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<T: Clone> Reasons<T> {
    fn get(&self, id: &str) -> Option<T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned()
    }

    fn set(&self, id: &str, reason: Option<T>) {
        let mut reasons = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match reason {
            Some(reason) => reasons.insert(id.to_owned(), reason),
            None => reasons.remove(id),
        };
    }
}

impl NodeAgent {
    pub fn new(store: VolumeStore, opts: AgentOptions) -> Self {
        Self {
            opts,
            store,
            guards: VolumeGuards::default(),
            servers: ServerTable::default(),
            fenced: Reasons::default(),
            unserved: Reasons::default(),
        }
    }

    /// This node's name.
    pub fn node_id(&self) -> &str {
        &self.opts.node_id
    }

    /// The node's volume store.
    pub fn store(&self) -> &VolumeStore {
        &self.store
    }

    /// The guards every operation on a volume (or a snapshot key) holds.
    pub fn guards(&self) -> &VolumeGuards {
        &self.guards
    }

    /// The device servers this process runs, by volume ID (for metrics).
    pub fn servers(&self) -> Vec<(String, Arc<DeviceServer>)> {
        self.servers.all()
    }

    /// The block device of a volume, if its server runs.
    pub fn block_device(&self, id: &str) -> Option<PathBuf> {
        self.servers.get(id).map(|s| s.block_device().to_owned())
    }

    fn fenced_reason(&self, id: &str) -> Option<String> {
        self.fenced.get(id)
    }

    fn set_fenced(&self, id: &str, reason: Option<String>) {
        self.fenced.set(id, reason);
    }

    /// Why a staged volume's device server is not running, if this process knows.
    fn unserved_reason(&self, id: &str) -> Option<NotServed> {
        self.unserved.get(id)
    }

    fn set_unserved(&self, id: &str, reason: Option<NotServed>) {
        self.unserved.set(id, reason);
    }
}
