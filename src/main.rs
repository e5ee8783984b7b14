//! `vduse-csi` command line: set up logging, parse arguments, call into the library.
//!
//! Longer than the other files on purpose: every subcommand's arguments and `--help` text are
//! here, together, as clap derives them; the work itself is in the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use std::os::fd::AsFd;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use vduse_csi::backend::{Backend, CacheMode, FileBackend, NullBackend};
use vduse_csi::blk::qos::QosLimits;
use vduse_csi::csi;
use vduse_csi::server::{self, DeviceOptions, DeviceServer, HealthState};
use vduse_csi::units::parse_size;
use vduse_csi::vduse::{self, sysfs};

/// Kubernetes CSI driver whose volumes are VDUSE virtio-blk devices served by this process.
#[derive(Parser, Debug)]
#[command(name = "vduse-csi", version, propagate_version = true)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive such as
    /// `vduse_csi=debug`). RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the CSI plugin: Identity, Controller and Node services on a unix socket.
    ///
    /// Volumes live under --state-dir on this node. Volumes that were staged when the plugin
    /// last stopped are served again before Probe reports ready; their devices stay attached
    /// while the plugin is down (their I/O waits for it).
    Serve(PluginArgs),
    /// Serve and manage single VDUSE block devices without Kubernetes.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Volumes of this node: create and delete them through a running plugin (its Controller
    /// service, as external-provisioner would), list and show them from the state dir.
    #[command(subcommand)]
    Volume(VolumeCommand),
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// CreateVolume; prints the volume ID and its capacity in bytes.
    Create {
        /// Volume name (the ID of the new volume; idempotent).
        name: String,
        /// Capacity: bytes or a K, M, G, T suffix (powers of 1024).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// A raw block volume (volumeMode: Block) instead of a filesystem.
        #[arg(long)]
        block: bool,
        /// Filesystem of a mount volume (ext4 or xfs; default: the StorageClass default, ext4).
        #[arg(long, default_value = "", conflicts_with = "block")]
        fs_type: String,
        /// A StorageClass parameter, KEY=VALUE (repeatable).
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
        #[command(flatten)]
        endpoint: EndpointArg,
    },
    /// DeleteVolume (a volume that does not exist is not an error).
    Delete {
        name: String,
        #[command(flatten)]
        endpoint: EndpointArg,
    },
    /// Every volume and snapshot in the state dir: size, allocated bytes, filesystem, whether
    /// it is staged, its block device, publications, QoS limits and condition. Reads the
    /// state dir and sysfs only, so it works while the plugin runs and when it does not.
    List {
        #[command(flatten)]
        view: ViewArgs,
    },
    /// One volume or snapshot, a field a line (the same fields as `list`).
    Show {
        /// Volume or snapshot ID.
        id: String,
        #[command(flatten)]
        view: ViewArgs,
    },
}

#[derive(Args, Debug)]
struct ViewArgs {
    /// The plugin's state dir.
    #[arg(long, default_value = csi::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum Output {
    Table,
    Json,
}

#[derive(Args, Debug)]
struct EndpointArg {
    /// The plugin's gRPC endpoint, unix:///absolute/path.
    #[arg(long, default_value = csi::DEFAULT_ENDPOINT)]
    endpoint: String,
}

#[derive(Subcommand, Debug)]
enum DeviceCommand {
    /// Serve an image file as a host block device (/dev/vdX) until SIGINT or SIGTERM.
    ///
    /// Prints the block device path alone on a line of stdout once the device is up. On
    /// SIGINT/SIGTERM it detaches the device (the kernel drains outstanding I/O through us),
    /// makes every completed write durable and destroys the device. A device of the same name
    /// left attached by a server that was killed is taken over and served again. If a queue
    /// or the control thread stops on a fault, it exits non-zero with the reason and leaves
    /// the device attached for the next server to take over. If the device cannot be detached
    /// (for example outside the host's network namespace), it keeps serving it and says so:
    /// signal again to retry, or SIGKILL to leave it for the next server.
    Serve(Box<ServeArgs>),
    /// List the VDUSE devices on this host.
    List,
    /// Remove a VDUSE device that no server is serving (a leftover of a killed server).
    ///
    /// Pending I/O on it fails with an I/O error; the device is then detached and destroyed.
    Remove {
        /// Device name as shown by `device list`.
        name: String,
    },
}

