//! Node service: stage = serve the volume's image as /dev/vdX (and format + mount it),
//! publish = bind mounts, plus stats and online expansion.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use super::controller::{capacity_for, check_capability};
use super::proto::node_server::Node;
use super::proto::*;
use super::{Error, MIB, Plugin, Result, blocking, rbd, volume_id};
use crate::backend::CacheMode;
use crate::backend::{Backend, FileBackend, NullBackend};
use crate::host;
use crate::node::into_owned;
use crate::server::{DeviceOptions, DeviceServer, HealthState, StopError};
use crate::volume::{PublishInfo, StageInfo, VolumeMeta};

/// Ring size of every volume's queues.
const QUEUE_SIZE: u16 = 256;
/// How long to wait for the host to see a new capacity after the config interrupt.
const RESIZE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server taken out of the table may still be borrowed (a scrape, a stats call)
/// before whoever wants to stop or replace it gives up.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct NodeService {
    plugin: Arc<Plugin>,
}

impl NodeService {
    pub fn new(plugin: Arc<Plugin>) -> Self {
        Self { plugin }
    }
}

/// The VDUSE device name of a volume: its ID when that fits the 64-character device-name
/// limit, else a stable hash of it.
pub fn device_name(volume_id: &str) -> String {
    if crate::vduse::validate_device_name(volume_id).is_ok() {
        return volume_id.to_owned();
    }
    format!("vcsi-{:016x}", super::stable_hash(volume_id))
}

fn mode_of(cap: &VolumeCapability) -> i32 {
    cap.access_mode.as_ref().map_or(0, |m| m.mode)
}

fn reader_only(mode: i32) -> bool {
    mode == volume_capability::access_mode::Mode::SingleNodeReaderOnly as i32
}

/// Starts serving a volume's image and returns the server. A device of the volume's name
/// that is attached already is taken over only if the state dir records it as this
/// volume's: a name is the volume ID or a hash of it, so two volumes can want one.
pub fn start_device(plugin: &Plugin, meta: &VolumeMeta) -> Result<DeviceServer> {
    let name = device_name(&meta.spec.id);
    let claimed = plugin.store.claim_device(&name, &meta.spec.id).map_err(|e| match e {
        crate::volume::Error::Conflict { .. } => {
            Error::FailedPrecondition(format!("volume {}: {e}; unstage that volume first", meta.spec.id))
        }
        other => other.into(),
    })?;
    let backend: Arc<dyn Backend> = if rbd::is_rbd(&meta.spec) {
        match rbd::open_backend(plugin, meta)? {
            rbd::Opened::Served(backend) => Arc::new(backend),
            rbd::Opened::Fenced(reason) => {
                tracing::error!(volume = %meta.spec.id, reason, "fenced: every request to this device fails until it is unstaged");
                if let Ok(mut fenced) = plugin.fenced.lock() {
                    fenced.insert(meta.spec.id.clone(), reason);
                }
                Arc::new(NullBackend::fenced(meta.spec.capacity_bytes))
            }
        }
    } else {
        let image = plugin.store.image_path(&meta.spec.id)?;
        // Validated at CreateVolume; metadata from an older release has none.
        let cache = meta.spec.parameters.get(super::PARAM_CACHE).and_then(|c| CacheMode::parse(c)).unwrap_or_default();
        Arc::new(FileBackend::open(&image, None, false, cache).map_err(|e| Error::Internal(e.to_string()))?)
    };
    let qos = super::volume_qos(&meta.spec)
        .map_err(|e| Error::FailedPrecondition(format!("volume {}: {e}", meta.spec.id)))?;
    let opts = DeviceOptions {
        name,
        num_queues: meta.spec.queues.max(1),
        queue_size: QUEUE_SIZE,
        msg_timeout: 0,
        poll: crate::server::DEFAULT_POLL,
        counters: plugin.counters.load(std::sync::atomic::Ordering::Relaxed),
        qos,
    };
    let started = DeviceServer::start(&opts, backend);
    if started.is_err() && claimed && !crate::vduse::sysfs::device_exists(&opts.name) {
        if let Err(e) = plugin.store.release_device(&opts.name) {
            tracing::warn!(device = %opts.name, error = %e, "cannot remove the record of a device that never came up");
        }
    }
    Ok(started?)
}

