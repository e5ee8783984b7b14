//! Kernel tests of `vduse-csi device serve` in a throwaway QEMU guest with VDUSE.
//!
//! The host kernel of a build machine usually has no VDUSE, so every test here shares one
//! guest boot (tests/guest/run.sh, DESIGN.md "Testing on a real kernel"): the first test to run
//! boots it and runs tests/guest/device-tests.sh inside; each test then checks its own verdict.
//! A missing QEMU, kernel or guest failure fails every test loudly; nothing is skipped.

mod verdicts;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use verdicts::Verdicts;

fn guest_run() -> &'static Result<Verdicts, String> {
    static RUN: OnceLock<Result<Verdicts, String>> = OnceLock::new();
    RUN.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = repo.join("target/guest/device-tests");
        let _ = std::fs::remove_dir_all(&out);
        let mut command = Command::new(repo.join("tests/guest/run.sh"));
        command
            .arg(repo.join("tests/guest/device-tests.sh"))
            .arg(&out)
            .env("VDUSE_CSI_BIN", env!("CARGO_BIN_EXE_vduse-csi"))
            .env("GUEST_ENV", "VDUSE_CSI_BIN")
            .env("GUEST_QUIET", "1");
        verdicts::collect(command, &out)
    })
}

fn check(name: &str) {
    verdicts::check(guest_run(), name);
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
fn first_reads_of_a_fresh_odirect_device_return_the_image() {
    check("odirect_first_reads");
}

#[test]
fn own_bounce_pages_are_pinned_verify_and_survive_sigkill() {
    check("own_bounce_pages");
}

#[test]
fn every_guest_test_has_a_host_check() {
    // A test added to device-tests.sh without a check here would run unseen.
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
        "odirect_first_reads",
        "own_bounce_pages",
        "metrics_match_fio",
        "qos_limits_hold",
        "irq_bound_to_one_cpu",
    ];
    verdicts::all_known(guest_run(), &known);
}

#[test]
fn metrics_count_what_fio_did() {
    check("metrics_match_fio");
}

#[test]
fn one_queue_interrupt_is_bound_to_one_cpu_through_takeover() {
    check("irq_bound_to_one_cpu");
}

#[test]
fn qos_limits_hold_and_leave_other_devices_free() {
    check("qos_limits_hold");
}
