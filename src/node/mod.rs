//! The node agent's building blocks: the table of device servers and the per-volume
//! operation guards. Every rule about who may touch a staged volume's server, and when, is
//! in docs/ARCHITECTURE.md ("Locks" and "A staged volume's life").

pub mod guard;
pub mod table;

pub use guard::{VolumeGuard, VolumeGuards};
pub use table::{ServerTable, into_owned};