/// NodeStageVolume of an RBD volume: records it on this node (its image lives in Ceph), then
/// stages it like any volume. A record made for a stage that fails is removed again.
fn stage_rbd(
    plugin: &Plugin,
    id: &str,
    path: &Path,
    cap: &VolumeCapability,
    context: &HashMap<String, String>,
    secrets: &HashMap<String, String>,
) -> Result<()> {
    let fresh = plugin.store.volume(id)?.is_none();
    rbd::record_for_stage(plugin, id, context, secrets)?;
    let staged = stage(plugin, id, path, cap);
    if staged.is_err() && fresh {
        if let Err(e) = plugin.store.delete_volume(id) {
            tracing::warn!(volume = id, error = %e, "cannot remove the record of a failed stage");
        }
    }
    staged
}

/// The block device of a staged volume, if its server runs.
fn block_device(plugin: &Plugin, id: &str) -> Option<PathBuf> {
    plugin.servers.get(id).map(|s| s.block_device().to_owned())
}

/// The server of a volume, healthy: a missing or degraded one is replaced first (the device
/// stays attached and the new server takes it over where the old one stopped). Whatever
/// writes to the device (umount, fsfreeze, syncfs, a detach's drain) runs only behind this,
/// since on a device nobody answers it would wait in D state for ever. The caller holds the
/// volume's guard.
pub(super) fn served(plugin: &Plugin, meta: &VolumeMeta) -> Result<Arc<DeviceServer>> {
    let id = &meta.spec.id;
    let why = match plugin.servers.get(id) {
        Some(server) => match server.health() {
            HealthState::Serving => return Ok(server),
            HealthState::Degraded(reason) => format!("its device server is degraded: {reason}"),
        },
        None => "it has no device server".to_owned(),
    };
    if let Some(old) = plugin.servers.remove(id) {
        // Its threads are joined when the last reference goes, outside the table's lock.
        match into_owned(old, RELEASE_TIMEOUT) {
            Ok(old) => drop(old),
            Err(old) => {
                plugin.servers.insert(id, old);
                return Err(Error::Unavailable(format!("volume {id}: {why}, and its old server is still in use")));
            }
        }
    }
    let server = Arc::new(start_device(plugin, meta)?);
    tracing::warn!(volume = %id, device = %server.block_device().display(), "served again: {why}");
    plugin.servers.insert(id, Arc::clone(&server));
    Ok(server)
}

/// Like [`served`], for an operation on a volume that is staged already: a volume that cannot
/// be served is UNAVAILABLE (kubelet or the sidecar retries; the heal loop keeps trying).
pub(super) fn served_or_unavailable(plugin: &Plugin, meta: &VolumeMeta) -> Result<Arc<DeviceServer>> {
    served(plugin, meta).map_err(|e| {
        Error::Unavailable(format!(
            "the device of volume {} is not served, and cannot be served again now ({e}); try again later",
            meta.spec.id
        ))
    })
}

/// Stops the server of `id` and removes its device. A server that cannot detach keeps
/// serving and stays in the table.
pub(super) fn take_down(plugin: &Plugin, id: &str) -> Result<()> {
    let Some(server) = plugin.servers.remove(id) else { return Ok(()) };
    let server = into_owned(server, RELEASE_TIMEOUT).map_err(|server| {
        plugin.servers.insert(id, server);
        Error::Unavailable(format!("the device server of volume {id} is in use; try again"))
    })?;
    match server.stop() {
        Ok(()) => Ok(plugin.store.release_device(&device_name(id))?),
        Err(StopError::StillServing(still)) => {
            plugin.servers.insert(id, Arc::new(*still.server));
            Err(still.error.into())
        }
        Err(StopError::Failed(e)) => Err(e.into()),
    }
}

