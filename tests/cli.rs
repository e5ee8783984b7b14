//! Host-side checks of the command line that need no kernel support.

use std::process::Command;

fn vduse_csi(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vduse-csi")).args(args).output().expect("run vduse-csi");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn absent_image_without_size_is_refused_and_nothing_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("absent.img");
    let (ok, _, err) = vduse_csi(&["device", "serve", "--image", image.to_str().expect("utf-8")]);
    assert!(!ok);
    assert!(err.contains("does not exist; pass --size"), "{err}");
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
    assert!(!image.exists());
}

#[test]
fn missing_vduse_says_what_to_load() {
    if std::path::Path::new("/dev/vduse/control").exists() {
        // This host has VDUSE: the guest tests cover serving; here there is nothing to check.
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("new.img");
    let (ok, _, err) = vduse_csi(&["device", "serve", "--image", image.to_str().expect("utf-8"), "--size", "1G"]);
    assert!(!ok);
    assert!(err.contains("modprobe") && err.contains("vduse"), "{err}");
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
    assert!(!image.exists(), "nothing is created when VDUSE is missing");
}

#[test]
fn bad_sizes_and_names_are_refused() {
    let (ok, _, err) = vduse_csi(&["device", "serve", "--image", "/nonexistent/x", "--size", "12Q"]);
    assert!(!ok && err.contains("suffix"), "{err}");
    let (ok, _, err) = vduse_csi(&["device", "serve", "--image", "/nonexistent/x", "--size", "1G", "--name", "../x"]);
    assert!(!ok && err.contains("invalid device name"), "{err}");
    let (ok, _, err) = vduse_csi(&["device", "remove", "a/b"]);
    assert!(!ok && err.contains("invalid device name"), "{err}");
}

#[test]
fn help_explains_every_command() {
    for args in
        [&["--help"][..], &["device", "--help"], &["device", "serve", "--help"], &["device", "remove", "--help"]]
    {
        let (ok, out, _) = vduse_csi(args);
        assert!(ok, "{args:?}");
        assert!(out.contains("Usage:"), "{out}");
    }
    let (_, out, _) = vduse_csi(&["device", "serve", "--help"]);
    for flag in ["--image", "--size", "--name", "--queues", "--queue-size", "--read-only"] {
        assert!(out.contains(flag), "serve --help lacks {flag}");
    }
}
