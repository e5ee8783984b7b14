//! Host operations for the Node service: probe, format, mount, bind, unmount, grow, statvfs.
//! External tools run with an argv, never through a shell.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

mod freeze;
mod paths;
mod signature;

pub use freeze::{Freeze, Thawed, thaw};
pub use paths::checked_path;
pub use signature::{Contents, parse_blkid_export};

/// Errors of host operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tool} failed ({status}): {stderr}")]
    Tool { tool: String, status: String, stderr: String },
    #[error("cannot run {tool}: {source}")]
    Spawn { tool: String, source: std::io::Error },
    #[error("{op} {path}: {source}")]
    Sys { op: &'static str, path: PathBuf, source: nix::Error },
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("unsupported filesystem {0:?}: use ext4 or xfs")]
    UnsupportedFs(String),
    #[error("unsupported mount flag {0:?}")]
    BadFlag(String),
    #[error("{what} did not end within {limit:?}")]
    TimedOut { what: String, limit: std::time::Duration },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Filesystems we format and grow.
pub const SUPPORTED_FS: [&str; 2] = ["ext4", "xfs"];

fn run(tool: &str, args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new(tool).args(args).output().map_err(|source| Error::Spawn { tool: tool.into(), source })?;
    Ok(out)
}

fn run_ok(tool: &str, args: &[&str]) -> Result<String> {
    let out = run(tool, args)?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool: format!("{tool} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `dev` holds: nothing blkid knows (blank), a filesystem, or another signature (a
/// partition table, an LVM or RAID member, an encrypted volume...). Like Kubernetes'
/// mount-utils, a device is blank only when low-level probing finds no signature at all.
pub fn probe(dev: &Path) -> Result<Contents> {
    let dev = dev.to_string_lossy();
    let out = run("blkid", &["-p", "-o", "export", &dev])?;
    match out.status.code() {
        Some(0) => Ok(parse_blkid_export(&String::from_utf8_lossy(&out.stdout))),
        // 2: no signature found.
        Some(2) => Ok(Contents::Blank),
        // 8: several signatures that contradict each other: certainly not blank.
        Some(8) => Ok(Contents::Other("several contradicting signatures (blkid -p: ambivalent result)".into())),
        _ => Err(Error::Tool {
            tool: format!("blkid -p {dev}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        }),
    }
}

/// Formats a blank device. Callers must have checked [`probe`] first: this never runs on a
/// device that has a signature.
pub fn mkfs(dev: &Path, fs_type: &str) -> Result<()> {
    let dev = dev.to_string_lossy();
    match fs_type {
        "ext4" => run_ok("mkfs.ext4", &["-q", "-F", &dev]).map(drop),
        "xfs" => run_ok("mkfs.xfs", &["-q", &dev]).map(drop),
        other => Err(Error::UnsupportedFs(other.into())),
    }
}

/// Splits CSI mount flags into kernel flags and filesystem data.
pub fn parse_mount_flags(flags: &[String], read_only: bool) -> Result<(MsFlags, String)> {
    let mut ms = MsFlags::empty();
    let mut data = Vec::new();
    for flag in flags.iter().flat_map(|f| f.split(',')).map(str::trim).filter(|f| !f.is_empty()) {
        match flag {
            "ro" => ms |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "noatime" => ms |= MsFlags::MS_NOATIME,
            "nodiratime" => ms |= MsFlags::MS_NODIRATIME,
            "relatime" => ms |= MsFlags::MS_RELATIME,
            "nosuid" => ms |= MsFlags::MS_NOSUID,
            "nodev" => ms |= MsFlags::MS_NODEV,
            "noexec" => ms |= MsFlags::MS_NOEXEC,
            "sync" => ms |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => ms |= MsFlags::MS_DIRSYNC,
            f if f.bytes().all(|b| b.is_ascii_alphanumeric() || b"=_-.:".contains(&b)) => data.push(f.to_owned()),
            f => return Err(Error::BadFlag(f.to_owned())),
        }
    }
    if read_only {
        ms |= MsFlags::MS_RDONLY;
    }
    Ok((ms, data.join(",")))
}

/// Mounts `dev` at `target`.
pub fn mount_fs(dev: &Path, target: &Path, fs_type: &str, flags: &[String], read_only: bool) -> Result<()> {
    let (ms, data) = parse_mount_flags(flags, read_only)?;
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(Some(dev), target, Some(fs_type), ms, data).map_err(|source| Error::Sys {
        op: "mount",
        path: target.into(),
        source,
    })
}

/// Bind-mounts `source` onto `target`, read-only if asked (which takes a remount).
pub fn bind_mount(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| Error::Sys {
        op: "bind mount",
        path: target.into(),
        source: e,
    })?;
    if read_only {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            let _ = umount2(target, MntFlags::empty());
            return Err(Error::Sys { op: "remount read-only", path: target.into(), source: e });
        }
    }
    Ok(())
}

/// Unmounts `target` if something is mounted there.
pub fn unmount(target: &Path) -> Result<()> {
    while mount_at(target)?.is_some() {
        umount2(target, MntFlags::empty()).map_err(|source| Error::Sys {
            op: "unmount",
            path: target.into(),
            source,
        })?;
    }
    Ok(())
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted device.
    pub dev: String,
    pub mount_point: PathBuf,
    pub options: String,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Whether a block device `major:minor` still exists.
pub fn device_present(dev: &str) -> bool {
    Path::new("/sys/dev/block").join(dev).exists()
}

/// Detaches whatever is mounted at `target` at once (MNT_DETACH); the kernel finishes the
/// unmount when the last user goes. For mounts whose device is gone and cannot be flushed.
pub fn detach_mount(target: &Path) -> Result<()> {
    umount2(target, MntFlags::MNT_DETACH).map_err(|source| Error::Sys {
        op: "detach mount",
        path: target.into(),
        source,
    })
}

fn unescape(field: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = String::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = u8::from_str_radix(&field[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(v as char);
            i += 4;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                dev: l.get(2)?.to_string(),
                mount_point: PathBuf::from(unescape(l.get(4)?)),
                options: l.get(5)?.to_string(),
                fs_type: r.first()?.to_string(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

/// The topmost mount at `path`, if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(|source| Error::Io {
        op: "read",
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    Ok(parse_mountinfo(&text).into_iter().rev().find(|m| m.mount_point == path))
}

/// `major:minor` of a block device node.
pub fn device_number(dev: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dev).map_err(|source| Error::Io { op: "stat", path: dev.into(), source })?;
    let rdev = meta.rdev();
    Ok(format!("{}:{}", nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)))
}

/// Grows the filesystem mounted at `mount_point` on `dev` to fill the device.
pub fn grow_fs(dev: &Path, mount_point: &Path, fs_type: &str) -> Result<()> {
    match fs_type {
        "ext4" => run_ok("resize2fs", &[&dev.to_string_lossy()]).map(drop),
        "xfs" => run_ok("xfs_growfs", &[&mount_point.to_string_lossy()]).map(drop),
        other => Err(Error::UnsupportedFs(other.into())),
    }
}

/// Writes out everything cached for the filesystem that holds `path` (syncfs).
pub fn sync_fs(path: &Path) -> Result<()> {
    let dir = fs::File::open(path).map_err(|source| Error::Io { op: "open", path: path.to_owned(), source })?;
    nix::unistd::syncfs(&dir).map_err(|e| Error::Io { op: "syncfs", path: path.to_owned(), source: e.into() })
}

/// Like [`sync_fs`], but in a child process (`sync --file-system`), waited for up to `limit`.
/// A syncfs whose device does not answer sleeps uninterruptibly, and a process with such a
/// thread cannot even exit; the child takes that wait instead, and is left to it.
pub fn sync_fs_within(path: &Path, limit: std::time::Duration) -> Result<()> {
    let tool = "sync";
    let mut child = Command::new(tool)
        .arg("--file-system")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|source| Error::Spawn { tool: tool.into(), source })?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(Error::Tool {
                    tool: format!("sync --file-system {}", path.display()),
                    status: status.to_string(),
                    stderr: String::new(),
                });
            }
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Ok(None) => return Err(Error::TimedOut { what: format!("syncfs of {}", path.display()), limit }),
            Err(source) => return Err(Error::Io { op: "wait for sync of", path: path.to_owned(), source }),
        }
    }
}

/// Size of a block device in bytes, from sysfs.
pub fn block_device_size(dev: &Path) -> Result<u64> {
    let name = dev.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let path = PathBuf::from(format!("/sys/class/block/{name}/size"));
    let text = fs::read_to_string(&path).map_err(|source| Error::Io { op: "read", path: path.clone(), source })?;
    text.trim().parse::<u64>().map(|s| s * 512).map_err(|e| Error::Io {
        op: "parse",
        path,
        source: std::io::Error::other(e),
    })
}

/// Space and inode usage of the filesystem holding `path`.
#[derive(Debug, Clone, Copy)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

pub fn fs_usage(path: &Path) -> Result<FsUsage> {
    let st =
        nix::sys::statvfs::statvfs(path).map_err(|source| Error::Sys { op: "statvfs", path: path.into(), source })?;
    let frag = st.fragment_size() as u64;
    let total = st.blocks() as u64 * frag;
    let free = st.blocks_free() as u64 * frag;
    Ok(FsUsage {
        total_bytes: total,
        available_bytes: st.blocks_available() as u64 * frag,
        used_bytes: total.saturating_sub(free),
        total_inodes: st.files() as u64,
        free_inodes: st.files_free() as u64,
        used_inodes: (st.files() as u64).saturating_sub(st.files_free() as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_parsed_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext4 /dev/vda rw,errors=continue\n\
                    37 35 253:1 / /var/lib/kubelet/x ro,relatime shared:2 - xfs /dev/vdb ro\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].dev, "98:0");
        assert_eq!(m[0].fs_type, "ext4");
        assert!(!m[0].read_only());
        assert!(m[1].read_only());
        assert_eq!(m[1].source, "/dev/vdb");
    }

    #[test]
    fn mount_flags_are_split_and_checked() {
        let (ms, data) = parse_mount_flags(&["noatime,discard".into(), "nodev".into()], true).expect("flags");
        assert!(ms.contains(MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_RDONLY));
        assert_eq!(data, "discard");
        assert!(parse_mount_flags(&["bad flag;rm".into()], false).is_err());
    }
}
