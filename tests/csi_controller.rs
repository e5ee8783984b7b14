//! Identity and Controller services over the real unix socket with a tonic client: behaviour,
//! idempotency and every error code. These need no kernel support, so they run on the host.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;

use common::*;
use tonic::Code;
use vduse_csi::csi::proto::*;

struct Env {
    _dir: tempfile::TempDir,
    plugin: PluginProcess,
    c: Clients,
}

async fn env(mode: &'static str) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = PluginProcess::start(&dir.path().join("csi.sock"), &dir.path().join("state"), mode);
    let c = connect(&plugin.socket).await;
    Env { _dir: dir, plugin, c }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

#[test]
fn identity_reports_name_version_capabilities_and_readiness() {
    rt().block_on(async {
        let mut e = env("controller").await;
        let info = e.c.identity.get_plugin_info(GetPluginInfoRequest {}).await.expect("info").into_inner();
        assert_eq!(info.name, "vduse.csi.dev");
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
        let caps = e.c.identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.expect("caps").into_inner();
        let text = format!("{:?}", caps.capabilities);
        use plugin_capability::service::Type as S;
        for want in [S::ControllerService as i32, S::VolumeAccessibilityConstraints as i32] {
            assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type, Some(plugin_capability::Type::Service(s)) if s.r#type == want)), "{text}");
        }
        assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
            Some(plugin_capability::Type::VolumeExpansion(v)) if v.r#type == plugin_capability::volume_expansion::Type::Online as i32)), "{text}");
        let probe = e.c.identity.probe(ProbeRequest {}).await.expect("probe").into_inner();
        assert_eq!(probe.ready, Some(true));
        let mode = std::fs::metadata(&e.plugin.socket).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    });
}

#[test]
fn node_plugin_without_vduse_is_not_ready_and_says_why() {
    if std::path::Path::new("/dev/vduse/control").exists() {
        return; // VDUSE present: readiness is covered by the guest tests.
    }
    rt().block_on(async {
        let mut e = env("node").await;
        let err = e.c.identity.probe(ProbeRequest {}).await.expect_err("not ready");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("modprobe"), "{}", err.message());
        let info = e.c.node.node_get_info(NodeGetInfoRequest {}).await.expect("info").into_inner();
        assert_eq!(info.node_id, NODE);
        assert_eq!(
            info.accessible_topology.expect("topology").segments.get("vduse.csi.dev/node").map(String::as_str),
            Some(NODE)
        );
    });
}

#[test]
fn create_volume_is_idempotent_and_validates_everything() {
    rt().block_on(async {
        let mut e = env("controller").await;
        let ctl = &mut e.c.controller;
        let first = ctl
            .create_volume(create_request("pvc-a", 1, mount_cap("ext4", writer())))
            .await
            .expect("create")
            .into_inner();
        let vol = first.volume.clone().expect("volume");
        assert_eq!(vol.volume_id, "pvc-a");
        assert_eq!(vol.capacity_bytes, 1 << 20, "rounded up to 1 MiB");
        assert_eq!(vol.accessible_topology[0].segments.get("vduse.csi.dev/node").map(String::as_str), Some(NODE));
        let again = ctl
            .create_volume(create_request("pvc-a", 1, mount_cap("ext4", writer())))
            .await
            .expect("repeat")
            .into_inner();
        assert_eq!(again, first, "same name, same volume");
        let image = e.plugin.state.join("volumes/pvc-a/image.raw");
        assert_eq!(std::fs::metadata(&image).expect("image").len(), 1 << 20);

        assert_code(
            ctl.create_volume(create_request("pvc-a", 8 << 20, mount_cap("ext4", writer()))).await,
            Code::AlreadyExists,
        );
        let mut r = create_request("pvc-range", 0, mount_cap("", writer()));
        r.capacity_range = Some(CapacityRange { required_bytes: (1 << 20) + 1, limit_bytes: (1 << 20) + 10 });
        assert_code(ctl.create_volume(r).await, Code::OutOfRange);
        let mut r = create_request("pvc-param", 1 << 20, mount_cap("", writer()));
        r.parameters = HashMap::from([("colour".to_owned(), "blue".to_owned())]);
        assert_code(ctl.create_volume(r).await, Code::InvalidArgument);
        let mut r = create_request("pvc-queues", 1 << 20, mount_cap("", writer()));
        r.parameters = HashMap::from([("queues".to_owned(), "0".to_owned())]);
        assert_code(ctl.create_volume(r).await, Code::InvalidArgument);
        let mut r = create_request("pvc-q2", 1 << 20, mount_cap("", writer()));
        r.parameters = HashMap::from([
            ("queues".to_owned(), "2".to_owned()),
            ("csi.storage.k8s.io/pvc/name".to_owned(), "x".to_owned()),
        ]);
        ctl.create_volume(r).await.expect("queues=2 and provisioner metadata are accepted");
        assert_code(
            ctl.create_volume(create_request("pvc-fs", 1 << 20, mount_cap("btrfs", writer()))).await,
            Code::InvalidArgument,
        );
        let multi = volume_capability::access_mode::Mode::MultiNodeMultiWriter;
        assert_code(
            ctl.create_volume(create_request("pvc-multi", 1 << 20, mount_cap("", multi))).await,
            Code::InvalidArgument,
        );
        let mut r = create_request("pvc-nocap", 1 << 20, mount_cap("", writer()));
        r.volume_capabilities.clear();
        assert_code(ctl.create_volume(r).await, Code::InvalidArgument);
        for hostile in ["../x", "/etc/passwd", "a/b", "", "..", &"x".repeat(129)] {
            assert_code(
                ctl.create_volume(create_request(hostile, 1 << 20, mount_cap("", writer()))).await,
                Code::InvalidArgument,
            );
        }
        let mut r = create_request("pvc-elsewhere", 1 << 20, mount_cap("", writer()));
        let other = Topology { segments: HashMap::from([("vduse.csi.dev/node".to_owned(), "node-2".to_owned())]) };
        r.accessibility_requirements =
            Some(TopologyRequirement { requisite: vec![other.clone()], preferred: vec![other] });
        assert_code(ctl.create_volume(r).await, Code::ResourceExhausted);
        assert_code(
            ctl.create_volume(create_request("pvc-huge", 1 << 60, mount_cap("", writer()))).await,
            Code::ResourceExhausted,
        );
        assert!(!e.plugin.state.join("volumes/pvc-huge").exists());
        for hostile in ["../x", "/abs", "a/b"] {
            assert!(!std::path::Path::new(hostile).join("image.raw").exists());
        }
    });
}

