//! RBD volumes against a real Ceph, on a real kernel.
//!
//! On the host this binary boots the VDUSE test guest and runs itself inside it (see
//! `common::guest_node`). Inside, it first starts a one-node Ceph bound to the guest's
//! loopback (tests/ceph/cluster.sh: a mon, a mgr and a BlueStore OSD on a file) with cephx
//! required, and each scenario drives the plugin's Controller and Node services the way the
//! CSI sidecars and kubelet do, as a `profile rbd` user whose key comes only in the calls'
//! secrets, checking the images, locks and blocklist in Ceph with its own CLI (as admin).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use common::guest_node::{self, Harness, Node, Scenario, syncfs};
use common::*;
use tonic::Code;
use vduse_csi::csi::proto::*;
use vduse_csi::rbd::ids::image_name;

const CEPH_DIR: &str = "/tmp/ceph";
const CLUSTERS_FILE: &str = "/tmp/ceph-clusters.json";
const CLUSTER_ID: &str = "test";
const MIB: i64 = 1 << 20;
/// The plugin's user (made by tests/ceph/cluster.sh as the README tells users to).
const CEPH_USER: &str = "kubernetes";
const HARNESS: Harness = Harness {
    out_dir: "rbd-tests",
    plugin_flags: &["--ceph-clusters=/tmp/ceph-clusters.json"],
    before: Some(start_ceph),
    after: Some(stop_ceph),
    secrets: Some(secrets),
};

fn main() -> ExitCode {
    let scenarios: &[(&str, Scenario)] = &[
        ("rbd_volume_survives_restage_and_plugin_restart", lifecycle),
        ("rbd_cephx_wrong_key_refused_rotated_key_taken", cephx_keys),
        ("rbd_conformance_snapshots_clones_guards_clients", conformance),
        ("rbd_sick_pool_holds_up_nothing_else", sick_pool),
        ("rbd_lost_lock_degrades_then_heals", lost_lock),
        ("rbd_lock_taken_by_another_node_fences_at_heal", lock_taken_fences),
        ("rbd_fio_verify_at_qd32", fio_verify),
        ("rbd_snapshot_and_clones_hold_the_same_data", snapshot_and_clones),
        ("rbd_online_resize", online_resize),
        ("rbd_plugin_sigkill_under_fio_verify", sigkill_under_fio),
        ("rbd_two_nodes_contend_for_one_image", two_nodes),
        ("rbd_bad_requests_get_clear_errors", bad_requests),
    ];
    guest_node::main(&HARNESS, scenarios)
}

fn start_ceph() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ceph/cluster.sh");
    let started = Instant::now();
    let status = Command::new(&script)
        .args(["start", CEPH_DIR])
        .env("CEPH_AUTH", "cephx")
        .status()
        .expect("run tests/ceph/cluster.sh");
    assert!(status.success(), "the test Ceph did not start");
    println!("ceph: one-node cluster up in {:.0?}", started.elapsed());
    let clusters = format!(r#"[{{"clusterID": "{CLUSTER_ID}", "monitors": ["127.0.0.1:6789"]}}]"#);
    std::fs::write(CLUSTERS_FILE, clusters).expect("write the clusters file");
}

/// The CSI secrets of the plugin's user, as a StorageClass's secret carries them.
fn secrets() -> HashMap<String, String> {
    let key = std::fs::read_to_string(format!("{CEPH_DIR}/client.{CEPH_USER}.key")).expect("the user's key");
    HashMap::from([("userID".into(), CEPH_USER.into()), ("userKey".into(), key.trim().to_owned())])
}

fn ceph_osd(action: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ceph/cluster.sh");
    let status = Command::new(&script).args([action, CEPH_DIR]).status().expect("run tests/ceph/cluster.sh");
    assert!(status.success(), "cluster.sh {action} failed");
}

fn stop_ceph() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ceph/cluster.sh");
    let _ = Command::new(&script).args(["stop", CEPH_DIR]).status();
}

/// Runs a Ceph CLI (`rbd` or `ceph`) against the test cluster; its stdout.
fn ceph_cli(tool: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("120")
        .arg(tool)
        .args(["-c", &format!("{CEPH_DIR}/ceph.conf")])
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .expect("run the ceph CLI");
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn images() -> Vec<String> {
    ceph_cli("rbd", &["ls", "rbd"]).lines().map(str::to_owned).collect()
}

/// The image name inside an RBD volume ID (`rbd.<cluster>.<pool>.<image>`).
fn image_of(id: &str) -> String {
    id.rsplit('.').next().expect("image").to_owned()
}

fn rbd_params() -> HashMap<String, String> {
    HashMap::from([
        ("backend".into(), "rbd".into()),
        ("clusterID".into(), CLUSTER_ID.into()),
        ("pool".into(), "rbd".into()),
    ])
}

fn create_rbd(
    n: &mut Node,
    name: &str,
    mib: i64,
    cap: &VolumeCapability,
    params: HashMap<String, String>,
    source: Option<volume_content_source::Type>,
) -> Result<Volume, tonic::Status> {
    let req = CreateVolumeRequest {
        parameters: params,
        volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
        secrets: secrets(),
        ..create_request(name, mib * MIB, cap.clone())
    };
    n.rt.block_on(n.c.controller.create_volume(req)).map(|r| r.into_inner().volume.expect("volume"))
}

/// NodeStageVolume with the volume context CreateVolume returned, as kubelet sends it.
fn stage_with(
    c: &mut Clients,
    rt: &tokio::runtime::Runtime,
    v: &Volume,
    path: &Path,
    cap: &VolumeCapability,
) -> Result<(), tonic::Status> {
    let req = NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: path.to_string_lossy().into(),
        volume_capability: Some(cap.clone()),
        volume_context: v.volume_context.clone(),
        secrets: secrets(),
        ..Default::default()
    };
    rt.block_on(c.node.node_stage_volume(req)).map(drop)
}

fn try_snapshot(n: &mut Node, source: &str, name: &str) -> Result<Snapshot, tonic::Status> {
    let req = CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        secrets: secrets(),
        ..Default::default()
    };
    n.rt.block_on(n.c.controller.create_snapshot(req)).map(|r| r.into_inner().snapshot.expect("snapshot"))
}