#[derive(Args, Debug)]
struct PluginArgs {
    /// gRPC endpoint, unix:///absolute/path (the socket is created with mode 0600).
    #[arg(long, default_value = csi::DEFAULT_ENDPOINT)]
    endpoint: String,
    /// This node's ID (the Kubernetes node name); also the topology value.
    #[arg(long, env = "NODE_ID")]
    node_id: String,
    /// Where volume images and metadata live.
    #[arg(long, default_value = csi::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Which services to serve.
    #[arg(long, value_enum, default_value_t = csi::Mode::All)]
    mode: csi::Mode,
    /// How far volumes may promise more than the node has: the capacities of all volumes
    /// together may reach this many times the size of the state dir's filesystem. Images are
    /// sparse and hold only what was written; a `thick: "true"` StorageClass reserves its
    /// volumes in full instead. 1 promises no more than the filesystem's size.
    #[arg(long, default_value_t = vduse_csi::volume::DEFAULT_OVERCOMMIT_RATIO, value_parser = parse_ratio)]
    overcommit_ratio: f64,
    /// Largest ephemeral inline volume a pod may declare (its `size` attribute; bytes or
    /// K/M/G/T, Ki/Mi/Gi/Ti). Pod authors, not the admin, write inline volumes and
    /// ResourceQuota does not count them, so their only other attribute is none: queues,
    /// thickness and QoS are the node's defaults.
    #[arg(long, default_value = "10Gi", value_parser = parse_size)]
    ephemeral_max_size: u64,
    /// Seconds between two rounds of the node agent's healing: staged volumes without a
    /// healthy device server are served again, and filesystems a killed plugin left frozen
    /// are thawed.
    #[arg(long, default_value_t = 10.0, value_parser = parse_interval)]
    heal_interval: f64,
    /// Register the driver with kubelet from this process, as node-driver-registrar would:
    /// serve kubelet's plugin registration API in this folder (kubelet's
    /// `plugins_registry`, e.g. /var/lib/kubelet/plugins_registry). For nodes without the
    /// registrar sidecar; off by default.
    #[arg(long)]
    kubelet_registration_dir: Option<PathBuf>,
    /// The CSI socket's path as kubelet sees it, told to kubelet at registration (it differs
    /// from --endpoint inside a container). Default: the path of --endpoint.
    #[arg(long, requires = "kubelet_registration_dir")]
    kubelet_registration_path: Option<PathBuf>,
    /// CSI driver name reported by GetPluginInfo.
    #[arg(long, default_value = csi::DRIVER_NAME)]
    driver_name: String,
    /// Serve Prometheus metrics at http://ADDRESS/metrics: CSI calls, this node's backing
    /// store, and every staged volume's requests, bytes, latencies, kicks, interrupts and QoS
    /// throttling. Loopback by default; the DaemonSet (which runs with hostNetwork) binds the
    /// node's own address rather than every interface. An empty value turns metrics off, and
    /// the datapath then counts nothing.
    #[arg(long, default_value = vduse_csi::metrics::DEFAULT_ADDRESS, value_parser = parse_metrics_address)]
    metrics_address: MetricsAddress,
    /// Ceph clusters for RBD volumes (StorageClass `backend: rbd`): a JSON list of
    /// `{"clusterID": "...", "monitors": ["host:port", ...]}`, the shape of ceph-csi's
    /// config.json. With `--mode controller` this process is the cluster-wide RBD controller
    /// and provisions RBD volumes only.
    #[arg(long, value_name = "FILE")]
    ceph_clusters: Option<PathBuf>,
    /// Seconds a control-plane Ceph call (create, delete, snapshot, resize; a node's open and
    /// lock of an image) may wait before the CSI call fails UNAVAILABLE, so a pool whose
    /// placement groups are inactive holds up nothing else. Devices' I/O never times out: it
    /// waits for the pool, as a disk does.
    #[arg(long, default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600), requires = "ceph_clusters")]
    ceph_timeout: u64,
    /// Also serve the Node service at this endpoint (unix:///absolute/path) under
    /// --rbd-driver-name, for RBD volumes: kubelet reaches each driver through its own
    /// socket. Node plugins of clusters with an RBD StorageClass set it.
    #[arg(long, requires = "ceph_clusters")]
    rbd_endpoint: Option<String>,
    /// The CSI driver name of RBD volumes (their StorageClass's provisioner), distinct from
    /// --driver-name so the cluster-wide RBD controller and the per-node controllers never
    /// both provision one claim.
    #[arg(long, default_value = vduse_csi::rbd::RBD_DRIVER_NAME)]
    rbd_driver_name: String,
}

