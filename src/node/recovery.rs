//! Recovery after a restart, the heal loop's round, and the flush at shutdown.

use std::path::Path;
use std::sync::Arc;

use super::NodeAgent;
use crate::volume::VolumeMeta;

/// How long the sync of one staged filesystem may take at shutdown.
const SHUTDOWN_SYNC: std::time::Duration = std::time::Duration::from_secs(10);

impl NodeAgent {
    /// Serves again every staged volume whose image is on this node, before the plugin reports
    /// ready. Returns why the node cannot serve volumes at all, if it cannot. Staged RBD volumes
    /// are left to [`NodeAgent::recover_remote`]: their pools may not answer, and the plugin
    /// must serve CSI calls (and its node-local volumes) meanwhile.
    pub fn recover(&self) -> Option<String> {
        if !Path::new(crate::vduse::CONTROL_PATH).exists() {
            let reason = crate::vduse::Error::ControlMissing.to_string();
            tracing::error!("{reason}");
            return Some(reason);
        }
        for meta in self.staged().into_iter().filter(|m| !crate::rbd::is_rbd(&m.spec)) {
            self.recover_one(&meta);
        }
        None
    }

    /// Serves again every staged RBD volume, all at once (each open waits for its own pool,
    /// at most `--ceph-timeout`), while gRPC already serves. A volume an operation holds is
    /// left to that operation, and one that does not open to the heal loop.
    pub fn recover_remote(&self) {
        let remote: Vec<VolumeMeta> = self
            .staged()
            .into_iter()
            .filter(|m| crate::rbd::is_rbd(&m.spec) && self.servers.get(&m.spec.id).is_none())
            .collect();
        std::thread::scope(|scope| {
            for meta in &remote {
                scope.spawn(move || {
                    if let Ok(_guard) = self.guards.acquire(&meta.spec.id) {
                        if self.servers.get(&meta.spec.id).is_none() {
                            self.recover_one(meta);
                        }
                    }
                });
            }
        });
    }

