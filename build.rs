//! Compiles proto/csi.proto (the CSI v1.12 wire contract) and proto/pluginregistration.proto
//! (kubelet's plugin registration API) with a pure-Rust protobuf compiler, so a fresh machine
//! needs no `protoc`; and generates the librados/librbd binding of the RBD backend from the
//! installed headers (Debian's `librados-dev` and `librbd-dev`), so it always matches the
//! library it links.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=proto/pluginregistration.proto");
    let fds = protox::compile(["proto/csi.proto", "proto/pluginregistration.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    #[cfg(feature = "rbd")]
    rbd_binding()?;
    Ok(())
}

#[cfg(feature = "rbd")]
/// Only what the backend calls is bound, so the generated file stays small and a header change
/// elsewhere in librbd cannot break the build.
fn rbd_binding() -> Result<(), Box<dyn std::error::Error>> {
    const HEADER: &str = "src/backend/ceph/wrapper.h";
    println!("cargo:rerun-if-changed={HEADER}");
    println!("cargo:rustc-link-lib=rbd");
    println!("cargo:rustc-link-lib=rados");
    let functions = [
        "rados_create",
        "rados_conf_set",
        "rados_conf_parse_argv",
        "rados_conf_get",
        "rados_getaddrs",
        "rados_connect",
        "rados_shutdown",
        "rados_ioctx_create",
        "rados_ioctx_create2",
        "rados_ioctx_destroy",
        "rados_ioctx_get_id",
        "rados_pool_reverse_lookup",
        "rbd_create2",
        "rbd_remove",
        "rbd_open",
        "rbd_close",
        "rbd_get_size",
        "rbd_resize",
        "rbd_flatten",
        "rbd_get_parent",
        "rbd_linked_image_spec_cleanup",
        "rbd_snap_spec_cleanup",
        "rbd_clone",
        "rbd_metadata_get",
        "rbd_metadata_set",
        "rbd_pool_metadata_get",
        "rbd_pool_metadata_set",
        "rbd_pool_metadata_remove",
        "rbd_snap_create",
        "rbd_snap_remove",
        "rbd_snap_list",
        "rbd_snap_list_end",
        "rbd_snap_protect",
        "rbd_snap_unprotect",
        "rbd_snap_is_protected",
        "rbd_snap_get_id",
        "rbd_snap_get_timestamp",
        "rbd_lock_acquire",
        "rbd_lock_get_owners",
        "rbd_lock_get_owners_cleanup",
        "rbd_lock_break",
        "rbd_flush",
        "rbd_aio_create_completion",
        "rbd_aio_get_return_value",
        "rbd_aio_release",
        "rbd_aio_readv",
        "rbd_aio_writev",
        "rbd_aio_flush",
        "rbd_aio_discard",
        "rbd_aio_write_zeroes",
    ];
    let bindings = bindgen::Builder::default()
        .header(HEADER)
        .allowlist_function(functions.join("|"))
        .allowlist_var("RBD_FEATURE_(LAYERING|EXCLUSIVE_LOCK|OBJECT_MAP|FAST_DIFF|DEEP_FLATTEN)")
        .allowlist_type("rbd_lock_mode_t")
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate()?;
    bindings.write_to_file(std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("rbd_sys.rs"))?;
    Ok(())
}