#[test]
fn delete_list_validate_and_capacity() {
    rt().block_on(async {
        let mut e = env("controller").await;
        let ctl = &mut e.c.controller;
        for name in ["v1", "v2", "v3"] {
            ctl.create_volume(create_request(name, 1 << 20, block_cap(writer()))).await.expect("create");
        }
        let page1 = ctl
            .list_volumes(ListVolumesRequest { max_entries: 2, starting_token: String::new() })
            .await
            .expect("list")
            .into_inner();
        assert_eq!(page1.entries.len(), 2);
        assert!(!page1.next_token.is_empty());
        let page2 = ctl
            .list_volumes(ListVolumesRequest { max_entries: 2, starting_token: page1.next_token })
            .await
            .expect("list")
            .into_inner();
        assert_eq!(
            page2.entries.iter().map(|e| e.volume.as_ref().map(|v| v.volume_id.clone())).collect::<Vec<_>>(),
            vec![Some("v3".to_owned())]
        );
        assert!(page2.next_token.is_empty());
        // Tokens are opaque and checked: a volume ID, or anything else we did not issue, is
        // refused with ABORTED.
        for forged in ["../bad", "v2", "v2~0000000000000000"] {
            assert_code(
                ctl.list_volumes(ListVolumesRequest { max_entries: 1, starting_token: forged.into() }).await,
                Code::Aborted,
            );
        }

        let ok = ctl
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "v1".into(),
                volume_capabilities: vec![block_cap(writer())],
                ..Default::default()
            })
            .await
            .expect("validate")
            .into_inner();
        assert!(ok.confirmed.is_some());
        let multi = volume_capability::access_mode::Mode::MultiNodeReaderOnly;
        let no = ctl
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "v1".into(),
                volume_capabilities: vec![block_cap(multi)],
                ..Default::default()
            })
            .await
            .expect("validate")
            .into_inner();
        assert!(no.confirmed.is_none() && !no.message.is_empty());
        assert_code(
            ctl.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "nope".into(),
                volume_capabilities: vec![block_cap(writer())],
                ..Default::default()
            })
            .await,
            Code::NotFound,
        );

        let cap = ctl.get_capacity(GetCapacityRequest::default()).await.expect("capacity").into_inner();
        assert!(cap.available_capacity > 0);
        let elsewhere = Topology { segments: HashMap::from([("vduse.csi.dev/node".to_owned(), "node-9".to_owned())]) };
        let none = ctl
            .get_capacity(GetCapacityRequest { accessible_topology: Some(elsewhere), ..Default::default() })
            .await
            .expect("capacity")
            .into_inner();
        assert_eq!(none.available_capacity, 0);

        ctl.delete_volume(DeleteVolumeRequest { volume_id: "v1".into(), secrets: HashMap::new() })
            .await
            .expect("delete");
        ctl.delete_volume(DeleteVolumeRequest { volume_id: "v1".into(), secrets: HashMap::new() })
            .await
            .expect("delete unknown is OK");
        assert!(!e.plugin.state.join("volumes/v1").exists());
        for hostile in ["../state", "/", ""] {
            assert_code(
                ctl.delete_volume(DeleteVolumeRequest { volume_id: hostile.into(), secrets: HashMap::new() }).await,
                Code::InvalidArgument,
            );
        }
        assert!(e.plugin.state.join("volumes/v2").exists());
        let caps =
            ctl.controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await.expect("caps").into_inner();
        assert!(caps.capabilities.len() >= 6);
        assert_code(
            ctl.controller_publish_volume(ControllerPublishVolumeRequest::default()).await,
            Code::Unimplemented,
        );
    });
}