/// The volume as a PV external-provisioner made holds it: its volume context carries the
/// provisioner's identity, and kubelet adds the pod's keys.
fn provisioned(v: &Volume) -> Volume {
    let mut v = v.clone();
    for (k, val) in [
        ("storage.kubernetes.io/csiProvisionerIdentity", "1733400000000-8081-rbd.vduse.csi.dev"),
        ("csi.storage.k8s.io/pod.name", "app-0"),
        ("csi.storage.k8s.io/pod.namespace", "default"),
        ("csi.storage.k8s.io/ephemeral", "false"),
    ] {
        v.volume_context.insert(k.into(), val.into());
    }
    v
}

fn snapshot(n: &mut Node, source: &str, name: &str) -> Snapshot {
    try_snapshot(n, source, name).expect("CreateSnapshot")
}

fn delete_snapshot(n: &mut Node, id: &str) -> Result<(), tonic::Status> {
    let req = DeleteSnapshotRequest { snapshot_id: id.into(), secrets: secrets() };
    n.rt.block_on(n.c.controller.delete_snapshot(req)).map(drop)
}

/// The record a node keeps of a staged RBD volume (its lock owner).
fn lock_owner(state: &Path, id: &str) -> String {
    let text = std::fs::read_to_string(state.join("volumes").join(id).join("rbd.json")).expect("node record");
    let record: serde_json::Value = serde_json::from_str(&text).expect("record JSON");
    record["lock_owner"].as_str().expect("lock owner").to_owned()
}

fn blocklisted(address: &str) -> bool {
    ceph_cli("ceph", &["osd", "blocklist", "ls"]).lines().any(|l| l.split_whitespace().next() == Some(address))
}

fn md5(path: &Path, mib: u64) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("dd if={} bs=1M count={mib} iflag=direct status=none | md5sum", path.display()))
        .output()
        .expect("md5");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("sum").to_owned()
}

fn run(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn kernel_lines() -> usize {
    run("dmesg").1.lines().count()
}

/// Kernel log lines after the first `since` that report I/O errors.
fn kernel_errors_since(since: usize) -> Vec<String> {
    run("dmesg")
        .1
        .lines()
        .skip(since)
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("i/o error") || l.contains("blk_update_request") || l.contains("buffer i/o")
        })
        .map(str::to_owned)
        .collect()
}

fn lifecycle(n: &mut Node) {
    let pv = "pvc-rbd-life";
    let cap = mount_cap("ext4", writer());
    let v = create_rbd(n, pv, 64, &cap, rbd_params(), None).expect("CreateVolume");
    assert!(v.volume_id.starts_with("rbd.test."), "{}", v.volume_id);
    assert!(v.accessible_topology.is_empty(), "RBD volumes are reachable from every node");
    assert_eq!(v.capacity_bytes, 64 * MIB);
    let image = image_of(&v.volume_id);
    assert!(images().contains(&image));
    assert_eq!(ceph_cli("rbd", &["image-meta", "get", &format!("rbd/{image}"), "vduse-csi.name"]).trim(), pv);
    // Idempotent by name; another size for the same name is a conflict.
    let again = create_rbd(n, pv, 64, &cap, rbd_params(), None).expect("CreateVolume again");
    assert_eq!(again.volume_id, v.volume_id);
    assert_code(create_rbd(n, pv, 128, &cap, rbd_params(), None).map(tonic::Response::new), Code::AlreadyExists);

    // ValidateVolumeCapabilities needs no parameters: the ID names the cluster and the pool.
    let req = ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_capabilities: vec![cap.clone()],
        secrets: secrets(),
        ..Default::default()
    };
    let validated = n.rt.block_on(n.c.controller.validate_volume_capabilities(req)).expect("validate").into_inner();
    assert!(validated.confirmed.is_some(), "{}", validated.message);

    // Staged with the volume context of a PV external-provisioner made, as kubelet sends it.
    let staging = n.staging(pv);
    stage_with(&mut n.c, &n.rt, &provisioned(&v), &staging, &cap).expect("stage");
    let target = n.target("pod-a", pv);
    n.publish(&v.volume_id, &staging, &target, &cap, false).expect("publish");
    // The node keeps a record of the staged RBD volume; it is not a node-local volume.
    let listed = n.rt.block_on(n.c.controller.list_volumes(ListVolumesRequest::default())).expect("list");
    let ids: Vec<String> =
        listed.into_inner().entries.iter().filter_map(|e| e.volume.clone()).map(|v| v.volume_id).collect();
    assert!(!ids.iter().any(|id| id.starts_with("rbd.")), "node-local ListVolumes lists {ids:?}");
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(target.join("before"), &data).expect("write");
    syncfs(&target);
    let locks = ceph_cli("rbd", &["lock", "ls", &format!("rbd/{image}")]);
    assert!(locks.contains("auto"), "the served image holds its exclusive lock: {locks}");
    assert_code(n.delete(&v.volume_id).map(tonic::Response::new), Code::FailedPrecondition);

    // A restarted plugin takes the device and the image's lock over; the mount never breaks.
    n.restart();
    std::fs::write(target.join("after"), b"written after the restart").expect("write after restart");
    syncfs(&target);
    let stats = n.stats(&v.volume_id, &target);
    assert!(!stats.volume_condition.expect("condition").abnormal);
    n.unpublish(&v.volume_id, &target).expect("unpublish");
    n.unstage(&v.volume_id, &staging).expect("unstage");
    let state = n.root.join("state");
    assert!(!state.join("volumes").join(&v.volume_id).exists(), "the node keeps nothing of an unstaged RBD volume");
    n.unstage(&v.volume_id, &staging).expect("unstage is idempotent");

    n.restart();
    stage_with(&mut n.c, &n.rt, &v, &staging, &cap).expect("stage again");
    n.publish(&v.volume_id, &staging, &target, &cap, false).expect("publish again");
    assert_eq!(std::fs::read(target.join("before")).expect("read"), data);
    assert_eq!(std::fs::read(target.join("after")).expect("read"), b"written after the restart");
    n.unpublish(&v.volume_id, &target).expect("unpublish");
    n.unstage(&v.volume_id, &staging).expect("unstage");
    n.delete(&v.volume_id).expect("delete");
    assert!(!images().contains(&image));
    n.delete(&v.volume_id).expect("delete is idempotent");
}

