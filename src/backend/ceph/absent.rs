//! The Ceph client of a build without the `rbd` feature: the API of `client.rs`, with no
//! librados behind it. [`Cluster::connect`] always fails with [`Error::NotBuilt`], so no
//! cluster, pool or image can exist: their methods are never reached (each holds a value of
//! an empty type, which the compiler knows cannot be).

use std::sync::Arc;

use super::{ClusterConfig, Error, Result};

/// A type without values.
#[derive(Debug)]
enum Never {}

/// A cluster connection; none can be made in this build.
#[derive(Debug)]
pub struct Cluster(Never);

impl Cluster {
    /// Fails: this build has no librados.
    pub fn connect(_config: &ClusterConfig) -> Result<Arc<Self>> {
        Err(Error::NotBuilt)
    }
    pub fn pool(self: &Arc<Self>, _name: &str) -> Result<Pool> {
        match self.0 {}
    }
    pub fn pool_by_id(self: &Arc<Self>, _id: i64) -> Result<Pool> {
        match self.0 {}
    }
    pub fn address(&self) -> Result<String> {
        match self.0 {}
    }
}

/// A pool's I/O context; none exists in this build.
#[derive(Debug)]
pub struct Pool(Never);

impl Pool {
    pub fn cluster(&self) -> &Arc<Cluster> {
        match self.0 {}
    }
    pub fn id(&self) -> i64 {
        match self.0 {}
    }
    pub fn create_image(&self, _name: &str, _size: u64) -> Result<()> {
        match self.0 {}
    }
    pub fn remove_image(&self, _name: &str) -> Result<()> {
        match self.0 {}
    }
    pub fn clone_image(&self, _parent: &str, _snap: &str, _child: &str) -> Result<()> {
        match self.0 {}
    }
    pub fn open(self: &Arc<Self>, _name: &str) -> Result<Image> {
        match self.0 {}
    }
    pub fn metadata(&self, _key: &str) -> Result<Option<String>> {
        match self.0 {}
    }
    pub fn set_metadata(&self, _key: &str, _value: &str) -> Result<()> {
        match self.0 {}
    }
    pub fn remove_metadata(&self, _key: &str) -> Result<()> {
        match self.0 {}
    }
}

/// A snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub name: String,
    pub size: u64,
    /// Creation time, seconds and nanoseconds since the epoch.
    pub created: (i64, i32),
}

/// An open image; none exists in this build.
#[derive(Debug)]
pub struct Image(Never);

impl Image {
    pub fn size(&self) -> Result<u64> {
        match self.0 {}
    }
    pub fn resize(&self, _bytes: u64) -> Result<()> {
        match self.0 {}
    }
    pub fn flatten(&self) -> Result<()> {
        match self.0 {}
    }
    pub fn has_parent(&self) -> Result<bool> {
        match self.0 {}
    }
    pub fn parent(&self) -> Result<Option<(i64, String, String)>> {
        match self.0 {}
    }
    pub fn flush(&self) -> Result<()> {
        match self.0 {}
    }
    pub fn metadata(&self, _key: &str) -> Result<Option<String>> {
        match self.0 {}
    }
    pub fn set_metadata(&self, _key: &str, _value: &str) -> Result<()> {
        match self.0 {}
    }
    pub fn snapshots(&self) -> Result<Vec<SnapInfo>> {
        match self.0 {}
    }
    pub fn create_snapshot(&self, _snap: &str) -> Result<()> {
        match self.0 {}
    }
    pub fn remove_snapshot(&self, _snap: &str) -> Result<()> {
        match self.0 {}
    }
    pub fn protect_snapshot(&self, _snap: &str) -> Result<()> {
        match self.0 {}
    }
    pub fn unprotect_snapshot(&self, _snap: &str) -> Result<()> {
        match self.0 {}
    }
    pub fn lock_exclusive(&self) -> Result<()> {
        match self.0 {}
    }
    pub fn lock_owners(&self) -> Result<Vec<String>> {
        match self.0 {}
    }
    pub fn break_lock(&self, _owner: &str) -> Result<()> {
        match self.0 {}
    }
}

// The real handles close in `drop`; these mirror that, so callers that drop a handle early
// (to release it before a later call) read the same in both builds.
impl Drop for Cluster {
    fn drop(&mut self) {
        match self.0 {}
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        match self.0 {}
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        match self.0 {}
    }
}
