//! Paths a caller hands us (staging and target paths): absolute and already normal, so that
//! what we mount, unmount and record is the path kubelet means and nothing outside it.

use std::path::{Component, Path, PathBuf};

/// Returns `path` if it is absolute and normal: no `.` or `..` component, no empty one
/// (`//`), no trailing slash, no NUL; otherwise why not.
pub fn checked_path(field: &str, path: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err(format!("{field} is required"));
    }
    if !path.starts_with('/') {
        return Err(format!("{field} {path:?} must be an absolute path"));
    }
    if path.contains('\0') {
        return Err(format!("{field} {path:?} contains a NUL byte"));
    }
    let parsed = Path::new(path);
    let normal = parsed.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    // `components()` hides `//`, `/./` and a trailing slash: compare with the rebuilt path.
    let rebuilt: PathBuf = parsed.components().collect();
    if !normal || rebuilt.as_os_str() != parsed.as_os_str() {
        return Err(format!("{field} {path:?} must be a normalised path (no '.', '..', '//' or trailing '/')"));
    }
    Ok(rebuilt)
}

#[cfg(test)]
mod tests {
    use super::checked_path;

    #[test]
    fn only_absolute_normal_paths_pass() {
        let ok = "/var/lib/kubelet/plugins/kubernetes.io/csi/vduse.csi.dev/abc/globalmount";
        assert_eq!(checked_path("staging_target_path", ok).as_deref(), Ok(std::path::Path::new(ok)));
        for bad in [
            "",
            "relative/path",
            "/var/lib/kubelet/../../etc",
            "/var/lib/kubelet/pods/..",
            "/var/./lib",
            "/var//lib",
            "/var/lib/",
            "/var/l\0ib",
        ] {
            assert!(checked_path("target_path", bad).is_err(), "{bad:?} accepted");
        }
        assert!(checked_path("target_path", "/").is_ok());
    }
}
