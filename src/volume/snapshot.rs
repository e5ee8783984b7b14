//! Snapshots of node-local volumes: a sparse copy of the image made under a temporary name
//! and renamed into place, so a crash leaves either no snapshot or a whole one. The caller
//! makes the image consistent first (the node agent's quiesce).

use std::fs::{self, File};

use super::{
    Error, IMAGE, META, NEW_PREFIX, Result, SnapshotMeta, VolumeStore, io_err, now, remove_entry, sparse_copy,
    sync_dir, write_meta,
};

impl VolumeStore {
    /// Creates a snapshot (a point-in-time copy of the image), or returns the existing one if
    /// it has the same source. The caller makes the image consistent first.
    pub fn create_snapshot(&self, id: &str, source_volume_id: &str) -> Result<(SnapshotMeta, bool)> {
        let dir = self.snapshot_dir(id)?;
        if let Some(existing) = self.snapshot(id)? {
            if existing.source_volume_id != source_volume_id {
                return Err(Error::Conflict {
                    what: "snapshot",
                    id: id.to_owned(),
                    why: format!("source is {}", existing.source_volume_id),
                });
            }
            return Ok((existing, false));
        }
        let source = self.existing_volume(source_volume_id)?;
        let src = self.image_path(source_volume_id)?;
        self.check_copy(&src)?;
        let tmp = self.root.join("snapshots").join(format!("{NEW_PREFIX}{id}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        let made = (|| -> Result<SnapshotMeta> {
            let image = tmp.join(IMAGE);
            sparse_copy(&src, &image)?;
            File::open(&image).and_then(|f| f.sync_all()).map_err(io_err("fsync", &image))?;
            let (secs, nanos) = now();
            let meta = SnapshotMeta {
                id: id.to_owned(),
                source_volume_id: source_volume_id.to_owned(),
                size_bytes: source.spec.capacity_bytes,
                created_unix: secs,
                created_nanos: nanos,
            };
            write_meta(&tmp.join(META), &meta)?;
            Ok(meta)
        })();
        match made {
            Ok(meta) => {
                fs::rename(&tmp, &dir).map_err(io_err("rename", &dir))?;
                sync_dir(&self.root.join("snapshots"))?;
                Ok((meta, true))
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Deletes a snapshot; `false` if it did not exist.
    pub fn delete_snapshot(&self, id: &str) -> Result<bool> {
        remove_entry(&self.snapshot_dir(id)?)
    }
}
