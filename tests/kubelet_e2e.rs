//! A real kubelet drives the plugin: tests/e2e/run.sh prepares (once, cached outside the clone)
//! Kubernetes 1.20 built from Debian's source, boots the VDUSE test guest, starts a one-node
//! cluster on loopback with our plugin registered with kubelet, and runs the scenarios of
//! tests/e2e/scenarios.sh through kubectl. Every test here shares that one run and checks its
//! own scenario's verdict; a failed preparation or boot fails them all loudly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

struct E2eRun {
    out: PathBuf,
    verdicts: HashMap<String, bool>,
}

fn e2e_run() -> &'static Result<E2eRun, String> {
    static RUN: OnceLock<Result<E2eRun, String>> = OnceLock::new();
    RUN.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = repo.join("target/guest/e2e");
        let status = Command::new(repo.join("tests/e2e/run.sh"))
            .arg(&out)
            .env("VDUSE_CSI_BIN", env!("CARGO_BIN_EXE_vduse-csi"))
            .status()
            .map_err(|e| format!("cannot run tests/e2e/run.sh: {e}"))?;
        let results = std::fs::read_to_string(out.join("results")).map_err(|e| {
            format!("the e2e run produced no results ({e}); run.sh exited with {status}; see {}", out.display())
        })?;
        let verdicts = results
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some("RESULT")).then_some(())?;
                Some((f.next()?.to_owned(), f.next()? == "PASS"))
            })
            .collect();
        Ok(E2eRun { out, verdicts })
    })
}

fn check(name: &str) {
    let run = match e2e_run() {
        Ok(run) => run,
        Err(e) => panic!("e2e run failed: {e}"),
    };
    match run.verdicts.get(name) {
        Some(true) => {}
        Some(false) => {
            let log = run.out.join(format!("{name}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            panic!("e2e scenario {name} failed ({}):\n{}", log.display(), tail.join("\n"));
        }
        None => panic!("e2e scenario {name} did not run; see {}", run.out.display()),
    }
}

const SCENARIOS: [&str; 6] = [
    "pod_writes_and_a_new_pod_reads_back",
    "block_claim_is_a_device_in_the_pod",
    "plugin_killed_while_a_pod_writes",
    "read_only_claim_and_two_pods_on_one_volume",
    "online_expansion_reaches_the_pod",
    "manifests_apply_to_kubernetes_1_20",
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
fn every_scenario_has_a_test() {
    let run = e2e_run().as_ref().expect("e2e run");
    for name in run.verdicts.keys() {
        assert!(SCENARIOS.contains(&name.as_str()), "e2e scenario {name} has no #[test] here");
    }
}
