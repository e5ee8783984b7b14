//! Shared helpers for the CSI tests: run the plugin binary, talk to it over its unix socket
//! with a real tonic client.

#![allow(dead_code)]

pub mod guest_node;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use vduse_csi::csi::proto::controller_client::ControllerClient;
use vduse_csi::csi::proto::identity_client::IdentityClient;
use vduse_csi::csi::proto::node_client::NodeClient;
use vduse_csi::csi::proto::*;

pub const NODE: &str = "node-1";

/// A running `vduse-csi serve`.
pub struct PluginProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub mode: &'static str,
}

impl PluginProcess {
    pub fn start(socket: &Path, state: &Path, mode: &'static str) -> Self {
        Self::start_with(socket, state, mode, &[])
    }

    /// Starts the plugin with more `serve` flags. Metrics are off unless `extra` turns them
    /// on: plugins of tests that run at once would contend for the default port.
    pub fn start_with(socket: &Path, state: &Path, mode: &'static str, extra: &[&str]) -> Self {
        Self::start_as(NODE, socket, state, mode, extra)
    }

    /// Like `start_with`, as node `node_id` (a second "node" on the same machine).
    pub fn start_as(node_id: &str, socket: &Path, state: &Path, mode: &'static str, extra: &[&str]) -> Self {
        Self::start_under(&[], node_id, socket, state, mode, extra)
    }

    /// Like `start_as`, run by `wrapper` (a command and its arguments, e.g. `unshare -n`).
    pub fn start_under(
        wrapper: &[&str],
        node_id: &str,
        socket: &Path,
        state: &Path,
        mode: &'static str,
        extra: &[&str],
    ) -> Self {
        let metrics_off = (!extra.iter().any(|a| a.starts_with("--metrics-address"))).then_some("--metrics-address=");
        let child = plugin_command(wrapper)
            .args([
                "serve",
                "--endpoint",
                &format!("unix://{}", socket.display()),
                "--node-id",
                node_id,
                "--mode",
                mode,
            ])
            .arg("--state-dir")
            .arg(state)
            .args(metrics_off)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("start vduse-csi serve");
        let p = Self { child, socket: socket.to_owned(), state: state.to_owned(), mode };
        p.wait_for_socket();
        p
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("plugin did not listen on {}", self.socket.display());
    }

    /// SIGTERM and wait; returns whether it exited 0.
    pub fn stop(mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `vduse-csi` binary as a command, run by `wrapper` (a command and its arguments) if any.
pub fn plugin_command(wrapper: &[&str]) -> Command {
    let bin = env!("CARGO_BIN_EXE_vduse-csi");
    match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

pub async fn connect(socket: &Path) -> Clients {
    let path = socket.to_owned();
    // The URI is ignored: every connection goes to the unix socket.
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect to the plugin socket");
    Clients {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    }
}

pub fn mount_cap(fs: &str, mode: volume_capability::access_mode::Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
    }
}

pub fn block_cap(mode: volume_capability::access_mode::Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(volume_capability::AccessType::Block(volume_capability::BlockVolume {})),
    }
}

pub fn writer() -> volume_capability::access_mode::Mode {
    volume_capability::access_mode::Mode::SingleNodeWriter
}

pub fn create_request(name: &str, bytes: i64, cap: VolumeCapability) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

/// Asserts that a call failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>, code: tonic::Code) {
    match result {
        Ok(r) => panic!("expected {code:?}, got success: {r:?}"),
        Err(status) => assert_eq!(status.code(), code, "{}", status.message()),
    }
}
