//! kubelet plugin registration, served by the plugin itself (`serve --kubelet-registration-dir`):
//! what node-driver-registrar does, for nodes that run without that sidecar image (an
//! air-gapped node, the kubelet end-to-end test). kubelet's plugin watcher finds the socket in
//! its `plugins_registry/`, asks for the driver name and CSI endpoint, and from then on calls
//! the Node service there. The registration lives exactly as long as the plugin process: the
//! socket is removed on exit, and kubelet registers the driver again when a new plugin
//! creates it.

use std::path::{Path, PathBuf};

use tonic::{Request, Response, Status};

/// Generated types of kubelet's `pluginregistration` API.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("pluginregistration");
}

use proto::registration_server::Registration;
use proto::{InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse};

/// Plugin type kubelet expects from a CSI driver.
const CSI_PLUGIN: &str = "CSIPlugin";
/// Registration API versions kubelet accepts for CSI drivers.
const SUPPORTED_VERSIONS: [&str; 1] = ["1.0.0"];

/// Answers kubelet's plugin watcher.
pub struct RegistrationService {
    driver_name: String,
    endpoint: PathBuf,
}

impl RegistrationService {
    /// `endpoint`: the CSI socket as kubelet sees it.
    pub fn new(driver_name: String, endpoint: PathBuf) -> Self {
        Self { driver_name, endpoint }
    }
}

/// The registration socket of `driver_name` in kubelet's registry `dir`.
pub fn socket_path(dir: &Path, driver_name: &str) -> PathBuf {
    dir.join(format!("{driver_name}-reg.sock"))
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: CSI_PLUGIN.to_owned(),
            name: self.driver_name.clone(),
            endpoint: self.endpoint.to_string_lossy().into_owned(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.driver_name, endpoint = %self.endpoint.display(), "registered with kubelet");
        } else {
            tracing::error!(driver = %self.driver_name, error = %status.error, "kubelet refused the registration");
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tells_kubelet_the_driver_and_endpoint() {
        let service = RegistrationService::new("vduse.csi.dev".into(), "/var/lib/kubelet/plugins/x/csi.sock".into());
        let info = service.get_info(Request::new(InfoRequest {})).await.expect("info").into_inner();
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "vduse.csi.dev");
        assert_eq!(info.endpoint, "/var/lib/kubelet/plugins/x/csi.sock");
        assert_eq!(info.supported_versions, ["1.0.0"]);
        assert_eq!(
            socket_path(Path::new("/var/lib/kubelet/plugins_registry"), "vduse.csi.dev"),
            Path::new("/var/lib/kubelet/plugins_registry/vduse.csi.dev-reg.sock")
        );
    }
}
