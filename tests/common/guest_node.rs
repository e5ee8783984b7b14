//! The harness of the guest CSI tests: on the host, a test binary boots the VDUSE test guest
//! (tests/guest/run.sh) and runs itself inside it with VDUSE_CSI_IN_GUEST=1; inside, each
//! scenario gets a [`Node`]: a `vduse-csi serve` with a tonic client over its unix socket,
//! and kubelet's path layout under a kubelet-like directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use super::*;
use vduse_csi::csi::proto::*;

const IN_GUEST: &str = "VDUSE_CSI_IN_GUEST";
const MIB: i64 = 1 << 20;

/// One guest test binary.
pub struct Harness {
    /// Its output folder under target/guest.
    pub out_dir: &'static str,
    /// `serve` flags of every scenario's plugin.
    pub plugin_flags: &'static [&'static str],
    /// Runs in the guest before the first scenario (a panic fails the run) and after the last.
    pub before: Option<fn()>,
    pub after: Option<fn()>,
    /// The CSI secrets every call of a scenario carries (the cephx user of tests/rbd.rs).
    pub secrets: Option<fn() -> HashMap<String, String>>,
}

pub type Scenario = fn(&mut Node);

/// The test binary's `main`: boots the guest on the host, runs the scenarios inside it.
pub fn main(harness: &Harness, scenarios: &[(&str, Scenario)]) -> ExitCode {
    if std::env::var_os(IN_GUEST).is_some() { in_guest(harness, scenarios) } else { on_host(harness) }
}

fn on_host(harness: &Harness) -> ExitCode {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe().expect("own path");
    let out = repo.join("target/guest").join(harness.out_dir);
    let _ = std::fs::remove_dir_all(&out);
    // Name filters (`cargo test --test csi_node -- NAME`) reach the scenarios in the guest.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let status = Command::new(repo.join("tests/guest/run.sh"))
        .arg(&exe)
        .arg(&out)
        .args(&filters)
        .env(IN_GUEST, "1")
        // Variables the caller names in GUEST_ENV reach the guest too (e.g. RUST_LOG, CEPH_ARGS).
        .env("GUEST_ENV", format!("{IN_GUEST} {}", std::env::var("GUEST_ENV").unwrap_or_default()))
        .env("GUEST_QUIET", "1")
        .status();
    let log = std::fs::read_to_string(out.join("output.log")).unwrap_or_default();
    print!("{log}");
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            if !log.contains(" passed, ") {
                println!("0 passed, 1 failed");
                eprintln!("the guest did not run the Node tests ({s}); see {}", out.display());
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("0 passed, 1 failed");
            eprintln!("cannot run tests/guest/run.sh: {e}");
            ExitCode::FAILURE
        }
    }
}

fn in_guest(harness: &Harness, scenarios: &[(&str, Scenario)]) -> ExitCode {
    if let Some(before) = harness.before {
        before();
    }
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let (mut passed, mut failed) = (0, 0);
    for &(name, scenario) in scenarios {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let result = std::panic::catch_unwind(|| {
            let mut node = Node::start(name, harness.plugin_flags);
            node.secrets = harness.secrets.map(|f| f()).unwrap_or_default();
            scenario(&mut node);
            node.finish();
        });
        cleanup();
        match result {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED");
            }
        }
    }
    if let Some(after) = harness.after {
        after();
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 && passed > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
/// Unmounts whatever a failed scenario left under /tmp/csi-tests and removes leftover devices.
/// The devices go first: a filesystem whose device nobody serves would block even a lazy
/// unmount on its journal (the last reference writes it), and removing the device fails that
/// I/O instead. Then the unmounts, then whatever device is left.
pub fn cleanup() {
    let _ = Command::new("pkill").args(["-KILL", "-f", "vduse-csi serve"]).status();
    std::thread::sleep(std::time::Duration::from_millis(300));
    remove_devices();
    if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") {
        let mut points: Vec<&str> =
            text.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| p.starts_with("/tmp/csi-tests/")).collect();
        points.reverse();
        for p in points {
            let _ = Command::new("umount").args(["-l", p]).status();
        }
    }
    remove_devices();
    let _ = std::fs::remove_dir_all("/tmp/csi-tests");
}

fn remove_devices() {
    if let Ok(entries) = std::fs::read_dir("/sys/class/vduse") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != "control" {
                let _ = Command::new(env!("CARGO_BIN_EXE_vduse-csi")).args(["device", "remove", &name]).status();
            }
        }
    }
}

pub struct Node {
    pub flags: &'static [&'static str],
    pub rt: tokio::runtime::Runtime,
    pub root: PathBuf,
    pub plugin: Option<PluginProcess>,
    pub c: Clients,
    /// Sent with every call that takes secrets.
    pub secrets: HashMap<String, String>,
}