#[test]
fn snapshots_clones_and_expansion() {
    rt().block_on(async {
        let mut e = env("controller").await;
        let ctl = &mut e.c.controller;
        ctl.create_volume(create_request("src", 4 << 20, block_cap(writer()))).await.expect("create");
        let pattern: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        std::fs::write(e.plugin.state.join("volumes/src/image.raw"), &pattern).expect("fill");

        let snap = ctl
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: "src".into(),
                name: "snap-1".into(),
                ..Default::default()
            })
            .await
            .expect("snapshot")
            .into_inner();
        let s = snap.snapshot.clone().expect("snapshot");
        assert_eq!(
            (s.snapshot_id.as_str(), s.source_volume_id.as_str(), s.size_bytes, s.ready_to_use),
            ("snap-1", "src", 4 << 20, true)
        );
        let again = ctl
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: "src".into(),
                name: "snap-1".into(),
                ..Default::default()
            })
            .await
            .expect("repeat")
            .into_inner();
        assert_eq!(again, snap);
        ctl.create_volume(create_request("other", 1 << 20, block_cap(writer()))).await.expect("create");
        assert_code(
            ctl.create_snapshot(CreateSnapshotRequest {
                source_volume_id: "other".into(),
                name: "snap-1".into(),
                ..Default::default()
            })
            .await,
            Code::AlreadyExists,
        );
        assert_code(
            ctl.create_snapshot(CreateSnapshotRequest {
                source_volume_id: "missing".into(),
                name: "snap-2".into(),
                ..Default::default()
            })
            .await,
            Code::NotFound,
        );
        assert_code(
            ctl.create_snapshot(CreateSnapshotRequest {
                source_volume_id: "src".into(),
                name: "../snap".into(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        );

        // Overwrite the source: the snapshot keeps the old content.
        std::fs::write(e.plugin.state.join("volumes/src/image.raw"), vec![0u8; 4 << 20]).expect("overwrite");
        let mut restore = create_request("restored", 8 << 20, block_cap(writer()));
        restore.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: "snap-1".into(),
            })),
        });
        let v = ctl.create_volume(restore).await.expect("restore").into_inner().volume.expect("volume");
        assert!(v.content_source.is_some());
        let data = std::fs::read(e.plugin.state.join("volumes/restored/image.raw")).expect("read");
        assert_eq!(data.len(), 8 << 20);
        assert_eq!(&data[..4 << 20], &pattern[..]);
        let mut missing = create_request("restored-2", 8 << 20, block_cap(writer()));
        missing.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: "nope".into(),
            })),
        });
        assert_code(ctl.create_volume(missing).await, Code::NotFound);
        let mut too_small = create_request("restored-small", 1 << 20, block_cap(writer()));
        too_small.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: "snap-1".into(),
            })),
        });
        assert_code(ctl.create_volume(too_small).await, Code::OutOfRange);
        let mut clone = create_request("cloned", 8 << 20, block_cap(writer()));
        clone.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: "restored".into(),
            })),
        });
        ctl.create_volume(clone).await.expect("clone");
        assert_eq!(
            &std::fs::read(e.plugin.state.join("volumes/cloned/image.raw")).expect("read")[..4 << 20],
            &pattern[..]
        );

        let list = ctl
            .list_snapshots(ListSnapshotsRequest { source_volume_id: "src".into(), ..Default::default() })
            .await
            .expect("list")
            .into_inner();
        assert_eq!(list.entries.len(), 1);
        let none = ctl
            .list_snapshots(ListSnapshotsRequest { source_volume_id: "other".into(), ..Default::default() })
            .await
            .expect("list")
            .into_inner();
        assert!(none.entries.is_empty());
        ctl.delete_snapshot(DeleteSnapshotRequest { snapshot_id: "snap-1".into(), secrets: HashMap::new() })
            .await
            .expect("delete");
        ctl.delete_snapshot(DeleteSnapshotRequest { snapshot_id: "snap-1".into(), secrets: HashMap::new() })
            .await
            .expect("delete again");

        let grown = ctl
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "src".into(),
                capacity_range: Some(CapacityRange { required_bytes: 16 << 20, limit_bytes: 0 }),
                ..Default::default()
            })
            .await
            .expect("expand")
            .into_inner();
        assert_eq!(grown.capacity_bytes, 16 << 20);
        assert!(grown.node_expansion_required);
        assert_eq!(std::fs::metadata(e.plugin.state.join("volumes/src/image.raw")).expect("image").len(), 16 << 20);
        assert_code(
            ctl.controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "nope".into(),
                capacity_range: Some(CapacityRange { required_bytes: 1, limit_bytes: 0 }),
                ..Default::default()
            })
            .await,
            Code::NotFound,
        );
    });
}

