//! `vduse-csi serve`: the CSI plugin process.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use super::controller::ControllerService;
use super::identity::IdentityService;
use super::node::NodeService;
use super::proto::controller_server::ControllerServer;
use super::proto::identity_server::IdentityServer;
use super::proto::node_server::NodeServer;
use super::registration::{self, RegistrationService, proto::registration_server::RegistrationServer};
use super::{Mode, Plugin};
use crate::node::{AgentOptions, NodeAgent};
use crate::rbd::Clusters;
use crate::volume::VolumeStore;

/// How long running calls get to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// How long the flush and stop of the staged volumes may take at shutdown.
const STOP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// What `serve` was asked to do.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub endpoint: String,
    pub node_id: String,
    pub state_dir: PathBuf,
    pub mode: Mode,
    pub driver_name: String,
    /// See `VolumeStore`'s provisioning model.
    pub overcommit_ratio: f64,
    /// Largest ephemeral inline volume (`--ephemeral-max-size`).
    pub ephemeral_max_bytes: u64,
    /// Time between two healing rounds (`--heal-interval`).
    pub heal_interval: std::time::Duration,
    /// Register with kubelet ourselves: kubelet's `plugins_registry` folder, and the CSI
    /// socket path as kubelet sees it.
    pub kubelet_registration: Option<(PathBuf, PathBuf)>,
    /// Where to serve `/metrics`; `None` serves none and counts nothing in the datapath.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The `--ceph-clusters` file, if RBD volumes are served.
    pub ceph_clusters: Option<PathBuf>,
    /// How long a control-plane Ceph call may wait (`--ceph-timeout`).
    pub ceph_timeout: std::time::Duration,
    /// A second endpoint serving the Node service under the RBD driver's name (driver name,
    /// endpoint): kubelet knows each driver by its own socket.
    pub rbd_endpoint: Option<(String, String)>,
}

/// The socket path of a `unix://` endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint
        .strip_prefix("unix://")
        .ok_or_else(|| format!("endpoint {endpoint:?} must be unix:///absolute/path"))?;
    if !path.starts_with('/') {
        return Err(format!("endpoint {endpoint:?} must name an absolute path"));
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket with mode 0600. A stale socket file is replaced; a live one (a plugin
/// answers on it) is not stolen.
fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!("another process is serving {}; not taking it over", path.display()));
        }
        std::fs::remove_file(path).map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    // Bind under a restrictive umask so the socket is never reachable by others, even briefly.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    Ok(listener)
}

/// Serves the Node service under the RBD driver's name on its own socket. Returns the socket
/// and the sender that stops it.
fn serve_rbd_node(
    plugin: &Arc<Plugin>,
    name: &str,
    endpoint: &str,
    calls: super::metrics::CallMetricsLayer,
) -> Result<(PathBuf, tokio::sync::oneshot::Sender<()>), String> {
    let socket = socket_path(endpoint)?;
    let listener = bind(&socket)?;
    let identity = IdentityServer::new(IdentityService::rbd_node(Arc::clone(plugin), name.to_owned()));
    let node = NodeServer::new(NodeService::rbd(Arc::clone(plugin)));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let served = Server::builder()
            .layer(calls)
            .add_service(identity)
            .add_service(node)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the RBD node endpoint failed");
        }
    });
    tracing::info!(endpoint, driver = name, "serving RBD volumes' Node service");
    Ok((socket, stop_tx))
}

/// Serves kubelet's plugin registration API on a socket in its `plugins_registry` folder `dir`.
/// Returns the socket and the sender that stops the service.
fn register_with_kubelet(
    dir: &Path,
    endpoint: &Path,
    driver_name: &str,
) -> Result<(PathBuf, tokio::sync::oneshot::Sender<()>), String> {
    let socket = registration::socket_path(dir, driver_name);
    let listener = bind(&socket)?;
    let service = RegistrationServer::new(RegistrationService::new(driver_name.to_owned(), endpoint.to_owned()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let served = Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "kubelet registration service failed");
        }
    });
    tracing::info!(socket = %socket.display(), endpoint = %endpoint.display(), "waiting for kubelet to register the driver");
    Ok((socket, stop_tx))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping");
}