impl Node {
    pub fn start(name: &str, flags: &'static [&'static str]) -> Self {
        let root = PathBuf::from("/tmp/csi-tests").join(name);
        std::fs::create_dir_all(root.join("kubelet")).expect("kubelet dir");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let plugin = PluginProcess::start_with(&root.join("csi.sock"), &root.join("state"), "all", flags);
        let c = rt.block_on(connect(&plugin.socket));
        let mut node = Self { flags, rt, root, plugin: Some(plugin), c, secrets: HashMap::new() };
        let probe = node.rt.block_on(node.c.identity.probe(ProbeRequest {})).expect("probe").into_inner();
        assert_eq!(probe.ready, Some(true));
        node
    }

    /// Kills the plugin with SIGKILL (no shutdown work at all) and starts a new one.
    pub fn kill_and_restart(&mut self) {
        self.kill_and_restart_under(&[], || {});
    }

    /// Like `kill_and_restart`, running `between` while no plugin runs, and the new plugin
    /// under `wrapper` (a command and its arguments, e.g. `unshare --net`).
    pub fn kill_and_restart_under(&mut self, wrapper: &[&str], between: impl FnOnce()) {
        let mut plugin = self.plugin.take().expect("plugin");
        let (socket, state) = (plugin.socket.clone(), plugin.state.clone());
        plugin.child.kill().expect("SIGKILL");
        plugin.child.wait().expect("wait");
        drop(plugin);
        between();
        let plugin = PluginProcess::start_under(wrapper, super::NODE, &socket, &state, "all", self.flags);
        self.c = self.rt.block_on(connect(&plugin.socket));
        self.plugin = Some(plugin);
        let probe = self.rt.block_on(self.c.identity.probe(ProbeRequest {})).expect("probe").into_inner();
        assert_eq!(probe.ready, Some(true), "ready only after staged volumes are served again");
    }

    /// Stops the plugin with SIGTERM and starts a new one on the same state dir.
    pub fn restart(&mut self) {
        self.restart_with(|| {});
    }

    /// Like `restart`, running `between` while no plugin runs.
    pub fn restart_with(&mut self, between: impl FnOnce()) {
        let plugin = self.plugin.take().expect("plugin");
        let (socket, state) = (plugin.socket.clone(), plugin.state.clone());
        assert!(plugin.stop(), "plugin exits 0 on SIGTERM");
        between();
        let plugin = PluginProcess::start_with(&socket, &state, "all", self.flags);
        self.c = self.rt.block_on(connect(&plugin.socket));
        self.plugin = Some(plugin);
        let probe = self.rt.block_on(self.c.identity.probe(ProbeRequest {})).expect("probe").into_inner();
        assert_eq!(probe.ready, Some(true), "ready only after staged volumes are served again");
    }

    pub fn finish(mut self) {
        if let Some(p) = self.plugin.take() {
            assert!(p.stop());
        }
        let devices: Vec<String> = std::fs::read_dir("/sys/class/vduse")
            .map(|d| {
                d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n != "control").collect()
            })
            .unwrap_or_default();
        assert!(devices.is_empty(), "scenario left devices behind: {devices:?}");
    }

    /// kubelet's global staging path of a mount volume (the CO creates it).
    pub fn staging(&self, pv: &str) -> PathBuf {
        let p = self.root.join("kubelet/plugins/kubernetes.io/csi/vduse.csi.dev").join(pv).join("globalmount");
        std::fs::create_dir_all(&p).expect("staging dir");
        p
    }

    /// kubelet's staging path of a block volume.
    pub fn block_staging(&self, pv: &str) -> PathBuf {
        let p = self.root.join("kubelet/plugins/kubernetes.io/csi/volumeDevices/staging").join(pv);
        std::fs::create_dir_all(&p).expect("staging dir");
        p
    }

    /// kubelet's pod mount target (the CO creates the parent; the plugin the target).
    pub fn target(&self, pod: &str, pv: &str) -> PathBuf {
        let parent = self.root.join("kubelet/pods").join(pod).join("volumes/kubernetes.io~csi").join(pv);
        std::fs::create_dir_all(&parent).expect("target parent");
        parent.join("mount")
    }

    /// kubelet's block publish path: a file the plugin creates.
    pub fn block_target(&self, pod: &str, pv: &str) -> PathBuf {
        let parent = self.root.join("kubelet/plugins/kubernetes.io/csi/volumeDevices/publish").join(pv);
        std::fs::create_dir_all(&parent).expect("target parent");
        parent.join(pod)
    }

    pub fn create(&mut self, name: &str, mib: i64, cap: VolumeCapability) -> Volume {
        let req = CreateVolumeRequest { secrets: self.secrets.clone(), ..create_request(name, mib * MIB, cap) };
        let r = self.rt.block_on(self.c.controller.create_volume(req));
        r.expect("CreateVolume").into_inner().volume.expect("volume")
    }

    pub fn stage(&mut self, id: &str, path: &Path, cap: &VolumeCapability) -> Result<(), tonic::Status> {
        let req = NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path.to_string_lossy().into(),
            volume_capability: Some(cap.clone()),
            secrets: self.secrets.clone(),
            ..Default::default()
        };
        self.rt.block_on(self.c.node.node_stage_volume(req)).map(drop)
    }

    pub fn unstage(&mut self, id: &str, path: &Path) -> Result<(), tonic::Status> {
        let req = NodeUnstageVolumeRequest { volume_id: id.into(), staging_target_path: path.to_string_lossy().into() };
        self.rt.block_on(self.c.node.node_unstage_volume(req)).map(drop)
    }

    pub fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: &VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        let req = NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.to_string_lossy().into(),
            target_path: target.to_string_lossy().into(),
            volume_capability: Some(cap.clone()),
            readonly,
            ..Default::default()
        };
        self.rt.block_on(self.c.node.node_publish_volume(req)).map(drop)
    }

    pub fn unpublish(&mut self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        let req = NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: target.to_string_lossy().into() };
        self.rt.block_on(self.c.node.node_unpublish_volume(req)).map(drop)
    }

    pub fn stats(&mut self, id: &str, path: &Path) -> NodeGetVolumeStatsResponse {
        let req = NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.to_string_lossy().into(),
            staging_target_path: String::new(),
        };
        self.rt.block_on(self.c.node.node_get_volume_stats(req)).expect("stats").into_inner()
    }

    pub fn expand(&mut self, id: &str, path: &Path, mib: i64) -> i64 {
        let range = Some(CapacityRange { required_bytes: mib * MIB, limit_bytes: 0 });
        let c = self
            .rt
            .block_on(self.c.controller.controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: id.into(),
                capacity_range: range,
                secrets: self.secrets.clone(),
                ..Default::default()
            }))
            .expect("ControllerExpandVolume")
            .into_inner();
        assert!(c.node_expansion_required);
        let req = NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.to_string_lossy().into(),
            capacity_range: range,
            secrets: self.secrets.clone(),
            ..Default::default()
        };
        self.rt.block_on(self.c.node.node_expand_volume(req)).expect("NodeExpandVolume").into_inner().capacity_bytes
    }

    /// Waits (up to 90 s, asking every 50 ms) until volume `id`'s condition, seen through `path`, is `wanted`
    /// (`None`: normal; `Some(text)`: abnormal, saying `text`): staged RBD volumes are served
    /// again after the plugin is ready, not before.
    pub fn wait_condition(&mut self, id: &str, path: &Path, wanted: Option<&str>) -> VolumeCondition {
        let started = std::time::Instant::now();
        loop {
            let condition = self.stats(id, path).volume_condition.expect("condition");
            let reached = match wanted {
                None => !condition.abnormal,
                Some(text) => condition.abnormal && condition.message.contains(text),
            };
            if reached {
                return condition;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(90),
                "volume {id}: {condition:?}, not {wanted:?}"
            );
            // Often: a state can be short (a heal round may end it within seconds).
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Runs `call` as kubelet runs a node call: again, every 200 ms for up to 60 s, while the
    /// plugin answers ABORTED (another operation on the volume, such as the recovery of a
    /// volume that was staged before a restart, still holds it).
    pub fn as_kubelet(
        &mut self,
        mut call: impl FnMut(&mut Self) -> Result<(), tonic::Status>,
    ) -> Result<(), tonic::Status> {
        let started = std::time::Instant::now();
        loop {
            match call(self) {
                Err(e)
                    if e.code() == tonic::Code::Aborted && started.elapsed() < std::time::Duration::from_secs(60) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(200))
                }
                outcome => return outcome,
            }
        }
    }

    pub fn delete(&mut self, id: &str) -> Result<(), tonic::Status> {
        let req = DeleteVolumeRequest { volume_id: id.into(), secrets: self.secrets.clone() };
        self.rt.block_on(self.c.controller.delete_volume(req)).map(drop)
    }
}

/// Flushes the filesystem holding `path` (through the plugin serving its device).
pub fn syncfs(path: &Path) {
    let dir = std::fs::File::open(path).expect("open dir");
    nix::unistd::syncfs(&dir).expect("syncfs");
}

pub fn is_mount_point(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| t.lines().any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap_or(""))))
        .unwrap_or(false)
}

pub fn usage(resp: &NodeGetVolumeStatsResponse, unit: volume_usage::Unit) -> VolumeUsage {
    *resp.usage.iter().find(|u| u.unit == unit as i32).expect("usage unit")
}
