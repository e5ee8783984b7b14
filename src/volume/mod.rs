//! The node-local volume store under `--state-dir`: one folder per volume and per snapshot,
//! each with an image and a `meta.json` written atomically (temp file + fsync + rename).
//!
//! Every ID and name that reaches a path is validated first ([`validate_id`]), so no request
//! can name a path outside the state dir.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

mod copy;
mod records;
mod snapshot;
mod space;

pub use copy::{allocated_bytes, sparse_copy};

/// Longest volume or snapshot ID we accept (CSI allows 128 bytes for names).
pub const MAX_ID_LEN: usize = 128;
const META: &str = "meta.json";
const IMAGE: &str = "image.raw";
/// Folder of the freeze records (see [`VolumeStore::record_freeze`]).
const FROZEN: &str = "frozen";
/// Folder of the device records (see [`VolumeStore::claim_device`]).
const DEVICES: &str = "devices";
/// Prefix of the folders a create builds before renaming them into place.
const NEW_PREFIX: &str = ".new-";
/// Volume parameter: reserve the whole image at creation (`"true"`) instead of allocating
/// it as it is written.
pub const PARAM_THICK: &str = "thick";
/// StorageClass parameter: where the volume's data lives (`file`, the default: an image in
/// this store; `rbd`: a Ceph RBD image).
pub const PARAM_BACKEND: &str = "backend";
/// The default backend.
pub const BACKEND_FILE: &str = "file";
/// Default of `serve --overcommit-ratio`: volumes may promise twice the backing
/// filesystem's size in all, since sparse images hold only what was written.
pub const DEFAULT_OVERCOMMIT_RATIO: f64 = 2.0;

/// Errors of the volume store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {what} {id:?}: use 1-{MAX_ID_LEN} characters of [A-Za-z0-9._-] starting with a letter or digit")]
    InvalidId { what: &'static str, id: String },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{what} {id:?} already exists with different properties: {why}")]
    Conflict { what: &'static str, id: String, why: String },
    #[error("volume {id} ({capacity} bytes) is smaller than its source {source_id} ({source_size} bytes)")]
    SmallerThanSource { id: String, capacity: u64, source_id: String, source_size: u64 },
    #[error("not enough space in {dir}: {needed} bytes needed, {available} available")]
    NoSpace { dir: PathBuf, needed: u64, available: u64 },
    #[error(
        "{needed} bytes more would promise more than {ratio} times the size of {dir}: only {headroom} bytes can still be provisioned (serve --overcommit-ratio)"
    )]
    Overcommitted { dir: PathBuf, needed: u64, headroom: u64, ratio: f64 },
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("corrupt metadata {path}: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { op, path: path.to_owned(), source }
}

/// A hash of `s` that stays the same across releases and machines (a std hasher does not):
/// FNV-1a, 64 bits. It names things that must be found again (devices, RBD images).
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Checks that `id` is a safe single path component.
pub fn validate_id(what: &'static str, id: &str) -> Result<()> {
    let mut bytes = id.bytes();
    let ok = id.len() <= MAX_ID_LEN
        && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(Error::InvalidId { what, id: id.to_owned() }) }
}

/// Where a volume's content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// How a staged volume is exposed on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageInfo {
    pub staging_path: PathBuf,
    /// Raw block access: nothing is mounted at the staging path.
    pub block: bool,
    pub fs_type: Option<String>,
    pub mount_flags: Vec<String>,
    /// The access mode the volume was staged with (CSI enum value).
    pub access_mode: i32,
}

/// One publication of a staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishInfo {
    pub read_only: bool,
    pub access_mode: i32,
}

/// A volume's persisted metadata: what it was created as, plus its state on this node.
/// The spec is flattened, so `meta.json` stays one flat object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    #[serde(flatten)]
    pub spec: VolumeSpec,
    pub created_unix: u64,
    pub staged: Option<StageInfo>,
    #[serde(default)]
    pub published: BTreeMap<PathBuf, PublishInfo>,
}

/// A snapshot's persisted metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub id: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    pub created_unix: u64,
    #[serde(default)]
    pub created_nanos: u32,
}

/// What a volume is created as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub id: String,
    pub capacity_bytes: u64,
    pub queues: u16,
    /// Filesystem requested at creation, if any.
    pub fs_type: Option<String>,
    pub parameters: BTreeMap<String, String>,
    pub source: Option<ContentSource>,
    /// A CSI ephemeral inline volume: created by NodePublishVolume and deleted by the
    /// NodeUnpublishVolume of its one pod.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
}

