//! Compiles proto/csi.proto (the CSI v1.12 wire contract) and proto/pluginregistration.proto
//! (kubelet's plugin registration API) with a pure-Rust protobuf compiler, so a fresh machine
//! needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=proto/pluginregistration.proto");
    let fds = protox::compile(["proto/csi.proto", "proto/pluginregistration.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
