//! The Node service driven the way kubelet drives it, on a real kernel.
//!
//! On the host this binary boots the VDUSE test guest (tests/guest/run.sh) and runs itself
//! inside it with VDUSE_CSI_IN_GUEST=1; inside, each scenario starts `vduse-csi serve`, talks
//! to it with a tonic client over its unix socket, and checks the mounts, files and devices
//! that kubelet would see. Paths follow kubelet's layout under a kubelet-like directory.

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use common::guest_node::{self, Harness, Node, Scenario, is_mount_point, syncfs, usage};
use common::*;
use tonic::Code;
use vduse_csi::csi::proto::*;

/// Every scenario's plugin serves metrics (one plugin runs at a time), so the datapath
/// counts in all of them.
const METRICS: &str = "127.0.0.1:9812";
const HARNESS: Harness = Harness {
    out_dir: "csi-node-tests",
    plugin_flags: &["--metrics-address=127.0.0.1:9812"],
    before: None,
    after: None,
    secrets: None,
};
const MIB: i64 = 1 << 20;

fn main() -> ExitCode {
    let scenarios: &[(&str, Scenario)] = &[
        ("mount_volume_lifecycle_ext4", |n| mount_lifecycle(n, "ext4", 256)),
        ("mount_volume_lifecycle_xfs", |n| mount_lifecycle(n, "xfs", 512)),
        ("block_volume_lifecycle", block_lifecycle),
        ("read_only_publish_refuses_writes", read_only_publish),
        ("single_node_single_writer_is_enforced", single_writer),
        ("plugin_restart_keeps_staged_volumes", restart_keeps_volumes),
        ("snapshot_of_staged_volume_is_consistent", snapshot_of_staged),
        ("lost_device_is_abnormal_and_restage_recovers", lost_device),
        ("hostile_and_missing_ids_are_refused", hostile_ids),
        ("stats_answer_while_another_volume_stages", stats_while_staging),
        ("clone_of_staged_volume_is_consistent", clone_of_staged),
        ("plugin_killed_mid_snapshot_thaws_at_start", killed_mid_snapshot),
        ("sigterm_writes_staged_filesystems_through", sigterm_syncs),
        ("full_backing_store_is_reported", full_backing_store),
        ("unstage_after_a_crash_before_the_metadata_unmounts_first", unstage_unrecorded),
        ("failed_recovery_is_retried", failed_recovery_retried),
        ("failed_metadata_write_leaves_no_unserved_mount", failed_metadata_write),
        ("ephemeral_volume_lives_with_its_pod", ephemeral_volume),
        ("own_bounce_pages_are_pinned_and_survive_sigkill", own_bounce_pages),
    ];
    guest_node::main(&HARNESS, scenarios)
}