#[test]
fn socket_handling_replaces_stale_and_refuses_live() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("csi.sock");
        // A stale socket file: bound once, nobody listening now.
        drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
        assert!(socket.exists());
        let live = PluginProcess::start(&socket, &dir.path().join("state"), "controller");
        let second = std::process::Command::new(env!("CARGO_BIN_EXE_vduse-csi"))
            .args([
                "serve",
                "--endpoint",
                &format!("unix://{}", socket.display()),
                "--node-id",
                NODE,
                "--mode",
                "controller",
            ])
            .arg("--state-dir")
            .arg(dir.path().join("state2"))
            .output()
            .expect("second plugin");
        assert!(!second.status.success());
        assert!(String::from_utf8_lossy(&second.stderr).contains("another process is serving"));
        let mut c = connect(&socket).await;
        c.identity.probe(ProbeRequest {}).await.expect("the first plugin still answers");
        assert!(live.stop(), "clean exit on SIGTERM");
        assert!(!socket.exists(), "socket removed on exit");
    });
}

fn gib(n: i64) -> i64 {
    n << 30
}

fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

fn image(state: &std::path::Path, volume: &str) -> std::path::PathBuf {
    state.join("volumes").join(volume).join("image.raw")
}

/// Thin by default up to the overcommit limit, which GetCapacity reports; a thick class
/// reserves its volumes and is held to the free space.
#[test]
fn thin_provisioning_follows_the_overcommit_limit_and_thick_volumes_reserve_space() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let plugin =
            PluginProcess::start_with(&dir.path().join("csi.sock"), &state, "controller", &["--overcommit-ratio", "3"]);
        let mut c = connect(&plugin.socket).await;
        let st = nix::sys::statvfs::statvfs(dir.path()).expect("statvfs");
        let (total, free) = (st.blocks() * st.fragment_size(), st.blocks_available() * st.fragment_size());
        let capacity = |thick: bool| GetCapacityRequest {
            parameters: HashMap::from([("thick".to_owned(), thick.to_string())]),
            ..Default::default()
        };
        let thin = c.controller.get_capacity(capacity(false)).await.expect("capacity").into_inner();
        let limit = (total * 3) as i64;
        assert!(thin.available_capacity > limit - gib(1) && thin.available_capacity <= limit, "{thin:?}");
        let thick = c.controller.get_capacity(capacity(true)).await.expect("capacity").into_inner();
        assert!(
            thick.available_capacity <= free as i64 && thick.available_capacity > free as i64 - gib(1),
            "{thick:?}"
        );

        // More than the free space, thin: fine, and it allocates nothing.
        let big = (free as i64 / (1 << 20) + 1024) << 20;
        let cap = mount_cap("ext4", writer());
        c.controller.create_volume(create_request("thin-big", big, cap.clone())).await.expect("thin volume");
        assert_eq!(allocated(&image(&state, "thin-big")), 0);
        // The rest of the promise is still there; one MiB past it is not.
        let left = c.controller.get_capacity(capacity(false)).await.expect("capacity").into_inner().available_capacity;
        assert!(left <= thin.available_capacity - big && left > thin.available_capacity - big - gib(1));
        assert_code(
            c.controller.create_volume(create_request("over", left + (1 << 20), cap.clone())).await,
            Code::ResourceExhausted,
        );

        // Thick: reserved at once; refused when it does not fit in the free space.
        let mut req = create_request("thick-8m", 8 << 20, cap.clone());
        req.parameters.insert("thick".into(), "true".into());
        c.controller.create_volume(req.clone()).await.expect("thick volume");
        assert!(allocated(&image(&state, "thick-8m")) >= 8 << 20);
        req.name = "thick-huge".into();
        req.capacity_range = Some(CapacityRange { required_bytes: big, limit_bytes: 0 });
        assert_code(c.controller.create_volume(req.clone()).await, Code::ResourceExhausted);
        assert!(!state.join("volumes/thick-huge").exists(), "a refused volume leaves nothing");
        req.parameters.insert("thick".into(), "maybe".into());
        assert_code(c.controller.create_volume(req).await, Code::InvalidArgument);

        // No capacity range: the documented default (1 GiB).
        let mut req = create_request("default-size", 0, cap);
        req.capacity_range = None;
        let v = c.controller.create_volume(req).await.expect("default").into_inner().volume.expect("volume");
        assert_eq!(v.capacity_bytes, gib(1));
    });
}

