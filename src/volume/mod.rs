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

/// Longest volume or snapshot ID we accept (CSI allows 128 bytes for names).
pub const MAX_ID_LEN: usize = 128;
const META: &str = "meta.json";
const IMAGE: &str = "image.raw";

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
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("corrupt metadata {path}: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { op, path: path.to_owned(), source }
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
}

/// The store rooted at the state dir.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    root: PathBuf,
}

impl VolumeStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Self> {
        for sub in ["volumes", "snapshots"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        Ok(Self { root: root.to_owned() })
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

    /// Bytes available to new images on the state dir's filesystem.
    pub fn available_bytes(&self) -> Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.root).map_err(|e| Error::Io {
            op: "statvfs",
            path: self.root.clone(),
            source: e.into(),
        })?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
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
        let available = self.available_bytes()?;
        if available < spec.capacity_bytes {
            return Err(Error::NoSpace { dir: self.root.clone(), needed: spec.capacity_bytes, available });
        }

        // Build in a temp folder and rename it into place, so a crash leaves no half volume
        // under the real ID.
        let tmp = self.root.join("volumes").join(format!(".new-{}", spec.id));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        let image = tmp.join(IMAGE);
        let made = (|| -> Result<()> {
            match &source_image {
                Some(src) => {
                    // copy_file_range: a reflink on XFS/btrfs, an in-kernel copy elsewhere.
                    fs::copy(src, &image).map_err(io_err("copy", src))?;
                }
                None => {
                    File::create(&image).map_err(io_err("create", &image))?;
                }
            }
            let f = OpenOptions::new().write(true).open(&image).map_err(io_err("open", &image))?;
            f.set_len(spec.capacity_bytes).map_err(io_err("size", &image))?;
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
        sync_dir(&dir.parent().unwrap_or(&self.root).to_owned())?;
        Ok((self.existing_volume(&spec.id)?, true))
    }

    /// Saves changed metadata of an existing volume.
    pub fn save_volume(&self, meta: &VolumeMeta) -> Result<()> {
        let dir = self.volume_dir(&meta.spec.id)?;
        write_meta(&dir.join(META), meta)
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
        let available = self.available_bytes()?;
        if available < extra {
            return Err(Error::NoSpace { dir: self.root.clone(), needed: extra, available });
        }
        let image = self.image_path(id)?;
        let f = OpenOptions::new().write(true).open(&image).map_err(io_err("open", &image))?;
        f.set_len(capacity_bytes).map_err(io_err("grow", &image))?;
        f.sync_all().map_err(io_err("fsync", &image))?;
        meta.spec.capacity_bytes = capacity_bytes;
        self.save_volume(&meta)?;
        Ok(meta)
    }

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
        let tmp = self.root.join("snapshots").join(format!(".new-{id}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        let made = (|| -> Result<SnapshotMeta> {
            let image = tmp.join(IMAGE);
            fs::copy(&src, &image).map_err(io_err("copy", &src))?;
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

/// Removes a volume or snapshot folder; `false` if it did not exist.
fn remove_entry(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    // Remove the metadata first: a crash half-way leaves a folder that listings skip.
    let _ = fs::remove_file(dir.join(META));
    fs::remove_dir_all(dir).map_err(io_err("remove", dir))?;
    Ok(true)
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
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{META}.tmp"));
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| Error::Corrupt { path: path.to_owned(), source })?;
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(&bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    sync_dir(&dir.to_owned())
}

fn sync_dir(dir: &PathBuf) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("fsync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, cap: u64) -> VolumeSpec {
        VolumeSpec {
            id: id.into(),
            capacity_bytes: cap,
            queues: 1,
            fs_type: None,
            parameters: BTreeMap::new(),
            source: None,
        }
    }

    #[test]
    fn hostile_ids_are_rejected() {
        for bad in ["", "..", ".", "../x", "/abs", "a/b", ".hidden", "a b", &"x".repeat(129), "-lead"] {
            assert!(validate_id("volume ID", bad).is_err(), "{bad:?}");
        }
        for good in ["pvc-1234", "a", "A.b_c-9", &"x".repeat(128)] {
            assert!(validate_id("volume ID", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn create_is_idempotent_and_conflicts_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = VolumeStore::open(dir.path()).expect("store");
        let (a, created) = store.create_volume(&spec("v1", 1 << 20)).expect("create");
        assert!(created);
        let (b, created) = store.create_volume(&spec("v1", 1 << 20)).expect("repeat");
        assert!(!created);
        assert_eq!(a, b);
        assert!(matches!(store.create_volume(&spec("v1", 2 << 20)), Err(Error::Conflict { .. })));
        assert_eq!(store.volumes().expect("list").len(), 1);
        assert!(store.delete_volume("v1").expect("delete"));
        assert!(!store.delete_volume("v1").expect("delete again"));
    }

    #[test]
    fn snapshots_and_clones_copy_the_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = VolumeStore::open(dir.path()).expect("store");
        store.create_volume(&spec("src", 1 << 20)).expect("create");
        fs::write(store.image_path("src").expect("path"), vec![7u8; 1 << 20]).expect("fill");
        let (snap, _) = store.create_snapshot("s1", "src").expect("snapshot");
        assert_eq!(snap.size_bytes, 1 << 20);
        assert!(matches!(store.create_snapshot("s1", "other"), Err(Error::Conflict { .. })));
        let mut clone = spec("c1", 2 << 20);
        clone.source = Some(ContentSource::Snapshot("s1".into()));
        store.create_volume(&clone).expect("restore");
        let data = fs::read(store.image_path("c1").expect("path")).expect("read");
        assert_eq!(data.len(), 2 << 20);
        assert!(data[..1 << 20].iter().all(|b| *b == 7) && data[1 << 20..].iter().all(|b| *b == 0));
        let mut missing = spec("c2", 1 << 20);
        missing.source = Some(ContentSource::Volume("nope".into()));
        assert!(matches!(store.create_volume(&missing), Err(Error::NotFound { .. })));
    }
}
