//! The virtio-blk device model: features and config space, request parsing (validated, no
//! I/O) and the queue worker loop. Built on vm-memory and virtio-queue; knows nothing of VDUSE,
//! so it is unit-tested with virtio-queue's mock driver.

pub mod config;
mod flush_failure;
pub mod qos;
pub mod request;
pub mod stats;
pub mod worker;

pub use flush_failure::FlushFailure;
pub use request::DeviceLimits;
pub use worker::{Pass, QueueError, QueueMemory, QueueWorker};

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
