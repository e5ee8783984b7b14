//! The CSI Node service: a thin adapter over the node agent (crate::node). It checks and
//! translates requests (capabilities, paths, mount flags), takes the volume's guard, runs the
//! agent's blocking work off the async runtime, and maps the answer back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::controller::check_capability;
use super::proto::node_server::Node;
use super::proto::*;
use super::{Error, Plugin, Result, blocking, volume_id};
use crate::host;
use crate::node::{EphemeralSpec, MountSpec, PublishSpec, StageSpec, VolumeStats};

/// The volume-context key kubelet sets on an ephemeral inline volume's publish.
pub const CONTEXT_EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";

pub struct NodeService {
    plugin: Arc<Plugin>,
    /// Whether NodeGetInfo reports the node's topology: node-local volumes live on one node;
    /// RBD volumes (the node's RBD endpoint) are reachable from every node.
    topology: bool,
}

impl NodeService {
    pub fn new(plugin: Arc<Plugin>) -> Self {
        Self { plugin, topology: true }
    }

    /// The Node service of the node's RBD endpoint: no topology.
    pub fn rbd(plugin: Arc<Plugin>) -> Self {
        Self { plugin, topology: false }
    }
}

/// Whether a publish is for an ephemeral inline volume.
fn ephemeral_requested(context: &HashMap<String, String>) -> bool {
    context.get(CONTEXT_EPHEMERAL).is_some_and(|v| v == "true")
}

fn mode_of(cap: &VolumeCapability) -> i32 {
    cap.access_mode.as_ref().map_or(0, |m| m.mode)
}

/// The mount of a filesystem capability; `None` for raw block access.
fn mount_spec(cap: &VolumeCapability) -> Option<MountSpec> {
    match &cap.access_type {
        Some(volume_capability::AccessType::Mount(m)) => {
            Some(MountSpec { fs_type: Some(m.fs_type.clone()).filter(|f| !f.is_empty()), flags: m.mount_flags.clone() })
        }
        _ => None,
    }
}

fn stage_spec(path: PathBuf, cap: &VolumeCapability) -> StageSpec {
    let access_mode = mode_of(cap);
    StageSpec {
        path,
        mount: mount_spec(cap),
        access_mode,
        read_only: access_mode == crate::node::ACCESS_SINGLE_NODE_READER_ONLY,
    }
}

fn stats_response(stats: VolumeStats) -> NodeGetVolumeStatsResponse {
    use volume_usage::Unit;
    let usage = match stats.usage {
        crate::node::VolumeUsage::Block { total_bytes } => {
            vec![VolumeUsage { available: 0, total: total_bytes as i64, used: 0, unit: Unit::Bytes as i32 }]
        }
        crate::node::VolumeUsage::Filesystem(u) => vec![
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
        ],
    };
    let condition = VolumeCondition { abnormal: stats.condition.abnormal, message: stats.condition.message };
    NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) }
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
        let spec = stage_spec(path, &cap);
        let guard = self.plugin.agent.guards().acquire(&id)?;
        let plugin = Arc::clone(&self.plugin);
        blocking(move || {
            let _guard = guard;
            if crate::rbd::is_rbd_id(&id) {
                return plugin.agent.stage_rbd(&id, &spec, &req.volume_context, &req.secrets);
            }
            plugin.agent.stage(&id, &spec)
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
        let guard = self.plugin.agent.guards().acquire(&id)?;
        let plugin = Arc::clone(&self.plugin);
        blocking(move || {
            let _guard = guard;
            plugin.agent.unstage(&id, &path)
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
        let target = checked_path("target_path", &req.target_path)?;
        let cap = capability(req.volume_capability.take())?;
        let access_mode = mode_of(&cap);
        let read_only = req.readonly || access_mode == crate::node::ACCESS_SINGLE_NODE_READER_ONLY;
        if ephemeral_requested(&req.volume_context) {
            let Some(mount) = mount_spec(&cap) else {
                return Err(Error::InvalidArgument(
                    "an ephemeral inline volume is a filesystem: raw block access needs a PersistentVolumeClaim".into(),
                )
                .into());
            };
            let spec = EphemeralSpec {
                id: id.clone(),
                attributes: std::mem::take(&mut req.volume_context),
                mount,
                target,
                read_only,
                access_mode,
            };
            let guard = self.plugin.agent.guards().acquire(&id)?;
            let plugin = Arc::clone(&self.plugin);
            blocking(move || {
                let _guard = guard;
                plugin.agent.publish_ephemeral(&spec)
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
        let spec = PublishSpec {
            target,
            staging_path: checked_path("staging_target_path", &req.staging_target_path)?,
            block: mount_spec(&cap).is_none(),
            read_only,
            access_mode,
        };
        let guard = self.plugin.agent.guards().acquire(&id)?;
        let plugin = Arc::clone(&self.plugin);
        blocking(move || {
            let _guard = guard;
            plugin.agent.publish(&id, &spec)
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
        let guard = self.plugin.agent.guards().acquire(&id)?;
        let plugin = Arc::clone(&self.plugin);
        blocking(move || {
            let _guard = guard;
            plugin.agent.unpublish(&id, &target)
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
        let stats = blocking(move || plugin.agent.stats(&id, &path)).await?;
        Ok(Response::new(stats_response(stats)))
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
        let wanted =
            req.capacity_range.map(|r| crate::params::capacity(r.required_bytes, r.limit_bytes)).transpose()?;
        let guard = self.plugin.agent.guards().acquire(&id)?;
        let plugin = Arc::clone(&self.plugin);
        let capacity = blocking(move || {
            let _guard = guard;
            plugin.agent.expand(&id, &path, wanted)
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
            accessible_topology: self.topology.then(|| self.plugin.topology()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::csi::proto::volume_capability::access_mode::Mode;

    #[test]
    fn the_agent_records_csi_access_modes_by_their_wire_values() {
        assert_eq!(crate::node::ACCESS_SINGLE_NODE_SINGLE_WRITER, Mode::SingleNodeSingleWriter as i32);
        assert_eq!(crate::node::ACCESS_SINGLE_NODE_READER_ONLY, Mode::SingleNodeReaderOnly as i32);
    }
}