/// A block volume staged and published; its published device node.
fn block_volume(n: &mut Node, pv: &str, mib: i64, params: HashMap<String, String>) -> (Volume, PathBuf, PathBuf) {
    let cap = block_cap(writer());
    let v = create_rbd(n, pv, mib, &cap, params, None).expect("CreateVolume");
    let staging = n.block_staging(pv);
    stage_with(&mut n.c, &n.rt, &v, &staging, &cap).expect("stage");
    let target = n.block_target("pod-a", pv);
    n.publish(&v.volume_id, &staging, &target, &cap, false).expect("publish");
    (v, staging, target)
}

fn retire(n: &mut Node, v: &Volume, staging: &Path, target: &Path) {
    n.unpublish(&v.volume_id, target).expect("unpublish");
    n.unstage(&v.volume_id, staging).expect("unstage");
    n.delete(&v.volume_id).expect("delete");
}

/// fio writing `mib` MiB per job (2 jobs × QD32, 4k random) and verifying all of it.
fn fio_verify_cmd(dev: &Path, mib: u32, out: &str) -> String {
    format!(
        "fio --name=rbd --filename={} --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=32 \
         --numjobs=2 --size={mib}M --offset_increment=16M --verify=crc32c --verify_fatal=1 --do_verify=1 \
         --verify_state_save=0 --randrepeat=0 --group_reporting --output={out}",
        dev.display()
    )
}

fn fio_verify(n: &mut Node) {
    let (v, staging, target) = block_volume(n, "pvc-rbd-fio", 64, rbd_params());
    let lines = kernel_lines();
    let (ok, _) = run(&fio_verify_cmd(&target, 6, "/tmp/rbd-fio.out"));
    let report = std::fs::read_to_string("/tmp/rbd-fio.out").unwrap_or_default();
    println!("{}", report.lines().filter(|l| l.contains("IOPS") || l.contains("err=")).collect::<Vec<_>>().join("\n"));
    assert!(ok, "fio failed: {report}");
    assert!(!report.contains("verify: bad") && report.contains("err= 0"), "{report}");
    assert!(kernel_errors_since(lines).is_empty(), "{:?}", kernel_errors_since(lines));
    retire(n, &v, &staging, &target);
}

fn snapshot_and_clones(n: &mut Node) {
    let (v, staging, target) = block_volume(n, "pvc-rbd-src", 32, rbd_params());
    let (ok, text) = run(&format!(
        "head -c 16M /dev/urandom > /tmp/rbd-pattern && dd if=/tmp/rbd-pattern of={} bs=1M oflag=direct status=none",
        target.display()
    ));
    assert!(ok, "{text}");
    let original = md5(&target, 16);
    // Taken while the volume is served: librbd has the lock owner (our device server) take it.
    let snap = snapshot(n, &v.volume_id, "snap-rbd-1");
    assert!(snap.ready_to_use && snap.size_bytes == 32 * MIB, "{snap:?}");
    assert_eq!(snapshot(n, &v.volume_id, "snap-rbd-1").snapshot_id, snap.snapshot_id, "idempotent");
    assert_code(n.delete(&v.volume_id).map(tonic::Response::new), Code::FailedPrecondition);

    let cap = block_cap(writer());
    let from_snap = create_rbd(
        n,
        "pvc-rbd-from-snap",
        32,
        &cap,
        rbd_params(),
        Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    )
    .expect("CreateVolume from the snapshot");
    let from_vol = create_rbd(
        n,
        "pvc-rbd-from-vol",
        64,
        &cap,
        rbd_params(),
        Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource {
            volume_id: v.volume_id.clone(),
        })),
    )
    .expect("CreateVolume from the volume");
    assert_eq!(from_vol.capacity_bytes, 64 * MIB);
    // The source changes afterwards; the copies do not.
    let (ok, text) = run(&format!("dd if=/dev/zero of={} bs=1M count=1 oflag=direct status=none", target.display()));
    assert!(ok, "{text}");
    // Clones are flattened: the snapshot can go before them.
    delete_snapshot(n, &snap.snapshot_id).expect("DeleteSnapshot");
    delete_snapshot(n, &snap.snapshot_id).expect("DeleteSnapshot is idempotent");
    for (clone, pv) in [(&from_snap, "pvc-rbd-from-snap"), (&from_vol, "pvc-rbd-from-vol")] {
        let staging = n.block_staging(pv);
        stage_with(&mut n.c, &n.rt, clone, &staging, &cap).expect("stage the clone");
        let target = n.block_target("pod-b", pv);
        n.publish(&clone.volume_id, &staging, &target, &cap, false).expect("publish the clone");
        assert_eq!(md5(&target, 16), original, "{pv} holds the source's data at the snapshot");
        n.unpublish(&clone.volume_id, &target).expect("unpublish");
        n.unstage(&clone.volume_id, &staging).expect("unstage");
        n.delete(&clone.volume_id).expect("delete the clone");
    }
    assert_ne!(md5(&target, 16), original, "the source changed after the snapshot");
    retire(n, &v, &staging, &target);
    let ours = ["pvc-rbd-src", "pvc-rbd-from-snap", "pvc-rbd-from-vol"].map(image_name);
    let left: Vec<String> = images().into_iter().filter(|i| ours.contains(i)).collect();
    assert!(left.is_empty(), "images left: {left:?}");
}

fn online_resize(n: &mut Node) {
    let pv = "pvc-rbd-grow";
    let cap = mount_cap("ext4", writer());
    let v = create_rbd(n, pv, 64, &cap, rbd_params(), None).expect("CreateVolume");
    let staging = n.staging(pv);
    stage_with(&mut n.c, &n.rt, &v, &staging, &cap).expect("stage");
    let target = n.target("pod-a", pv);
    n.publish(&v.volume_id, &staging, &target, &cap, false).expect("publish");
    std::fs::write(target.join("kept"), b"before the resize").expect("write");
    let before = host_fs_total(&target);
    let caps = n.rt.block_on(n.c.controller.controller_get_capabilities(ControllerGetCapabilitiesRequest {}));
    println!("controller capabilities: {:?}", caps.map(|c| c.into_inner().capabilities.len()));
    let grown = n.expand(&v.volume_id, &target, 128);
    assert_eq!(grown, 128 * MIB);
    let info = ceph_cli("rbd", &["info", &format!("rbd/{}", image_of(&v.volume_id))]);
    assert!(info.contains("size 128 MiB"), "{info}");
    let after = host_fs_total(&target);
    assert!(after > before + 50 * MIB as u64, "the filesystem grew online: {before} -> {after}");
    assert_eq!(std::fs::read(target.join("kept")).expect("read"), b"before the resize");
    n.unpublish(&v.volume_id, &target).expect("unpublish");
    n.unstage(&v.volume_id, &staging).expect("unstage");
    n.delete(&v.volume_id).expect("delete");
}

