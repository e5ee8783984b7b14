//! The node agent's promises, each a scenario that failed before the agent kept it (see
//! docs/ARCHITECTURE.md): no torn snapshot of a filesystem or a block volume, nothing formatted
//! over a partition table, no call that hangs on a device nobody serves, no successor that
//! starts before its predecessor's I/O is gone, no takeover of another volume's device, and
//! only normal paths. Runs in the VDUSE guest like tests/csi_node.rs.

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::guest_node::{self, Harness, Node, Scenario, is_mount_point, syncfs};
use common::*;
use tonic::Code;
use vduse_csi::csi::proto::*;

/// Healing runs every 100 ms here, so that a heal round certainly meets every operation
/// that lasts longer (a snapshot's copy, a takeover).
const HARNESS: Harness = Harness {
    out_dir: "node-agent-tests",
    plugin_flags: &["--heal-interval=0.1"],
    before: None,
    after: None,
    secrets: None,
};
const MIB: i64 = 1 << 20;
/// What a call that waits on a device nobody serves would do without bound.
const CALL_LIMIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let scenarios: &[(&str, Scenario)] = &[
        ("heal_loop_never_thaws_a_running_snapshot", snapshot_not_thawed_by_heal),
        ("block_snapshot_and_clone_are_one_point_in_time", block_copies_consistent),
        ("partition_table_is_never_formatted", partition_table_kept),
        ("calls_on_an_unserved_device_answer_unavailable", unserved_device),
        ("successor_waits_for_the_predecessors_io", successor_waits),
        ("another_volumes_device_is_never_taken_over", device_name_collision),
        ("relative_and_dotted_paths_are_refused", hostile_paths),
        ("a_failed_detach_keeps_the_device_served", failed_detach),
        ("device_serve_keeps_serving_when_it_cannot_detach", device_serve_failed_detach),
        ("a_stuck_flush_never_blocks_other_volumes", stuck_flush_blocks_nobody),
    ];
    guest_node::main(&HARNESS, scenarios)
}

fn state_dir(n: &Node) -> std::path::PathBuf {
    n.plugin.as_ref().expect("plugin").state.clone()
}

fn snapshot(n: &mut Node, source: &str, name: &str) -> Result<(), tonic::Status> {
    let req = CreateSnapshotRequest { source_volume_id: source.into(), name: name.into(), ..Default::default() };
    n.rt.block_on(n.c.controller.create_snapshot(req)).map(drop)
}

fn clone_request(name: &str, mib: i64, source: &str, cap: VolumeCapability) -> CreateVolumeRequest {
    let mut req = create_request(name, mib * MIB, cap);
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource {
            volume_id: source.into(),
        })),
    });
    req
}

/// Defect 1: a heal round that met a snapshot's freeze record thawed the filesystem (and
/// deleted the record) while the copy still ran. Observed from outside: the record must
/// outlive the copy (the snapshot's `.new-` folder), since the heal loop now skips a volume
/// whose guard the snapshot holds.
fn snapshot_not_thawed_by_heal(n: &mut Node) {
    let pv = "pvc-slowsnap";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 256, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    // Enough data that the copy spans many heal rounds.
    let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    let mut file = std::fs::File::create(staging.join("data")).expect("create");
    for _ in 0..160 {
        file.write_all(&chunk).expect("write");
    }
    drop(file);
    syncfs(&staging);
    let state = state_dir(n);
    let record = state.join("frozen").join(pv);
    let copying = state.join("snapshots").join(".new-snap-slow");
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let (mut seen, mut torn, mut polls) = (false, false, 0u64);
            while !done.load(Ordering::SeqCst) {
                let recorded = record.exists();
                seen |= recorded;
                // The record gone while the copy still runs: thawed under the snapshot.
                torn |= seen && !recorded && copying.exists();
                polls += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (seen, torn, polls)
        })
    };
    let started = Instant::now();
    snapshot(n, pv, "snap-slow").expect("snapshot");
    let took = started.elapsed();
    done.store(true, Ordering::SeqCst);
    let (seen, torn, polls) = watcher.join().expect("watcher");
    println!("snapshot of 160 MiB took {took:?}; {polls} polls");
    assert!(took > Duration::from_millis(300), "the copy ({took:?}) must outlast a few heal rounds");
    assert!(seen, "the freeze record was never seen");
    assert!(!torn, "the heal loop thawed the filesystem while the snapshot copied it");
    std::fs::write(staging.join("after"), b"thawed after the snapshot").expect("writable again");
    syncfs(&staging);
    n.unstage(pv, &staging).expect("unstage");
    let req = DeleteSnapshotRequest { snapshot_id: "snap-slow".into(), secrets: HashMap::new() };
    n.rt.block_on(n.c.controller.delete_snapshot(req)).expect("delete snapshot");
    n.delete(pv).expect("delete");
}

