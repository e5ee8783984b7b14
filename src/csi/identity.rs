//! Identity service: who we are, what we offer, whether we are ready.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tonic::{Request, Response, Status};

use super::Plugin;
use super::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    PluginCapability, ProbeRequest, ProbeResponse, identity_server::Identity, plugin_capability,
};

pub struct IdentityService {
    plugin: Arc<Plugin>,
    /// The driver name this endpoint answers for.
    name: String,
    /// Whether its volumes have topology (node-local ones do; RBD volumes do not).
    topology: bool,
}

impl IdentityService {
    /// The identity of the plugin's main endpoint.
    pub fn new(plugin: Arc<Plugin>) -> Self {
        let (name, topology) = (plugin.driver_name.clone(), !plugin.rbd_controller());
        Self { plugin, name, topology }
    }

    /// The identity of the node's RBD endpoint: another driver name, no topology.
    pub fn rbd_node(plugin: Arc<Plugin>, name: String) -> Self {
        Self { plugin, name, topology: false }
    }
}

fn service(t: plugin_capability::service::Type) -> PluginCapability {
    PluginCapability { r#type: Some(plugin_capability::Type::Service(plugin_capability::Service { r#type: t as i32 })) }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::service::Type as S;
        use plugin_capability::volume_expansion::Type as E;
        let mut capabilities = Vec::new();
        if self.topology {
            capabilities.push(service(S::VolumeAccessibilityConstraints));
        }
        if self.plugin.mode.controller() && self.name == self.plugin.driver_name {
            capabilities.insert(0, service(S::ControllerService));
        }
        capabilities.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(plugin_capability::VolumeExpansion {
                r#type: E::Online as i32,
            })),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        if self.plugin.mode.node() {
            if let Some(reason) = self.plugin.not_ready_reason.lock().ok().and_then(|r| r.clone()) {
                return Err(Status::failed_precondition(format!("not ready: {reason}")));
            }
            if !self.plugin.recovered.load(Ordering::Acquire) {
                return Ok(Response::new(ProbeResponse { ready: Some(false) }));
            }
        }
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