/// A snapshot and a clone of a 1 GiB volume holding 10 MiB allocate about 10 MiB each.
#[test]
fn snapshots_and_clones_cost_what_the_volume_holds() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let plugin = PluginProcess::start(&dir.path().join("csi.sock"), &state, "controller");
        let mut c = connect(&plugin.socket).await;
        let cap = block_cap(writer());
        c.controller.create_volume(create_request("src", gib(1), cap.clone())).await.expect("create");
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(image(&state, "src")).expect("image");
            let data: Vec<u8> = (0..(5 << 20)).map(|i: u32| (i % 253) as u8 + 1).collect();
            f.write_all_at(&data, 0).expect("write");
            f.write_all_at(&data, 700 << 20).expect("write");
            f.sync_all().expect("sync");
        }
        let held = allocated(&image(&state, "src"));
        assert!((10 << 20..12 << 20).contains(&held), "{held}");
        let snap = c
            .controller
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: "src".into(),
                name: "snap".into(),
                ..Default::default()
            })
            .await
            .expect("snapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        let mut from_snapshot = create_request("from-snap", gib(1), cap.clone());
        from_snapshot.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            })),
        });
        c.controller.create_volume(from_snapshot).await.expect("restore");
        let mut clone = create_request("clone", gib(2), cap);
        clone.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: "src".into(),
            })),
        });
        c.controller.create_volume(clone).await.expect("clone");
        let source = std::fs::read(image(&state, "src")).expect("read");
        let snap_image = state.join("snapshots/snap/image.raw");
        for (what, path) in
            [("snapshot", snap_image), ("restore", image(&state, "from-snap")), ("clone", image(&state, "clone"))]
        {
            let bytes = allocated(&path);
            assert!(bytes <= held + (1 << 20), "{what} allocates {bytes} bytes for {held} held");
            let copy = std::fs::read(&path).expect("read");
            assert_eq!(&copy[..source.len()], &source[..], "{what}: same data");
            assert!(copy[source.len()..].iter().all(|b| *b == 0), "{what}: the rest reads as zeroes");
        }
    });
}

/// Concurrent creates, deletes and snapshots on the same and on different names, in random
/// order for many rounds: ABORTED is the only error a same-name race may give (NOT_FOUND only
/// for a snapshot whose source a concurrent delete removed), every successful create is
/// listed once with its size, and no half-made volume or snapshot is ever left.
#[test]
fn racing_calls_leave_a_consistent_store() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let plugin = PluginProcess::start(&dir.path().join("csi.sock"), &state, "controller");
        let c = connect(&plugin.socket).await;
        let size = |v: usize| ((v as i64) + 1) << 20;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..25 {
            let mut tasks = Vec::new();
            for _ in 0..12 {
                let (op, v) = (next() % 4, (next() % 3) as usize);
                let mut ctl = c.controller.clone();
                let name = format!("race-{v}");
                tasks.push(tokio::spawn(async move {
                    let result = match op {
                        0 | 1 => ctl
                            .create_volume(create_request(&name, size(v), block_cap(writer())))
                            .await
                            .map(|r| Some(r.into_inner().volume.expect("volume").capacity_bytes)),
                        2 => ctl
                            .delete_volume(DeleteVolumeRequest { volume_id: name.clone(), ..Default::default() })
                            .await
                            .map(|_| None),
                        _ => ctl
                            .create_snapshot(CreateSnapshotRequest {
                                source_volume_id: name.clone(),
                                name: format!("snap-{v}"),
                                ..Default::default()
                            })
                            .await
                            .map(|_| None),
                    };
                    (op, v, result)
                }));
            }
            for task in tasks {
                let (op, v, result) = task.await.expect("task");
                match result {
                    Ok(Some(bytes)) => assert_eq!(bytes, size(v), "round {round}: create of race-{v}"),
                    Ok(None) => {}
                    Err(s) if s.code() == Code::Aborted => {}
                    Err(s) if op == 3 && s.code() == Code::NotFound => {}
                    Err(s) => panic!("round {round}: op {op} on race-{v}: {:?} {}", s.code(), s.message()),
                }
            }
            let mut ctl = c.controller.clone();
            let listed = ctl.list_volumes(ListVolumesRequest::default()).await.expect("list").into_inner().entries;
            let mut seen = std::collections::HashSet::new();
            for v in listed.iter().filter_map(|e| e.volume.as_ref()) {
                assert!(seen.insert(v.volume_id.clone()), "round {round}: {} listed twice", v.volume_id);
                let n: usize = v.volume_id.trim_start_matches("race-").parse().expect("name");
                assert_eq!(v.capacity_bytes, size(n), "round {round}");
                assert!(image(&state, &v.volume_id).exists(), "round {round}: {} has no image", v.volume_id);
            }
            let snaps = ctl.list_snapshots(ListSnapshotsRequest::default()).await.expect("list").into_inner().entries;
            for s in snaps.iter().filter_map(|e| e.snapshot.as_ref()) {
                let n: usize = s.snapshot_id.trim_start_matches("snap-").parse().expect("name");
                assert_eq!(s.source_volume_id, format!("race-{n}"), "round {round}");
                assert_eq!(s.size_bytes, size(n), "round {round}");
            }
            for sub in ["volumes", "snapshots"] {
                let leftovers: Vec<_> = std::fs::read_dir(state.join(sub))
                    .expect("list")
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with('.'))
                    .collect();
                assert!(leftovers.is_empty(), "round {round}: half-made entries {leftovers:?}");
            }
        }
    });
}