impl VolumeSpec {
    /// Whether the volume's image is a file of this store (not an RBD image that this node
    /// only stages).
    pub fn is_local(&self) -> bool {
        self.parameters.get(PARAM_BACKEND).is_none_or(|b| b == BACKEND_FILE)
    }

    /// Whether the image is reserved in full ([`PARAM_THICK`]).
    pub fn thick(&self) -> bool {
        self.parameters.get(PARAM_THICK).is_some_and(|v| v == "true")
    }
}

/// The backing filesystem's space and what the volumes on it promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Size of the filesystem.
    pub total: u64,
    /// Bytes new data can still take.
    pub free: u64,
    /// Sum of the capacities of all volumes.
    pub provisioned: u64,
}

/// The store rooted at the state dir.
///
/// Provisioning model: images are thin (sparse) unless a volume asks for [`PARAM_THICK`].
/// The capacities of all volumes together may reach `overcommit_ratio` times the size of the
/// backing filesystem; a thick volume must also fit in the free space, which it reserves at
/// once. Snapshots and clones need room for the data their source holds, not its capacity.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    root: PathBuf,
    overcommit_ratio: f64,
}

impl VolumeStore {
    /// Opens (creating if needed) the store at `root` with the default overcommit ratio, and
    /// removes what interrupted creates left behind. Only its owner may enter `root`: it holds
    /// the volumes' data and the cephx keys of staged RBD volumes.
    pub fn open(root: &Path) -> Result<Self> {
        for sub in ["volumes", "snapshots"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
            remove_leftovers(&dir)?;
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io_err("restrict", root))?;
        Ok(Self { root: root.to_owned(), overcommit_ratio: DEFAULT_OVERCOMMIT_RATIO })
    }

    /// Opens an existing store to read it only: nothing is created or cleaned up, so a running
    /// plugin's work in progress is left alone.
    pub fn open_read_only(root: &Path) -> Result<Self> {
        let volumes = root.join("volumes");
        if !volumes.is_dir() {
            return Err(Error::Io {
                op: "open",
                path: volumes,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a vduse-csi state dir"),
            });
        }
        Ok(Self { root: root.to_owned(), overcommit_ratio: DEFAULT_OVERCOMMIT_RATIO })
    }

    /// The same store with another overcommit ratio (at least 1: a ratio below it would
    /// refuse volumes that fit even if every byte were written).
    pub fn with_overcommit_ratio(mut self, ratio: f64) -> Self {
        self.overcommit_ratio = if ratio.is_finite() { ratio.max(1.0) } else { DEFAULT_OVERCOMMIT_RATIO };
        self
    }

    /// Where an ephemeral volume is staged: outside its volume folder, so deleting the volume
    /// never walks into a mount.
    pub fn ephemeral_staging_path(&self, id: &str) -> Result<PathBuf> {
        validate_id("volume ID", id)?;
        Ok(self.root.join("ephemeral").join(id))
    }

    /// The state dir.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The overcommit ratio in force.
    pub fn overcommit_ratio(&self) -> f64 {
        self.overcommit_ratio
    }

    fn volume_dir(&self, id: &str) -> Result<PathBuf> {
        validate_id("volume ID", id)?;
        Ok(self.root.join("volumes").join(id))
    }

    fn snapshot_dir(&self, id: &str) -> Result<PathBuf> {
        validate_id("snapshot ID", id)?;
        Ok(self.root.join("snapshots").join(id))
    }

    /// Path of a volume's image.
    pub fn image_path(&self, id: &str) -> Result<PathBuf> {
        Ok(self.volume_dir(id)?.join(IMAGE))
    }

    /// A snapshot's image file.
    pub fn snapshot_image_path(&self, id: &str) -> Result<PathBuf> {
        Ok(self.snapshot_dir(id)?.join(IMAGE))
    }

    /// A volume's metadata, `None` if it does not exist.
    pub fn volume(&self, id: &str) -> Result<Option<VolumeMeta>> {
        read_meta(&self.volume_dir(id)?.join(META))
    }

    /// A volume's metadata, or NotFound.
    pub fn existing_volume(&self, id: &str) -> Result<VolumeMeta> {
        self.volume(id)?.ok_or_else(|| Error::NotFound { what: "volume", id: id.to_owned() })
    }