    fn staged(&self) -> Vec<VolumeMeta> {
        match self.store.volumes() {
            Ok(volumes) => volumes.into_iter().filter(|m| m.staged.is_some()).collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot list the staged volumes");
                Vec::new()
            }
        }
    }

    fn recover_one(&self, meta: &VolumeMeta) {
        match self.start_device(meta) {
            Ok(server) => {
                tracing::info!(volume = %meta.spec.id, device = %server.block_device().display(), recovered = server.recovered(), "serving staged volume again");
                self.servers.insert(&meta.spec.id, Arc::new(server));
            }
            Err(e) => {
                tracing::error!(volume = %meta.spec.id, error = %e, "cannot serve staged volume; its condition is abnormal");
                let fault = "no server has run it since the plugin started".to_owned();
                self.set_unserved(&meta.spec.id, Some(super::NotServed { fault, retry_error: e.to_string() }));
            }
        }
    }

    /// Whether this process serves volume `id`'s device and every one of its threads runs.
    fn serves_healthy(&self, id: &str) -> bool {
        self.servers.get(id).is_some_and(|s| matches!(s.health(), crate::server::HealthState::Serving))
    }

    /// Serves again every staged volume whose device server failed to start at recovery or
    /// stopped on a fault (a degraded server): the old server's threads are dropped, the device
    /// stays attached, and a new server takes it over where the old one stopped. A volume an
    /// operation holds is left for the next round (that operation heals it itself if it needs
    /// the device: see [`NodeAgent::served`]). Volumes heal at once, each on its own thread:
    /// one whose pool does not answer holds up no other.
    pub fn heal(&self) {
        let sick: Vec<String> =
            self.staged().into_iter().map(|m| m.spec.id).filter(|id| !self.serves_healthy(id)).collect();
        std::thread::scope(|scope| {
            for id in &sick {
                scope.spawn(move || {
                    let Ok(_guard) = self.guards.acquire(id) else { return };
                    // Read again under the guard: an unstage that held it may have taken the
                    // device down and ended the stage meanwhile, and serving the volume from
                    // the list read before would make a device for a volume nobody staged.
                    let meta = match self.store.volume(id) {
                        Ok(Some(meta)) if meta.staged.is_some() => meta,
                        Ok(_) => return,
                        Err(e) => {
                            tracing::error!(volume = %id, error = %e, "cannot read the volume's record; retrying at the next heal round");
                            return;
                        }
                    };
                    if self.serves_healthy(id) {
                        return;
                    }
                    if let Err(e) = self.served(&meta) {
                        tracing::error!(volume = %id, error = %e, "cannot serve the staged volume; retrying at the next heal round");
                    }
                });
            }
        });
    }

    /// Makes every acknowledged write of the staged volumes durable before the plugin exits, so a
    /// node shutdown right after it loses nothing: each staged filesystem is synced (its page
    /// cache written through our devices, which still serve) and then every image flushed.
    pub fn flush_all(&self) {
        let volumes = match self.store.volumes() {
            Ok(volumes) => volumes,
            Err(e) => {
                tracing::error!(error = %e, "cannot list volumes to flush them");
                return;
            }
        };
        // Only filesystems on devices this process serves and that serve well: a sync of one
        // whose device nobody answers would wait forever. Each in a child process, all at once,
        // each waited for a bounded time: a pool that does not answer keeps its sync waiting,
        // not this process (see `host::sync_fs_within`).
        let staged: Vec<(&str, &std::path::Path)> = volumes
            .iter()
            .filter(|m| self.serves_healthy(&m.spec.id))
            .filter_map(|m| {
                m.staged.as_ref().filter(|s| !s.block).map(|s| (m.spec.id.as_str(), s.staging_path.as_path()))
            })
            .collect();
        std::thread::scope(|scope| {
            for (id, path) in staged {
                scope.spawn(move || {
                    if let Err(e) = crate::host::sync_fs_within(path, SHUTDOWN_SYNC) {
                        tracing::error!(volume = %id, error = %e, "cannot sync the staged filesystem");
                    }
                });
            }
        });
        for (id, server) in self.servers.all() {
            match server.flush() {
                Ok(()) => tracing::info!(volume = %id, "flushed"),
                Err(e) => tracing::error!(volume = %id, error = %e, "cannot flush the image"),
            }
        }
    }

    /// Thaws the filesystems a killed plugin left frozen mid-snapshot. Each under its volume's
    /// guard: a snapshot or clone that runs now holds it and its freeze is its own, to be
    /// thawed when its copy ends, never under it. Only on devices this process serves: a thaw
    /// writes to the device, and with nobody answering it would wait forever. The others are
    /// tried again after the heal loop has served them.
    pub fn thaw_recorded(&self) {
        let frozen = match self.store.recorded_freezes() {
            Ok(frozen) => frozen,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the freeze records");
                return;
            }
        };
        for (volume, mount_point) in frozen {
            let Ok(_guard) = self.guards.acquire(&volume) else { continue };
            // Read again under the guard: the operation that froze it may have ended meanwhile.
            if !self.store.freeze_recorded(&volume).unwrap_or(false) {
                continue;
            }
            if !self.serves_healthy(&volume) {
                tracing::warn!(volume, path = %mount_point.display(), "frozen, but its device is not served yet; thawing later");
                continue;
            }
            match crate::host::thaw(&mount_point) {
                Ok(thawed) => {
                    if thawed == crate::host::Thawed::WasFrozen {
                        tracing::warn!(volume, path = %mount_point.display(), "thawed a filesystem an interrupted snapshot left frozen");
                    }
                    if let Err(e) = self.store.clear_freeze(&volume) {
                        tracing::error!(volume, error = %e, "cannot remove the freeze record");
                    }
                }
                Err(e) => tracing::error!(volume, path = %mount_point.display(), error = %e, "cannot thaw"),
            }
        }
    }

    /// Stops every device server's threads and leaves the devices attached: their I/O waits
    /// for the next plugin, which takes them over. Returns how many there were.
    pub fn release_all(&self) -> usize {
        self.servers.drain().len()
    }
}
