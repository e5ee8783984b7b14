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
        assert_eq!(page1.next_token, "v2");
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
        assert_code(
            ctl.list_volumes(ListVolumesRequest { max_entries: 1, starting_token: "../bad".into() }).await,
            Code::Aborted,
        );

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
