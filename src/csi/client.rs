//! A CSI client over the plugin's unix socket: what `vduse-csi volume` uses to ask a running
//! plugin for volumes, the way external-provisioner would (for operators and for tests that
//! declare a PV by hand).

use std::collections::HashMap;
use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::proto::controller_client::ControllerClient;
use super::proto::*;

/// Connects to the plugin listening on `socket`.
pub async fn connect(socket: PathBuf) -> Result<ControllerClient<Channel>, String> {
    let path = socket.clone();
    // tonic wants a URI; every connection goes to the unix socket instead.
    let channel = Endpoint::from_static("http://[::]:0")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    Ok(ControllerClient::new(channel))
}

/// What `volume create` asks for.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub name: String,
    pub bytes: u64,
    /// Raw block access instead of a filesystem.
    pub block: bool,
    pub fs_type: String,
    pub parameters: HashMap<String, String>,
}

/// CreateVolume with a single-node-writer capability; returns the volume.
pub async fn create_volume(client: &mut ControllerClient<Channel>, new: NewVolume) -> Result<Volume, String> {
    use volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode};
    let access_type = if new.block {
        AccessType::Block(BlockVolume {})
    } else {
        AccessType::Mount(MountVolume { fs_type: new.fs_type.clone(), ..Default::default() })
    };
    let request = CreateVolumeRequest {
        name: new.name,
        capacity_range: Some(CapacityRange { required_bytes: new.bytes as i64, limit_bytes: 0 }),
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
            access_type: Some(access_type),
        }],
        parameters: new.parameters,
        ..Default::default()
    };
    let response = client.create_volume(request).await.map_err(|s| format!("CreateVolume: {}", s.message()))?;
    response.into_inner().volume.ok_or_else(|| "CreateVolume answered without a volume".to_owned())
}

/// DeleteVolume.
pub async fn delete_volume(client: &mut ControllerClient<Channel>, id: String) -> Result<(), String> {
    client
        .delete_volume(DeleteVolumeRequest { volume_id: id, secrets: HashMap::new() })
        .await
        .map(drop)
        .map_err(|s| format!("DeleteVolume: {}", s.message()))
}