pub(super) fn stage(plugin: &Plugin, id: &str, path: &Path, cap: &VolumeCapability) -> Result<()> {
    let mut meta = plugin.store.existing_volume(id)?;
    let block = matches!(cap.access_type, Some(volume_capability::AccessType::Block(_)));
    let mount = match &cap.access_type {
        Some(volume_capability::AccessType::Mount(m)) => Some(m.clone()),
        _ => None,
    };
    if let Some(staged) = &meta.staged {
        if staged.staging_path != path || staged.block != block {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is already staged at {} as {}",
                staged.staging_path.display(),
                if staged.block { "a block device" } else { "a filesystem" }
            )));
        }
        let same_mount = match &mount {
            Some(m) => {
                staged.mount_flags == m.mount_flags
                    && (m.fs_type.is_empty() || staged.fs_type.as_deref() == Some(m.fs_type.as_str()))
            }
            None => true,
        };
        if staged.access_mode != mode_of(cap) || !same_mount {
            return Err(Error::AlreadyExists(format!(
                "volume {id} is staged at {} with another capability",
                path.display()
            )));
        }
        // Done already, unless the device or its mount went away (a node reboot, a lost
        // device) or its server is degraded: then fall through and bring all back.
        if let Some(server) = plugin.servers.get(id).filter(|s| s.health() == HealthState::Serving) {
            if block || mounted_from(path, server.block_device()) {
                return Ok(());
            }
        }
    }
    if !path.is_dir() {
        return Err(Error::NotFound(format!("staging path {} does not exist", path.display())));
    }
    let recorded_before = meta.staged.is_some();
    let server = served(plugin, &meta)?;
    let dev = server.block_device().to_owned();
    drop(server);
    let mut stage = StageInfo {
        staging_path: path.to_owned(),
        block,
        fs_type: None,
        mount_flags: vec![],
        access_mode: mode_of(cap),
    };
    if let Some(m) = mount {
        let wanted = Some(m.fs_type.clone())
            .filter(|f| !f.is_empty())
            .or_else(|| meta.spec.fs_type.clone())
            .unwrap_or_else(|| "ext4".into());
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
            let read_only = reader_only(stage.access_mode);
            match current {
                Some(existing) if existing.dev == ours => {}
                Some(existing) if !host::device_present(&existing.dev) => {
                    // A mount of a device that no longer exists (its server died and the
                    // device was removed): nothing can use it any more; replace it.
                    tracing::warn!(volume = id, stale = %existing.source, "replacing a mount of a vanished device");
                    host::detach_mount(path)?;
                    host::mount_fs(&dev, path, &fs_type, &m.mount_flags, read_only)?;
                }
                Some(existing) => {
                    return Err(Error::AlreadyExists(format!(
                        "{} is already a mount of {}",
                        path.display(),
                        existing.source
                    )));
                }
                None => host::mount_fs(&dev, path, &fs_type, &m.mount_flags, read_only)?,
            }
            Ok(fs_type)
        })();
        match mounted {
            Ok(fs_type) => {
                stage.fs_type = Some(fs_type);
                stage.mount_flags = m.mount_flags.clone();
            }
            Err(e) => {
                // A stage that started the device takes it down again; a volume staged
                // before keeps its server (its state dir says staged).
                if !recorded_before {
                    if let Err(stop) = take_down(plugin, id) {
                        tracing::error!(volume = id, error = %stop, "cannot stop the device after a failed stage");
                    }
                }
                return Err(e);
            }
        }
    }
    meta.staged = Some(stage);
    if rbd::is_rbd(&meta.spec) {
        // The image's size is Ceph's to say; the record follows it.
        if let Ok(size) = host::block_device_size(&dev) {
            meta.spec.capacity_bytes = size;
        }
    }
    if let Err(e) = plugin.store.save_volume(&meta) {
        // Never leave a mounted disk that nobody serves (every access to it would hang).
        // If the state dir still says staged, keep serving: kubelet's retry finishes.
        if !recorded_before {
            if !block {
                if let Err(unmount) = host::unmount(path) {
                    tracing::error!(volume = id, error = %unmount, "cannot unmount after a failed stage; the device stays served");
                    return Err(e.into());
                }
            }
            if let Err(stop) = take_down(plugin, id) {
                tracing::error!(volume = id, error = %stop, "cannot stop the device after a failed stage");
            }
        }
        return Err(e.into());
    }
    tracing::info!(volume = id, device = %dev.display(), path = %path.display(), "staged");
    Ok(())
}