fn mount_lifecycle(n: &mut Node, fs: &str, mib: i64) {
    let pv = format!("pvc-{fs}");
    let cap = mount_cap(fs, writer());
    n.create(&pv, mib, cap.clone());
    let staging = n.staging(&pv);
    n.stage(&pv, &staging, &cap).expect("stage");
    n.stage(&pv, &staging, &cap).expect("stage again is OK");
    let reader = mount_cap(fs, volume_capability::access_mode::Mode::SingleNodeReaderOnly);
    assert_eq!(n.stage(&pv, &staging, &reader).expect_err("other capability").code(), Code::AlreadyExists);
    assert!(is_mount_point(&staging));
    let (t1, t2) = (n.target("pod-a", &pv), n.target("pod-b", &pv));
    n.publish(&pv, &staging, &t1, &cap, false).expect("publish 1");
    n.publish(&pv, &staging, &t2, &cap, false).expect("publish 2");
    n.publish(&pv, &staging, &t1, &cap, false).expect("publish again is OK");
    assert_eq!(n.publish(&pv, &staging, &t1, &cap, true).expect_err("readonly differs").code(), Code::AlreadyExists);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(t1.join("data.bin"), &data).expect("write via pod-a");
    assert_eq!(std::fs::read(t2.join("data.bin")).expect("read via pod-b"), data);
    let st = n.stats(&pv, &t1);
    let bytes = usage(&st, volume_usage::Unit::Bytes);
    assert!(bytes.total > 0 && bytes.used >= 3_000_000 && bytes.available > 0, "{bytes:?}");
    assert!(usage(&st, volume_usage::Unit::Inodes).total > 0);
    assert!(!st.volume_condition.expect("condition").abnormal);
    assert_eq!(n.delete(&pv).expect_err("staged").code(), Code::FailedPrecondition);
    assert_eq!(n.unstage(&pv, &staging).expect_err("still published").code(), Code::FailedPrecondition);
    n.unpublish(&pv, &t1).expect("unpublish 1");
    n.unpublish(&pv, &t2).expect("unpublish 2");
    n.unpublish(&pv, &t2).expect("unpublish again is OK");
    assert!(!t1.exists() && !t2.exists(), "targets removed");
    n.unstage(&pv, &staging).expect("unstage");
    n.unstage(&pv, &staging).expect("unstage again is OK");
    assert!(!is_mount_point(&staging));

    n.stage(&pv, &staging, &cap).expect("stage again");
    n.publish(&pv, &staging, &t1, &cap, false).expect("publish");
    assert_eq!(std::fs::read(t1.join("data.bin")).expect("read after re-stage"), data, "never reformatted");
    let before = usage(&n.stats(&pv, &t1), volume_usage::Unit::Bytes).total;
    let grown = n.expand(&pv, &t1, mib * 2);
    assert_eq!(grown, mib * 2 * MIB);
    let after = usage(&n.stats(&pv, &t1), volume_usage::Unit::Bytes).total;
    assert!(after > before + mib * MIB / 2, "filesystem grew online: {before} -> {after}");
    assert_eq!(std::fs::read(t1.join("data.bin")).expect("read after expand"), data);
    std::fs::write(t1.join("after-expand"), b"ok").expect("write after expand");
    n.unpublish(&pv, &t1).expect("unpublish");
    n.unstage(&pv, &staging).expect("unstage");
    n.delete(&pv).expect("delete");
}

fn block_lifecycle(n: &mut Node) {
    let pv = "pvc-block";
    let cap = block_cap(writer());
    n.create(pv, 64, cap.clone());
    let staging = n.block_staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    assert!(!is_mount_point(&staging), "block volumes mount nothing at staging");
    let target = n.block_target("pod-a", pv);
    n.publish(pv, &staging, &target, &cap, false).expect("publish");
    let pattern: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 241) as u8).collect();
    {
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(&target)
            .expect("open block target");
        dev.seek(SeekFrom::Start(8 << 20)).expect("seek");
        dev.write_all(&pattern).expect("write");
        dev.sync_all().expect("sync");
    }
    let st = n.stats(pv, &target);
    assert_eq!(usage(&st, volume_usage::Unit::Bytes).total, 64 * MIB);
    let grown = n.expand(pv, &target, 96);
    assert_eq!(grown, 96 * MIB);
    assert_eq!(usage(&n.stats(pv, &target), volume_usage::Unit::Bytes).total, 96 * MIB);
    n.unpublish(pv, &target).expect("unpublish");
    assert!(!target.exists(), "publish file removed");
    n.unstage(pv, &staging).expect("unstage");
    n.stage(pv, &staging, &cap).expect("stage again");
    n.publish(pv, &staging, &target, &cap, false).expect("publish again");
    let mut back = vec![0u8; pattern.len()];
    let mut dev = std::fs::File::open(&target).expect("open");
    dev.seek(SeekFrom::Start(8 << 20)).expect("seek");
    dev.read_exact(&mut back).expect("read");
    assert_eq!(back, pattern, "block data intact across unstage/stage");
    drop(dev);
    n.unpublish(pv, &target).expect("unpublish");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