    /// A snapshot's metadata, `None` if it does not exist.
    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotMeta>> {
        read_meta(&self.snapshot_dir(id)?.join(META))
    }

    /// All volumes, sorted by ID. Folders without readable metadata (a create that died
    /// half-way) are skipped.
    pub fn volumes(&self) -> Result<Vec<VolumeMeta>> {
        self.list(&self.root.join("volumes"))
    }

    /// All snapshots, sorted by ID.
    pub fn snapshots(&self) -> Result<Vec<SnapshotMeta>> {
        self.list(&self.root.join("snapshots"))
    }

    fn list<T: for<'de> Deserialize<'de>>(&self, dir: &Path) -> Result<Vec<T>> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map_err(io_err("list", dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| validate_id("ID", n).is_ok())
            .collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match read_meta(&dir.join(&name).join(META)) {
                Ok(Some(meta)) => out.push(meta),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "skipping unreadable metadata"),
            }
        }
        Ok(out)
    }

    /// Creates a volume, or returns the existing one if it is compatible with `spec`.
    /// The image is sparse, or a copy of the source that shares blocks where the filesystem
    /// can reflink.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<(VolumeMeta, bool)> {
        let dir = self.volume_dir(&spec.id)?;
        if let Some(existing) = self.volume(&spec.id)? {
            if existing.spec == *spec {
                return Ok((existing, false));
            }
            let old = &existing.spec;
            let why = if old.capacity_bytes != spec.capacity_bytes {
                format!("capacity {} != {}", old.capacity_bytes, spec.capacity_bytes)
            } else if old.source != spec.source {
                "content source differs".to_owned()
            } else if old.fs_type != spec.fs_type {
                "filesystem type differs".to_owned()
            } else {
                "parameters differ".to_owned()
            };
            return Err(Error::Conflict { what: "volume", id: spec.id.clone(), why });
        }
        let source_image = match &spec.source {
            None => None,
            Some(ContentSource::Snapshot(s)) => {
                let meta = self.snapshot(s)?.ok_or_else(|| Error::NotFound { what: "snapshot", id: s.clone() })?;
                if meta.size_bytes > spec.capacity_bytes {
                    return Err(Error::SmallerThanSource {
                        id: spec.id.clone(),
                        capacity: spec.capacity_bytes,
                        source_id: s.clone(),
                        source_size: meta.size_bytes,
                    });
                }
                Some(self.snapshot_dir(s)?.join(IMAGE))
            }
            Some(ContentSource::Volume(v)) => {
                let meta = self.existing_volume(v)?;
                if meta.spec.capacity_bytes > spec.capacity_bytes {
                    return Err(Error::SmallerThanSource {
                        id: spec.id.clone(),
                        capacity: spec.capacity_bytes,
                        source_id: v.clone(),
                        source_size: meta.spec.capacity_bytes,
                    });
                }
                Some(self.image_path(v)?)
            }
        };
        self.check_promise(spec.capacity_bytes, spec.thick())?;
        if let Some(src) = &source_image {
            self.check_copy(src)?;
        }

        // Build in a temp folder and rename it into place, so a crash leaves no half volume
        // under the real ID.
        let tmp = self.root.join("volumes").join(format!("{NEW_PREFIX}{}", spec.id));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        let image = tmp.join(IMAGE);
        let made = (|| -> Result<()> {
            match &source_image {
                Some(src) => sparse_copy(src, &image)?,
                None => drop(File::create(&image).map_err(io_err("create", &image))?),
            }
            let f = OpenOptions::new().write(true).open(&image).map_err(io_err("open", &image))?;
            f.set_len(spec.capacity_bytes).map_err(io_err("size", &image))?;
            if spec.thick() {
                reserve(&f, &image, 0, spec.capacity_bytes)?;
            }
            f.sync_all().map_err(io_err("fsync", &image))?;
            let meta =
                VolumeMeta { spec: spec.clone(), created_unix: now().0, staged: None, published: BTreeMap::new() };
            write_meta(&tmp.join(META), &meta)?;
            Ok(())
        })();
        if let Err(e) = made {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &dir).map_err(io_err("rename", &dir))?;
        sync_dir(dir.parent().unwrap_or(&self.root))?;
        Ok((self.existing_volume(&spec.id)?, true))
    }

    /// Saves changed metadata of an existing volume.
    pub fn save_volume(&self, meta: &VolumeMeta) -> Result<()> {
        let dir = self.volume_dir(&meta.spec.id)?;
        write_meta(&dir.join(META), meta)
    }

    /// Records a volume that lives elsewhere (an RBD image) while this node stages it: its
    /// folder holds the metadata and no image.
    pub fn record_volume(&self, meta: &VolumeMeta) -> Result<()> {
        let dir = self.volume_dir(&meta.spec.id)?;
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
            sync_dir(dir.parent().unwrap_or(&self.root))?;
        }
        write_meta(&dir.join(META), meta)
    }

    /// Writes `value` as `name` in a volume's folder, readable by root only (credentials).
    pub fn write_private<T: Serialize>(&self, id: &str, name: &str, value: &T) -> Result<()> {
        let dir = self.volume_dir(id)?;
        write_file(&dir.join(name), value, 0o600)
    }

    /// Reads what [`Self::write_private`] wrote; `None` if it is absent.
    pub fn read_private<T: serde::de::DeserializeOwned>(&self, id: &str, name: &str) -> Result<Option<T>> {
        read_meta(&self.volume_dir(id)?.join(name))
    }

    /// Deletes a volume; `false` if it did not exist.
    pub fn delete_volume(&self, id: &str) -> Result<bool> {
        remove_entry(&self.volume_dir(id)?)
    }

    /// Grows a volume's image and records the new capacity.
    pub fn grow_volume(&self, id: &str, capacity_bytes: u64) -> Result<VolumeMeta> {
        let mut meta = self.existing_volume(id)?;
        if capacity_bytes <= meta.spec.capacity_bytes {
            return Ok(meta);
        }
        let extra = capacity_bytes - meta.spec.capacity_bytes;
        self.check_promise(extra, meta.spec.thick())?;
        let image = self.image_path(id)?;
        let f = OpenOptions::new().write(true).open(&image).map_err(io_err("open", &image))?;
        f.set_len(capacity_bytes).map_err(io_err("grow", &image))?;
        if meta.spec.thick() {
            reserve(&f, &image, meta.spec.capacity_bytes, extra)?;
        }
        f.sync_all().map_err(io_err("fsync", &image))?;
        meta.spec.capacity_bytes = capacity_bytes;
        self.save_volume(&meta)?;
        Ok(meta)
    }
}

