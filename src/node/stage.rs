//! Stage and unstage: a volume's device served, probed, formatted only if blank, mounted (or
//! handed over raw), and recorded; and back. The states and transitions are drawn in
//! docs/ARCHITECTURE.md ("A staged volume's life").

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::NodeAgent;
use crate::host;
use crate::server::HealthState;
use crate::status::{Error, Result};
use crate::volume::{StageInfo, VolumeMeta};

/// A filesystem stage's mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountSpec {
    /// The filesystem to make on a blank volume; `None`: the volume's own, or ext4.
    pub fs_type: Option<String>,
    /// Mount flags (checked by `host::parse_mount_flags`).
    pub flags: Vec<String>,
}

/// What a stage asks for.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// The staging path (absolute and normal: `host::checked_path`).
    pub path: PathBuf,
    /// `None`: raw block access; nothing is mounted at the staging path.
    pub mount: Option<MountSpec>,
    /// The CSI access mode, recorded as it came.
    pub access_mode: i32,
    /// Whether the filesystem is mounted read-only.
    pub read_only: bool,
}

impl StageSpec {
    fn block(&self) -> bool {
        self.mount.is_none()
    }
}

impl NodeAgent {
    /// NodeStageVolume of an RBD volume: records it on this node (its image lives in Ceph), then
    /// stages it like any volume. A record made for a stage that fails is removed again.
    pub fn stage_rbd(
        &self,
        id: &str,
        spec: &StageSpec,
        context: &HashMap<String, String>,
        secrets: &HashMap<String, String>,
    ) -> Result<()> {
        let fresh = self.store.volume(id)?.is_none();
        crate::rbd::node::record_for_stage(&self.store, id, context, secrets)?;
        let staged = self.stage(id, spec);
        if staged.is_err() && fresh {
            if let Err(e) = self.store.delete_volume(id) {
                tracing::warn!(volume = id, error = %e, "cannot remove the record of a failed stage");
            }
        }
        staged
    }