pub(super) fn unstage(plugin: &Plugin, id: &str, path: &Path) -> Result<()> {
    let mut meta = match plugin.store.volume(id)? {
        Some(meta) => meta,
        // An RBD volume this node forgot (unstaged already): nothing is served; only a mount
        // that kubelet still sees could be left.
        None if rbd::is_rbd_id(id) => {
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
        let server = served_or_unavailable(plugin, &meta)?;
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
        take_down(plugin, id)?;
    } else {
        unmount_unrecorded(plugin, &meta, path)?;
        if plugin.servers.get(id).is_some() {
            take_down(plugin, id)?;
        } else if crate::vduse::sysfs::device_exists(&device_name(id)) {
            if plugin.store.device_owner(&device_name(id))?.is_some_and(|owner| owner != *id) {
                return Err(Error::FailedPrecondition(format!(
                    "device {} serves another volume; not removing it",
                    device_name(id)
                )));
            }
            crate::server::remove_stale(&device_name(id))?;
            plugin.store.release_device(&device_name(id))?;
        }
    }
    meta.staged = None;
    meta.published.clear();
    if let Ok(mut fenced) = plugin.fenced.lock() {
        fenced.remove(id);
    }
    if rbd::is_rbd(&meta.spec) {
        // Its lock is released (the server closed the image); the node keeps nothing.
        plugin.store.delete_volume(id)?;
    } else {
        plugin.store.save_volume(&meta)?;
    }
    tracing::info!(volume = id, "unstaged");
    Ok(())
}

/// Unmounts a staging path that holds the volume's filesystem although the state dir does not
/// say it is staged (a plugin killed between mount and metadata write). The device is served
/// again first, so the unmount's writes complete; unstage then stops it as usual.
fn unmount_unrecorded(plugin: &Plugin, meta: &VolumeMeta, path: &Path) -> Result<()> {
    let id = &meta.spec.id;
    let dev = match block_device(plugin, id) {
        Some(dev) => dev,
        None => match crate::vduse::sysfs::block_device_name(&device_name(id)) {
            Some(name) => PathBuf::from("/dev").join(name),
            None => return Ok(()),
        },
    };
    if !mounted_from(path, &dev) {
        return Ok(());
    }
    tracing::warn!(volume = %id, path = %path.display(), "unmounting a staging mount the state dir does not record");
    served_or_unavailable(plugin, meta)?;
    host::unmount(path)?;
    Ok(())
}

pub(super) fn publish(plugin: &Plugin, req: &NodePublishVolumeRequest, cap: &VolumeCapability) -> Result<()> {
    let id = &req.volume_id;
    let target = Path::new(&req.target_path);
    let mut meta = plugin.store.existing_volume(id)?;
    let staged = meta.staged.clone().ok_or_else(|| Error::FailedPrecondition(format!("volume {id} is not staged")))?;
    if staged.staging_path != Path::new(&req.staging_target_path) {
        return Err(Error::FailedPrecondition(format!("volume {id} is staged at {}", staged.staging_path.display())));
    }
    let block = matches!(cap.access_type, Some(volume_capability::AccessType::Block(_)));
    if block != staged.block {
        return Err(Error::InvalidArgument("access type differs from the one the volume was staged with".into()));
    }
    let mode = mode_of(cap);
    let read_only = req.readonly || reader_only(mode);
    if let Some(existing) = meta.published.get(target) {
        if existing.read_only != read_only || existing.access_mode != mode {
            return Err(Error::AlreadyExists(format!("{} is published with other options", target.display())));
        }
        if host::mount_at(target)?.is_some() {
            return Ok(());
        }
    } else if mode == volume_capability::access_mode::Mode::SingleNodeSingleWriter as i32 && !meta.published.is_empty()
    {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} is SINGLE_NODE_SINGLE_WRITER and already published"
        )));
    } else if meta
        .published
        .values()
        .any(|p| p.access_mode == volume_capability::access_mode::Mode::SingleNodeSingleWriter as i32)
    {
        return Err(Error::FailedPrecondition(format!("volume {id} is published SINGLE_NODE_SINGLE_WRITER elsewhere")));
    }
    // Record the publication before mounting: unpublish only ever touches recorded targets,
    // so a crash between the two must leave the record, not an unknown mount.
    meta.published.insert(target.to_owned(), PublishInfo { read_only, access_mode: mode });
    plugin.store.save_volume(&meta)?;
    if let Err(e) = bind_target(plugin, id, &staged, target, block, read_only) {
        meta.published.remove(target);
        plugin.store.save_volume(&meta)?;
        return Err(e);
    }
    tracing::info!(volume = %id, target = %target.display(), read_only, "published");
    Ok(())
}

