//! A real kubelet drives the plugin: tests/e2e/run.sh prepares (once, cached outside the clone)
//! Kubernetes 1.20 built from Debian's source, boots the VDUSE test guest, starts a one-node
//! cluster on loopback with our plugin registered with kubelet, and runs the scenarios of
//! tests/e2e/scenarios.sh through kubectl. Every test here shares that one run and checks its
//! own scenario's verdict; a failed preparation or boot fails them all loudly.

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

const SCENARIOS: [&str; 7] = [
    "pod_writes_and_a_new_pod_reads_back",
    "block_claim_is_a_device_in_the_pod",
    "plugin_killed_while_a_pod_writes",
    "read_only_claim_and_two_pods_on_one_volume",
    "online_expansion_reaches_the_pod",
    "manifests_apply_to_kubernetes_1_20",
    "ephemeral_inline_volume_lives_with_its_pod",
];

#[test]
fn a_pod_writes_and_a_new_pod_on_the_claim_reads_it_back() {
    check(SCENARIOS[0]);
}

#[test]
fn a_block_claim_is_a_device_in_the_pod() {
    check(SCENARIOS[1]);
}

#[test]
fn the_plugin_killed_while_a_pod_writes_loses_nothing() {
    check(SCENARIOS[2]);
}

#[test]
fn a_read_only_claim_refuses_writes_and_two_pods_share_a_volume() {
    check(SCENARIOS[3]);
}

#[test]
fn online_expansion_reaches_the_pod() {
    check(SCENARIOS[4]);
}

#[test]
fn our_manifests_apply_to_kubernetes_1_20() {
    check(SCENARIOS[5]);
}

#[test]
fn an_ephemeral_inline_volume_lives_with_its_pod() {
    check(SCENARIOS[6]);
}

#[test]
fn every_scenario_has_a_test() {
    verdicts::all_known(e2e_run(), &SCENARIOS);
}
