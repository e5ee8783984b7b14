//! Kernel tests of `vduse-csi device serve` in a throwaway QEMU guest with VDUSE.
//!
//! The host kernel of a build machine usually has no VDUSE, so every test here shares one
//! guest boot (tests/guest/run.sh, DESIGN.md "Testing on a real kernel"): the first test to run
//! boots it and runs tests/guest/device-tests.sh inside; each test then checks its own verdict.
//! A missing QEMU, kernel or guest failure fails every test loudly; nothing is skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

struct GuestRun {
    out: PathBuf,
    verdicts: HashMap<String, bool>,
}

fn guest_run() -> &'static Result<GuestRun, String> {
    static RUN: OnceLock<Result<GuestRun, String>> = OnceLock::new();
    RUN.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = repo.join("target/guest/device-tests");
        let _ = std::fs::remove_dir_all(&out);
        let status = Command::new(repo.join("tests/guest/run.sh"))
            .arg(repo.join("tests/guest/device-tests.sh"))
            .arg(&out)
            .env("VDUSE_CSI_BIN", env!("CARGO_BIN_EXE_vduse-csi"))
            .env("GUEST_ENV", "VDUSE_CSI_BIN")
            .env("GUEST_QUIET", "1")
            .status()
            .map_err(|e| format!("cannot run tests/guest/run.sh: {e}"))?;
        let results = std::fs::read_to_string(out.join("results")).map_err(|e| {
            format!("the guest produced no results ({e}); run.sh exited with {status}; see {}", out.display())
        })?;
        let verdicts = results
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some("RESULT")).then_some(())?;
                Some((f.next()?.to_owned(), f.next()? == "PASS"))
            })
            .collect();
        Ok(GuestRun { out, verdicts })
    })
}

fn check(name: &str) {
    let run = match guest_run() {
        Ok(run) => run,
        Err(e) => panic!("guest run failed: {e}"),
    };
    let log = run.out.join(format!("{name}.log"));
    match run.verdicts.get(name) {
        Some(true) => {}
        Some(false) => {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!("guest test {name} failed ({}):\n{}", log.display(), tail.join("\n"));
        }
        None => panic!("guest test {name} did not run; see {}", run.out.display()),
    }
}

#[test]
fn filesystem_data_survives_stop_and_restart() {
    check("fs_persists_across_restart");
}

#[test]
fn fio_verify_random_4k_qd32_and_sequential_1m() {
    check("fio_verify");
}

#[test]
fn multiqueue_device_verifies() {
    check("multiqueue_verify");
}

#[test]
fn fstrim_shrinks_the_image() {
    check("fstrim_shrinks_image");
}

#[test]
fn io_past_capacity_fails_and_device_keeps_serving() {
    check("out_of_range_fails_and_device_keeps_serving");
}

#[test]
fn read_only_device_refuses_writes() {
    check("read_only");
}

#[test]
fn sigkill_then_restart_takes_the_device_over() {
    check("sigkill_then_restart_recovers");
}

#[test]
fn device_remove_clears_a_stale_device() {
    check("remove_stale_device");
}

#[test]
fn bad_command_lines_are_refused() {
    check("bad_input_is_refused");
}

#[test]
fn sigkill_five_times_under_fio_verify_loses_nothing() {
    check("kill9_under_fio_verify");
}

#[test]
fn sigterm_under_load_stops_promptly_with_writes_durable() {
    check("sigterm_under_load");
}

#[test]
fn a_one_mib_request_arrives_as_one_request() {
    check("one_mib_request_is_one_request");
}

#[test]
fn odirect_and_misaligned_requests_verify() {
    check("odirect_misaligned_verify");
}

#[test]
fn every_guest_test_has_a_host_check() {
    // A test added to device-tests.sh without a check here would run unseen.
    let run = guest_run().as_ref().expect("guest run");
    let known = [
        "fs_persists_across_restart",
        "fio_verify",
        "multiqueue_verify",
        "fstrim_shrinks_image",
        "out_of_range_fails_and_device_keeps_serving",
        "read_only",
        "sigkill_then_restart_recovers",
        "remove_stale_device",
        "bad_input_is_refused",
        "kill9_under_fio_verify",
        "sigterm_under_load",
        "one_mib_request_is_one_request",
        "odirect_misaligned_verify",
    ];
    for name in run.verdicts.keys() {
        assert!(known.contains(&name.as_str()), "guest test {name} has no #[test] here");
    }
}
