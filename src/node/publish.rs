//! Publish and unpublish: bind mounts of a staged volume (its filesystem, or its device for
//! raw block access) into pods, recorded before they are made.

use std::fs;
use std::path::{Path, PathBuf};

use super::{ACCESS_SINGLE_NODE_SINGLE_WRITER, NodeAgent};
use crate::host;
use crate::status::{Error, Result};
use crate::volume::{PublishInfo, StageInfo};

/// What a publish asks for.
#[derive(Debug, Clone)]
pub struct PublishSpec {
    /// Where the pod sees the volume (absolute and normal).
    pub target: PathBuf,
    /// The staging path the volume was staged at.
    pub staging_path: PathBuf,
    /// Raw block access (the device is bound) or a filesystem (the staging mount is).
    pub block: bool,
    pub read_only: bool,
    /// The CSI access mode, recorded as it came.
    pub access_mode: i32,
}

impl NodeAgent {
    /// NodePublishVolume: records the publication, then binds the volume onto the target.
    pub fn publish(&self, id: &str, spec: &PublishSpec) -> Result<()> {
        let target = spec.target.as_path();
        let mut meta = self.store.existing_volume(id)?;
        let staged =
            meta.staged.clone().ok_or_else(|| Error::FailedPrecondition(format!("volume {id} is not staged")))?;
        if staged.staging_path != spec.staging_path {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is staged at {}",
                staged.staging_path.display()
            )));
        }
        let block = spec.block;
        if block != staged.block {
            return Err(Error::InvalidArgument("access type differs from the one the volume was staged with".into()));
        }
        let (mode, read_only) = (spec.access_mode, spec.read_only);
        if let Some(existing) = meta.published.get(target) {
            if existing.read_only != read_only || existing.access_mode != mode {
                return Err(Error::AlreadyExists(format!("{} is published with other options", target.display())));
            }
            if host::mount_at(target)?.is_some() {
                return Ok(());
            }
        } else if mode == ACCESS_SINGLE_NODE_SINGLE_WRITER && !meta.published.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is SINGLE_NODE_SINGLE_WRITER and already published"
            )));
        } else if meta.published.values().any(|p| p.access_mode == ACCESS_SINGLE_NODE_SINGLE_WRITER) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is published SINGLE_NODE_SINGLE_WRITER elsewhere"
            )));
        }
        // Record the publication before mounting: unpublish only ever touches recorded targets,
        // so a crash between the two must leave the record, not an unknown mount.
        meta.published.insert(target.to_owned(), PublishInfo { read_only, access_mode: mode });
        self.store.save_volume(&meta)?;
        if let Err(e) = self.bind_target(id, &staged, target, block, read_only) {
            meta.published.remove(target);
            self.store.save_volume(&meta)?;
            return Err(e);
        }
        tracing::info!(volume = id, target = %target.display(), read_only, "published");
        Ok(())
    }

    /// Creates `target` and bind-mounts the volume onto it (the device for block volumes, the
    /// staged filesystem otherwise).
    fn bind_target(&self, id: &str, staged: &StageInfo, target: &Path, block: bool, read_only: bool) -> Result<()> {
        let io = |op: &'static str| move |source| host::Error::Io { op, path: target.to_owned(), source };
        if block {
            let dev = self
                .block_device(id)
                .ok_or_else(|| Error::Unavailable(format!("volume {id} is staged but its device is not served")))?;
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(io("create"))?;
            }
            fs::OpenOptions::new().create(true).truncate(false).write(true).open(target).map_err(io("create"))?;
            if host::mount_at(target)?.is_none() {
                host::bind_mount(&dev, target, read_only)?;
            }
        } else {
            fs::create_dir_all(target).map_err(io("create"))?;
            if host::mount_at(target)?.is_none() {
                host::bind_mount(&staged.staging_path, target, read_only)?;
            }
        }
        Ok(())
    }

    /// NodeUnpublishVolume: unbinds a recorded target; an ephemeral volume's last one
    /// deletes the volume.
    pub fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        let mut meta = match self.store.volume(id)? {
            Some(meta) => meta,
            // An ephemeral volume is deleted by its unpublish; a retry finds nothing to do.
            None if host::mount_at(target).ok().flatten().is_none() => return Ok(()),
            None => return Err(Error::NotFound(format!("volume {id} does not exist"))),
        };
        if !meta.published.contains_key(target) {
            // Not ours (or already done): leave whatever is at that path alone, but finish the
            // teardown of an ephemeral volume an earlier call could not complete.
            return self.remove_ephemeral_if_unused(&meta);
        }
        host::unmount(target)?;
        let removed = if target.is_dir() { fs::remove_dir(target) } else { fs::remove_file(target) };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(host::Error::Io { op: "remove", path: target.to_owned(), source }.into()),
        }
        meta.published.remove(target);
        self.store.save_volume(&meta)?;
        tracing::info!(volume = id, target = %target.display(), "unpublished");
        self.remove_ephemeral_if_unused(&meta)
    }
}