/// `--heal-interval`: 0.05 to 3600 seconds.
fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if (0.05..=3600.0).contains(&v) { Ok(v) } else { Err(format!("{v} is not between 0.05 and 3600 seconds")) }
}

/// `--metrics-address`: an address, or none.
#[derive(Debug, Clone, Copy)]
struct MetricsAddress(Option<std::net::SocketAddr>);

fn parse_metrics_address(s: &str) -> Result<MetricsAddress, String> {
    vduse_csi::metrics::parse_address(s).map(MetricsAddress)
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Image file to serve; created sparse if absent and --size is given.
    #[arg(long, required_unless_present_any = ["null", "rbd"])]
    image: Option<PathBuf>,
    /// Serve the Ceph RBD image POOL/IMAGE instead of a file, through librbd, holding its
    /// exclusive lock; created with --size if absent. Needs --ceph-monitors and --name.
    #[arg(long, value_name = "POOL/IMAGE", conflicts_with_all = ["image", "null", "read_only", "cache"], requires_all = ["name", "ceph_monitors"])]
    rbd: Option<String>,
    /// The Ceph monitors for --rbd, in `mon_host` syntax (`10.0.0.1:6789,10.0.0.2:6789`).
    #[arg(long, value_name = "ADDRS")]
    ceph_monitors: Option<String>,
    /// The cephx user for --rbd, without `client.`.
    #[arg(long, default_value = "admin")]
    ceph_user: String,
    /// A file holding the cephx key for --rbd (the key alone, as `ceph auth print-key` prints
    /// it); none for a cluster without cephx.
    #[arg(long, value_name = "FILE")]
    ceph_key_file: Option<PathBuf>,
    /// For benchmarks, not data: serve a disk of --size bytes that stores nothing. Every
    /// request succeeds at once and reads return whatever the kernel's bounce pages held; it
    /// measures the VDUSE path and the queue engine with the storage taken out (like null_blk).
    #[arg(long, conflicts_with_all = ["image", "read_only", "cache"], requires_all = ["size", "name"])]
    null: bool,
    /// Size of a new image: bytes or a K, M, G, T suffix (powers of 1024). An existing image
    /// keeps its size.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Device name (VDUSE, vdpa and virtio-blk serial); default: the image file name.
    #[arg(long)]
    name: Option<String>,
    /// Number of virtqueues (the host uses at most one per CPU). Default: one per CPU, at
    /// most 4.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: Option<u16>,
    /// Entries per virtqueue: a power of two from 4 to 1024.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Refuse writes (the host sees a read-only disk).
    #[arg(long)]
    read_only: bool,
    /// Seconds the kernel waits for an answer to a control message before it marks the device
    /// broken for good; 0 waits forever, so a restarted server can still answer.
    #[arg(long, default_value_t = 0)]
    msg_timeout: u32,
    /// How image I/O uses this host's page cache: `none` reads and writes aligned requests
    /// with O_DIRECT (the page cache only for misaligned ones, and for everything if the
    /// image's filesystem refuses O_DIRECT or is tmpfs, where the page cache is the storage);
    /// `writeback` caches everything.
    #[arg(long, default_value = "none", value_parser = parse_cache)]
    cache: CacheMode,
    /// Microseconds a queue thread keeps polling its ring after the last request before it
    /// sleeps until a kick (at most 10000). It polls only while requests keep arriving, never
    /// while idle; 0 turns polling off.
    #[arg(long, default_value_t = server::DEFAULT_POLL.as_micros() as u64)]
    poll_us: u64,
    /// Leave each queue's interrupt moving from CPU to CPU of its mask at every completion,
    /// as VDUSE does by itself. By default each queue's interrupt is bound to one CPU of its
    /// mask, which is about twice as fast with fewer queues than CPUs (docs/PERFORMANCE.md).
    #[arg(long)]
    rotate_irqs: bool,
    /// Register memory of ours, on transparent huge pages, as the device's bounce pages
    /// instead of the kernel's 4 KiB ones: O_DIRECT then pins 2 MiB folios and sends fewer,
    /// larger segments (docs/PERFORMANCE.md). It pins the whole bounce region while the
    /// device is served: 32 MiB per queue, at least 64 MiB (room for 32 requests of 1 MiB in
    /// flight per queue; more wait for room), and raises this process's RLIMIT_MEMLOCK to do
    /// so. Without the right to, or on a kernel that refuses, the kernel's pages stay and a
    /// warning says why.
    #[arg(long)]
    own_bounce_pages: bool,
    /// Serve Prometheus metrics for this device at http://ADDRESS/metrics (its volume_id label
    /// is the device name). Off unless given.
    #[arg(long, default_value = "", value_parser = parse_metrics_address)]
    metrics_address: MetricsAddress,
    #[command(flatten)]
    qos: QosArgs,
}