fn host_fs_total(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
    st.blocks() as u64 * st.fragment_size() as u64
}

fn sigkill_under_fio(n: &mut Node) {
    let mut params = rbd_params();
    params.insert("queues".into(), "2".into());
    let (v, staging, target) = block_volume(n, "pvc-rbd-kill", 64, params);
    let lines = kernel_lines();
    // Long enough (about 30 s of writes under TCG) for both kills to land while fio writes.
    let mut fio =
        Command::new("sh").arg("-c").arg(fio_verify_cmd(&target, 14, "/tmp/rbd-kill.out")).spawn().expect("fio");
    let state = n.root.join("state");
    let mut kills = 0;
    while kills < 2 {
        std::thread::sleep(Duration::from_secs(3));
        if fio.try_wait().expect("fio status").is_some() {
            break;
        }
        let previous = lock_owner(&state, &v.volume_id);
        n.kill_and_restart();
        kills += 1;
        // RBD volumes are served again after the plugin is ready.
        n.wait_condition(&v.volume_id, &target, None);
        // The successor broke its dead predecessor's lock, which blocklists it: nothing the
        // dead one still had in flight can land after the re-run requests.
        assert!(blocklisted(&previous), "{previous} is blocklisted after the takeover");
        assert_ne!(lock_owner(&state, &v.volume_id), previous);
        println!("kill {kills}: {previous} broken and blocklisted");
    }
    let status = fio.wait().expect("fio");
    let report = std::fs::read_to_string("/tmp/rbd-kill.out").unwrap_or_default();
    println!("{}", report.lines().filter(|l| l.contains("IOPS") || l.contains("err=")).collect::<Vec<_>>().join("\n"));
    assert_eq!(kills, 2, "fio ended before the second kill; make it longer");
    assert!(status.success(), "fio failed: {report}");
    assert!(!report.contains("verify: bad") && report.contains("err= 0"), "{report}");
    let errors = kernel_errors_since(lines);
    assert!(errors.is_empty(), "kernel I/O errors: {errors:?}");
    retire(n, &v, &staging, &target);
}

fn two_nodes(n: &mut Node) {
    let pv = "pvc-rbd-shared";
    let cap = mount_cap("ext4", writer());
    let v = create_rbd(n, pv, 64, &cap, rbd_params(), None).expect("CreateVolume");
    let staging_a = n.staging(pv);
    stage_with(&mut n.c, &n.rt, &v, &staging_a, &cap).expect("stage on node A");
    let target_a = n.target("pod-a", pv);
    n.publish(&v.volume_id, &staging_a, &target_a, &cap, false).expect("publish on node A");
    std::fs::write(target_a.join("from-a"), b"node A wrote this").expect("write on A");
    syncfs(&target_a);

    // Node B: its own plugin, state dir and kubelet paths.
    let root_b = n.root.join("node-b");
    std::fs::create_dir_all(&root_b).expect("node B dir");
    let plugin_b = PluginProcess::start_as(
        "node-2",
        &root_b.join("csi.sock"),
        &root_b.join("state"),
        "node",
        HARNESS.plugin_flags,
    );
    let mut b = n.rt.block_on(connect(&plugin_b.socket));
    let staging_b = root_b.join("globalmount");
    std::fs::create_dir_all(&staging_b).expect("staging B");
    let refused =
        stage_with(&mut b, &n.rt, &v, &staging_b, &cap).expect_err("node B must not stage a volume node A serves");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{}", refused.message());
    assert!(refused.message().contains("locked"), "{}", refused.message());
    assert!(!root_b.join("state/volumes").join(&v.volume_id).exists(), "a refused stage leaves no record");
    // Node A is undisturbed.
    std::fs::write(target_a.join("still-a"), b"node A still writes").expect("A still writes");
    syncfs(&target_a);

    // Node A's plugin dies (killed: its queued I/O waits, as on a node that hangs).
    let owner_a = lock_owner(&n.root.join("state"), &v.volume_id);
    let mut plugin_a = n.plugin.take().expect("plugin A");
    plugin_a.child.kill().expect("SIGKILL A");
    plugin_a.child.wait().expect("wait A");

    // Node B takes over once Ceph sees A's client dead (its watch times out): librbd breaks
    // the lock and blocklists A.
    let started = Instant::now();
    loop {
        match stage_with(&mut b, &n.rt, &v, &staging_b, &cap) {
            Ok(()) => break,
            Err(e) if started.elapsed() < Duration::from_secs(90) => {
                println!("node B stage: {} ({:.0?})", e.message(), started.elapsed());
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => panic!("node B never took over: {e:?}"),
        }
    }
    println!("node B took the image over {:.1?} after node A died", started.elapsed());
    assert!(blocklisted(&owner_a), "node A's client {owner_a} is blocklisted");
    assert_eq!(std::fs::read(staging_b.join("from-a")).expect("read on B"), b"node A wrote this");
    assert_eq!(std::fs::read(staging_b.join("still-a")).expect("read on B"), b"node A still writes");
    std::fs::write(staging_b.join("from-b"), b"node B wrote this").expect("write on B");
    syncfs(&staging_b);
    let req = NodeUnstageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging_b.to_string_lossy().into(),
    };
    n.rt.block_on(b.node.node_unstage_volume(req)).expect("unstage on B");
    assert!(plugin_b.stop());

    // Node A's plugin comes back. It served the volume before, but node B took it over since:
    // A's device is fenced (what the kernel still queued there fails instead of landing on
    // B's data), its condition says so, and kubelet's unstage clears it.
    let plugin_a =
        PluginProcess::start_with(&n.root.join("csi.sock"), &n.root.join("state"), "all", HARNESS.plugin_flags);
    n.c = n.rt.block_on(connect(&plugin_a.socket));
    n.plugin = Some(plugin_a);
    n.wait_condition(&v.volume_id, &staging_a, Some("fenced"));
    // The comeback serves the fenced device on a thread of its own, holding the volume until
    // it is up: the unpublish that comes meanwhile is ABORTED, and retried as kubelet does.
    n.as_kubelet(|n| n.unpublish(&v.volume_id, &target_a)).expect("unpublish on A");
    n.unstage(&v.volume_id, &staging_a).expect("unstage on A");
    // B's write survived A's comeback.
    let staging_c = n.staging("pvc-rbd-shared-again");
    stage_with(&mut n.c, &n.rt, &v, &staging_c, &cap).expect("stage again on A");
    assert_eq!(std::fs::read(staging_c.join("from-b")).expect("read on A"), b"node B wrote this");
    n.unstage(&v.volume_id, &staging_c).expect("unstage on A");
    n.delete(&v.volume_id).expect("delete");
}