fn read_only_publish(n: &mut Node) {
    let pv = "pvc-ro";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    let (ro, rw) = (n.target("pod-ro", pv), n.target("pod-rw", pv));
    n.publish(pv, &staging, &rw, &cap, false).expect("publish rw");
    std::fs::write(rw.join("f"), b"hello").expect("write rw");
    n.publish(pv, &staging, &ro, &cap, true).expect("publish ro");
    let err = std::fs::write(ro.join("g"), b"x").expect_err("read-only target refuses writes");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(std::fs::read(ro.join("f")).expect("read ro"), b"hello");
    std::fs::write(rw.join("h"), b"still writable").expect("rw target unaffected");
    n.unpublish(pv, &ro).expect("unpublish");
    n.unpublish(pv, &rw).expect("unpublish");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

fn single_writer(n: &mut Node) {
    let pv = "pvc-rwop";
    let cap = mount_cap("ext4", volume_capability::access_mode::Mode::SingleNodeSingleWriter);
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    let (a, b) = (n.target("pod-a", pv), n.target("pod-b", pv));
    n.publish(pv, &staging, &a, &cap, false).expect("publish a");
    let err = n.publish(pv, &staging, &b, &cap, false).expect_err("second writer");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    n.unpublish(pv, &a).expect("unpublish");
    n.publish(pv, &staging, &b, &cap, false).expect("publish b once a is gone");
    n.unpublish(pv, &b).expect("unpublish");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

fn restart_keeps_volumes(n: &mut Node) {
    let pv = "pvc-restart";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 128, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    let target = n.target("pod-a", pv);
    n.publish(pv, &staging, &target, &cap, false).expect("publish");
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(target.join("before"), &data).expect("write");
    syncfs(&target);

    n.restart();
    // The device was never detached: the mount is the same and works through the new plugin.
    assert!(is_mount_point(&staging) && is_mount_point(&target));
    std::fs::write(target.join("after"), b"written after the restart").expect("write after restart");
    syncfs(&target);
    assert!(!n.stats(pv, &target).volume_condition.expect("condition").abnormal);
    n.unpublish(pv, &target).expect("unpublish after restart");
    n.unstage(pv, &staging).expect("unstage after restart");
    n.stage(pv, &staging, &cap).expect("stage");
    n.publish(pv, &staging, &target, &cap, false).expect("publish");
    assert_eq!(std::fs::read(target.join("before")).expect("read"), data);
    assert_eq!(std::fs::read(target.join("after")).expect("read"), b"written after the restart");
    n.unpublish(pv, &target).expect("unpublish");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

fn lost_device(n: &mut Node) {
    let pv = "pvc-lost";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    let target = n.target("pod-a", pv);
    n.publish(pv, &staging, &target, &cap, false).expect("publish");
    std::fs::write(target.join("kept"), b"synced before the loss").expect("write");
    syncfs(&target);
    // While no plugin runs, an operator removes the device: its mounts are now dead.
    n.restart_with(|| {
        let status =
            Command::new(env!("CARGO_BIN_EXE_vduse-csi")).args(["device", "remove", pv]).status().expect("remove");
        assert!(status.success());
    });
    let condition = n.stats(pv, &staging).volume_condition.expect("condition");
    assert!(condition.abnormal, "{condition:?}");
    assert!(condition.message.contains("lost"), "{}", condition.message);
    // What kubelet does once the pod is gone: unpublish, unstage; then stage again.
    n.unpublish(pv, &target).expect("unpublish");
    n.unstage(pv, &staging).expect("unstage");
    n.stage(pv, &staging, &cap).expect("stage again");
    assert!(!n.stats(pv, &staging).volume_condition.expect("condition").abnormal);
    assert_eq!(std::fs::read(staging.join("kept")).expect("read"), b"synced before the loss");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

fn snapshot_of_staged(n: &mut Node) {
    let pv = "pvc-snap-src";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    let target = n.target("pod-a", pv);
    n.publish(pv, &staging, &target, &cap, false).expect("publish");
    // Written but not synced by the writer: the snapshot must flush it.
    std::fs::write(target.join("file"), b"in the snapshot").expect("write");
    let req = CreateSnapshotRequest { source_volume_id: pv.into(), name: "snap-staged".into(), ..Default::default() };
    n.rt.block_on(n.c.controller.create_snapshot(req)).expect("snapshot");
    std::fs::write(target.join("file"), b"after the snapshot").expect("overwrite");

    let restored = "pvc-snap-restored";
    let mut req = create_request(restored, 64 * MIB, cap.clone());
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
            snapshot_id: "snap-staged".into(),
        })),
    });
    n.rt.block_on(n.c.controller.create_volume(req)).expect("restore");
    let staging2 = n.staging(restored);
    n.stage(restored, &staging2, &cap).expect("stage restored");
    assert_eq!(std::fs::read(staging2.join("file")).expect("read restored"), b"in the snapshot");
    n.unstage(restored, &staging2).expect("unstage");
    n.unpublish(pv, &target).expect("unpublish");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(restored).expect("delete");
    n.delete(pv).expect("delete");
    let req = DeleteSnapshotRequest { snapshot_id: "snap-staged".into(), secrets: HashMap::new() };
    n.rt.block_on(n.c.controller.delete_snapshot(req)).expect("delete snapshot");
}