    /// NodeStageVolume: serves the volume's device (healing a degraded server), formats it
    /// only if it carries no signature at all, mounts it (or leaves it raw), and records the
    /// stage. Idempotent; a stage that started the device and fails takes it down again.
    pub fn stage(&self, id: &str, spec: &StageSpec) -> Result<()> {
        let mut meta = self.store.existing_volume(id)?;
        let (path, block, mount) = (spec.path.as_path(), spec.block(), spec.mount.as_ref());
        if let Some(staged) = &meta.staged {
            if staged.staging_path != path || staged.block != block {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is already staged at {} as {}",
                    staged.staging_path.display(),
                    if staged.block { "a block device" } else { "a filesystem" }
                )));
            }
            let same_mount = match &mount {
                Some(m) => staged.mount_flags == m.flags && (m.fs_type.is_none() || staged.fs_type == m.fs_type),
                None => true,
            };
            if staged.access_mode != spec.access_mode || !same_mount {
                return Err(Error::AlreadyExists(format!(
                    "volume {id} is staged at {} with another capability",
                    path.display()
                )));
            }
            // Done already, unless the device or its mount went away (a node reboot, a lost
            // device) or its server is degraded: then fall through and bring all back.
            if let Some(server) = self.servers.get(id).filter(|s| s.health() == HealthState::Serving) {
                if block || mounted_from(path, server.block_device()) {
                    return Ok(());
                }
            }
        }
        if !path.is_dir() {
            return Err(Error::NotFound(format!("staging path {} does not exist", path.display())));
        }
        let recorded_before = meta.staged.is_some();
        let server = self.served(&meta)?;
        let dev = server.block_device().to_owned();
        drop(server);
        let mut stage = StageInfo {
            staging_path: path.to_owned(),
            block,
            fs_type: None,
            mount_flags: vec![],
            access_mode: spec.access_mode,
        };
        if let Some(m) = mount {
            let wanted = m.fs_type.clone().or_else(|| meta.spec.fs_type.clone()).unwrap_or_else(|| "ext4".into());
            let mounted = (|| -> Result<String> {
                let fs_type = match host::probe(&dev)? {
                    host::Contents::Filesystem(existing) => {
                        if existing != wanted {
                            tracing::warn!(
                                volume = id,
                                existing,
                                wanted,
                                "volume already has a filesystem; mounting it as it is"
                            );
                        }
                        existing
                    }
                    host::Contents::Other(what) => {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {id} holds {what}, not a filesystem: it is never formatted; stage it as a block volume, or wipe it (wipefs) if its data may go"
                        )));
                    }
                    host::Contents::Blank => {
                        tracing::info!(volume = id, fs = wanted, device = %dev.display(), "formatting blank volume");
                        host::mkfs(&dev, &wanted)?;
                        wanted
                    }
                };
                let current = host::mount_at(path)?;
                let ours = host::device_number(&dev)?;
                let read_only = spec.read_only;
                match current {
                    Some(existing) if existing.dev == ours => {}
                    Some(existing) if !host::device_present(&existing.dev) => {
                        // A mount of a device that no longer exists (its server died and the
                        // device was removed): nothing can use it any more; replace it.
                        tracing::warn!(volume = id, stale = %existing.source, "replacing a mount of a vanished device");
                        host::detach_mount(path)?;
                        host::mount_fs(&dev, path, &fs_type, &m.flags, read_only)?;
                    }
                    Some(existing) => {
                        return Err(Error::AlreadyExists(format!(
                            "{} is already a mount of {}",
                            path.display(),
                            existing.source
                        )));
                    }
                    None => host::mount_fs(&dev, path, &fs_type, &m.flags, read_only)?,
                }
                Ok(fs_type)
            })();
            match mounted {
                Ok(fs_type) => {
                    stage.fs_type = Some(fs_type);
                    stage.mount_flags = m.flags.clone();
                }
                Err(e) => {
                    // A stage that started the device takes it down again; a volume staged
                    // before keeps its server (its state dir says staged).
                    if !recorded_before {
                        if let Err(stop) = self.take_down(id) {
                            tracing::error!(volume = id, error = %stop, "cannot stop the device after a failed stage");
                        }
                    }
                    return Err(e);
                }
            }
        }
        meta.staged = Some(stage);
        if crate::rbd::is_rbd(&meta.spec) {
            // The image's size is Ceph's to say; the record follows it.
            if let Ok(size) = host::block_device_size(&dev) {
                meta.spec.capacity_bytes = size;
            }
        }
        if let Err(e) = self.store.save_volume(&meta) {
            // Never leave a mounted disk that nobody serves (every access to it would hang).
            // If the state dir still says staged, keep serving: kubelet's retry finishes.
            if !recorded_before {
                if !block {
                    if let Err(unmount) = host::unmount(path) {
                        tracing::error!(volume = id, error = %unmount, "cannot unmount after a failed stage; the device stays served");
                        return Err(e.into());
                    }
                }
                if let Err(stop) = self.take_down(id) {
                    tracing::error!(volume = id, error = %stop, "cannot stop the device after a failed stage");
                }
            }
            return Err(e.into());
        }
        tracing::info!(volume = id, device = %dev.display(), path = %path.display(), "staged");
        Ok(())
    }

    /// NodeUnstageVolume: on a served device only, unmounts, refuses if a flush of the device
    /// ever failed, detaches (a failed detach keeps serving) and forgets the stage.
    /// Idempotent.
    pub fn unstage(&self, id: &str, path: &Path) -> Result<()> {
        let mut meta = match self.store.volume(id)? {
            Some(meta) => meta,
            // An RBD volume this node forgot (unstaged already): nothing is served; only a mount
            // that kubelet still sees could be left.
            None if crate::rbd::is_rbd_id(id) => {
                if host::mount_at(path)?.is_some() {
                    host::unmount(path)?;
                }
                return Ok(());
            }
            None => return Err(crate::volume::Error::NotFound { what: "volume", id: id.to_owned() }.into()),
        };
        if let Some(staged) = &meta.staged {
            if staged.staging_path != path {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is staged at {}, not {}",
                    staged.staging_path.display(),
                    path.display()
                )));
            }
            if !meta.published.is_empty() {
                let targets: Vec<String> = meta.published.keys().map(|p| p.display().to_string()).collect();
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is still published at {}; unpublish it first",
                    targets.join(", ")
                )));
            }
            // The unmount writes, and the detach drains the host's queue through us: both only
            // on a device that is served.
            let server = self.served_or_unavailable(&meta)?;
            host::unmount(path)?;
            // Every write the filesystem made is through now; if any flush of it failed, the
            // data may be gone although this flush succeeds: say so rather than finish.
            server.flush().map_err(|e| match e {
                crate::server::Error::FlushFailed(..) => Error::FailedPrecondition(format!(
                    "{e}; the volume stays staged: check the node's disk, and restart the plugin to serve it afresh"
                )),
                other => other.into(),
            })?;
            drop(server);
            self.take_down(id)?;
        } else {
            self.unmount_unrecorded(&meta, path)?;
            if self.servers.get(id).is_some() {
                self.take_down(id)?;
            } else {
                self.remove_leftover_device(id)?;
            }
        }
        meta.staged = None;
        meta.published.clear();
        self.set_fenced(id, None);
        self.set_unserved(id, None);
        if crate::rbd::is_rbd(&meta.spec) {
            // Its lock is released (the server closed the image); the node keeps nothing.
            self.store.delete_volume(id)?;
        } else {
            self.store.save_volume(&meta)?;
        }
        tracing::info!(volume = id, "unstaged");
        Ok(())
    }

    /// Unmounts a staging path that holds the volume's filesystem although the state dir does not
    /// say it is staged (a plugin killed between mount and metadata write). The device is served
    /// again first, so the unmount's writes complete; unstage then stops it as usual.
    fn unmount_unrecorded(&self, meta: &VolumeMeta, path: &Path) -> Result<()> {
        let id = &meta.spec.id;
        let Some(dev) = self.attached_block_device(id) else { return Ok(()) };
        if !mounted_from(path, &dev) {
            return Ok(());
        }
        tracing::warn!(volume = %id, path = %path.display(), "unmounting a staging mount the state dir does not record");
        self.served_or_unavailable(meta)?;
        host::unmount(path)?;
        Ok(())
    }
}

/// Whether the filesystem mounted at `path` lives on `dev`.
pub(super) fn mounted_from(path: &Path, dev: &Path) -> bool {
    match (host::mount_at(path), host::device_number(dev)) {
        (Ok(Some(m)), Ok(number)) => m.dev == number,
        _ => false,
    }
}
