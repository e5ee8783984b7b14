//! What a node's state dir holds, for `vduse-csi volume list|show`: every volume and snapshot
//! with its size, allocated bytes, filesystem, stage state, device, publications, QoS and
//! condition. Read from the state dir and sysfs only, never written, so it works while the
//! plugin runs and on a node where it does not.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::blk::qos::QosLimits;
use crate::vduse::sysfs;
use crate::volume::{VolumeMeta, VolumeStore};

/// One volume or snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub id: String,
    /// `volume`, `ephemeral` (an inline volume of one pod) or `snapshot`.
    pub kind: &'static str,
    pub size_bytes: u64,
    /// Bytes the image takes on the backing filesystem (it is sparse).
    pub allocated_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged_at: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_device: Option<String>,
    pub publications: Vec<PathBuf>,
    pub qos: QosLimits,
    /// `normal`, or what is wrong.
    pub condition: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_volume_id: Option<String>,
}

/// Errors of the inventory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] crate::volume::Error),
    #[error("no volume or snapshot {0:?} in this state dir")]
    NotFound(String),
}

fn allocated(path: &Path) -> u64 {
    crate::volume::allocated_bytes(path).unwrap_or(0)
}

fn volume_entry(store: &VolumeStore, meta: &VolumeMeta) -> Entry {
    let id = &meta.spec.id;
    let device = crate::node::device_name(id);
    let block_device = sysfs::block_device_name(&device).map(|b| format!("/dev/{b}"));
    let qos = crate::node::device::volume_qos(meta).unwrap_or_default();
    let condition = match &meta.staged {
        None => "normal".to_owned(),
        Some(_) if !sysfs::device_exists(&device) => {
            "abnormal: staged, but its VDUSE device is gone (the plugin serves it again when it starts)".to_owned()
        }
        Some(_) if block_device.is_none() => "abnormal: staged, but its device is not attached to the host".to_owned(),
        Some(_) => "normal".to_owned(),
    };
    let condition = match crate::node::store_full(store, meta) {
        Ok(Some(full)) if meta.staged.is_some() => format!("abnormal: {full}"),
        _ => condition,
    };
    Entry {
        id: id.clone(),
        kind: if meta.spec.ephemeral { "ephemeral" } else { "volume" },
        size_bytes: meta.spec.capacity_bytes,
        allocated_bytes: store.image_path(id).map_or(0, |p| allocated(&p)),
        fs_type: meta.staged.as_ref().and_then(|s| s.fs_type.clone()).or_else(|| meta.spec.fs_type.clone()),
        staged_at: meta.staged.as_ref().map(|s| s.staging_path.clone()),
        block_device,
        publications: meta.published.keys().cloned().collect(),
        qos,
        condition,
        source_volume_id: None,
    }
}

/// Every volume, then every snapshot, each sorted by ID.
pub fn list(store: &VolumeStore) -> Result<Vec<Entry>, Error> {
    let mut out: Vec<Entry> = store.volumes()?.iter().map(|m| volume_entry(store, m)).collect();
    for snap in store.snapshots()? {
        out.push(Entry {
            allocated_bytes: store.snapshot_image_path(&snap.id).map_or(0, |p| allocated(&p)),
            id: snap.id,
            kind: "snapshot",
            size_bytes: snap.size_bytes,
            fs_type: None,
            staged_at: None,
            block_device: None,
            publications: Vec::new(),
            qos: QosLimits::default(),
            condition: "normal".into(),
            source_volume_id: Some(snap.source_volume_id),
        });
    }
    Ok(out)
}

/// One volume or snapshot.
pub fn show(store: &VolumeStore, id: &str) -> Result<Entry, Error> {
    list(store)?.into_iter().find(|e| e.id == id).ok_or_else(|| Error::NotFound(id.to_owned()))
}

/// Sizes for people: 1.5G, 64M, 512.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v >= 10.0 { format!("{v:.0}{}", UNITS[unit]) } else { format!("{v:.1}{}", UNITS[unit]) }
}

/// The limits as `maxReadIops=500,...`, or `-`.
fn qos_text(q: &QosLimits) -> String {
    let json = serde_json::to_value(q).unwrap_or_default();
    let parts: Vec<String> =
        json.as_object().map(|o| o.iter().map(|(k, v)| format!("{k}={v}")).collect()).unwrap_or_default();
    if parts.is_empty() { "-".into() } else { parts.join(",") }
}

/// A table, one line per entry.
pub fn table(entries: &[Entry]) -> String {
    // As wide as the longest ID: kubelet names ephemeral volumes with 68 characters.
    let w = entries.iter().map(|e| e.id.len()).max().unwrap_or(0).max(20);
    let mut out = format!(
        "{:<w$} {:<9} {:>6} {:>6} {:<5} {:<6} {:<9} {:>4} {:<24} CONDITION\n",
        "ID", "KIND", "SIZE", "ALLOC", "FS", "STAGED", "DEVICE", "PUBS", "QOS"
    );
    for e in entries {
        out.push_str(&format!(
            "{:<w$} {:<9} {:>6} {:>6} {:<5} {:<6} {:<9} {:>4} {:<24} {}\n",
            e.id,
            e.kind,
            human(e.size_bytes),
            human(e.allocated_bytes),
            e.fs_type.as_deref().unwrap_or("-"),
            if e.staged_at.is_some() { "yes" } else { "no" },
            e.block_device.as_deref().unwrap_or("-"),
            e.publications.len(),
            qos_text(&e.qos),
            e.condition
        ));
    }
    out
}

/// One entry, a field a line.
pub fn details(e: &Entry) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<16} {v}\n"));
    line("id", e.id.clone());
    line("kind", e.kind.into());
    line("size", format!("{} ({} bytes)", human(e.size_bytes), e.size_bytes));
    line("allocated", format!("{} ({} bytes)", human(e.allocated_bytes), e.allocated_bytes));
    if let Some(src) = &e.source_volume_id {
        line("source volume", src.clone());
    }
    if e.kind != "snapshot" {
        line("filesystem", e.fs_type.clone().unwrap_or_else(|| "-".into()));
        line("staged at", e.staged_at.as_ref().map_or("-".into(), |p| p.display().to_string()));
        line("block device", e.block_device.clone().unwrap_or_else(|| "-".into()));
        let pubs: Vec<String> = e.publications.iter().map(|p| p.display().to_string()).collect();
        line("published at", if pubs.is_empty() { "-".into() } else { pubs.join(", ") });
        line("qos", qos_text(&e.qos));
    }
    line("condition", e.condition.clone());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human(512), "512");
        assert_eq!(human(64 << 20), "64M");
        assert_eq!(human(1536 << 20), "1.5G");
        let q = QosLimits { max_read_iops: Some(500), ..Default::default() };
        assert_eq!(qos_text(&q), "maxReadIops=500");
        assert_eq!(qos_text(&QosLimits::default()), "-");
    }
}