/// No lock is held across another volume's stage (device start, attach, mkfs): stats of a
/// staged volume answer while it runs.
fn stats_while_staging(n: &mut Node) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let ext4 = mount_cap("ext4", writer());
    n.create("pvc-a", 64, ext4.clone());
    let staging_a = n.staging("pvc-a");
    n.stage("pvc-a", &staging_a, &ext4).expect("stage a");
    // B: an xfs mkfs of 512 MiB, the slowest stage here.
    let cap = mount_cap("xfs", writer());
    n.create("pvc-b", 512, cap.clone());
    let staging_b = n.staging("pvc-b");
    let socket = n.plugin.as_ref().expect("plugin").socket.clone();
    let done = Arc::new(AtomicBool::new(false));
    let stager = {
        let (done, staging_b, cap) = (Arc::clone(&done), staging_b.clone(), cap.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let mut c = rt.block_on(connect(&socket));
            let req = NodeStageVolumeRequest {
                volume_id: "pvc-b".into(),
                staging_target_path: staging_b.to_string_lossy().into(),
                volume_capability: Some(cap),
                ..Default::default()
            };
            let result = rt.block_on(c.node.node_stage_volume(req)).map(drop);
            done.store(true, Ordering::SeqCst);
            result
        })
    };
    let mut answered_meanwhile = 0;
    while !done.load(Ordering::SeqCst) {
        let condition = n.stats("pvc-a", &staging_a).volume_condition.expect("condition");
        assert!(!condition.abnormal, "{condition:?}");
        if !done.load(Ordering::SeqCst) {
            answered_meanwhile += 1;
        }
    }
    stager.join().expect("stager").expect("stage b");
    assert!(answered_meanwhile > 0, "no stats call of pvc-a completed while pvc-b was staged");
    println!("stats of pvc-a answered {answered_meanwhile} times while pvc-b was staged");
    for (pv, staging) in [("pvc-a", &staging_a), ("pvc-b", &staging_b)] {
        n.unstage(pv, staging).expect("unstage");
        n.delete(pv).expect("delete");
    }
}

/// A clone of a staged volume is taken like a snapshot: what was written before it, synced or
/// not, is in the clone, and the source's filesystem is thawed afterwards.
fn clone_of_staged(n: &mut Node) {
    let pv = "pvc-clone-src";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    std::fs::write(staging.join("file"), b"in the clone").expect("write");
    let clone = "pvc-clone";
    let mut req = create_request(clone, 64 * MIB, cap.clone());
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource { volume_id: pv.into() })),
    });
    n.rt.block_on(n.c.controller.create_volume(req)).expect("clone");
    std::fs::write(staging.join("file"), b"after the clone").expect("the source is writable again");
    syncfs(&staging);
    let staging2 = n.staging(clone);
    n.stage(clone, &staging2, &cap).expect("stage clone");
    assert_eq!(std::fs::read(staging2.join("file")).expect("read clone"), b"in the clone");
    let state = n.plugin.as_ref().expect("plugin").state.clone();
    assert!(!state.join("frozen").join(pv).exists(), "the freeze record is removed after the thaw");
    for (v, path) in [(clone, &staging2), (pv, &staging)] {
        n.unstage(v, path).expect("unstage");
        n.delete(v).expect("delete");
    }
}

