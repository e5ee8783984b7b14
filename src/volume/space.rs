//! The provisioning model's arithmetic: what the backing filesystem holds, what volumes
//! promised, and what may still be promised (see [`VolumeStore`]).

use std::path::Path;

use super::{Error, Result, Space, VolumeStore, allocated_bytes};

impl VolumeStore {
    /// The backing filesystem's space and the volumes' promises.
    pub fn space(&self) -> Result<Space> {
        let st = nix::sys::statvfs::statvfs(&self.root).map_err(|e| Error::Io {
            op: "statvfs",
            path: self.root.clone(),
            source: e.into(),
        })?;
        let block = st.fragment_size() as u64;
        let provisioned = self.volumes()?.iter().filter(|v| v.spec.is_local()).map(|v| v.spec.capacity_bytes).sum();
        Ok(Space { total: st.blocks() as u64 * block, free: st.blocks_available() as u64 * block, provisioned })
    }

    /// Bytes of capacity that may still be promised to a new or growing volume: thin ones
    /// under the overcommit limit, thick ones also within the free space.
    pub fn promisable_bytes(&self, thick: bool) -> Result<u64> {
        let space = self.space()?;
        let headroom = self.headroom(&space);
        Ok(if thick { headroom.min(space.free) } else { headroom })
    }

    /// Capacity the overcommit limit still allows.
    fn headroom(&self, space: &Space) -> u64 {
        let limit = (space.total as f64 * self.overcommit_ratio) as u64;
        limit.saturating_sub(space.provisioned)
    }

    /// Refuses `needed` more bytes of capacity if the model cannot promise them.
    pub(super) fn check_promise(&self, needed: u64, thick: bool) -> Result<()> {
        let space = self.space()?;
        let headroom = self.headroom(&space);
        if needed > headroom {
            return Err(Error::Overcommitted {
                dir: self.root.clone(),
                needed,
                headroom,
                ratio: self.overcommit_ratio,
            });
        }
        if thick && needed > space.free {
            return Err(Error::NoSpace { dir: self.root.clone(), needed, available: space.free });
        }
        Ok(())
    }

    /// Refuses a copy of `image` if its data does not fit in the free space.
    pub(super) fn check_copy(&self, image: &Path) -> Result<()> {
        let needed = allocated_bytes(image)?;
        let available = self.available_bytes()?;
        if needed > available {
            return Err(Error::NoSpace { dir: self.root.clone(), needed, available });
        }
        Ok(())
    }

    /// Bytes new data can still take on the state dir's filesystem.
    pub fn available_bytes(&self) -> Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.root).map_err(|e| Error::Io {
            op: "statvfs",
            path: self.root.clone(),
            source: e.into(),
        })?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }
}
