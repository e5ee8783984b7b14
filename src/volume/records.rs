//! Small durable records beside the volumes: which volume each VDUSE device serves, and which
//! filesystems a snapshot froze (so a plugin killed mid-snapshot thaws them when it starts).

use std::fs;
use std::path::{Path, PathBuf};

use super::{DEVICES, Error, FROZEN, Result, VolumeStore, io_err, read_meta, sync_dir, validate_id, write_meta};

impl VolumeStore {
    fn device_record(&self, device: &str) -> Result<PathBuf> {
        validate_id("device name", device)?;
        Ok(self.root.join(DEVICES).join(device))
    }

    /// Records that VDUSE device `device` serves `volume_id`, and fails if the record says it
    /// serves another volume. Device names are volume IDs or hashes of them, so two volumes
    /// can want one name; a server must never take over a device that holds another volume's
    /// data. `Ok(false)` if the device was recorded for this volume already.
    pub fn claim_device(&self, device: &str, volume_id: &str) -> Result<bool> {
        let record = self.device_record(device)?;
        if let Some(owner) = read_meta::<String>(&record)? {
            if owner == volume_id {
                return Ok(false);
            }
            return Err(Error::Conflict {
                what: "device",
                id: device.to_owned(),
                why: format!("it serves volume {owner}, not {volume_id}"),
            });
        }
        let dir = self.root.join(DEVICES);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        write_meta(&record, &volume_id.to_owned())?;
        Ok(true)
    }

    /// The volume device `device` was recorded for, if any.
    pub fn device_owner(&self, device: &str) -> Result<Option<String>> {
        read_meta(&self.device_record(device)?)
    }

    /// Forgets the record of a device that is gone.
    pub fn release_device(&self, device: &str) -> Result<()> {
        let record = self.device_record(device)?;
        match fs::remove_file(&record) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &record)(e)),
        }
    }

    fn freeze_record(&self, volume_id: &str) -> Result<PathBuf> {
        validate_id("volume ID", volume_id)?;
        Ok(self.root.join(FROZEN).join(volume_id))
    }

    /// Records, durably, that the filesystem of `volume_id` at `mount_point` is about to be
    /// frozen, so a plugin killed before it thaws it can thaw it when it starts again.
    pub fn record_freeze(&self, volume_id: &str, mount_point: &Path) -> Result<()> {
        let record = self.freeze_record(volume_id)?;
        let dir = self.root.join(FROZEN);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        write_meta(&record, &mount_point.to_owned())
    }

    /// Whether a freeze of `volume_id` is recorded.
    pub fn freeze_recorded(&self, volume_id: &str) -> Result<bool> {
        Ok(self.freeze_record(volume_id)?.exists())
    }

    /// Forgets the freeze of `volume_id` once its filesystem is thawed.
    pub fn clear_freeze(&self, volume_id: &str) -> Result<()> {
        let record = self.freeze_record(volume_id)?;
        match fs::remove_file(&record) {
            Ok(()) => sync_dir(&self.root.join(FROZEN)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &record)(e)),
        }
    }

    /// The freezes a killed plugin left: `(volume ID, mount point)`.
    pub fn recorded_freezes(&self) -> Result<Vec<(String, PathBuf)>> {
        let dir = self.root.join(FROZEN);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &dir)(e)),
        };
        let mut out = Vec::new();
        for name in entries.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()) {
            if validate_id("volume ID", &name).is_err() {
                continue;
            }
            if let Some(mount_point) = read_meta::<PathBuf>(&dir.join(&name))? {
                out.push((name, mount_point));
            }
        }
        Ok(out)
    }
}