/// A plugin killed while a staged filesystem is frozen for a snapshot (recorded in the state
/// dir first) thaws it when it starts again.
fn killed_mid_snapshot(n: &mut Node) {
    let pv = "pvc-frozen";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    // What CreateSnapshot does before it copies: record, then freeze. Then the plugin dies.
    let state = n.plugin.as_ref().expect("plugin").state.clone();
    std::fs::create_dir_all(state.join("frozen")).expect("frozen dir");
    std::fs::write(state.join("frozen").join(pv), serde_json::to_vec(&staging).expect("json")).expect("record");
    let frozen = Command::new("fsfreeze").arg("--freeze").arg(&staging).status().expect("fsfreeze");
    assert!(frozen.success());
    n.kill_and_restart();
    // Thawed: a second thaw is refused, and the record is gone.
    let out = Command::new("fsfreeze").arg("--unfreeze").arg(&staging).output().expect("fsfreeze");
    assert!(!out.status.success(), "the filesystem was still frozen after the restart");
    assert!(!state.join("frozen").join(pv).exists(), "the freeze record is removed");
    std::fs::write(staging.join("file"), b"writable").expect("write");
    syncfs(&staging);
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

/// On SIGTERM the plugin writes every staged filesystem through to its image before it
/// exits: data a pod wrote and never synced is in the image while no plugin runs.
fn sigterm_syncs(n: &mut Node) {
    let pv = "pvc-term";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    let marker: Vec<u8> = b"vduse-csi sigterm marker 7f3a9c".iter().copied().cycle().take(64 << 10).collect();
    std::fs::write(staging.join("unsynced"), &marker).expect("write");
    let image = n.plugin.as_ref().expect("plugin").state.join("volumes").join(pv).join("image.raw");
    n.restart_with(|| {
        let bytes = std::fs::read(&image).expect("read image");
        assert!(
            bytes.windows(marker.len().min(4096)).any(|w| w == &marker[..4096]),
            "the unsynced file is not in the image after SIGTERM"
        );
    });
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

/// A thin volume whose backing filesystem is full shows it in its condition.
fn full_backing_store(n: &mut Node) {
    let pv = "pvc-full";
    let cap = block_cap(writer());
    n.create(pv, 64, cap.clone());
    let staging = n.block_staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    assert!(!n.stats(pv, &staging).volume_condition.expect("condition").abnormal);
    // Fill the state dir's filesystem (the guest's /tmp) to the last half MiB.
    let state = n.plugin.as_ref().expect("plugin").state.clone();
    let filler = fill_filesystem(&state, 512 << 10);
    let condition = n.stats(pv, &staging).volume_condition.expect("condition");
    std::fs::remove_file(&filler).expect("remove filler");
    assert!(condition.abnormal && condition.message.contains("backing store full"), "{condition:?}");
    assert!(!n.stats(pv, &staging).volume_condition.expect("condition").abnormal, "normal again with room");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

/// A plugin killed between mounting a staged volume and recording it: NodeUnstage still
/// unmounts the staging path (serving the device again for it) before removing the device.
fn unstage_unrecorded(n: &mut Node) {
    let pv = "pvc-unrecorded";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    std::fs::write(staging.join("file"), b"kept").expect("write");
    syncfs(&staging);
    let meta_path = n.plugin.as_ref().expect("plugin").state.join("volumes").join(pv).join("meta.json");
    // The state the crash leaves: mounted, served by nobody, and not recorded as staged.
    n.restart_with(|| {
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&meta_path).expect("meta")).expect("json");
        meta["staged"] = serde_json::Value::Null;
        std::fs::write(&meta_path, serde_json::to_vec(&meta).expect("json")).expect("write meta");
    });
    assert!(is_mount_point(&staging));
    n.unstage(pv, &staging).expect("unstage");
    assert!(!is_mount_point(&staging), "the staging path is unmounted");
    assert!(!Path::new("/sys/class/vduse").join(pv).exists(), "the device is removed");
    n.stage(pv, &staging, &cap).expect("stage again");
    assert_eq!(std::fs::read(staging.join("file")).expect("read"), b"kept");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

/// A staged volume whose device server cannot start at recovery (another process holds its
/// device node) is served again once it can, without a new stage.
fn failed_recovery_retried(n: &mut Node) {
    let pv = "pvc-heal";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    let mut holder = None;
    n.restart_with(|| {
        let node = format!("/dev/vduse/{pv}");
        holder = Some(
            Command::new("sh").args(["-c", &format!("exec 3<>{node}; sleep 6")]).spawn().expect("hold the device"),
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    });
    // The condition says why the volume is not served: the error of the attempt that failed
    // (recovery runs beside the gRPC server, so it may still be trying at the first call).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let condition = n.stats(pv, &staging).volume_condition.expect("condition");
        assert!(condition.abnormal, "recovery must have failed while the node was held: {condition:?}");
        if condition.message.contains("serving it again failed") {
            println!("while the node was held: {}", condition.message);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the condition does not say why: {condition:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = holder.take().expect("holder").wait();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let condition = n.stats(pv, &staging).volume_condition.expect("condition");
        if !condition.abnormal {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never served again: {condition:?}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    std::fs::write(staging.join("file"), b"after the retry").expect("write");
    syncfs(&staging);
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

/// Fills the filesystem holding `dir` to the last byte; returns the filler file.
fn fill_filesystem(dir: &Path, leave: u64) -> PathBuf {
    let st = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    let free = st.blocks_available() * st.fragment_size();
    let filler = dir.join("filler");
    let status =
        Command::new("fallocate").args(["-l", &(free - leave).to_string()]).arg(&filler).status().expect("fallocate");
    assert!(status.success());
    filler
}

/// A stage that mounts the volume and then cannot record it (the state dir's filesystem is
/// full) unmounts it and stops its device: no mounted disk is left that nobody serves.
fn failed_metadata_write(n: &mut Node) {
    let pv = "pvc-nometa";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    // Formatted once, so the second stage only mounts: it needs no new space in the image.
    n.stage(pv, &staging, &cap).expect("stage");
    n.unstage(pv, &staging).expect("unstage");
    let state = n.plugin.as_ref().expect("plugin").state.clone();
    let filler = fill_filesystem(&state, 0);
    let err = n.stage(pv, &staging, &cap).expect_err("the metadata cannot be written");
    std::fs::remove_file(&filler).expect("remove filler");
    assert!(err.message().contains("No space left"), "{}", err.message());
    assert!(!is_mount_point(&staging), "the staging path was left mounted");
    assert!(!Path::new("/sys/class/vduse").join(pv).exists(), "the device was left behind");
    n.stage(pv, &staging, &cap).expect("stage with room again");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

fn hostile_ids(n: &mut Node) {
    let cap = mount_cap("ext4", writer());
    let staging = n.staging("x");
    let long = "v".repeat(200);
    for id in ["../x", "/etc", "a/../../b", "", long.as_str()] {
        let err = n.stage(id, &staging, &cap).expect_err("hostile stage");
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}: {}", err.message());
        let err = n.publish(id, &staging, &n.target("p", "x"), &cap, false).expect_err("hostile publish");
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}");
        let err = n.unstage(id, &staging).expect_err("hostile unstage");
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}");
    }
    assert_eq!(n.stage("no-such-volume", &staging, &cap).expect_err("missing").code(), Code::NotFound);
    let mut bad_flags = cap.clone();
    if let Some(volume_capability::AccessType::Mount(m)) = &mut bad_flags.access_type {
        m.mount_flags = vec!["noatime;reboot".into()];
    }
    assert_eq!(n.stage("no-such-volume", &staging, &bad_flags).expect_err("bad flags").code(), Code::InvalidArgument);
    // Unpublishing a path that is not ours leaves it alone.
    let foreign = n.root.join("foreign");
    std::fs::create_dir_all(&foreign).expect("dir");
    n.create("pvc-f", 16, cap.clone());
    n.unpublish("pvc-f", &foreign).expect("unknown target is OK");
    assert!(foreign.is_dir());
    n.delete("pvc-f").expect("delete");
    n.create("pvc-h", 16, cap.clone());
    let target = n.target("p", "pvc-h");
    assert_eq!(
        n.publish("pvc-h", Path::new(""), &target, &cap, false).expect_err("no staging path").code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        n.publish("pvc-h", &staging, &target, &cap, false).expect_err("not staged").code(),
        Code::FailedPrecondition
    );
    // Arguments are checked before any state: a publish missing both the capability and the
    // staging path of a volume that is not staged is a malformed request.
    let req = NodePublishVolumeRequest {
        volume_id: "pvc-h".into(),
        target_path: target.to_string_lossy().into(),
        ..Default::default()
    };
    assert_eq!(n.rt.block_on(n.c.node.node_publish_volume(req)).expect_err("malformed").code(), Code::InvalidArgument);
    let multi = mount_cap("ext4", volume_capability::access_mode::Mode::MultiNodeMultiWriter);
    assert_eq!(n.stage("pvc-h", &staging, &multi).expect_err("multi-node").code(), Code::InvalidArgument);
    let req = NodeGetVolumeStatsRequest {
        volume_id: "pvc-h".into(),
        volume_path: "/tmp".into(),
        staging_target_path: String::new(),
    };
    assert_eq!(n.rt.block_on(n.c.node.node_get_volume_stats(req)).expect_err("not staged").code(), Code::NotFound);
    assert!(!Path::new("/tmp/csi-tests/hostile_and_missing_ids_are_refused/x").exists());
    n.delete("pvc-h").expect("delete");
}

/// GET /metrics of the plugin.
fn scrape() -> String {
    use std::net::TcpStream;
    let mut s = TcpStream::connect(METRICS).expect("connect to the metrics endpoint");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {METRICS}\r\n\r\n").expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    assert!(body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of the sample `name{labels}` in a scrape.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.parse().ok())
}

/// An ephemeral inline volume, as kubelet drives one: one NodePublishVolume creates and
/// mounts it, a plugin restart keeps it, the NodeUnpublishVolume deletes it.
fn ephemeral_volume(n: &mut Node) {
    let id = "csi-4f0e2b7c9d1a";
    let target = n.target("pod-e", id);
    let cap = mount_cap("", writer());
    let context = |size: &str| {
        HashMap::from([
            ("csi.storage.k8s.io/ephemeral".to_owned(), "true".to_owned()),
            ("csi.storage.k8s.io/pod.name".to_owned(), "pod-e".to_owned()),
            ("size".to_owned(), size.to_owned()),
        ])
    };
    let publish = |n: &mut Node, cap: &VolumeCapability, context: HashMap<String, String>| {
        let req = NodePublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.to_string_lossy().into(),
            volume_capability: Some(cap.clone()),
            volume_context: context,
            ..Default::default()
        };
        n.rt.block_on(n.c.node.node_publish_volume(req)).map(drop)
    };
    // Bad attributes are refused before anything is made.
    let block = VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(volume_capability::BlockVolume {})),
        access_mode: Some(volume_capability::AccessMode { mode: writer() as i32 }),
    };
    assert_eq!(publish(n, &block, context("64Mi")).expect_err("block").code(), Code::InvalidArgument);
    assert_eq!(publish(n, &cap, context("lots")).expect_err("size").code(), Code::InvalidArgument);
    // A pod author sizes an inline volume, nothing more (the node's admin owns thickness,
    // queues and QoS).
    let mut bad = context("64Mi");
    bad.insert("thick".into(), "true".into());
    assert_eq!(publish(n, &cap, bad).expect_err("thick").code(), Code::InvalidArgument);
    let state = n.plugin.as_ref().expect("plugin").state.clone();
    assert!(!state.join("volumes").join(id).exists(), "a refused publish creates nothing");

    publish(n, &cap, context("64Mi")).expect("publish");
    publish(n, &cap, context("64Mi")).expect("publish again is OK");
    assert!(is_mount_point(&target));
    let stat = nix::sys::statvfs::statvfs(&target).expect("statvfs");
    let bytes = stat.blocks() as u64 * stat.fragment_size() as u64;
    assert!(bytes > 50 << 20 && bytes <= 64 << 20, "filesystem of {bytes} bytes on a 64 MiB volume");
    std::fs::write(target.join("hello"), b"inline").expect("write");
    syncfs(&target);

    // The volume's datapath and the calls show in the metrics.
    let text = scrape();
    let writes: f64 = (0..4)
        .filter_map(|q| {
            sample(&text, &format!(r#"vduse_csi_requests_total{{volume_id="{id}",queue="{q}",op="write"}}"#))
        })
        .sum();
    assert!(writes > 0.0, "no writes counted for {id}:\n{text}");
    assert_eq!(sample(&text, "vduse_csi_volumes_staged"), Some(1.0));
    let published = sample(&text, r#"vduse_csi_csi_calls_total{method="NodePublishVolume",code="OK"}"#);
    assert_eq!(published, Some(2.0), "{text}");
    let refused = sample(&text, r#"vduse_csi_csi_calls_total{method="NodePublishVolume",code="InvalidArgument"}"#);
    assert_eq!(refused, Some(3.0));

    // A plugin killed and started again serves it again: the mount keeps working.
    n.kill_and_restart();
    assert_eq!(std::fs::read(target.join("hello")).expect("read after restart"), b"inline");
    std::fs::write(target.join("after"), b"restart").expect("write after restart");
    syncfs(&target);

    n.unpublish(id, &target).expect("unpublish");
    assert!(!target.exists(), "the target is removed");
    assert!(!state.join("volumes").join(id).exists(), "the image is deleted with its pod");
    assert!(!state.join("ephemeral").join(id).exists(), "its staging folder too");
    assert!(!Path::new("/sys/class/vduse").join(id).exists(), "its device is gone");
    n.unpublish(id, &target).expect("unpublish again is OK");
}

/// KiB the plugin has pinned (`VmPin`): our own bounce pages, once registered.
fn plugin_pinned_kib(n: &Node) -> u64 {
    let pid = n.plugin.as_ref().expect("plugin").child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPin:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmPin")
}

/// A StorageClass with `bouncePages: own`: the staged volume's bounce pages are the plugin's
/// (pinned), its filesystem works through them, and a plugin killed with SIGKILL is replaced
/// by one that registers its own pages again, with nothing written lost. A bad value is
/// refused at CreateVolume.
fn own_bounce_pages(n: &mut Node) {
    let pv = "pvc-own";
    let cap = mount_cap("ext4", writer());
    let create = |n: &mut Node, value: &str| {
        let mut req = CreateVolumeRequest { secrets: n.secrets.clone(), ..create_request(pv, 128 * MIB, cap.clone()) };
        req.parameters.insert("bouncePages".into(), value.into());
        n.rt.block_on(n.c.controller.create_volume(req))
    };
    assert_eq!(create(n, "user").expect_err("bad value").code(), Code::InvalidArgument);
    create(n, "own").expect("CreateVolume");
    assert_eq!(plugin_pinned_kib(n), 0, "nothing pinned before a volume is staged");
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    let target = n.target("pod-a", pv);
    n.publish(pv, &staging, &target, &cap, false).expect("publish");
    // mkfs and the mount made requests, so the bounce range exists and is ours.
    let pinned = plugin_pinned_kib(n);
    assert!(pinned >= 64 << 10, "the bounce region is pinned: {pinned} kB");
    let data: Vec<u8> = (0..8_000_000u32).map(|i| (i * 13 % 253) as u8).collect();
    std::fs::write(target.join("before"), &data).expect("write");
    syncfs(&target);

    n.kill_and_restart();
    assert!(is_mount_point(&staging) && is_mount_point(&target));
    std::fs::write(target.join("after"), &data).expect("write after the kill");
    syncfs(&target);
    let pinned = plugin_pinned_kib(n);
    assert!(pinned >= 64 << 10, "the new plugin registered its own pages: {pinned} kB");
    assert!(!n.stats(pv, &target).volume_condition.expect("condition").abnormal);
    n.unpublish(pv, &target).expect("unpublish");
    n.unstage(pv, &staging).expect("unstage");
    assert_eq!(plugin_pinned_kib(n), 0, "unstage unpins the pages");
    n.stage(pv, &staging, &cap).expect("stage again");
    n.publish(pv, &staging, &target, &cap, false).expect("publish again");
    assert_eq!(std::fs::read(target.join("before")).expect("read"), data);
    assert_eq!(std::fs::read(target.join("after")).expect("read"), data);
    n.unpublish(pv, &target).expect("unpublish");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}