/// A caller that gives up does not release the volume: the copy runs on, a retry finds the
/// volume busy (ABORTED) until the copy ends, and then gets the one volume it made.
#[test]
fn a_create_whose_caller_gives_up_keeps_the_volume_busy_until_its_work_ends() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let plugin = PluginProcess::start(&dir.path().join("csi.sock"), &state, "controller");
        let mut c = connect(&plugin.socket).await;
        let cap = block_cap(writer());
        c.controller.create_volume(create_request("big", gib(2), cap.clone())).await.expect("create");
        {
            // 1.5 GiB of data: a copy that takes far longer than the caller waits.
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(image(&state, "big")).expect("image");
            let chunk = vec![0x5au8; 64 << 20];
            for i in 0..24u64 {
                f.write_all_at(&chunk, i * (64 << 20)).expect("write");
            }
            f.sync_all().expect("sync");
        }
        let mut clone = create_request("clone", gib(2), cap);
        clone.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: "big".into(),
            })),
        });
        let mut impatient = tonic::Request::new(clone.clone());
        impatient.set_timeout(std::time::Duration::from_millis(50));
        let gave_up = c.controller.create_volume(impatient).await.expect_err("the caller gives up");
        assert!(matches!(gave_up.code(), Code::DeadlineExceeded | Code::Cancelled), "{gave_up:?}");
        assert_code(c.controller.create_volume(clone.clone()).await, Code::Aborted);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let volume = loop {
            match c.controller.create_volume(clone.clone()).await {
                Ok(r) => break r.into_inner().volume.expect("volume"),
                Err(s) if s.code() == Code::Aborted && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(s) => panic!("{s:?}"),
            }
        };
        assert_eq!(volume.capacity_bytes, gib(2));
        use std::io::Read;
        let (mut a, mut b) = (
            std::fs::File::open(image(&state, "big")).expect("source"),
            std::fs::File::open(image(&state, "clone")).expect("clone"),
        );
        let (mut x, mut y) = (vec![0u8; 64 << 20], vec![0u8; 64 << 20]);
        for _ in 0..32 {
            a.read_exact(&mut x).expect("read source");
            b.read_exact(&mut y).expect("read clone");
            assert!(x == y, "the clone differs from its source");
        }
    });
}

/// `vduse-csi volume create|list|delete` drive a running plugin's Controller service.
#[test]
fn the_volume_command_creates_lists_shows_and_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("csi.sock");
    let state = dir.path().join("state");
    let plugin = PluginProcess::start(&socket, &state, "controller");
    let endpoint = format!("unix://{}", socket.display());
    let state_arg = state.to_string_lossy().into_owned();
    let run = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vduse-csi"));
        command.arg("volume").args(args);
        if matches!(args[0], "create" | "delete") {
            command.args(["--endpoint", &endpoint]);
        } else {
            command.args(["--state-dir", &state_arg]);
        }
        let out = command.output().expect("run vduse-csi volume");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = run(&["create", "pv-cli", "--size", "64Mi", "--param", "maxReadIops=500"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "pv-cli 67108864");
    let (ok, _, _) = run(&["create", "pv-block", "--size", "32M", "--block", "--param", "thick=true"]);
    assert!(ok);
    let (ok, _, stderr) = run(&["create", "pv-bad", "--size", "1M", "--param", "colour=red"]);
    assert!(!ok && stderr.contains("unknown parameter"), "{stderr}");
    let (ok, _, stderr) = run(&["create", "pv-bad", "--size", "1M", "--param", "maxIops=-5"]);
    assert!(!ok && stderr.contains("maxIops must be a positive integer"), "{stderr}");

    // The table, while the plugin runs: a thin image allocates nothing, a thick one all of it.
    let (ok, stdout, stderr) = run(&["list"]);
    assert!(ok, "{stderr}");
    let rows: Vec<Vec<&str>> = stdout.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0][..4], ["ID", "KIND", "SIZE", "ALLOC"], "{stdout}");
    assert_eq!(rows[1][..8], ["pv-block", "volume", "32M", "32M", "-", "no", "-", "0"], "{stdout}");
    assert_eq!(rows[2][..9], ["pv-cli", "volume", "64M", "0", "-", "no", "-", "0", "maxReadIops=500"], "{stdout}");
    assert_eq!(rows[2][9], "normal");
    let (ok, json, _) = run(&["list", "--output", "json"]);
    assert!(ok);
    let json: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(json[1]["id"], "pv-cli");
    assert_eq!(json[1]["size_bytes"], 67108864);
    assert_eq!(json[1]["qos"]["maxReadIops"], 500);
    assert_eq!(json[0]["allocated_bytes"], 33554432);
    let (ok, show, _) = run(&["show", "pv-cli"]);
    assert!(ok);
    assert!(show.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["qos", "maxReadIops=500"]), "{show}");
    let (ok, _, stderr) = run(&["show", "pv-none"]);
    assert!(!ok && stderr.contains("no volume or snapshot \"pv-none\""), "{stderr}");

    // And with the plugin stopped: the same answer from the state dir alone.
    assert!(plugin.stop());
    assert_eq!(run(&["list"]).1, stdout);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vduse-csi"))
        .args(["volume", "list", "--state-dir", "/nonexistent"])
        .output()
        .expect("run vduse-csi volume list");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not a vduse-csi state dir"), "{stderr}");
    let _plugin = PluginProcess::start(&socket, &state, "controller");
    for id in ["pv-cli", "pv-block"] {
        assert!(run(&["delete", id]).0);
    }
    assert_eq!(run(&["list"]).1.lines().count(), 1, "only the header is left");
}