/// Creates `target` and bind-mounts the volume onto it (the device for block volumes, the
/// staged filesystem otherwise).
fn bind_target(
    plugin: &Plugin,
    id: &str,
    staged: &StageInfo,
    target: &Path,
    block: bool,
    read_only: bool,
) -> Result<()> {
    let io = |op: &'static str| move |source| host::Error::Io { op, path: target.to_owned(), source };
    if block {
        let dev = block_device(plugin, id)
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

fn unpublish(plugin: &Plugin, id: &str, target: &Path) -> Result<()> {
    let mut meta = match plugin.store.volume(id)? {
        Some(meta) => meta,
        // An ephemeral volume is deleted by its unpublish; a retry finds nothing to do.
        None if host::mount_at(target).ok().flatten().is_none() => return Ok(()),
        None => return Err(Error::NotFound(format!("volume {id} does not exist"))),
    };
    if !meta.published.contains_key(target) {
        // Not ours (or already done): leave whatever is at that path alone, but finish the
        // teardown of an ephemeral volume an earlier call could not complete.
        return super::ephemeral::remove_if_unused(plugin, &meta);
    }
    host::unmount(target)?;
    let removed = if target.is_dir() { fs::remove_dir(target) } else { fs::remove_file(target) };
    match removed {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(host::Error::Io { op: "remove", path: target.to_owned(), source }.into()),
    }
    meta.published.remove(target);
    plugin.store.save_volume(&meta)?;
    tracing::info!(volume = id, target = %target.display(), "unpublished");
    super::ephemeral::remove_if_unused(plugin, &meta)
}

fn expand(plugin: &Plugin, id: &str, path: &Path, range: Option<&CapacityRange>) -> Result<u64> {
    let meta = plugin.store.existing_volume(id)?;
    let staged = meta
        .staged
        .clone()
        .ok_or_else(|| Error::FailedPrecondition(format!("volume {id} is not staged on this node")))?;
    if path != staged.staging_path && !meta.published.contains_key(path) {
        return Err(Error::NotFound(format!("{} is not a path of volume {id}", path.display())));
    }
    let wanted = match range {
        Some(r) => capacity_for(Some(r))?,
        None => meta.spec.capacity_bytes,
    };
    let meta = if rbd::is_rbd(&meta.spec) {
        // The controller resized the image; the device server learns it below.
        let mut meta = meta;
        meta.spec.capacity_bytes = meta.spec.capacity_bytes.max(wanted);
        plugin.store.save_volume(&meta)?;
        meta
    } else {
        plugin.store.grow_volume(id, wanted)?
    };
    let dev = {
        let server = served_or_unavailable(plugin, &meta)?;
        server.resize(meta.spec.capacity_bytes)?;
        server.block_device().to_owned()
    };
    let deadline = Instant::now() + RESIZE_TIMEOUT;
    while host::block_device_size(&dev)? < meta.spec.capacity_bytes {
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "{} did not grow to {} bytes",
                dev.display(),
                meta.spec.capacity_bytes
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !staged.block {
        let fs_type = host::mount_at(&staged.staging_path)?
            .map(|m| m.fs_type)
            .or(staged.fs_type)
            .unwrap_or_else(|| "ext4".into());
        host::grow_fs(&dev, &staged.staging_path, &fs_type)?;
    }
    tracing::info!(volume = id, capacity = meta.spec.capacity_bytes, "expanded");
    Ok(meta.spec.capacity_bytes)
}

fn stats(plugin: &Plugin, id: &str, path: &Path) -> Result<NodeGetVolumeStatsResponse> {
    let meta = plugin.store.existing_volume(id)?;
    let staged =
        meta.staged.clone().ok_or_else(|| Error::NotFound(format!("volume {id} is not staged on this node")))?;
    if path != staged.staging_path && !meta.published.contains_key(path) {
        return Err(Error::NotFound(format!("{} is not a path of volume {id}", path.display())));
    }
    let dev = block_device(plugin, id);
    let server = plugin.servers.get(id);
    let health = server.as_ref().map(|s| s.health());
    let flush_failure = server.as_ref().and_then(|s| s.flush_failure());
    drop(server);
    let condition = match &dev {
        _ if let Some(why) = &flush_failure => {
            abnormal(format!("a flush of volume {id} failed ({why}): writes it acknowledged may be lost"))
        }
        // A queue or control thread of the server stopped on a fault: the reason says which.
        _ if let Some(HealthState::Degraded(reason)) = &health => {
            abnormal(format!("the device server of volume {id} is degraded: {reason}"))
        }
        _ if let Some(reason) = plugin.fenced.lock().ok().and_then(|f| f.get(id).cloned()) => {
            abnormal(format!("volume {id} is fenced on this node, every request fails: {reason}; unstage it"))
        }
        Some(d) if !d.exists() => abnormal(format!("{} of volume {id} is gone", d.display())),
        Some(d) if !staged.block && !mounted_from(&staged.staging_path, d) => abnormal(format!(
            "the filesystem at {} is not on {} (the device was lost); unstage and stage the volume again",
            staged.staging_path.display(),
            d.display()
        )),
        Some(d) => match backing_store_full(plugin, &meta)? {
            Some(message) => abnormal(message),
            None => VolumeCondition { abnormal: false, message: format!("served as {}", d.display()) },
        },
        None => abnormal(format!("the device server of volume {id} is not running")),
    };
    use volume_usage::Unit;
    let usage = if staged.block {
        let total = dev.as_deref().map(host::block_device_size).transpose()?.unwrap_or(meta.spec.capacity_bytes);
        vec![VolumeUsage { available: 0, total: total as i64, used: 0, unit: Unit::Bytes as i32 }]
    } else {
        let u = host::fs_usage(path)?;
        vec![
            VolumeUsage {
                available: u.available_bytes as i64,
                total: u.total_bytes as i64,
                used: u.used_bytes as i64,
                unit: Unit::Bytes as i32,
            },
            VolumeUsage {
                available: u.free_inodes as i64,
                total: u.total_inodes as i64,
                used: u.used_inodes as i64,
                unit: Unit::Inodes as i32,
            },
        ]
    };
    Ok(NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) })
}

/// Free bytes of the backing filesystem below which a thin volume's writes to blocks it has
/// not allocated yet may fail.
const BACKING_FULL_BYTES: u64 = MIB;

/// Whether writes of a thin volume can fail because the backing filesystem is full: the
/// message for its condition, or `None`.
fn backing_store_full(plugin: &Plugin, meta: &VolumeMeta) -> Result<Option<String>> {
    Ok(store_full(&plugin.store, meta)?)
}

/// Whether writes of a thin volume can fail because its store's filesystem is full (see
/// [`backing_store_full`]); for callers without a running plugin.
pub(super) fn store_full(
    store: &crate::volume::VolumeStore,
    meta: &VolumeMeta,
) -> crate::volume::Result<Option<String>> {
    if !meta.spec.is_local() {
        return Ok(None);
    }
    let free = store.available_bytes()?;
    let allocated = crate::volume::allocated_bytes(&store.image_path(&meta.spec.id)?)?;
    Ok(full_message(&meta.spec.id, free, allocated, meta.spec.capacity_bytes))
}

fn full_message(id: &str, free: u64, allocated: u64, capacity: u64) -> Option<String> {
    (free < BACKING_FULL_BYTES && allocated < capacity).then(|| {
        format!(
            "backing store full: {free} bytes free on the node's state dir, and {} bytes of volume {id} are not allocated yet; writes to them fail with I/O errors",
            capacity - allocated
        )
    })
}

fn abnormal(message: String) -> VolumeCondition {
    VolumeCondition { abnormal: true, message }
}

/// Whether the filesystem mounted at `path` lives on `dev`.
fn mounted_from(path: &Path, dev: &Path) -> bool {
    match (host::mount_at(path), host::device_number(dev)) {
        (Ok(Some(m)), Ok(number)) => m.dev == number,
        _ => false,
    }
}

/// A path field of a request, absolute and normal (see [`host::checked_path`]).
fn checked_path(field: &str, path: &str) -> Result<PathBuf> {
    host::checked_path(field, path).map_err(Error::InvalidArgument)
}

fn capability(cap: Option<VolumeCapability>) -> Result<VolumeCapability> {
    let cap = cap.ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?;
    check_capability(&cap)?;
    Ok(cap)
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> std::result::Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = volume_id(&req.volume_id)?.to_owned();
        let path = checked_path("staging_target_path", &req.staging_target_path)?;
        let cap = capability(req.volume_capability)?;
        // Refuse bad mount flags before a device is started or a filesystem made.
        if let Some(volume_capability::AccessType::Mount(m)) = &cap.access_type {
            host::parse_mount_flags(&m.mount_flags, false).map_err(Error::from)?;
        }
        let guard = self.plugin.guards.acquire(&id)?;
        let plugin = Arc::clone(&self.plugin);
        blocking(move || {
            let _guard = guard;
            if rbd::is_rbd_id(&id) {
                return stage_rbd(&plugin, &id, &path, &cap, &req.volume_context, &req.secrets);
            }
            stage(&plugin, &id, &path, &cap)
        })
        .await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> std::result::Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = volume_id(&req.volume_id)?.to_owned();
        let path = checked_path("staging_target_path", &req.staging_target_path)?;
        let guard = self.plugin.guards.acquire(&id)?;
        let plugin = Arc::clone(&self.plugin);
        blocking(move || {
            let _guard = guard;
            unstage(&plugin, &id, &path)
        })
        .await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> std::result::Result<Response<NodePublishVolumeResponse>, Status> {
        let mut req = request.into_inner();
        let id = volume_id(&req.volume_id)?.to_owned();
        checked_path("target_path", &req.target_path)?;
        let cap = capability(req.volume_capability.take())?;
        if super::ephemeral::requested(&req.volume_context) {
            let guard = self.plugin.guards.acquire(&id)?;
            let plugin = Arc::clone(&self.plugin);
            blocking(move || {
                let _guard = guard;
                super::ephemeral::publish(&plugin, &req, &cap)
            })
            .await?;
            return Ok(Response::new(NodePublishVolumeResponse {}));
        }
        // Checked after the fields that make the request malformed: the CSI spec answers a
        // publish without the staging path of a STAGE_UNSTAGE_VOLUME plugin with
        // FAILED_PRECONDITION (stage first), not INVALID_ARGUMENT.
        if req.staging_target_path.is_empty() {
            return Err(
                Error::FailedPrecondition("staging_target_path is required: stage the volume first".into()).into()
            );
        }
        checked_path("staging_target_path", &req.staging_target_path)?;
        let guard = self.plugin.guards.acquire(&id)?;
        let plugin = Arc::clone(&self.plugin);
        blocking(move || {
            let _guard = guard;
            publish(&plugin, &req, &cap)
        })
        .await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = volume_id(&req.volume_id)?.to_owned();
        let target = checked_path("target_path", &req.target_path)?;
        let guard = self.plugin.guards.acquire(&id)?;
        let plugin = Arc::clone(&self.plugin);
        blocking(move || {
            let _guard = guard;
            unpublish(&plugin, &id, &target)
        })
        .await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> std::result::Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = volume_id(&req.volume_id)?.to_owned();
        let path = checked_path("volume_path", &req.volume_path)?;
        let plugin = Arc::clone(&self.plugin);
        let resp = blocking(move || stats(&plugin, &id, &path)).await?;
        Ok(Response::new(resp))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> std::result::Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = volume_id(&req.volume_id)?.to_owned();
        let path = checked_path("volume_path", &req.volume_path)?;
        if let Some(cap) = &req.volume_capability {
            check_capability(cap)?;
        }
        let guard = self.plugin.guards.acquire(&id)?;
        let plugin = Arc::clone(&self.plugin);
        let range = req.capacity_range;
        let capacity = blocking(move || {
            let _guard = guard;
            expand(&plugin, &id, &path, range.as_ref())
        })
        .await?;
        Ok(Response::new(NodeExpandVolumeResponse { capacity_bytes: capacity as i64 }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::rpc::Type as T;
        let capabilities =
            [T::StageUnstageVolume, T::GetVolumeStats, T::ExpandVolume, T::VolumeCondition, T::SingleNodeMultiWriter]
                .into_iter()
                .map(|t| NodeServiceCapability {
                    r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc { r#type: t as i32 })),
                })
                .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> std::result::Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.plugin.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(Topology {
                segments: HashMap::from([(super::TOPOLOGY_KEY.to_owned(), self.plugin.node_id.clone())]),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::device_name;

    #[test]
    fn a_thin_volume_on_a_full_backing_store_is_reported() {
        use super::{MIB, full_message};
        let message = full_message("pvc-1", 4096, 10 * MIB, 100 * MIB).expect("full");
        assert!(message.starts_with("backing store full"), "{message}");
        assert_eq!(full_message("pvc-1", 4096, 100 * MIB, 100 * MIB), None, "fully allocated: writes cannot fail");
        assert_eq!(full_message("pvc-1", 64 * MIB, 10 * MIB, 100 * MIB), None, "room left");
    }

    #[test]
    fn device_names_fit_vduse_limits() {
        assert_eq!(device_name("pvc-1"), "pvc-1");
        let long = "x".repeat(100);
        let name = device_name(&long);
        assert!(name.len() <= 64);
        assert_eq!(name, device_name(&long));
        assert!(crate::vduse::validate_device_name(&name).is_ok());
    }
}
