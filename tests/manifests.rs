//! The Kubernetes packaging validates: deploy/ against the Kubernetes API schemas, the Helm
//! chart renders to the same objects, and the DaemonSet's plugin flags exist in this binary.
//! Runs tests/manifests/check.sh (needs the venv that .ci/run creates; fails loudly without).

use std::path::Path;
use std::process::Command;

#[test]
fn deploy_manifests_and_chart_validate() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(repo.join("tests/manifests/check.sh"))
        .env("VDUSE_CSI_BIN", env!("CARGO_BIN_EXE_vduse-csi"))
        .output()
        .expect("run tests/manifests/check.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "manifest checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(" passed, 0 failed"), "no verdict line:\n{stdout}");
}