#[test]
fn metrics_count_calls_by_method_and_code_and_report_the_store() {
    // A port nobody holds right now.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let address = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = PluginProcess::start_with(
        &dir.path().join("csi.sock"),
        &dir.path().join("state"),
        "controller",
        &[&format!("--metrics-address={address}")],
    );
    rt().block_on(async {
        let mut c = connect(&plugin.socket).await;
        c.controller
            .create_volume(create_request("pvc-m", 1 << 20, mount_cap("ext4", writer())))
            .await
            .expect("create");
        let mut bad = create_request("pvc-m2", 1 << 20, mount_cap("", writer()));
        bad.parameters = HashMap::from([("maxReadBytesPerSec".to_owned(), "fast".to_owned())]);
        assert_code(c.controller.create_volume(bad).await, Code::InvalidArgument);
    });
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stream, &mut text).expect("response");
    assert!(text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("content-type: text/plain; version=0.0.4"), "{text}");
    for line in [
        r#"vduse_csi_csi_calls_total{method="CreateVolume",code="OK"} 1"#,
        r#"vduse_csi_csi_calls_total{method="CreateVolume",code="InvalidArgument"} 1"#,
        r#"vduse_csi_csi_call_duration_seconds_count{method="CreateVolume",code="OK"} 1"#,
        "vduse_csi_volumes_staged 0",
        "vduse_csi_devices_unhealthy 0",
        "vduse_csi_provisioned_bytes 1048576",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    for gauge in ["vduse_csi_backing_store_used_bytes ", "vduse_csi_backing_store_free_bytes "] {
        assert!(text.lines().any(|l| l.starts_with(gauge)), "missing {gauge} in\n{text}");
    }
    // A second plugin cannot take the same address: it says so and exits.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vduse-csi"))
        .args(["serve", "--node-id", "n", "--mode", "controller", "--metrics-address", &address])
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.path().join("other.sock").display()))
        .arg("--state-dir")
        .arg(dir.path().join("other"))
        .output()
        .expect("run a second plugin");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cannot bind metrics address"), "{stderr}");
}