fn bad_requests(n: &mut Node) {
    let cap = mount_cap("ext4", writer());
    let with = |k: &str, v: &str| {
        let mut p = rbd_params();
        p.insert(k.into(), v.into());
        p
    };
    let without = |k: &str| {
        let mut p = rbd_params();
        p.remove(k);
        p
    };
    for (params, code) in [
        (with("clusterID", "elsewhere"), Code::InvalidArgument),
        (with("clusterID", "../x"), Code::InvalidArgument),
        (without("pool"), Code::InvalidArgument),
        (without("clusterID"), Code::InvalidArgument),
        (with("cache", "writeback"), Code::InvalidArgument),
        (with("backend", "nfs"), Code::InvalidArgument),
        (with("pool", "no-such-pool"), Code::NotFound),
    ] {
        let result = create_rbd(n, "pvc-rbd-bad", 64, &cap, params.clone(), None);
        assert_code(result.map(tonic::Response::new), code);
    }
    // Deleting what does not exist (any more) succeeds; malformed IDs are refused.
    n.delete("rbd.test.1.csi-vol-00000000deadbeef").expect("absent image");
    n.delete("rbd.test.999.csi-vol-00000000deadbeef").expect("absent pool");
    assert_code(n.delete("rbd.test.1.csi-vol/../../x").map(tonic::Response::new), Code::InvalidArgument);
    // A cluster the clusters file does not list (any more): the configuration is to fix,
    // not the request.
    let gone = n.delete("rbd.elsewhere.1.csi-vol-0").expect_err("unknown cluster");
    assert_eq!(gone.code(), Code::FailedPrecondition, "{}", gone.message());
    assert!(gone.message().contains("add the cluster back"), "{}", gone.message());
    delete_snapshot(n, "rbd.test.1.csi-vol-00000000deadbeef.csi-snap-0").expect("absent snapshot");
    let req = CreateSnapshotRequest {
        source_volume_id: "rbd.test.1.csi-vol-00000000deadbeef".into(),
        name: "snap-of-nothing".into(),
        secrets: secrets(),
        ..Default::default()
    };
    assert_code(n.rt.block_on(n.c.controller.create_snapshot(req)), Code::NotFound);
    let source = volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
        snapshot_id: "not-an-rbd-snapshot".into(),
    });
    assert_code(
        create_rbd(n, "pvc-rbd-bad", 64, &cap, rbd_params(), Some(source)).map(tonic::Response::new),
        Code::NotFound,
    );
    let staging = n.staging("pvc-rbd-bad");
    assert_code(
        n.stage("rbd.test.1.csi-vol-00000000deadbeef", &staging, &cap).map(tonic::Response::new),
        Code::NotFound,
    );
    assert!(!n.root.join("state/volumes/rbd.test.1.csi-vol-00000000deadbeef").exists());
    assert!(!images().contains(&image_name("pvc-rbd-bad")), "no image was created");
}

/// A fresh cephx key, as `ceph-authtool --gen-print-key` makes one.
fn new_key() -> String {
    let out = Command::new("ceph-authtool").arg("--gen-print-key").output().expect("ceph-authtool");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Gives the plugin's user a new key in Ceph (its caps unchanged), and the secret with it.
fn rotate_key() -> String {
    let key = new_key();
    let keyring = format!(
        "[client.{CEPH_USER}]\n\tkey = {key}\n\tcaps mon = \"profile rbd\"\n\tcaps osd = \"profile rbd pool=rbd\"\n\
         \tcaps mgr = \"profile rbd pool=rbd\"\n"
    );
    std::fs::write("/tmp/rotated.keyring", keyring).expect("keyring");
    ceph_cli("ceph", &["auth", "import", "-i", "/tmp/rotated.keyring"]);
    std::fs::write(format!("{CEPH_DIR}/client.{CEPH_USER}.key"), &key).expect("key file");
    key
}

fn node_record(n: &Node, id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(n.root.join("state/volumes").join(id).join("rbd.json")).expect("node record");
    serde_json::from_str(&text).expect("record JSON")
}

/// Writes 1 MiB of `byte` at the start of a block device and reads it back.
fn write_and_check(dev: &Path, byte: u8) {
    let (ok, text) = run(&format!(
        "head -c 1M /dev/zero | tr '\\0' '\\{byte:o}' > /tmp/rbd-fill && dd if=/tmp/rbd-fill of={} bs=1M oflag=direct status=none && \
         cmp -n 1048576 /tmp/rbd-fill {}",
        dev.display(),
        dev.display()
    ));
    assert!(ok, "{text}");
}

fn cephx_keys(n: &mut Node) {
    let cap = block_cap(writer());
    // A key Ceph does not know: refused, saying so, and never repeating the key.
    let wrong_key = new_key();
    let mut wrong = secrets();
    wrong.insert("userKey".into(), wrong_key.clone());
    let started = Instant::now();
    let req = CreateVolumeRequest {
        parameters: rbd_params(),
        secrets: wrong.clone(),
        ..create_request("pvc-rbd-wrong-key", 64 * MIB, cap.clone())
    };
    let refused = n.rt.block_on(n.c.controller.create_volume(req)).expect_err("a wrong key");
    println!("wrong key at CreateVolume: {:?} {:?} after {:.1?}", refused.code(), refused.message(), started.elapsed());
    assert_eq!(refused.code(), Code::FailedPrecondition, "{}", refused.message());
    assert!(refused.message().contains("refused"), "{}", refused.message());
    assert!(!refused.message().contains(&wrong_key), "the key is never repeated");
    assert!(!images().contains(&image_name("pvc-rbd-wrong-key")));

    let v = create_rbd(n, "pvc-rbd-rotate", 64, &cap, rbd_params(), None).expect("CreateVolume");
    let staging = n.block_staging("pvc-rbd-rotate");
    stage_with(&mut n.c, &n.rt, &v, &staging, &cap).expect("stage");
    let target = n.block_target("pod-a", "pvc-rbd-rotate");
    n.publish(&v.volume_id, &staging, &target, &cap, false).expect("publish");
    write_and_check(&target, 1);
    // The node keeps the key to serve the volume again after a restart, without kubelet: in a
    // file only root may read (README, "Secrets on the node").
    let record = n.root.join("state/volumes").join(&v.volume_id).join("rbd.json");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&record).expect("record").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", record.display());
    let state_mode = std::fs::metadata(n.root.join("state")).expect("state dir").permissions().mode() & 0o777;
    assert_eq!(state_mode, 0o700, "only root enters the state dir");

    // Another volume staged with the wrong key is refused and leaves no record.
    let other = create_rbd(n, "pvc-rbd-other-key", 64, &cap, rbd_params(), None).expect("CreateVolume");
    let other_staging = n.block_staging("pvc-rbd-other-key");
    let req = NodeStageVolumeRequest {
        volume_id: other.volume_id.clone(),
        staging_target_path: other_staging.to_string_lossy().into(),
        volume_capability: Some(cap.clone()),
        volume_context: other.volume_context.clone(),
        secrets: wrong,
        ..Default::default()
    };
    let refused = n.rt.block_on(n.c.node.node_stage_volume(req)).expect_err("a wrong key at NodeStage");
    println!("wrong key at NodeStage: {:?} {:?}", refused.code(), refused.message());
    assert_eq!(refused.code(), Code::FailedPrecondition, "{}", refused.message());
    assert!(!refused.message().contains(&wrong_key));
    assert!(!n.root.join("state/volumes").join(&other.volume_id).exists(), "a refused stage leaves no record");

    // The user's key is rotated; kubelet's next stage brings the new one; a restarted plugin
    // serves the volume with it (the old one would no longer log in).
    let rotated = rotate_key();
    n.secrets = secrets();
    stage_with(&mut n.c, &n.rt, &v, &staging, &cap).expect("stage again with the rotated key");
    assert_eq!(node_record(n, &v.volume_id)["key"].as_str(), Some(rotated.as_str()), "the record took the new key");
    n.kill_and_restart();
    n.wait_condition(&v.volume_id, &target, None);
    write_and_check(&target, 2);
    retire(n, &v, &staging, &target);
    n.delete(&other.volume_id).expect("delete");
}