/// Runs the plugin until SIGTERM/SIGINT. Staged volumes' devices stay attached when it stops,
/// so a restarted plugin takes them over and their I/O resumes.
pub async fn run(opts: ServeOptions) -> Result<(), String> {
    if opts.node_id.is_empty() || opts.node_id.len() > 256 {
        return Err("--node-id must be 1 to 256 bytes".into());
    }
    let path = socket_path(&opts.endpoint)?;
    let store =
        VolumeStore::open(&opts.state_dir).map_err(|e| e.to_string())?.with_overcommit_ratio(opts.overcommit_ratio);
    let ceph = match &opts.ceph_clusters {
        Some(path) => {
            // Read now only to report a broken file early; it is read again at each use.
            if let Err(e) = Clusters::load(path) {
                tracing::warn!(error = %e, "the Ceph clusters file is not usable yet; RBD calls fail until it is");
            }
            Clusters::from_file(path, opts.ceph_timeout)
        }
        None => Clusters::default(),
    };
    // Before any device starts, so every device counts from its first request.
    let agent = NodeAgent::new(
        store,
        AgentOptions {
            node_id: opts.node_id.clone(),
            counters: opts.metrics_address.is_some(),
            ephemeral_max_bytes: opts.ephemeral_max_bytes,
            ceph: ceph.clone(),
        },
    );
    let plugin = Plugin::new(opts.driver_name.clone(), opts.mode, agent, ceph);
    let listener = bind(&path)?;
    let (registry, calls) = super::metrics::registry(&plugin);
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = opts.metrics_address {
        let started = crate::metrics::start(addr, Arc::new(registry), async {
            let _ = metrics_stopped.await;
        })
        .await;
        if let Err(e) = started {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    }

    if opts.mode.node() {
        let p = Arc::clone(&plugin);
        let not_ready = tokio::task::spawn_blocking(move || {
            let not_ready = p.agent.recover();
            p.agent.thaw_recorded();
            not_ready
        })
        .await
        .map_err(|e| e.to_string())?;
        if let Ok(mut reason) = plugin.not_ready_reason.lock() {
            *reason = not_ready;
        }
    }
    plugin.recovered.store(true, Ordering::Release);
    if opts.mode.node() {
        // Not awaited: RBD volumes' pools may not answer, and CSI calls must be served meanwhile.
        let p = Arc::clone(&plugin);
        tokio::task::spawn_blocking(move || {
            p.agent.recover_remote();
            p.agent.thaw_recorded();
        });
    }
    let heal_interval = opts.heal_interval;
    let healer = opts.mode.node().then(|| {
        let p = Arc::clone(&plugin);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(heal_interval);
            every.tick().await;
            loop {
                every.tick().await;
                let p = Arc::clone(&p);
                let _ = tokio::task::spawn_blocking(move || {
                    p.agent.heal();
                    p.agent.thaw_recorded();
                })
                .await;
            }
        })
    });
    tracing::info!(endpoint = %opts.endpoint, node = %opts.node_id, mode = ?opts.mode, state = %opts.state_dir.display(), "serving CSI");

    let rbd_node = match &opts.rbd_endpoint {
        Some((name, endpoint)) if opts.mode.node() => Some(serve_rbd_node(&plugin, name, endpoint, calls.clone())?),
        _ => None,
    };
    let controller = opts.mode.controller().then(|| ControllerServer::new(ControllerService::new(Arc::clone(&plugin))));
    let node = opts.mode.node().then(|| NodeServer::new(NodeService::new(Arc::clone(&plugin))));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .layer(calls)
        .add_service(IdentityServer::new(IdentityService::new(Arc::clone(&plugin))))
        .add_optional_service(controller)
        .add_optional_service(node)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    tokio::pin!(server);
    // Registration comes last: kubelet calls the Node service as soon as it sees the socket.
    let registration = match &opts.kubelet_registration {
        Some((dir, endpoint)) => Some(register_with_kubelet(dir, endpoint, &opts.driver_name)?),
        None => None,
    };
    // The RBD driver's socket is registered at its own path (no container path mapping).
    let rbd_registration = match (&opts.kubelet_registration, &rbd_node) {
        (Some((dir, _)), Some((socket, _))) => {
            let name = opts.rbd_endpoint.as_ref().map(|(n, _)| n.as_str()).unwrap_or_default();
            Some(register_with_kubelet(dir, socket, name)?)
        }
        _ => None,
    };
    let served = tokio::select! {
        result = &mut server => result,
        () = shutdown_signal() => {
            let _ = stop_tx.send(());
            // kubelet and the sidecars keep their connections open; give running calls a
            // moment to finish rather than waiting for every client to hang up.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::info!("clients still connected after {SHUTDOWN_GRACE:?}; exiting");
                    Ok(())
                }
            }
        }
    };
    let _ = std::fs::remove_file(&path);
    for (socket, stop) in [registration, rbd_registration, rbd_node].into_iter().flatten() {
        let _ = stop.send(());
        let _ = std::fs::remove_file(socket);
    }
    if let Some(healer) = healer {
        healer.abort();
    }
    let _ = metrics_stop.send(());
    // Flush, then stop the device threads but leave the devices attached: I/O waits for the
    // next plugin. Bounded: a volume whose pool does not answer would hold a flush for ever,
    // and a plugin that cannot stop is worse than one that stops as if killed (which the next
    // one takes over from safely).
    let p = Arc::clone(&plugin);
    let stopping = tokio::task::spawn_blocking(move || {
        p.agent.flush_all();
        p.agent.release_all()
    });
    match tokio::time::timeout(STOP_DEADLINE, stopping).await {
        Ok(Ok(n)) if n > 0 => {
            tracing::warn!(volumes = n, "left staged volumes attached; their I/O resumes when the plugin starts again")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "flushing and stopping the device servers failed"),
        Err(_) => tracing::error!(
            "flushing and stopping the device servers did not end within {STOP_DEADLINE:?} (a pool that does not \
             answer?); exiting as if killed: the next plugin takes the devices over"
        ),
    }
    served.map_err(|e| format!("gRPC server: {e}"))
}

#[cfg(test)]
mod tests {
    use super::socket_path;

    #[test]
    fn endpoints_must_be_absolute_unix_paths() {
        assert_eq!(socket_path("unix:///run/x.sock").ok(), Some("/run/x.sock".into()));
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://rel/x").is_err());
    }
}