/// The cluster-wide RBD controller and the node's RBD endpoint, as far as they need no Ceph:
/// their identities, capabilities and refusals. Calls that reach Ceph are in tests/rbd.rs.
#[test]
fn the_rbd_controller_and_the_rbd_node_endpoint_answer_for_their_driver() {
    rt().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let clusters = dir.path().join("clusters.json");
        let controller = PluginProcess::start_with(
            &dir.path().join("rbd-controller.sock"),
            &dir.path().join("controller-state"),
            "controller",
            &["--driver-name=rbd.vduse.csi.dev", &format!("--ceph-clusters={}", clusters.display())],
        );
        let mut c = connect(&controller.socket).await;
        let info = c.identity.get_plugin_info(GetPluginInfoRequest {}).await.expect("info").into_inner();
        assert_eq!(info.name, "rbd.vduse.csi.dev");
        let caps =
            c.identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.expect("caps").into_inner();
        use plugin_capability::service::Type as S;
        let services: Vec<i32> = caps
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect();
        assert_eq!(services, [S::ControllerService as i32], "RBD volumes have no topology");
        let caps = c.controller.controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await.expect("caps");
        let rpcs: Vec<i32> = caps
            .into_inner()
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
                _ => None,
            })
            .collect();
        use controller_service_capability::rpc::Type as T;
        assert!(rpcs.contains(&(T::ExpandVolume as i32)) && rpcs.contains(&(T::CloneVolume as i32)), "{rpcs:?}");
        for absent in [T::ListVolumes, T::ListSnapshots, T::GetCapacity] {
            assert!(!rpcs.contains(&(absent as i32)), "{absent:?} offered: {rpcs:?}");
        }
        // A class without `backend: rbd` is not this controller's; a missing clusters file is
        // the operator's to fix.
        let cap = mount_cap("ext4", writer());
        assert_code(
            c.controller.create_volume(create_request("pvc-local", 1 << 20, cap.clone())).await,
            Code::InvalidArgument,
        );
        let rbd = HashMap::from([
            ("backend".to_string(), "rbd".to_string()),
            ("clusterID".to_string(), "ceph".to_string()),
            ("pool".to_string(), "rbd".to_string()),
        ]);
        let req = CreateVolumeRequest { parameters: rbd.clone(), ..create_request("pvc-rbd", 1 << 20, cap.clone()) };
        assert_code(c.controller.create_volume(req).await, Code::FailedPrecondition);

        // With a clusters file that does not list cluster "ceph" (any more): a StorageClass
        // naming it is wrong, but the volumes that live there need the operator to add it back.
        std::fs::write(&clusters, r#"[{"clusterID": "other", "monitors": ["127.0.0.1:1"]}]"#).expect("clusters file");
        let req = CreateVolumeRequest { parameters: rbd.clone(), ..create_request("pvc-rbd", 1 << 20, cap.clone()) };
        assert_code(c.controller.create_volume(req).await, Code::InvalidArgument);
        let gone = "rbd.ceph.1.csi-vol-00000000deadbeef";
        let req = DeleteVolumeRequest { volume_id: gone.into(), secrets: HashMap::new() };
        let refused = c.controller.delete_volume(req).await.expect_err("cluster left the file");
        assert_eq!(refused.code(), Code::FailedPrecondition, "{}", refused.message());
        assert!(refused.message().contains("add the cluster back"), "{}", refused.message());
        let req = ValidateVolumeCapabilitiesRequest {
            volume_id: gone.into(),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        };
        assert_code(c.controller.validate_volume_capabilities(req).await, Code::FailedPrecondition);
        // A filesystem we cannot format is refused at CreateVolume, before Ceph is reached.
        let mut listed = rbd.clone();
        listed.insert("clusterID".into(), "other".into());
        for (fs_param, cap_fs) in [(Some("btrfs"), ""), (None, "zfs")] {
            let mut parameters = listed.clone();
            if let Some(fs) = fs_param {
                parameters.insert("csi.storage.k8s.io/fstype".into(), fs.into());
            }
            let req = CreateVolumeRequest {
                parameters,
                ..create_request("pvc-rbd-fs", 1 << 20, mount_cap(cap_fs, writer()))
            };
            let refused = c.controller.create_volume(req).await.expect_err("bad fsType");
            assert_eq!(refused.code(), Code::InvalidArgument, "{}", refused.message());
        }

        // A node plugin serves RBD volumes' Node service on a second socket, under the RBD name.
        let rbd_socket = dir.path().join("rbd-node.sock");
        let node = PluginProcess::start_with(
            &dir.path().join("node.sock"),
            &dir.path().join("node-state"),
            "all",
            &[
                &format!("--ceph-clusters={}", clusters.display()),
                &format!("--rbd-endpoint=unix://{}", rbd_socket.display()),
            ],
        );
        // The second socket is bound after the first (which start_with waits for).
        for _ in 0..200 {
            if std::os::unix::net::UnixStream::connect(&rbd_socket).is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mut n = connect(&rbd_socket).await;
        let info = n.identity.get_plugin_info(GetPluginInfoRequest {}).await.expect("info").into_inner();
        assert_eq!(info.name, "rbd.vduse.csi.dev");
        let caps =
            n.identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.expect("caps").into_inner();
        assert!(
            !caps.capabilities.iter().any(|c| matches!(&c.r#type, Some(plugin_capability::Type::Service(_)))),
            "the RBD endpoint offers neither topology nor a controller: {:?}",
            caps.capabilities
        );
        let node_caps = n.node.node_get_capabilities(NodeGetCapabilitiesRequest {}).await.expect("node caps");
        assert!(!node_caps.into_inner().capabilities.is_empty());
        let info = n.node.node_get_info(NodeGetInfoRequest {}).await.expect("node info").into_inner();
        assert!(info.accessible_topology.is_none(), "RBD volumes have no node topology: {info:?}");
        let mut main = connect(&node.socket).await;
        let info = main.identity.get_plugin_info(GetPluginInfoRequest {}).await.expect("info").into_inner();
        assert_eq!(info.name, "vduse.csi.dev", "the main socket keeps the node-local driver's name");
        let info = main.node.node_get_info(NodeGetInfoRequest {}).await.expect("node info").into_inner();
        assert!(info.accessible_topology.is_some(), "node-local volumes live on this node");
        drop(node);
        drop(controller);
    });
}
