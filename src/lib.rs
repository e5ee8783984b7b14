//! vduse-csi: a Kubernetes CSI driver whose volumes are VDUSE virtio-blk devices served from
//! inside the plugin process. docs/ARCHITECTURE.md draws the layers (dependencies point down
//! only, with no cycle), the node agent's state machine and its locks.

pub mod backend;
pub mod blk;
pub mod csi;
pub mod host;
pub mod metrics;
pub mod node;
pub mod params;
pub mod rbd;
pub mod server;
pub mod status;
pub mod units;
pub mod vduse;
pub mod volume;
