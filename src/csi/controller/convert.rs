//! Translations between the controller's records (volume store, RBD control plane) and CSI
//! messages, paging, and topology.

use std::collections::HashMap;

use crate::csi::proto::*;
use crate::csi::{Error, Plugin, Result, TOPOLOGY_KEY};
use crate::rbd::provision::{self, SnapshotInfo, Source};
use crate::rbd::{ImageLocation, SnapshotLocation};
use crate::volume::{ContentSource, SnapshotMeta, VolumeMeta};

pub(super) fn to_volume(plugin: &Plugin, meta: &VolumeMeta) -> Volume {
    Volume {
        capacity_bytes: meta.spec.capacity_bytes as i64,
        volume_id: meta.spec.id.clone(),
        volume_context: HashMap::new(),
        content_source: meta.spec.source.as_ref().map(|s| VolumeContentSource {
            r#type: Some(match s {
                ContentSource::Snapshot(id) => {
                    volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                        snapshot_id: id.clone(),
                    })
                }
                ContentSource::Volume(id) => {
                    volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: id.clone() })
                }
            }),
        }),
        accessible_topology: vec![plugin.topology()],
    }
}

pub(super) fn to_snapshot(meta: &SnapshotMeta) -> Snapshot {
    Snapshot {
        size_bytes: meta.size_bytes as i64,
        snapshot_id: meta.id.clone(),
        source_volume_id: meta.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: meta.created_unix as i64,
            nanos: meta.created_nanos as i32,
        }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

/// Whether a topology requirement can be met on this node.
pub(super) fn topology_ok(plugin: &Plugin, req: Option<&TopologyRequirement>) -> bool {
    let Some(req) = req else { return true };
    if req.requisite.is_empty() && req.preferred.is_empty() {
        return true;
    }
    req.requisite.iter().chain(req.preferred.iter()).any(|t| t.segments.get(TOPOLOGY_KEY) == Some(&plugin.node_id))
}

/// Pages through sorted items, resuming after the entry the token names (entries deleted in
/// between do not matter: the next page starts at the first ID after it).
pub(super) fn page<T>(items: Vec<T>, id: impl Fn(&T) -> &str, max: i32, token: &str) -> Result<(Vec<T>, String)> {
    if max < 0 {
        return Err(Error::InvalidArgument("max_entries must not be negative".into()));
    }
    let start = if token.is_empty() {
        0
    } else {
        let after = crate::csi::token::check(token).ok_or_else(|| {
            Error::InvalidToken(format!(
                "starting_token {token:?} was not issued by this plugin (or by an earlier run of it): list again from the start"
            ))
        })?;
        items.iter().position(|i| id(i) > after).unwrap_or(items.len())
    };
    let max = if max == 0 { usize::MAX } else { max as usize };
    let rest: Vec<T> = items.into_iter().skip(start).collect();
    let more = rest.len() > max;
    let page: Vec<T> = rest.into_iter().take(max).collect();
    let next =
        if more { page.last().map(|i| crate::csi::token::issue(id(i))).unwrap_or_default() } else { String::new() };
    Ok((page, next))
}

/// A content source of an RBD volume: only RBD snapshots and volumes of the same cluster
/// qualify.
pub(super) fn rbd_source(src: Option<volume_content_source::Type>, cluster_id: &str) -> Result<Option<Source>> {
    let src = match src {
        None => return Ok(None),
        Some(volume_content_source::Type::Snapshot(s)) => {
            Source::Snapshot(SnapshotLocation::parse(&s.snapshot_id).ok_or_else(|| {
                Error::NotFound(format!("snapshot {:?} is not an RBD snapshot of this driver", s.snapshot_id))
            })?)
        }
        Some(volume_content_source::Type::Volume(v)) => {
            Source::Volume(ImageLocation::parse(&v.volume_id).ok_or_else(|| {
                Error::NotFound(format!("volume {:?} is not an RBD volume of this driver", v.volume_id))
            })?)
        }
    };
    provision::check_source_cluster(&src, cluster_id)?;
    Ok(Some(src))
}

pub(super) fn rbd_snapshot(info: SnapshotInfo) -> Snapshot {
    Snapshot {
        size_bytes: info.size_bytes as i64,
        snapshot_id: info.id,
        source_volume_id: info.source_volume_id,
        creation_time: Some(prost_types::Timestamp { seconds: info.created.0, nanos: info.created.1 }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}
