//! Controller service for node-local volumes: this node's plugin provisions on this node, as
//! external-provisioner's per-node deployment expects.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::controller_server::Controller;
use super::proto::*;
mod checks;
mod convert;

use checks::fs_type_of;
pub use checks::{capacity_for, check_capabilities, check_capability};
use convert::{page, rbd_snapshot, rbd_source, to_snapshot, to_volume, topology_ok};

use super::{Error, Plugin, TOPOLOGY_KEY, blocking, required, volume_id};
use crate::params::{self, MIB};
use crate::rbd;
use crate::rbd::provision;
use crate::volume::{ContentSource, VolumeSpec, validate_id};

pub struct ControllerService {
    plugin: Arc<Plugin>,
}

impl ControllerService {
    pub fn new(plugin: Arc<Plugin>) -> Self {
        Self { plugin }
    }
}

impl ControllerService {
    /// CreateVolume of an RBD StorageClass: the image lives in Ceph, reachable from every
    /// node, so the volume has no topology.
    async fn create_rbd_volume(
        &self,
        req: CreateVolumeRequest,
        name: String,
        capacity: u64,
    ) -> std::result::Result<Response<CreateVolumeResponse>, Status> {
        let params = rbd::params::parameters(&req.parameters)?;
        fs_type_of(&req.volume_capabilities, &req.parameters)?;
        let content_source = req.volume_content_source.clone();
        let source = rbd_source(req.volume_content_source.and_then(|s| s.r#type), &params.cluster_id)?;
        // The image's key: DeleteVolume, which knows the volume by its ID, takes the same one.
        let guard = self.plugin.agent.guards().acquire(&rbd::guard::volume_of_name(&name))?;
        let plugin = Arc::clone(&self.plugin);
        let secrets = req.secrets;
        let context: HashMap<String, String> = params.kept.clone().into_iter().collect();
        let created = blocking(move || {
            let _guard = guard;
            let guards = plugin.agent.guards();
            provision::create_volume(&plugin.ceph, guards, &name, capacity, &params, source, &secrets)
        })
        .await?;
        tracing::info!(volume = %created.id, capacity = created.capacity, "CreateVolume (RBD)");
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(Volume {
                capacity_bytes: created.capacity as i64,
                volume_id: created.id,
                volume_context: context,
                content_source,
                accessible_topology: vec![],
            }),
        }))
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> std::result::Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required("name", &req.name)?.to_owned();
        validate_id("volume name", &id).map_err(Error::from)?;
        check_capabilities(&req.volume_capabilities)?;
        let capacity = capacity_for(req.capacity_range.as_ref())?;
        rbd::check_backend(&req.parameters)?;
        if rbd::requested(&req.parameters) {
            return self.create_rbd_volume(req, id, capacity).await;
        }
        if self.plugin.rbd_controller() {
            return Err(Error::InvalidArgument(format!(
                "this is the cluster-wide RBD controller: its StorageClasses need {}: {}",
                crate::volume::PARAM_BACKEND,
                rbd::BACKEND_RBD
            ))
            .into());
        }
        if rbd::is_rbd_id(&id) {
            // A node-local volume's ID is its name; this prefix names RBD volumes.
            return Err(
                Error::InvalidArgument(format!("volume names starting with \"rbd.\" are reserved: {id:?}")).into()
            );
        }
        let (queues, parameters) = params::check_local(&req.parameters)?;
        let fs_type = fs_type_of(&req.volume_capabilities, &req.parameters)?;
        if !topology_ok(&self.plugin, req.accessibility_requirements.as_ref()) {
            return Err(Error::ResourceExhausted(format!(
                "volumes of this plugin live on node {} only",
                self.plugin.node_id
            ))
            .into());
        }
        let source = match req.volume_content_source.and_then(|s| s.r#type) {
            None => None,
            Some(volume_content_source::Type::Snapshot(s)) => {
                validate_id("snapshot ID", &s.snapshot_id).map_err(Error::from)?;
                Some(ContentSource::Snapshot(s.snapshot_id))
            }
            Some(volume_content_source::Type::Volume(v)) => {
                Some(ContentSource::Volume(volume_id(&v.volume_id)?.to_owned()))
            }
        };
        // The guard moves into the blocking work: if the caller gives up, the work still runs
        // to its end, and a retry must find the volume busy until it does.
        let guard = self.plugin.agent.guards().acquire(&id)?;
        // A clone holds its source still, like a snapshot does.
        let source_guard = match &source {
            Some(ContentSource::Volume(v)) if *v != id => Some(self.plugin.agent.guards().acquire(v)?),
            _ => None,
        };
        let spec = VolumeSpec {
            id: id.clone(),
            capacity_bytes: capacity,
            queues,
            fs_type,
            parameters,
            source,
            ephemeral: false,
        };
        let plugin = Arc::clone(&self.plugin);
        let (meta, created) = blocking(move || {
            let _guards = (guard, source_guard);
            let quiet = match &spec.source {
                Some(ContentSource::Volume(v)) if plugin.agent.store().volume(&spec.id)?.is_none() => {
                    Some(plugin.agent.quiesce(&plugin.agent.store().existing_volume(v)?)?)
                }
                _ => None,
            };
            let created = plugin.agent.store().create_volume(&spec);
            drop(quiet);
            Ok(created?)
        })
        .await?;
        tracing::info!(volume = %id, capacity, created, "CreateVolume");
        Ok(Response::new(CreateVolumeResponse { volume: Some(to_volume(&self.plugin, &meta)) }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> std::result::Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = volume_id(&req.volume_id)?.to_owned();
        let plugin = Arc::clone(&self.plugin);
        if rbd::is_rbd_id(&id) {
            let guard = self.plugin.agent.guards().acquire(&rbd::guard::volume_of_id(&id)?)?;
            let secrets = req.secrets;
            blocking(move || {
                let _guard = guard;
                provision::delete_volume(&plugin.ceph, plugin.agent.guards(), &id, &secrets)
            })
            .await?;
            tracing::info!(volume = %req.volume_id, "DeleteVolume (RBD)");
            return Ok(Response::new(DeleteVolumeResponse {}));
        }
        let guard = self.plugin.agent.guards().acquire(&id)?;
        let existed = blocking(move || {
            let _guard = guard;
            if plugin.agent.store().volume(&id)?.is_some_and(|meta| meta.staged.is_some()) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is staged on node {}; unstage it first",
                    plugin.node_id
                )));
            }
            Ok(plugin.agent.store().delete_volume(&id)?)
        })
        .await?;
        tracing::info!(volume = %req.volume_id, existed, "DeleteVolume");
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> std::result::Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented("volumes are node-local: no controller publish (attachRequired: false)"))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented("volumes are node-local: no controller unpublish (attachRequired: false)"))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> std::result::Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = volume_id(&req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument("volume_capabilities are required".into()).into());
        }
        let rbd_volume = rbd::is_rbd_id(id);
        if rbd_volume {
            let (plugin, id, secrets) = (Arc::clone(&self.plugin), id.to_owned(), req.secrets.clone());
            blocking(move || provision::check_exists(&plugin.ceph, &id, &secrets)).await?;
        } else {
            self.plugin.agent.store().existing_volume(id).map_err(Error::from)?;
        }
        let (confirmed, message) = match check_capabilities(&req.volume_capabilities).and_then(|_| {
            if rbd_volume {
                rbd::location(id).and_then(|loc| rbd::params::for_volume(&req.parameters, &loc)).map(drop)
            } else {
                params::check_local(&req.parameters).map(drop)
            }
        }) {
            Ok(()) => (
                Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: HashMap::new(),
                }),
                String::new(),
            ),
            Err(e) => (None, e.to_string()),
        };
        Ok(Response::new(ValidateVolumeCapabilitiesResponse { confirmed, message }))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> std::result::Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        // The node's records of staged RBD volumes are not this driver's volumes.
        let mut volumes = self.plugin.agent.store().volumes().map_err(Error::from)?;
        volumes.retain(|m| !rbd::is_rbd(&m.spec));
        let (page, next_token) = page(volumes, |v| v.spec.id.as_str(), req.max_entries, &req.starting_token)?;
        let entries = page
            .iter()
            .map(|m| list_volumes_response::Entry {
                volume: Some(to_volume(&self.plugin, m)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: if m.staged.is_some() { vec![self.plugin.node_id.clone()] } else { vec![] },
                    volume_condition: None,
                }),
            })
            .collect();
        Ok(Response::new(ListVolumesResponse { entries, next_token }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> std::result::Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        if let Some(cap) = &req.volume_capabilities.first() {
            if check_capability(cap).is_err() {
                return Ok(Response::new(GetCapacityResponse::default()));
            }
        }
        if let Some(top) = &req.accessible_topology {
            if top.segments.get(TOPOLOGY_KEY).is_some_and(|n| n != &self.plugin.node_id) {
                return Ok(Response::new(GetCapacityResponse::default()));
            }
        }
        // What may still be promised under the provisioning model (see VolumeStore): the
        // overcommit headroom, and for a thick class also no more than is free.
        let thick = req.parameters.get(params::THICK).is_some_and(|v| v == "true");
        let available = self.plugin.agent.store().promisable_bytes(thick).map_err(Error::from)?;
        let available = available / MIB * MIB;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available as i64,
            maximum_volume_size: Some(available as i64),
            minimum_volume_size: Some(MIB as i64),
        }))
    }

    /// For node-local volumes EXPAND_VOLUME is deliberately not advertised: csi-resizer has no
    /// per-node mode, so its one leader would send ControllerExpandVolume for every node's
    /// volumes to its own node's plugin, which only knows its own. Without the capability the
    /// resizer does node-only expansion and NodeExpandVolume, on the volume's node, grows the
    /// image. The cluster-wide RBD controller advertises it: any replica can resize an image.
    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type as T;
        // The RBD controller lists nothing (its listings would be of the node-local store it
        // does not use) and knows no pool's capacity; it expands images itself.
        let rbd = self.plugin.rbd_controller();
        let capabilities = [
            (T::CreateDeleteVolume, true),
            (T::ListVolumes, !rbd),
            (T::GetCapacity, !rbd),
            (T::CreateDeleteSnapshot, true),
            (T::ListSnapshots, !rbd),
            (T::CloneVolume, true),
            (T::SingleNodeMultiWriter, true),
            (T::ExpandVolume, rbd),
        ]
        .into_iter()
        .filter_map(|(t, offered)| offered.then_some(t))
        .map(|t| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc {
                r#type: t as i32,
            })),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> std::result::Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let source = volume_id(&req.source_volume_id)?.to_owned();
        let name = required("name", &req.name)?.to_owned();
        validate_id("snapshot name", &name).map_err(Error::from)?;
        let plugin = Arc::clone(&self.plugin);
        if rbd::is_rbd_id(&source) {
            let guard = self.plugin.agent.guards().acquire(&rbd::guard::volume_of_id(&source)?)?;
            let snapshot_guard = self.plugin.agent.guards().acquire(&rbd::guard::snapshot_of_name(&name))?;
            let secrets = req.secrets;
            let snapshot = blocking(move || {
                let _guards = (guard, snapshot_guard);
                provision::create_snapshot(&plugin.ceph, &source, &name, &secrets).map(rbd_snapshot)
            })
            .await?;
            return Ok(Response::new(CreateSnapshotResponse { snapshot: Some(snapshot) }));
        }
        let guard = self.plugin.agent.guards().acquire(&source)?;
        let snapshot_guard = self.plugin.agent.guards().acquire(&format!("snapshot/{name}"))?;
        let snapshot = blocking(move || {
            let _guards = (guard, snapshot_guard);
            if let Some(existing) = plugin.agent.store().snapshot(&name)? {
                if existing.source_volume_id != source {
                    return Err(Error::AlreadyExists(format!(
                        "snapshot {name} exists for volume {}",
                        existing.source_volume_id
                    )));
                }
                return Ok(existing);
            }
            let meta = plugin.agent.store().existing_volume(&source)?;
            let quiet = plugin.agent.quiesce(&meta)?;
            let created = plugin.agent.store().create_snapshot(&name, &source);
            drop(quiet);
            Ok(created?.0)
        })
        .await?;
        tracing::info!(volume = %snapshot.source_volume_id, snapshot = %snapshot.id, "CreateSnapshot");
        Ok(Response::new(CreateSnapshotResponse { snapshot: Some(to_snapshot(&snapshot)) }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> std::result::Result<Response<DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = required("snapshot_id", &req.snapshot_id)?;
        validate_id("snapshot ID", id).map_err(Error::from)?;
        if rbd::is_rbd_id(id) {
            let guard = self.plugin.agent.guards().acquire(&rbd::guard::snapshot_of_id(id)?)?;
            let (plugin, id, secrets) = (Arc::clone(&self.plugin), id.to_owned(), req.secrets);
            blocking(move || {
                let _guard = guard;
                provision::delete_snapshot(&plugin.ceph, &id, &secrets)
            })
            .await?;
            return Ok(Response::new(DeleteSnapshotResponse {}));
        }
        let guard = self.plugin.agent.guards().acquire(&format!("snapshot/{id}"))?;
        let (store, id) = (self.plugin.agent.store().clone(), id.to_owned());
        blocking(move || {
            let _guard = guard;
            Ok(store.delete_snapshot(&id)?)
        })
        .await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> std::result::Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let mut snapshots = self.plugin.agent.store().snapshots().map_err(Error::from)?;
        if !req.snapshot_id.is_empty() {
            snapshots.retain(|s| s.id == req.snapshot_id);
        }
        if !req.source_volume_id.is_empty() {
            snapshots.retain(|s| s.source_volume_id == req.source_volume_id);
        }
        let (page, next_token) = page(snapshots, |s| s.id.as_str(), req.max_entries, &req.starting_token)?;
        let entries = page.iter().map(|s| list_snapshots_response::Entry { snapshot: Some(to_snapshot(s)) }).collect();
        Ok(Response::new(ListSnapshotsResponse { entries, next_token }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> std::result::Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = volume_id(&req.volume_id)?.to_owned();
        let capacity = capacity_for(Some(
            &req.capacity_range.ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?,
        ))?;
        if let Some(cap) = &req.volume_capability {
            check_capability(cap)?;
        }
        if rbd::is_rbd_id(&id) {
            let guard = self.plugin.agent.guards().acquire(&rbd::guard::volume_of_id(&id)?)?;
            let (plugin, secrets) = (Arc::clone(&self.plugin), req.secrets);
            let size = blocking(move || {
                let _guard = guard;
                provision::expand_volume(&plugin.ceph, &id, capacity, &secrets)
            })
            .await?;
            return Ok(Response::new(ControllerExpandVolumeResponse {
                capacity_bytes: size as i64,
                // The device learns the new size on the node, which sends the config interrupt.
                node_expansion_required: true,
            }));
        }
        let guard = self.plugin.agent.guards().acquire(&id)?;
        let store = self.plugin.agent.store().clone();
        // Growing the sparse image is cheap and safe while staged: the node step tells the
        // driver and grows the filesystem.
        let meta = blocking(move || {
            let _guard = guard;
            Ok(store.grow_volume(&id, capacity)?)
        })
        .await?;
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: meta.spec.capacity_bytes as i64,
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        _: Request<ControllerGetVolumeRequest>,
    ) -> std::result::Result<Response<ControllerGetVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerGetVolume is not offered"))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> std::result::Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerModifyVolume is not offered: no mutable parameters"))
    }

    async fn get_snapshot(
        &self,
        _: Request<GetSnapshotRequest>,
    ) -> std::result::Result<Response<GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("GetSnapshot (alpha) is not offered"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_resumes_after_the_token() {
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let (p, next) = page(items.clone(), |s| s.as_str(), 2, "").expect("page 1");
        assert_eq!(p.len(), 2);
        let (p, next) = page(items.clone(), |s| s.as_str(), 2, &next).expect("page 2");
        assert_eq!((p, next), (vec!["c".to_string(), "d".to_string()], String::new()));
        for forged in ["../x", "b", "b~0123456789abcdef"] {
            assert!(matches!(page(items.clone(), |s| s.as_str(), 1, forged), Err(Error::InvalidToken(_))), "{forged}");
        }
    }
}