/// Defect 2: a block volume was copied extent by extent while its pod kept writing. A writer
/// stamps a counter into the first block and then into the last one, each write acknowledged
/// before the next; in any point in time the last block's counter is at most the first's. A
/// copy that reads the first block early and the last one late, while the writer runs, sees
/// a later stamp in the last block: torn.
fn block_copies_consistent(n: &mut Node) {
    const SIZE: u64 = 128 << 20;
    let pv = "pvc-blockcopy";
    let cap = block_cap(writer());
    n.create(pv, (SIZE >> 20) as i64, cap.clone());
    let staging = n.block_staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    let target = n.block_target("pod-a", pv);
    n.publish(pv, &staging, &target, &cap, false).expect("publish");
    {
        // Every block allocated: the copy has to walk all of them between the two stamps.
        let mut dev = std::fs::OpenOptions::new().write(true).open(&target).expect("open");
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..(SIZE >> 20) {
            dev.write_all(&chunk).expect("fill");
        }
        dev.sync_all().expect("fsync");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stamped = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, stamped, target) = (Arc::clone(&stop), Arc::clone(&stamped), target.clone());
        std::thread::spawn(move || {
            let dev = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_SYNC).open(&target).expect("open");
            let mut block = vec![0u8; 4096];
            let mut stamp = 0u64;
            while !stop.load(Ordering::SeqCst) {
                stamp += 1;
                block[..8].copy_from_slice(&stamp.to_le_bytes());
                dev.write_all_at(&block, 0).expect("first block");
                dev.write_all_at(&block, SIZE - 4096).expect("last block");
                stamped.store(stamp, Ordering::SeqCst);
            }
        })
    };
    let wait_for = |from: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while stamped.load(Ordering::SeqCst) < from + 20 {
            assert!(Instant::now() < deadline, "the writer stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(0);
    snapshot(n, pv, "snap-block").expect("snapshot while the pod writes");
    wait_for(stamped.load(Ordering::SeqCst));
    n.rt.block_on(n.c.controller.create_volume(clone_request("pvc-blockclone", 128, pv, cap.clone())))
        .expect("clone while the pod writes");
    wait_for(stamped.load(Ordering::SeqCst));
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    let state = state_dir(n);
    for image in [state.join("snapshots/snap-block/image.raw"), state.join("volumes/pvc-blockclone/image.raw")] {
        let file = std::fs::File::open(&image).expect("copy image");
        let stamp_at = |offset: u64| {
            let mut b = [0u8; 8];
            file.read_exact_at(&mut b, offset).expect("read stamp");
            u64::from_le_bytes(b)
        };
        let (first, last) = (stamp_at(0), stamp_at(SIZE - 4096));
        println!("{}: first block {first}, last block {last}", image.display());
        assert!(first > 0, "the copy predates the writer");
        assert!(last <= first, "{}: torn: the last block ({last}) is newer than the first ({first})", image.display());
    }
    n.unpublish(pv, &target).expect("unpublish");
    n.unstage(pv, &staging).expect("unstage");
    n.delete("pvc-blockclone").expect("delete clone");
    let req = DeleteSnapshotRequest { snapshot_id: "snap-block".into(), secrets: HashMap::new() };
    n.rt.block_on(n.c.controller.delete_snapshot(req)).expect("delete snapshot");
    n.delete(pv).expect("delete");
}

/// Defect 3: a block volume a VM partitioned (a GPT by sfdisk and data in its partition),
/// staged as a filesystem later, was formatted. It must be refused, and nothing lost.
fn partition_table_kept(n: &mut Node) {
    let pv = "pvc-parted";
    let block = block_cap(writer());
    n.create(pv, 64, block.clone());
    let staging = n.block_staging(pv);
    n.stage(pv, &staging, &block).expect("stage as block");
    let target = n.block_target("vm", pv);
    n.publish(pv, &staging, &target, &block, false).expect("publish");
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--label", "gpt"])
        .arg(&target)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run sfdisk (package fdisk)");
    sfdisk.stdin.take().expect("stdin").write_all(b"start=2048, size=65536, type=L\n").expect("script");
    assert!(sfdisk.wait().expect("sfdisk").success(), "sfdisk failed");
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let read_back = |path: &Path| {
        let mut dev = std::fs::File::open(path).expect("open");
        let mut table = [0u8; 8];
        dev.seek(SeekFrom::Start(512)).expect("seek");
        dev.read_exact(&mut table).expect("read GPT header");
        let mut inside = vec![0u8; data.len()];
        dev.seek(SeekFrom::Start(2048 * 512)).expect("seek");
        dev.read_exact(&mut inside).expect("read partition");
        (table, inside)
    };
    {
        let mut dev = std::fs::OpenOptions::new().write(true).open(&target).expect("open");
        dev.seek(SeekFrom::Start(2048 * 512)).expect("seek");
        dev.write_all(&data).expect("write into the partition");
        dev.sync_all().expect("fsync");
    }
    let (table, inside) = read_back(&target);
    assert_eq!(&table, b"EFI PART", "sfdisk wrote a GPT");
    assert!(inside == data);
    n.unpublish(pv, &target).expect("unpublish");
    n.unstage(pv, &staging).expect("unstage");

    let fs_staging = n.staging(pv);
    let err = n.stage(pv, &fs_staging, &mount_cap("ext4", writer())).expect_err("a partitioned disk is not formatted");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("gpt partition table"), "{}", err.message());
    assert!(!is_mount_point(&fs_staging));
    assert!(!Path::new("/sys/class/vduse").join(pv).exists(), "a refused stage leaves no device");

    n.stage(pv, &staging, &block).expect("stage as block again");
    n.publish(pv, &staging, &target, &block, false).expect("publish");
    let (table, inside) = read_back(&target);
    assert_eq!(&table, b"EFI PART", "the partition table survived");
    assert!(inside == data, "the partition's data survived");
    n.unpublish(pv, &target).expect("unpublish");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

/// Defect 4: NodeUnstage, CreateSnapshot and a clone of a staged volume whose device nobody
/// serves (its recovery failed: another process holds the device node) waited for ever in
/// umount or fsfreeze. They answer UNAVAILABLE now, and succeed once the device is served.
/// A child process killed (and reaped) when dropped: a scenario that fails must not leave a
/// holder of a device behind, which would keep the device, and the guest's cleanup, waiting.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn unserved_device(n: &mut Node) {
    let pv = "pvc-unserved";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    std::fs::write(staging.join("kept"), b"before the restart").expect("write");
    syncfs(&staging);
    let mut holder = None;
    n.restart_with(|| {
        let node = format!("/dev/vduse/{pv}");
        holder = Some(KillOnDrop(
            Command::new("sh").args(["-c", &format!("exec 3<>{node}; exec sleep 600")]).spawn().expect("hold device"),
        ));
        std::thread::sleep(Duration::from_millis(500));
    });
    let condition = n.stats(pv, &staging).volume_condition.expect("condition");
    assert!(condition.abnormal, "recovery must have failed while the device was held: {condition:?}");
    let bounded = |n: &mut Node, what: &str, call: &dyn Fn(&mut Node) -> Result<(), tonic::Status>| {
        let started = Instant::now();
        let result = call(n);
        assert!(started.elapsed() < CALL_LIMIT, "{what} took {:?}", started.elapsed());
        let err = result.expect_err(what);
        // UNAVAILABLE from the call itself, or ABORTED when a heal round holds the volume at
        // that moment (trying to serve it again): both are bounded answers a caller retries.
        assert!(matches!(err.code(), Code::Unavailable | Code::Aborted), "{what}: {err:?}");
        println!("{what}: {} after {:?}", err.message(), started.elapsed());
    };
    let unstage_req =
        NodeUnstageVolumeRequest { volume_id: pv.into(), staging_target_path: staging.to_string_lossy().into() };
    bounded(n, "NodeUnstageVolume", &|n| {
        let mut req = tonic::Request::new(unstage_req.clone());
        req.set_timeout(CALL_LIMIT);
        n.rt.block_on(n.c.node.node_unstage_volume(req)).map(drop)
    });
    bounded(n, "CreateSnapshot", &|n| {
        let mut req = tonic::Request::new(CreateSnapshotRequest {
            source_volume_id: pv.into(),
            name: "snap-unserved".into(),
            ..Default::default()
        });
        req.set_timeout(CALL_LIMIT);
        n.rt.block_on(n.c.controller.create_snapshot(req)).map(drop)
    });
    bounded(n, "CreateVolume from the volume", &|n| {
        let mut req = tonic::Request::new(clone_request("pvc-unserved-clone", 64, pv, mount_cap("ext4", writer())));
        req.set_timeout(CALL_LIMIT);
        n.rt.block_on(n.c.controller.create_volume(req)).map(drop)
    });
    // The node lets go: the next heal round (or the next call) serves the device again.
    drop(holder.take().expect("holder"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while n.stats(pv, &staging).volume_condition.expect("condition").abnormal {
        assert!(Instant::now() < deadline, "never served again");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(std::fs::read(staging.join("kept")).expect("read"), b"before the restart");
    snapshot(n, pv, "snap-unserved").expect("snapshot once served");
    n.unstage(pv, &staging).expect("unstage once served");
    let req = DeleteSnapshotRequest { snapshot_id: "snap-unserved".into(), secrets: HashMap::new() };
    n.rt.block_on(n.c.controller.delete_snapshot(req)).expect("delete snapshot");
    n.delete(pv).expect("delete");
}

/// Defect 8: after kill -9 the dead server's requests may still be in flight in the kernel.
/// Each server holds OFD locks on its image that only the last reference to its open files
/// releases, and an in-flight request holds one. Here the test process holds such a lock
/// (standing for a predecessor's pending I/O): the next plugin must not serve the volume
/// until it is released.
fn successor_waits(n: &mut Node) {
    let pv = "pvc-locked";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    std::fs::write(staging.join("kept"), b"acknowledged before the kill").expect("write");
    syncfs(&staging);
    let image = state_dir(n).join("volumes").join(pv).join("image.raw");
    let pending = std::fs::OpenOptions::new().read(true).write(true).open(&image).expect("open image");
    let offset = vduse_csi::backend::image_lock::LOCK_OFFSETS[0];
    // The plugin dies; the stand-in takes its lock as soon as it is free, and holds it for
    // `hold` while the next plugin starts.
    let hold = Duration::from_secs(5);
    let mut locked_at = None;
    let mut releaser = None;
    n.kill_and_restart_under(&[], || {
        vduse_csi::backend::image_lock::lock(&pending, offset, false, Duration::from_secs(30))
            .expect("the dead server's lock is released");
        locked_at = Some(Instant::now());
        releaser = Some(std::thread::spawn(move || {
            std::thread::sleep(hold);
            drop(pending);
        }));
    });
    let locked_at = locked_at.expect("locked");
    let ready = locked_at.elapsed();
    releaser.expect("releaser").join().expect("releaser");
    println!("plugin ready {ready:?} after the stand-in took the lock for {hold:?}");
    assert!(ready >= hold, "the successor served the volume while its predecessor's I/O was pending");
    let condition = n.stats(pv, &staging).volume_condition.expect("condition");
    assert!(!condition.abnormal, "{condition:?}");
    assert_eq!(std::fs::read(staging.join("kept")).expect("read"), b"acknowledged before the kill");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

/// Defect 9: a long volume ID names its device by a hash, and another volume may have that
/// very name as its ID. Staging it must not take over the first volume's device (and serve
/// its own image under the first volume's filesystem). Also: no child process inherits the
/// plugin's IOTLB fds (they map every device's bounce pages).
fn device_name_collision(n: &mut Node) {
    let long = format!("pvc-{}", "l".repeat(90));
    let twin = vduse_csi::node::device_name(&long);
    assert_ne!(twin, long, "the long ID is hashed");
    let cap = mount_cap("ext4", writer());
    n.create(&long, 64, cap.clone());
    n.create(&twin, 64, cap.clone());
    let staging = n.staging(&long);
    n.stage(&long, &staging, &cap).expect("stage the long one");
    std::fs::write(staging.join("mine"), b"the long volume's").expect("write");
    syncfs(&staging);

    // Every fd of the plugin but the standard three is close-on-exec: mkfs, blkid and
    // fsfreeze children inherit nothing (an IOTLB fd maps a device's bounce pages).
    let pid = n.plugin.as_ref().expect("plugin").child.id();
    let mut inherited = Vec::new();
    let mut fds = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds").flatten() {
        let number: u32 = fd.file_name().to_string_lossy().parse().expect("fd number");
        if number < 3 {
            continue;
        }
        fds += 1;
        let link = std::fs::read_link(fd.path()).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{number}")).unwrap_or_default();
        let Some(flags) = info.lines().find_map(|l| l.strip_prefix("flags:")) else { continue };
        let flags = u64::from_str_radix(flags.trim(), 8).expect("octal flags");
        if flags & libc::O_CLOEXEC as u64 == 0 {
            inherited.push(format!("{number} -> {link}"));
        }
    }
    assert!(fds > 3, "the plugin serving a device has more than {fds} fds");
    assert!(inherited.is_empty(), "fds a child would inherit: {inherited:?}");

    let twin_staging = n.staging(&twin);
    let err = n.stage(&twin, &twin_staging, &cap).expect_err("the device serves the other volume");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&long), "{}", err.message());
    assert!(!is_mount_point(&twin_staging));
    assert_eq!(std::fs::read(staging.join("mine")).expect("read"), b"the long volume's", "untouched");
    std::fs::write(staging.join("still"), b"writable").expect("still served");
    syncfs(&staging);
    n.unstage(&long, &staging).expect("unstage the long one");
    // Its device is gone: now the name is free for the other volume.
    n.stage(&twin, &twin_staging, &cap).expect("stage the twin");
    assert!(!twin_staging.join("mine").exists(), "the twin has its own filesystem");
    n.unstage(&twin, &twin_staging).expect("unstage the twin");
    n.delete(&twin).expect("delete");
    n.delete(&long).expect("delete");
}

/// Defect 11: staging and target paths are absolute and normal.
fn hostile_paths(n: &mut Node) {
    let pv = "pvc-paths";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    for bad in ["relative/globalmount", "/tmp/csi-tests/../../etc", "/tmp/csi-tests/./x", "/tmp//csi-tests"] {
        let err = n.stage(pv, Path::new(bad), &cap).expect_err(bad);
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
    }
    n.stage(pv, &staging, &cap).expect("stage");
    let escape = format!("{}/../../escape", staging.display());
    let err = n.publish(pv, &staging, Path::new(&escape), &cap, false).expect_err("dotted target");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = n.unpublish(pv, Path::new("pods/x")).expect_err("relative target");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

/// Defect 6: a stop whose detach failed went on to stop the server, leaving the device
/// attached with nobody serving it (every access then hangs). A plugin in a network namespace
/// of its own cannot reach the vdpa netlink family (it exists in the initial namespace only),
/// so it can take a device over but not detach it: its unstage must fail and keep serving.
fn failed_detach(n: &mut Node) {
    let pv = "pvc-nodetach";
    let cap = mount_cap("ext4", writer());
    n.create(pv, 64, cap.clone());
    let staging = n.staging(pv);
    n.stage(pv, &staging, &cap).expect("stage");
    std::fs::write(staging.join("kept"), b"still served").expect("write");
    syncfs(&staging);
    // Taken over without netlink: recovery needs none.
    n.kill_and_restart_under(&["unshare", "--net"], || {});

    let err = n.unstage(pv, &staging).expect_err("the detach cannot succeed here");
    println!("unstage: {err:?}");
    let block = vduse_csi::vduse::sysfs::block_device_name(pv).expect("the device is still attached");
    // Still served: a direct read of its first block answers.
    let (tx, rx) = std::sync::mpsc::channel();
    let dev = format!("/dev/{block}");
    std::thread::spawn(move || {
        let read = Command::new("dd")
            .args([&format!("if={dev}"), "of=/dev/null", "bs=4096", "count=1", "iflag=direct"])
            .status();
        let _ = tx.send(read.map(|s| s.success()).unwrap_or(false));
    });
    let answered = rx.recv_timeout(Duration::from_secs(20));
    assert_eq!(answered, Ok(true), "the attached device is not served any more after the failed unstage");
    // Its server runs (the condition only says the staging mount is gone, as it is).
    let condition = n.stats(pv, &staging).volume_condition.expect("condition");
    assert!(!condition.message.contains("degraded") && !condition.message.contains("not running"), "{condition:?}");

    // A plugin that can detach finishes the unstage, and nothing was lost.
    n.kill_and_restart();
    n.stage(pv, &staging, &cap).expect("stage again");
    assert_eq!(std::fs::read(staging.join("kept")).expect("read"), b"still served");
    n.unstage(pv, &staging).expect("unstage");
    n.delete(pv).expect("delete");
}

/// Starts `vduse-csi device serve` (under `wrapper`, if any) and returns it with the block
/// device it printed.
fn device_serve(wrapper: &[&str], image: &Path, name: &str, size: &str) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = plugin_command(wrapper)
        .args(["device", "serve", "--size", size, "--name", name, "--image"])
        .arg(image)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("device serve");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    std::io::BufReader::new(stdout).read_line(&mut line).expect("block device line");
    (child, line.trim().to_owned())
}

/// Whether a direct read of `dev`'s first block answers within 20 s.
fn answers(dev: &str) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let dev = dev.to_owned();
    std::thread::spawn(move || {
        let read = Command::new("dd")
            .args([&format!("if={dev}"), "of=/dev/null", "bs=4096", "count=1", "iflag=direct", "status=none"])
            .status();
        let _ = tx.send(read.map(|s| s.success()).unwrap_or(false));
    });
    rx.recv_timeout(Duration::from_secs(20)) == Ok(true)
}