/// QoS limits of one device: token buckets that admit bursts of one second's worth, then
/// hold the queue back until the rate allows more. Unlimited unless given.
#[derive(Args, Debug)]
struct QosArgs {
    /// Read requests per second.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_read_iops: Option<u64>,
    /// Write requests (and flushes, discards, write-zeroes) per second.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_write_iops: Option<u64>,
    /// Requests per second, reads and writes together.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_iops: Option<u64>,
    /// Bytes read per second (a suffix K, M, G is allowed).
    #[arg(long, value_parser = parse_rate)]
    max_read_bytes_per_sec: Option<u64>,
    /// Bytes written per second.
    #[arg(long, value_parser = parse_rate)]
    max_write_bytes_per_sec: Option<u64>,
    /// Bytes per second, reads and writes together.
    #[arg(long, value_parser = parse_rate)]
    max_bytes_per_sec: Option<u64>,
}

impl QosArgs {
    fn limits(&self) -> QosLimits {
        QosLimits {
            max_read_iops: self.max_read_iops,
            max_write_iops: self.max_write_iops,
            max_iops: self.max_iops,
            max_read_bytes_per_sec: self.max_read_bytes_per_sec,
            max_write_bytes_per_sec: self.max_write_bytes_per_sec,
            max_bytes_per_sec: self.max_bytes_per_sec,
        }
    }
}

/// A byte rate: a size, and not zero.
fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("a rate must be positive".into()),
        v => Ok(v),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: container logs and test logs stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();

    let result = match cli.command {
        Command::Serve(args) => serve_plugin(args),
        Command::Device(DeviceCommand::Serve(args)) => serve_device(*args),
        Command::Device(DeviceCommand::List) => list_devices(),
        Command::Device(DeviceCommand::Remove { name }) => server::remove_stale(&name).map_err(|e| e.to_string()),
        Command::Volume(command) => volume_command(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vduse-csi: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("{s:?}: use KEY=VALUE"))
}

/// `volume list` and `volume show`: read the state dir, print.
fn show_volumes(id: Option<&str>, view: &ViewArgs) -> Result<(), String> {
    use csi::inventory;
    let store = vduse_csi::volume::VolumeStore::open_read_only(&view.state_dir).map_err(|e| e.to_string())?;
    let text = match (id, view.output) {
        (None, Output::Table) => inventory::table(&inventory::list(&store).map_err(|e| e.to_string())?),
        (None, Output::Json) => {
            serde_json::to_string_pretty(&inventory::list(&store).map_err(|e| e.to_string())?).unwrap_or_default()
                + "\n"
        }
        (Some(id), Output::Table) => inventory::details(&inventory::show(&store, id).map_err(|e| e.to_string())?),
        (Some(id), Output::Json) => {
            serde_json::to_string_pretty(&inventory::show(&store, id).map_err(|e| e.to_string())?).unwrap_or_default()
                + "\n"
        }
    };
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(())
}