fn snapshot_source(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource { snapshot_id: id.into() })
}

fn volume_source(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: id.into() })
}

fn create_request_rbd(name: &str, mib: i64, source: volume_content_source::Type) -> CreateVolumeRequest {
    CreateVolumeRequest {
        parameters: rbd_params(),
        volume_content_source: Some(VolumeContentSource { r#type: Some(source) }),
        secrets: secrets(),
        ..create_request(name, mib * MIB, block_cap(writer()))
    }
}

/// The sessions the monitor holds for the plugin's user: one per librados client.
fn user_sessions() -> usize {
    let out = Command::new("ceph")
        .args(["--admin-daemon", &format!("{CEPH_DIR}/run/mon.a.asok"), "sessions"])
        .output()
        .expect("ceph --admin-daemon");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sessions: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sessions JSON");
    let user = format!("\"client.{CEPH_USER}\"");
    let ours = sessions.as_array().expect("a list").iter().filter(|s| s.to_string().contains(&user)).count();
    println!("mon sessions of client.{CEPH_USER}: {ours}");
    ours
}

fn conformance(n: &mut Node) {
    let cap = block_cap(writer());
    let a = create_rbd(n, "pvc-rbd-conf-a", 32, &cap, rbd_params(), None).expect("CreateVolume a");
    let b = create_rbd(n, "pvc-rbd-conf-b", 32, &cap, rbd_params(), None).expect("CreateVolume b");

    // One CSI snapshot name for two volumes: the second is ALREADY_EXISTS, not a second snapshot.
    let snap = snapshot(n, &a.volume_id, "snap-rbd-conf");
    let clash = try_snapshot(n, &b.volume_id, "snap-rbd-conf").expect_err("same name, another source");
    assert_eq!(clash.code(), Code::AlreadyExists, "{}", clash.message());
    assert_eq!(snapshot(n, &a.volume_id, "snap-rbd-conf").snapshot_id, snap.snapshot_id, "a retry is idempotent");

    // Two clones of one snapshot at once: neither trips over the other's protect or unprotect,
    // and the snapshot is left unprotected for its DeleteSnapshot.
    let (mut c1, mut c2) = (n.c.controller.clone(), n.c.controller.clone());
    let (r1, r2) = n.rt.block_on(async {
        tokio::join!(
            c1.create_volume(create_request_rbd("pvc-rbd-twin-1", 32, snapshot_source(&snap.snapshot_id))),
            c2.create_volume(create_request_rbd("pvc-rbd-twin-2", 32, snapshot_source(&snap.snapshot_id)))
        )
    });
    let twins: Vec<Volume> =
        [r1, r2].into_iter().map(|r| r.expect("clone").into_inner().volume.expect("volume")).collect();
    let snap_name = snap.snapshot_id.rsplit('.').next().expect("snapshot name");
    let info = ceph_cli("rbd", &["info", &format!("rbd/{}@{snap_name}", image_of(&a.volume_id))]);
    assert!(info.contains("protected: False"), "the clones left the snapshot protected: {info}");
    delete_snapshot(n, &snap.snapshot_id).expect("DeleteSnapshot after two clones");
    for twin in &twins {
        n.delete(&twin.volume_id).expect("delete a clone");
    }
    // Once deleted, the name is free for another volume.
    let snap_b = snapshot(n, &b.volume_id, "snap-rbd-conf");
    delete_snapshot(n, &snap_b.snapshot_id).expect("DeleteSnapshot");

    // A clone abandoned before its flatten (its CreateVolume interrupted and never retried)
    // leaves a protected temporary snapshot of its source and an unfinished clone: they do not
    // keep the source from being deleted.
    let child = image_name("pvc-rbd-abandoned");
    let temporary = format!("rbd/{}@csi-clone-{}", image_of(&a.volume_id), &child["csi-vol-".len()..]);
    ceph_cli("rbd", &["snap", "create", &temporary]);
    ceph_cli("rbd", &["snap", "protect", &temporary]);
    ceph_cli("rbd", &["clone", "--rbd-default-clone-format", "1", &temporary, &format!("rbd/{child}")]);
    n.delete(&a.volume_id).expect("DeleteVolume of a source with an abandoned clone");
    let left = images();
    assert!(!left.contains(&image_of(&a.volume_id)) && !left.contains(&child), "images left: {left:?}");

    // CreateVolume (by name) and DeleteVolume (by ID) of one volume take one guard: a delete
    // while the create runs is ABORTED, never a race that deletes half a clone.
    ceph_cli(
        "rbd",
        &[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4M",
            "--io-total",
            "32M",
            &format!("rbd/{}", image_of(&b.volume_id)),
        ],
    );
    let racing = "pvc-rbd-conf-racing";
    let pool_id = b.volume_id.split('.').nth(2).expect("pool ID");
    let racing_id = format!("rbd.{CLUSTER_ID}.{pool_id}.{}", image_name(racing));
    let (mut creator, mut deleter) = (n.c.controller.clone(), n.c.controller.clone());
    let request = create_request_rbd(racing, 32, volume_source(&b.volume_id));
    let (created, aborted) = n.rt.block_on(async {
        let create = tokio::spawn(async move { creator.create_volume(request).await });
        // The create takes its guard first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut aborted = 0;
        while !create.is_finished() {
            let req = DeleteVolumeRequest { volume_id: racing_id.clone(), secrets: secrets() };
            match deleter.delete_volume(req).await {
                Err(e) if e.code() == Code::Aborted => aborted += 1,
                other => {
                    assert!(create.is_finished(), "DeleteVolume ran beside the CreateVolume of its volume: {other:?}")
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (create.await.expect("create task"), aborted)
    });
    created.expect("the clone");
    println!("DeleteVolume was ABORTED {aborted} times while its CreateVolume ran");
    assert!(aborted > 0, "the clone was made before any delete reached it: give it more to copy");
    // The last delete may have come after the create, and deleted the clone: made again.
    let racing_volume = create_rbd(n, racing, 32, &cap, rbd_params(), Some(volume_source(&b.volume_id)))
        .expect("CreateVolume after the race");

    // One librados client per (cluster, user) and purpose, whatever the volumes and calls:
    // the controller's and the devices'.
    let mut staged = Vec::new();
    for (pv, v) in [("pvc-rbd-conf-b", &b), (racing, &racing_volume)] {
        let staging = n.block_staging(pv);
        stage_with(&mut n.c, &n.rt, v, &staging, &cap).expect("stage");
        staged.push((v.clone(), staging));
    }
    assert_eq!(user_sessions(), 2, "one control and one data connection");
    for (v, staging) in &staged {
        n.unstage(&v.volume_id, staging).expect("unstage");
        n.delete(&v.volume_id).expect("delete");
    }
}

/// The only OSD stops while volumes are staged: the RBD volume's I/O waits, as a disk's would;
/// control-plane calls fail in bounded time; the node-local volumes, CSI calls and a plugin
/// restart go on regardless. The OSD comes back: the volume is served and its I/O completes.
fn sick_pool(n: &mut Node) {
    n.flags = &["--ceph-clusters=/tmp/ceph-clusters.json", "--ceph-timeout=5", "--heal-interval=1"];
    n.restart();
    let cap = mount_cap("ext4", writer());
    let v = create_rbd(n, "pvc-rbd-sick", 64, &cap, rbd_params(), None).expect("CreateVolume");
    let staging_v = n.staging("pvc-rbd-sick");
    stage_with(&mut n.c, &n.rt, &v, &staging_v, &cap).expect("stage");
    let target_v = n.target("pod-a", "pvc-rbd-sick");
    n.publish(&v.volume_id, &staging_v, &target_v, &cap, false).expect("publish");
    std::fs::write(target_v.join("before"), b"written while the pool was well").expect("write");
    syncfs(&target_v);
    let local = n.create("pvc-local-sick", 64, cap.clone());
    let staging_l = n.staging("pvc-local-sick");
    n.stage(&local.volume_id, &staging_l, &cap).expect("stage the node-local volume");
    let lines = kernel_lines();

    ceph_osd("stop-osd");
    let (ok, text) = run("head -c 4M /dev/urandom > /tmp/rbd-during");
    assert!(ok, "{text}");
    let mut writer = Command::new("dd")
        .args([
            "if=/tmp/rbd-during",
            &format!("of={}", target_v.join("during").display()),
            "bs=1M",
            "oflag=direct",
            "status=none",
        ])
        .spawn()
        .expect("dd");
    std::thread::sleep(Duration::from_secs(3));
    assert!(writer.try_wait().expect("dd").is_none(), "the write waits for the pool, it does not fail");

    // Control-plane calls fail UNAVAILABLE after --ceph-timeout, not never.
    let started = Instant::now();
    let refused = create_rbd(n, "pvc-rbd-while-sick", 64, &cap, rbd_params(), None).expect_err("pool down");
    println!(
        "CreateVolume on the sick pool: {:?} after {:.1?}: {}",
        refused.code(),
        started.elapsed(),
        refused.message()
    );
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());
    assert!(started.elapsed() < Duration::from_secs(40), "{:.1?}", started.elapsed());
    let started = Instant::now();
    let refused = try_snapshot(n, &v.volume_id, "snap-rbd-sick").expect_err("pool down");
    println!("CreateSnapshot on the sick pool: {:?} after {:.1?}", refused.code(), started.elapsed());
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());

    // Node-local volumes are untouched: a new one is made, staged and unstaged.
    let started = Instant::now();
    let fresh = n.create("pvc-local-fresh", 64, cap.clone());
    let staging_f = n.staging("pvc-local-fresh");
    n.stage(&fresh.volume_id, &staging_f, &cap).expect("stage while the pool is sick");
    std::fs::write(staging_f.join("x"), b"local").expect("write");
    n.unstage(&fresh.volume_id, &staging_f).expect("unstage");
    println!("a node-local volume made, staged and unstaged in {:.1?} while the pool is sick", started.elapsed());

    // The plugin stops (SIGTERM) although a flush of the RBD volume cannot end, and the next
    // one is ready at once: it serves the node-local volume, and the RBD one waits.
    let started = Instant::now();
    n.restart();
    println!("plugin stopped and ready again in {:.1?} with the pool down", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(60), "{:.1?}", started.elapsed());
    std::fs::write(staging_l.join("after-restart"), b"still served").expect("write the node-local volume");
    syncfs(&staging_l);
    n.wait_condition(&v.volume_id, &target_v, Some("not running"));
    assert!(writer.try_wait().expect("dd").is_none(), "the write still waits");

    // The pool comes back: the heal loop serves the volume, and the write completes.
    ceph_osd("start-osd");
    let started = Instant::now();
    n.wait_condition(&v.volume_id, &target_v, None);
    let status = writer.wait().expect("dd");
    println!("served again {:.1?} after the OSD came back; the write ended: {status}", started.elapsed());
    assert!(status.success());
    syncfs(&target_v);
    let (same, text) = run(&format!("cmp /tmp/rbd-during {}", target_v.join("during").display()));
    assert!(same, "{text}");
    assert_eq!(std::fs::read(target_v.join("before")).expect("read"), b"written while the pool was well");
    let errors = kernel_errors_since(lines);
    assert!(errors.is_empty(), "kernel I/O errors: {errors:?}");
    n.unstage(&local.volume_id, &staging_l).expect("unstage");
    n.unpublish(&v.volume_id, &target_v).expect("unpublish");
    n.unstage(&v.volume_id, &staging_v).expect("unstage");
    n.delete(&v.volume_id).expect("delete");
}

/// The client serving a volume is blocklisted (by an operator, or a node that broke its lock):
/// librbd fails its writes with ESHUTDOWN. The device fails none of them: it reports itself
/// degraded, saying the lock is lost, and the heal loop takes the lock back with a new client
/// (nobody else holds it), so the waiting write completes. The condition says the lock is lost
/// until a server runs again: a heal round that comes at once finds the shared Ceph client
/// blocklisted too and fails, and the volume, without a server then, still says why.
fn lost_lock(n: &mut Node) {
    n.flags = &["--ceph-clusters=/tmp/ceph-clusters.json", "--heal-interval=5"];
    n.restart();
    let (v, staging, target) = block_volume(n, "pvc-rbd-lost", 64, rbd_params());
    write_and_check(&target, 3);
    let state = n.root.join("state");
    let owner = lock_owner(&state, &v.volume_id);
    let lines = kernel_lines();
    ceph_cli("ceph", &["osd", "blocklist", "add", &owner]);
    let (ok, text) = run("head -c 1M /dev/zero | tr '\\0' '\\4' > /tmp/rbd-lost");
    assert!(ok, "{text}");
    let mut writer = Command::new("dd")
        .args(["if=/tmp/rbd-lost", &format!("of={}", target.display()), "bs=1M", "oflag=direct", "status=none"])
        .spawn()
        .expect("dd");
    let degraded = n.wait_condition(&v.volume_id, &target, Some("lock is lost"));
    println!("after the blocklist: {}", degraded.message);
    assert!(writer.try_wait().expect("dd").is_none(), "the write waits; it does not fail");
    n.wait_condition(&v.volume_id, &target, None);
    assert!(writer.wait().expect("dd").success(), "the write completed once the lock was back");
    let (same, text) = run(&format!("cmp -n 1048576 /tmp/rbd-lost {}", target.display()));
    assert!(same, "{text}");
    let retaken = lock_owner(&state, &v.volume_id);
    assert_ne!(retaken, owner, "a new client holds the lock");
    println!("lock taken back by {retaken}");
    let errors = kernel_errors_since(lines);
    assert!(errors.is_empty(), "kernel I/O errors: {errors:?}");
    retire(n, &v, &staging, &target);
}

/// This node's client is blocklisted and, before this node writes again, another client takes
/// the image's lock and keeps it: rbd-nbd mapped with `--exclusive`, standing in for another
/// node (two plugins in one guest would want one VDUSE device name). The next write here finds
/// the lock lost, and the heal round that follows must not take the lock back, as it does when
/// nobody else took it: it fences the device. The waiting write fails instead of landing on
/// the other client's data, the condition says why, and kubelet's unstage clears it.
fn lock_taken_fences(n: &mut Node) {
    n.flags = &["--ceph-clusters=/tmp/ceph-clusters.json", "--heal-interval=2"];
    n.restart();
    let (v, staging, target) = block_volume(n, "pvc-rbd-taken", 64, rbd_params());
    write_and_check(&target, 5);
    let owner_a = lock_owner(&n.root.join("state"), &v.volume_id);
    ceph_cli("ceph", &["osd", "blocklist", "add", &owner_a]);

    // The other client breaks the blocklisted holder's lock and keeps it.
    let image = format!("rbd/{}", image_of(&v.volume_id));
    let started = Instant::now();
    let nbd = loop {
        let (ok, text) = run(&format!("timeout 60 rbd-nbd -c {CEPH_DIR}/ceph.conf map --exclusive {image}"));
        if ok {
            break text.trim().to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(90), "rbd-nbd never took the lock: {text}");
        std::thread::sleep(Duration::from_secs(2));
    };
    println!("{nbd} holds the lock {:.1?} after this node's client was blocklisted", started.elapsed());
    // Until this node writes, nothing here has met the lost lock.
    let (ok, text) = run("head -c 1M /dev/zero | tr '\\0' '\\6' > /tmp/rbd-taken");
    assert!(ok, "{text}");
    let mut writer = Command::new("dd")
        .args(["if=/tmp/rbd-taken", &format!("of={}", target.display()), "bs=1M", "oflag=direct", "status=none"])
        .stderr(Stdio::null())
        .spawn()
        .expect("dd");
    let fenced = n.wait_condition(&v.volume_id, &target, Some("fenced"));
    println!("on this node: {}", fenced.message);
    assert!(fenced.message.contains("holds image"), "the condition says another client holds it: {}", fenced.message);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = writer.try_wait().expect("dd") {
            break status;
        }
        assert!(Instant::now() < deadline, "the write on the fenced device neither failed nor ended");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "the write here must fail once another client holds the image");
    // The image holds what this node wrote before the blocklist, not the write it withheld.
    let (same, text) = run(&format!(
        "head -c 1M /dev/zero | tr '\\0' '\\5' > /tmp/rbd-before && cmp -n 1048576 /tmp/rbd-before {nbd}"
    ));
    assert!(same, "the image changed under the other client: {text}");
    assert_eq!(lock_owner(&n.root.join("state"), &v.volume_id), owner_a, "this node took no new lock");

    let (ok, text) = run(&format!("rbd-nbd unmap {nbd}"));
    assert!(ok, "{text}");
    n.unpublish(&v.volume_id, &target).expect("unpublish");
    n.unstage(&v.volume_id, &staging).expect("unstage: clears the fence");
    n.delete(&v.volume_id).expect("delete");
}