/// Removes a volume or snapshot folder; `false` if it did not exist. Both removals are made
/// durable, so a crash never brings back metadata whose image is gone.
fn remove_entry(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    // Remove the metadata first: a crash half-way leaves a folder that listings skip.
    match fs::remove_file(dir.join(META)) {
        Ok(()) => sync_dir(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", &dir.join(META))(e)),
    }
    fs::remove_dir_all(dir).map_err(io_err("remove", dir))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(true)
}

/// Removes the folders of creates that a crash interrupted (they were never renamed into
/// place, so nothing refers to them).
fn remove_leftovers(dir: &Path) -> Result<()> {
    let mut removed = false;
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))?.filter_map(|e| e.ok()) {
        if entry.file_name().to_string_lossy().starts_with(NEW_PREFIX) {
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing what an interrupted create left");
            fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            removed = true;
        }
    }
    if removed { sync_dir(dir) } else { Ok(()) }
}

/// Allocates `len` bytes of `file` from `offset`, so writes there never meet a full disk.
fn reserve(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    fallocate(file, FallocateFlags::empty(), offset as libc::off_t, len as libc::off_t).map_err(|e| Error::Io {
        op: "reserve space for",
        path: path.to_owned(),
        source: e.into(),
    })
}

fn now() -> (u64, u32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn read_meta<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|source| Error::Corrupt { path: path.to_owned(), source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Writes `value` as JSON atomically: a crash leaves either the old or the new file.
fn write_meta<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_file(path, value, 0o644)
}

/// Writes `value` as JSON at `path` atomically and durably, with permissions `mode`.
fn write_file<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    // Named after the file, so records written side by side in one folder never share it.
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| Error::Corrupt { path: path.to_owned(), source })?;
    // A leftover of a crash may have other permissions; start afresh.
    let _ = fs::remove_file(&tmp);
    let mut f =
        fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(&bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("fsync", dir))
}

#[cfg(test)]
mod tests;