fn volume_command(command: VolumeCommand) -> Result<(), String> {
    use csi::client;
    let endpoint = match &command {
        VolumeCommand::List { view } => return show_volumes(None, view),
        VolumeCommand::Show { id, view } => return show_volumes(Some(id), view),
        VolumeCommand::Create { endpoint, .. } | VolumeCommand::Delete { endpoint, .. } => {
            csi::serve::socket_path(&endpoint.endpoint)?
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async move {
        let mut controller = client::connect(endpoint).await?;
        let mut out = std::io::stdout().lock();
        match command {
            VolumeCommand::Create { name, size, block, fs_type, params, .. } => {
                let new =
                    client::NewVolume { name, bytes: size, block, fs_type, parameters: params.into_iter().collect() };
                let volume = client::create_volume(&mut controller, new).await?;
                let _ = writeln!(out, "{} {}", volume.volume_id, volume.capacity_bytes);
            }
            VolumeCommand::Delete { name, .. } => client::delete_volume(&mut controller, name).await?,
            VolumeCommand::List { .. } | VolumeCommand::Show { .. } => {}
        }
        Ok(())
    })
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    s.parse::<f64>().ok().filter(|r| r.is_finite() && *r >= 1.0).ok_or_else(|| format!("{s:?}: use a number >= 1"))
}

fn parse_cache(s: &str) -> Result<CacheMode, String> {
    CacheMode::parse(s).ok_or_else(|| format!("{s:?} is not a cache mode: use none or writeback"))
}

/// The default device name: the image file name with unusable characters replaced.
fn default_name(image: &std::path::Path) -> String {
    let stem = image.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut name: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' }).take(64).collect();
    if name.is_empty() || name.starts_with('.') {
        name.insert_str(0, "vd");
        name.truncate(64);
    }
    name
}

/// Opens `--rbd POOL/IMAGE`, creating it if absent and --size is given.
fn open_rbd(args: &ServeArgs) -> Result<vduse_csi::backend::rbd::RbdBackend, String> {
    use vduse_csi::backend::ceph::{Cluster, ClusterConfig};
    use vduse_csi::backend::rbd::RbdBackend;
    let spec = args.rbd.as_deref().unwrap_or_default();
    let (pool, image) = spec.split_once('/').ok_or_else(|| format!("--rbd {spec:?}: use POOL/IMAGE"))?;
    let key = match &args.ceph_key_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --ceph-key-file {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    // A device's connection: its I/O waits for the pool as long as it takes.
    let config = ClusterConfig {
        monitors: args.ceph_monitors.clone().unwrap_or_default(),
        user: args.ceph_user.clone(),
        key,
        op_timeout: None,
    };
    let cluster = Cluster::connect(&config).map_err(|e| e.to_string())?;
    let pool = Arc::new(cluster.pool(pool).map_err(|e| e.to_string())?);
    if let Some(size) = args.size {
        match pool.create_image(image, size) {
            Err(e) if e.errno() != Some(libc::EEXIST) => return Err(e.to_string()),
            _ => {}
        }
    }
    RbdBackend::open(&pool, image, None).map_err(|e| e.to_string())
}

/// Refuses a device another live process serves, before the image is opened: the image's lock
/// would only refuse after waiting a minute for a predecessor's I/O. The kernel allows one
/// opener of the device node, so a node still busy after a moment (a killed server's files
/// close as it exits) belongs to a live server.
fn refuse_if_served(name: &str) -> Result<(), String> {
    const PATIENCE: Duration = Duration::from_secs(2);
    let start = std::time::Instant::now();
    while sysfs::device_exists(name) {
        match vduse::VduseDevice::open(name) {
            Err(e @ vduse::Error::Busy(_)) if start.elapsed() >= PATIENCE => return Err(e.to_string()),
            Err(vduse::Error::Busy(_)) => std::thread::sleep(Duration::from_millis(100)),
            // Opened (and closed again: nothing else holds it), or gone meanwhile; whatever
            // else went wrong, DeviceServer::start reports it properly.
            _ => break,
        }
    }
    Ok(())
}

fn serve_device(args: ServeArgs) -> Result<(), String> {
    let name = match (&args.name, &args.image) {
        (Some(name), _) => name.clone(),
        (None, Some(image)) => default_name(image),
        (None, None) => return Err("--name is required without --image".into()),
    };
    let opts = DeviceOptions {
        name,
        num_queues: args.queues.unwrap_or_else(server::default_queues),
        queue_size: args.queue_size,
        msg_timeout: args.msg_timeout,
        poll: Duration::from_micros(args.poll_us),
        counters: args.metrics_address.0.is_some(),
        qos: args.qos.limits(),
        rotate_irqs: args.rotate_irqs,
        own_bounce_pages: args.own_bounce_pages,
    };
    // Check everything the caller got wrong before touching the host, so a bad command line
    // creates nothing.
    opts.validate().map_err(|e| e.to_string())?;
    if let Some(image) = args.image.as_ref().filter(|i| args.size.is_none() && !i.exists()) {
        return Err(vduse_csi::backend::Error::Missing(image.clone()).to_string());
    }
    if !std::path::Path::new(vduse::CONTROL_PATH).exists() {
        return Err(vduse::Error::ControlMissing.to_string());
    }
    refuse_if_served(&opts.name)?;
    let metrics_listener = match args.metrics_address.0 {
        Some(addr) => {
            Some(std::net::TcpListener::bind(addr).map_err(|e| format!("cannot bind metrics address {addr}: {e}"))?)
        }
        None => None,
    };
    // Block the stop signals before any thread exists so every thread inherits the mask and
    // only the signalfd below sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().map_err(|e| format!("cannot block signals: {e}"))?;

    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("signalfd: {e}"))?;
    let backend: Arc<dyn Backend> = match (&args.image, args.size) {
        _ if args.rbd.is_some() => Arc::new(open_rbd(&args)?),
        (Some(image), size) => {
            Arc::new(FileBackend::open(image, size, args.read_only, args.cache).map_err(|e| e.to_string())?)
        }
        (None, Some(size)) => Arc::new(NullBackend::new(size).map_err(|e| e.to_string())?),
        (None, None) => return Err("--size is required with --null".into()),
    };
    let server = DeviceServer::start(&opts, backend).map_err(|e| e.to_string())?;
    if let (Some(listener), Some(stats)) = (metrics_listener, server.stats()) {
        let mut registry = prometheus_client::registry::Registry::default();
        let (name, stats) = (opts.name.clone(), Arc::clone(stats));
        registry.register_collector(Box::new(vduse_csi::metrics::DatapathCollector::new(Box::new(move || {
            vec![(name.clone(), Arc::clone(&stats))]
        }))));
        vduse_csi::metrics::spawn_thread(listener, registry)?;
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", server.block_device().display());
        let _ = out.flush();
    }
    // Serve until a stop signal, or until the server stops serving part of the device: then
    // exit non-zero with the reason instead of leaving the host's I/O waiting unseen. The
    // device stays attached for a new server to take over.
    let mut server = server;
    loop {
        let mut fds = [PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(HEALTH_CHECK_MS)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        if let Ok(Some(info)) = signal_fd.read_signal() {
            tracing::info!(signal = info.ssi_signo, "stopping");
            match server.stop() {
                Ok(()) => return Ok(()),
                // The host still has the device: keep serving it rather than strand its I/O.
                // The next signal tries again; SIGKILL leaves it for another server.
                Err(server::StopError::StillServing(still)) => {
                    tracing::error!(error = %still.error, "cannot detach the device; still serving it (signal again to retry)");
                    server = *still.server;
                }
                Err(server::StopError::Failed(e)) => return Err(e.to_string()),
            }
        }
        if let HealthState::Degraded(reason) = server.health() {
            // Dropping the server leaves the device attached, exactly like a crash.
            drop(server);
            return Err(format!(
                "the device is no longer fully served: {reason}; start `device serve` again to take it over"
            ));
        }
    }
}

/// How often `device serve` checks its server's health, in milliseconds.
const HEALTH_CHECK_MS: u16 = 200;

fn serve_plugin(args: PluginArgs) -> Result<(), String> {
    let kubelet_registration = match args.kubelet_registration_dir {
        Some(dir) => {
            let endpoint = match args.kubelet_registration_path {
                Some(path) => path,
                None => csi::serve::socket_path(&args.endpoint)?,
            };
            Some((dir, endpoint))
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let served = runtime.block_on(csi::serve::run(csi::serve::ServeOptions {
        endpoint: args.endpoint,
        node_id: args.node_id,
        state_dir: args.state_dir,
        mode: args.mode,
        driver_name: args.driver_name,
        overcommit_ratio: args.overcommit_ratio,
        ephemeral_max_bytes: args.ephemeral_max_size,
        heal_interval: std::time::Duration::from_secs_f64(args.heal_interval),
        kubelet_registration,
        metrics_address: args.metrics_address.0,
        ceph_clusters: args.ceph_clusters,
        ceph_timeout: std::time::Duration::from_secs(args.ceph_timeout),
        rbd_endpoint: args.rbd_endpoint.map(|e| (args.rbd_driver_name, e)),
    }));
    // Work still blocked (a flush on a pool that does not answer) must not keep the process.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

fn list_devices() -> Result<(), String> {
    let names = sysfs::list_devices().map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{:<40} {:<9} {:<12} {:<10} MSG_TIMEOUT", "NAME", "ATTACHED", "DRIVER", "BLOCK");
    for name in names {
        let attached = sysfs::is_attached(&name);
        let driver = sysfs::bound_driver(&name).unwrap_or_else(|| "-".into());
        let block = sysfs::block_device_name(&name).map(|b| format!("/dev/{b}")).unwrap_or_else(|| "-".into());
        let timeout = sysfs::msg_timeout(&name).map(|t| t.to_string()).unwrap_or_else(|_| "?".into());
        let _ =
            writeln!(out, "{name:<40} {:<9} {driver:<12} {block:<10} {timeout}", if attached { "yes" } else { "no" });
    }
    Ok(())
}