/// Defect 6, in the device server itself: a stop whose detach fails used to stop the threads
/// anyway, leaving the device attached with nobody answering it. A server in a network
/// namespace of its own takes the device over but cannot detach it: on SIGTERM it must keep
/// serving (and say why), until a server that can detach stops it.
fn device_serve_failed_detach(n: &mut Node) {
    let image = n.root.join("nodetach.img");
    let name = "nodetach-dev";
    let (mut first, dev) = device_serve(&[], &image, name, "64M");
    assert!(dev.starts_with("/dev/vd"), "{dev:?}");
    first.kill().expect("SIGKILL");
    first.wait().expect("wait");
    let (mut fenced_off, again) = device_serve(&["unshare", "--net"], &image, name, "64M");
    assert_eq!(again, dev, "taken over without netlink");
    let pid = nix::unistd::Pid::from_raw(fenced_off.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    std::thread::sleep(Duration::from_secs(2));
    assert!(fenced_off.try_wait().expect("try_wait").is_none(), "it exited although it could not detach the device");
    assert!(answers(&dev), "the device is not served after the failed stop");
    fenced_off.kill().expect("SIGKILL");
    fenced_off.wait().expect("wait");
    // One that can detach stops it for good.
    let (mut last, _) = device_serve(&[], &image, name, "64M");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(last.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    assert!(last.wait().expect("wait").success(), "a server that can detach stops cleanly");
    assert!(!Path::new("/sys/class/vduse").join(name).exists(), "the device is gone");
}

/// Resumes a stopped process when dropped, whatever the scenario asserted meanwhile.
struct Stopped(nix::unistd::Pid);

impl Stopped {
    fn stop(child: &std::process::Child) -> Self {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// Defect 5: the device server table's lock was held across blocking I/O (a snapshot's
/// flush, expansion, the serve paths, every scrape), so one slow disk stalled every CSI call
/// on the node. Here the state dir lives on a filesystem whose disk stops answering (a
/// `device serve` under SIGSTOP): a snapshot of one volume waits in its image's fsync, and
/// another volume's stats must answer meanwhile.
fn stuck_flush_blocks_nobody(n: &mut Node) {
    // The sick disk, and the state dir on it.
    let (mut disk, dev) = device_serve(&[], &n.root.join("sick.img"), "sick-disk", "512M");
    let sick = n.root.join("sick");
    std::fs::create_dir_all(&sick).expect("mount point");
    assert!(Command::new("mkfs.ext4").args(["-q", &dev]).status().expect("mkfs").success());
    assert!(Command::new("mount").arg(&dev).arg(&sick).status().expect("mount").success());
    let state = sick.join("state");
    let socket = n.plugin.as_ref().expect("plugin").socket.clone();
    let mut plugin = n.plugin.take().expect("plugin");
    plugin.child.kill().expect("SIGKILL");
    plugin.child.wait().expect("wait");
    drop(plugin);
    let plugin = PluginProcess::start_with(&socket, &state, "all", n.flags);
    n.c = n.rt.block_on(connect(&plugin.socket));
    n.plugin = Some(plugin);
    let probe = n.rt.block_on(n.c.identity.probe(ProbeRequest {})).expect("probe").into_inner();
    assert_eq!(probe.ready, Some(true));

    // A: a block volume whose writes stay in the page cache over its image (cache:
    // writeback), so a flush of it must write to the sick disk. B: any other volume.
    let block = block_cap(writer());
    let mut req = create_request("pvc-slowflush", 64 * MIB, block.clone());
    req.parameters.insert("cache".into(), "writeback".into());
    n.rt.block_on(n.c.controller.create_volume(req)).expect("create A");
    let staging_a = n.block_staging("pvc-slowflush");
    n.stage("pvc-slowflush", &staging_a, &block).expect("stage A");
    let target_a = n.block_target("pod-a", "pvc-slowflush");
    n.publish("pvc-slowflush", &staging_a, &target_a, &block, false).expect("publish A");
    // Both through the page cache: O_DIRECT from the bounce pages to a file on a disk that
    // is itself a VDUSE device fails with EFAULT in the test guest.
    let cap = mount_cap("ext4", writer());
    let mut req = create_request("pvc-bystander", 64 * MIB, cap.clone());
    req.parameters.insert("cache".into(), "writeback".into());
    n.rt.block_on(n.c.controller.create_volume(req)).expect("create B");
    let staging_b = n.staging("pvc-bystander");
    n.stage("pvc-bystander", &staging_b, &cap).expect("stage B");
    let dd = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", target_a.display()),
            "bs=1M",
            "count=16",
            "oflag=direct",
            "status=none",
        ])
        .status()
        .expect("dd");
    assert!(dd.success(), "write A");

    let stopped = Stopped::stop(&disk);
    let plugin_socket = socket.clone();
    let snapshotter = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let mut c = rt.block_on(connect(&plugin_socket));
        let req = CreateSnapshotRequest {
            source_volume_id: "pvc-slowflush".into(),
            name: "snap-slowflush".into(),
            ..Default::default()
        };
        rt.block_on(c.controller.create_snapshot(req)).map(drop)
    });
    // Long enough for the snapshot to be waiting in its flush.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!snapshotter.is_finished(), "the snapshot's flush should be waiting on the stopped disk");
    let started = Instant::now();
    let mut req = tonic::Request::new(NodeGetVolumeStatsRequest {
        volume_id: "pvc-bystander".into(),
        volume_path: staging_b.to_string_lossy().into(),
        staging_target_path: String::new(),
    });
    req.set_timeout(Duration::from_secs(10));
    let stats = n.rt.block_on(n.c.node.node_get_volume_stats(req));
    println!("stats of the other volume answered in {:?}: {:?}", started.elapsed(), stats.as_ref().map(|_| "ok"));
    drop(stopped);
    let snapshot = snapshotter.join().expect("snapshotter");
    let condition =
        stats.expect("stats of another volume while one volume's flush is stuck").into_inner().volume_condition;
    assert!(!condition.expect("condition").abnormal);
    snapshot.expect("the snapshot completes once the disk answers");

    n.unpublish("pvc-slowflush", &target_a).expect("unpublish A");
    n.unstage("pvc-slowflush", &staging_a).expect("unstage A");
    n.unstage("pvc-bystander", &staging_b).expect("unstage B");
    let req = DeleteSnapshotRequest { snapshot_id: "snap-slowflush".into(), secrets: HashMap::new() };
    n.rt.block_on(n.c.controller.delete_snapshot(req)).expect("delete snapshot");
    n.delete("pvc-slowflush").expect("delete A");
    n.delete("pvc-bystander").expect("delete B");
    // The plugin stops before its state dir goes.
    if let Some(p) = n.plugin.take() {
        assert!(p.stop());
    }
    assert!(Command::new("umount").arg(&sick).status().expect("umount").success());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(disk.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    assert!(disk.wait().expect("wait").success());
    // `finish` wants a plugin: a fresh one on the default state dir.
    let plugin = PluginProcess::start_with(&socket, &n.root.join("state"), "all", n.flags);
    n.c = n.rt.block_on(connect(&plugin.socket));
    n.plugin = Some(plugin);
    let probe = n.rt.block_on(n.c.identity.probe(ProbeRequest {})).expect("probe").into_inner();
    assert_eq!(probe.ready, Some(true));
}
