//! vduse-csi: a Kubernetes CSI driver whose volumes are VDUSE virtio-blk devices served from
//! inside the plugin process. See DESIGN.md for the module map; arrows point down only:
//! `csi` → `volume`, `host`, `server`; `server` → `blk` → `backend`, and `server` → `vduse`.

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
