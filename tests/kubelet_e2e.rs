//! The driver installed the way users install it: tests/e2e/run.sh prepares (once, cached
//! outside the clone) Kubernetes 1.20 and the CSI sidecars built from source, builds our image
//! from the Dockerfile with buildah, boots the VDUSE test guest, starts a one-node cluster and a
//! one-node Ceph (cephx) on loopback, applies deploy/ and deploy/rbd/ with kubectl, and runs
//! the scenarios of tests/e2e/scenarios.sh through kubectl only. Every test here shares that
//! one run and checks its own scenario's verdict; a failed preparation or boot fails them all
//! loudly.

mod verdicts;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use verdicts::Verdicts;

fn e2e_run() -> &'static Result<Verdicts, String> {
    static RUN: OnceLock<Result<Verdicts, String>> = OnceLock::new();
    RUN.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = repo.join("target/guest/e2e");
        let mut command = Command::new(repo.join("tests/e2e/run.sh"));
        command.arg(&out).env("VDUSE_CSI_BIN", env!("CARGO_BIN_EXE_vduse-csi"));
        verdicts::collect(command, &out)
    })
}

fn check(name: &str) {
    verdicts::check(e2e_run(), name);
}

const SCENARIOS: [&str; 12] = [
    "installed_with_kubectl_apply",
    "pod_writes_and_a_new_pod_reads_back",
    "block_claim_is_a_device_in_the_pod",
    "expansion_by_editing_the_claim_reaches_the_pod",
    "snapshot_restores_equal_data",
    "deleting_the_claim_removes_the_image",
    "plugin_container_killed_while_a_pod_writes",
    "read_only_claim_and_two_pods_on_one_volume",
    "ephemeral_inline_volume_lives_with_its_pod",
    "rbd_claim_with_cephx_outlives_its_pod",
    "rbd_snapshot_and_restore",
    "helm_chart_with_rbd_installs_and_serves",
];

#[test]
fn the_driver_installs_with_kubectl_apply_and_its_sidecars_run() {
    check(SCENARIOS[0]);
}

#[test]
fn a_dynamically_provisioned_claim_is_written_and_read_back_by_a_new_pod() {
    check(SCENARIOS[1]);
}

#[test]
fn a_block_claim_is_a_device_in_the_pod() {
    check(SCENARIOS[2]);
}

#[test]
fn expanding_the_claim_reaches_the_pod() {
    check(SCENARIOS[3]);
}

#[test]
fn a_claim_restored_from_a_snapshot_holds_the_snapshot_data() {
    check(SCENARIOS[4]);
}

#[test]
fn deleting_the_claim_removes_the_image() {
    check(SCENARIOS[5]);
}

#[test]
fn the_plugin_container_killed_while_a_pod_writes_loses_nothing() {
    check(SCENARIOS[6]);
}

#[test]
fn a_read_only_claim_refuses_writes_and_two_pods_share_a_volume() {
    check(SCENARIOS[7]);
}

#[test]
fn an_ephemeral_inline_volume_lives_with_its_pod() {
    check(SCENARIOS[8]);
}

#[test]
fn an_rbd_claim_with_a_cephx_user_outlives_its_pod() {
    check(SCENARIOS[9]);
}

#[test]
fn an_rbd_snapshot_restores_equal_data() {
    check(SCENARIOS[10]);
}

#[test]
fn the_helm_chart_with_rbd_installs_and_serves() {
    check(SCENARIOS[11]);
}

#[test]
fn every_scenario_has_a_test() {
    verdicts::all_known(e2e_run(), &SCENARIOS);
}
