//! Safe handles over librados and librbd: a cluster connection, a pool's I/O context and an
//! open image, with the administrative calls the CSI controller and the node make.
//!
//! Every handle is closed when dropped, in dependency order (an image keeps its pool, a pool
//! its cluster, through `Arc`s). librados and librbd handles are thread-safe, so the types are
//! `Send + Sync`; an image is shared by all queue workers of a device, because a second handle
//! in the same process would contend for the image's exclusive lock.

use std::ffi::{CStr, CString, c_char, c_int};
use std::io;
use std::ptr;
use std::sync::Arc;

use super::sys;
use super::{ClusterConfig, Error, Result};

/// Turns a librados/librbd return value (negative errno on failure) into a result.
pub(super) fn check(op: &'static str, ret: c_int) -> Result<c_int> {
    if ret < 0 { Err(Error::Call { op, source: io::Error::from_raw_os_error(-ret) }) } else { Ok(ret) }
}

fn cstring(what: &'static str, value: &str) -> Result<CString> {
    CString::new(value).map_err(|_| Error::Nul { what })
}

/// A string a librados/librbd call writes into our buffer: `call(buf, len)` with room for
/// `*len` bytes. `ERANGE` (with the size needed in `len`) or `ENAMETOOLONG` grow the buffer;
/// `ENOENT` is `None`.
fn read_string(op: &'static str, mut call: impl FnMut(*mut c_char, &mut usize) -> c_int) -> Result<Option<String>> {
    let mut buf = vec![0u8; 256];
    loop {
        let mut len = buf.len();
        match call(buf.as_mut_ptr().cast::<c_char>(), &mut len) {
            r if r == -libc::ENOENT => return Ok(None),
            r if (r == -libc::ERANGE || r == -libc::ENAMETOOLONG) && buf.len() < 1 << 20 => {
                let grown = len.max(buf.len() * 2);
                buf.resize(grown, 0);
            }
            r => {
                check(op, r)?;
                let value = CStr::from_bytes_until_nul(&buf).map_err(|_| Error::Nul { what: "returned string" })?;
                return Ok(Some(value.to_string_lossy().into_owned()));
            }
        }
    }
}

/// A connection to one Ceph cluster.
pub struct Cluster {
    handle: sys::rados_t,
}

// SAFETY: a connected `rados_t` may be used from any thread (librados is thread-safe), and we
// only shut it down in `drop`, when no other reference exists.
unsafe impl Send for Cluster {}
// SAFETY: as above; every call through `&Cluster` is one of librados's thread-safe calls.
unsafe impl Sync for Cluster {}

/// Options the operator's `CEPH_ARGS` may change.
fn default_options() -> Vec<(&'static str, String)> {
    vec![
        ("log_to_stderr", "false".into()),
        ("err_to_stderr", "false".into()),
        // A dead monitor address must not hang a CSI call for ever.
        ("client_mount_timeout", "30".into()),
        ("rados_mon_op_timeout", "30".into()),
    ]
}

/// The options `ceph_args` sets (`--name=value` or `--name value`), as `name_with_underscores`.
fn named_options(ceph_args: &str) -> std::collections::HashSet<String> {
    ceph_args
        .split_whitespace()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).replace('-', "_"))
        .collect()
}

/// Options set after `CEPH_ARGS`: what the plugin's guarantees rest on, whatever it says.
fn enforced_options(config: &ClusterConfig) -> Vec<(&'static str, String)> {
    let mut options = vec![
        ("mon_host", config.monitors.clone()),
        // Acknowledged writes must be on the OSDs: a process killed with writes in a
        // writeback cache would lose them, and the kernel above already caches.
        ("rbd_cache", "false".into()),
        // Clones are flattened right away, so the simplest format does: no cluster-wide
        // `require-min-compat-client` needed.
        ("rbd_default_clone_format", "1".into()),
        // 0: wait for ever, as a disk does; a device's I/O must never fail because a pool
        // is slow. The control plane bounds its calls instead.
        ("rados_osd_op_timeout", config.op_timeout.map_or(0, |t| t.as_secs().max(1)).to_string()),
    ];
    // A control connection's every wait for Ceph is bounded by its timeout.
    if let Some(timeout) = config.op_timeout {
        let secs = timeout.as_secs().max(1).to_string();
        options.push(("client_mount_timeout", secs.clone()));
        options.push(("rados_mon_op_timeout", secs));
    }
    match &config.key {
        Some(key) => options.push(("key", key.clone())),
        // No key: a cluster without cephx; do not go looking for keyring files.
        None => {
            options.push(("auth_client_required", "none".into()));
            options.push(("keyring", "/dev/null".into()));
        }
    }
    options
}

impl Cluster {
    /// Connects with `config`'s monitors and credentials. The key is handed to librados in
    /// memory and never written anywhere.
    pub fn connect(config: &ClusterConfig) -> Result<Arc<Self>> {
        let cluster = Self::configured(config, &std::env::var("CEPH_ARGS").unwrap_or_default())?;
        // SAFETY: the handle is valid and configured.
        check("rados_connect", unsafe { sys::rados_connect(cluster.handle) })
            .map_err(|e| Error::Connect { monitors: config.monitors.clone(), source: Box::new(e) })?;
        Ok(Arc::new(cluster))
    }

    /// A handle configured but not connected: our defaults unless `ceph_args` (the operator's
    /// `CEPH_ARGS`, e.g. `--debug-rbd=20 --log-file=...` for a diagnosis) names them, then
    /// `ceph_args`, then the options nothing may change ([`enforced_options`]).
    fn configured(config: &ClusterConfig, ceph_args: &str) -> Result<Self> {
        let user = cstring("user", &config.user)?;
        let mut handle: sys::rados_t = ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer and `user` a NUL-terminated string that
        // outlives the call.
        check("rados_create", unsafe { sys::rados_create(&mut handle, user.as_ptr()) })?;
        // From here on `drop` shuts the handle down, whatever fails next.
        let cluster = Self { handle };
        // An option set through the API outranks the command line in librados, so a default
        // the operator names is left to the operator.
        let named = named_options(ceph_args);
        let defaults: Vec<_> = default_options().into_iter().filter(|(name, _)| !named.contains(*name)).collect();
        cluster.set_options(&defaults)?;
        // librados skips the first argument, as a program's name.
        let args = std::iter::once("vduse-csi")
            .chain(ceph_args.split_whitespace())
            .map(|a| cstring("CEPH_ARGS", a))
            .collect::<Result<Vec<_>>>()?;
        let mut argv: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
        // SAFETY: the handle is valid and not connected; `argv` holds `argv.len()` pointers to
        // NUL-terminated strings (`args`) that outlive the call.
        check("rados_conf_parse_argv", unsafe {
            sys::rados_conf_parse_argv(cluster.handle, argv.len() as c_int, argv.as_mut_ptr())
        })?;
        cluster.set_options(&enforced_options(config))?;
        Ok(cluster)
    }

    fn set_options(&self, options: &[(&'static str, String)]) -> Result<()> {
        for (name, value) in options {
            let (n, v) = (cstring("option name", name)?, cstring(name, value)?);
            // SAFETY: both strings are NUL-terminated and outlive the call; the handle is
            // valid and not connected yet.
            check("rados_conf_set", unsafe { sys::rados_conf_set(self.handle, n.as_ptr(), v.as_ptr()) })?;
        }
        Ok(())
    }

    /// This client's addresses (`ip:port/nonce`, or a `[v2:...,v1:...]` list): what an
    /// image's lock records as its owner when this client holds it.
    pub fn address(&self) -> Result<String> {
        let mut addrs: *mut c_char = ptr::null_mut();
        // SAFETY: the cluster is connected; `addrs` is an out-pointer librados fills with a
        // string it allocates with malloc.
        check("rados_getaddrs", unsafe { sys::rados_getaddrs(self.handle, &mut addrs) })?;
        if addrs.is_null() {
            return Ok(String::new());
        }
        // SAFETY: librados wrote a NUL-terminated string at `addrs`.
        let text = unsafe { CStr::from_ptr(addrs) }.to_string_lossy().into_owned();
        // SAFETY: the string came from librados's malloc and is freed once, here.
        unsafe { libc::free(addrs.cast()) };
        Ok(text)
    }

    /// The value of configuration option `name`.
    pub fn option(&self, name: &str) -> Result<String> {
        let n = cstring("option name", name)?;
        read_string("rados_conf_get", |buf, len| {
            // SAFETY: the handle is valid, `n` outlives the call and `buf` has `*len` writable
            // bytes; librados does not change `len` (it fails with ENAMETOOLONG when short).
            unsafe { sys::rados_conf_get(self.handle, n.as_ptr(), buf, *len) }
        })?
        .ok_or(Error::Call { op: "rados_conf_get", source: io::Error::from_raw_os_error(libc::ENOENT) })
    }

    /// An I/O context on the pool named `name`.
    pub fn pool(self: &Arc<Self>, name: &str) -> Result<Pool> {
        let cname = cstring("pool", name)?;
        let mut io: sys::rados_ioctx_t = ptr::null_mut();
        // SAFETY: the cluster is connected, `cname` outlives the call, `io` is an out-pointer.
        check("rados_ioctx_create", unsafe { sys::rados_ioctx_create(self.handle, cname.as_ptr(), &mut io) })
            .map_err(|e| e.context(format!("pool {name}")))?;
        Ok(Pool { cluster: Arc::clone(self), io })
    }

    /// An I/O context on the pool with ID `id`.
    pub fn pool_by_id(self: &Arc<Self>, id: i64) -> Result<Pool> {
        let mut io: sys::rados_ioctx_t = ptr::null_mut();
        // SAFETY: the cluster is connected and `io` is an out-pointer.
        check("rados_ioctx_create2", unsafe { sys::rados_ioctx_create2(self.handle, id, &mut io) })
            .map_err(|e| e.context(format!("pool id {id}")))?;
        Ok(Pool { cluster: Arc::clone(self), io })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rados_create`; every pool and image holds an `Arc` of
        // the cluster, so none is left when this runs.
        unsafe { sys::rados_shutdown(self.handle) }
    }
}

/// A pool's I/O context.
pub struct Pool {
    /// Keeps the connection up while the pool is in use.
    cluster: Arc<Cluster>,
    io: sys::rados_ioctx_t,
}

// SAFETY: a `rados_ioctx_t` may be used from several threads at once for the calls we make
// (image create/open/remove, which do not change the context's snapshot or namespace state).
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

/// Features of the images we create: layering (clones), exclusive-lock (one writer), object-map
/// and fast-diff (cheap flatten, size and diff), deep-flatten (a flattened clone owes its
/// parent nothing, snapshots included).
const IMAGE_FEATURES: u64 = (sys::RBD_FEATURE_LAYERING
    | sys::RBD_FEATURE_EXCLUSIVE_LOCK
    | sys::RBD_FEATURE_OBJECT_MAP
    | sys::RBD_FEATURE_FAST_DIFF
    | sys::RBD_FEATURE_DEEP_FLATTEN) as u64;

impl Pool {
    /// The connection this pool is reached through.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The pool's numeric ID (stable for the pool's life, unlike its name).
    pub fn id(&self) -> i64 {
        // SAFETY: the context is valid.
        unsafe { sys::rados_ioctx_get_id(self.io) }
    }

    /// Creates an image of `size` bytes; an existing one is an error (`EEXIST`).
    pub fn create_image(&self, name: &str, size: u64) -> Result<()> {
        let cname = cstring("image", name)?;
        let mut order: c_int = 0;
        // SAFETY: the context is valid, `cname` outlives the call, `order` is an in/out
        // pointer (0: the default object size).
        check("rbd_create2", unsafe { sys::rbd_create2(self.io, cname.as_ptr(), size, IMAGE_FEATURES, &mut order) })
            .map_err(|e| e.context(format!("image {name}")))?;
        Ok(())
    }

    /// Removes an image; `ENOENT` if there is none, `EBUSY` while a client has it open,
    /// `ENOTEMPTY` while it has snapshots.
    pub fn remove_image(&self, name: &str) -> Result<()> {
        let cname = cstring("image", name)?;
        // SAFETY: the context is valid and `cname` outlives the call.
        check("rbd_remove", unsafe { sys::rbd_remove(self.io, cname.as_ptr()) })
            .map_err(|e| e.context(format!("image {name}")))?;
        Ok(())
    }

    /// Clones `parent@snap` (in this pool) as `child` (a protected snapshot is required).
    pub fn clone_image(&self, parent: &str, snap: &str, child: &str) -> Result<()> {
        let (p, s, c) = (cstring("image", parent)?, cstring("snapshot", snap)?, cstring("image", child)?);
        let mut order: c_int = 0;
        // SAFETY: the context is valid for parent and child (one pool); the strings outlive
        // the call; `order` is an in/out pointer.
        check("rbd_clone", unsafe {
            sys::rbd_clone(self.io, p.as_ptr(), s.as_ptr(), self.io, c.as_ptr(), IMAGE_FEATURES, &mut order)
        })
        .map_err(|e| e.context(format!("clone {parent}@{snap} as {child}")))?;
        Ok(())
    }

    /// The pool's metadata `key` (librbd's key/value store of the pool), `None` if unset.
    pub fn metadata(&self, key: &str) -> Result<Option<String>> {
        let ckey = cstring("metadata key", key)?;
        read_string("rbd_pool_metadata_get", |buf, len| {
            // SAFETY: the context is valid, `ckey` outlives the call, `buf` has `*len`
            // writable bytes and `len` is an in/out pointer.
            unsafe { sys::rbd_pool_metadata_get(self.io, ckey.as_ptr(), buf, len) }
        })
    }

    pub fn set_metadata(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (cstring("metadata key", key)?, cstring("metadata value", value)?);
        // SAFETY: the context is valid and both strings outlive the call.
        check("rbd_pool_metadata_set", unsafe { sys::rbd_pool_metadata_set(self.io, k.as_ptr(), v.as_ptr()) })?;
        Ok(())
    }

    /// Removes the pool's metadata `key`; an unset key is not an error.
    pub fn remove_metadata(&self, key: &str) -> Result<()> {
        let k = cstring("metadata key", key)?;
        // SAFETY: the context is valid and `k` outlives the call.
        match unsafe { sys::rbd_pool_metadata_remove(self.io, k.as_ptr()) } {
            r if r == -libc::ENOENT => Ok(()),
            r => check("rbd_pool_metadata_remove", r).map(drop),
        }
    }

    /// Opens an image for I/O and administration.
    pub fn open(self: &Arc<Self>, name: &str) -> Result<Image> {
        let cname = cstring("image", name)?;
        let mut image: sys::rbd_image_t = ptr::null_mut();
        // SAFETY: the context is valid, `cname` outlives the call, `image` is an out-pointer;
        // a null snapshot name opens the image's head.
        check("rbd_open", unsafe { sys::rbd_open(self.io, cname.as_ptr(), &mut image, ptr::null()) })
            .map_err(|e| e.context(format!("image {name}")))?;
        Ok(Image { _pool: Arc::clone(self), handle: image, name: name.to_owned() })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the context came from `rados_ioctx_create*`; every image holds an `Arc` of
        // its pool, so none is open when this runs.
        unsafe { sys::rados_ioctx_destroy(self.io) }
    }
}

/// A snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub name: String,
    pub size: u64,
    /// Creation time, seconds and nanoseconds since the epoch.
    pub created: (i64, i32),
}

/// An open image.
pub struct Image {
    _pool: Arc<Pool>,
    pub(crate) handle: sys::rbd_image_t,
    name: String,
}

// SAFETY: librbd image handles are internally locked; every call we make through `&Image`
// (I/O submission, size, snapshots, locks) may run concurrently from several threads.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Size in bytes.
    pub fn size(&self) -> Result<u64> {
        let mut size = 0u64;
        // SAFETY: the image is open and `size` an out-pointer.
        check("rbd_get_size", unsafe { sys::rbd_get_size(self.handle, &mut size) })?;
        Ok(size)
    }

    /// Resizes the image (librbd forwards it to the exclusive lock's owner if another client
    /// holds it).
    pub fn resize(&self, bytes: u64) -> Result<()> {
        // SAFETY: the image is open.
        check("rbd_resize", unsafe { sys::rbd_resize(self.handle, bytes) })?;
        Ok(())
    }

    /// Copies every block the parent provides into this clone, which then owes it nothing.
    pub fn flatten(&self) -> Result<()> {
        // SAFETY: the image is open.
        check("rbd_flatten", unsafe { sys::rbd_flatten(self.handle) })?;
        Ok(())
    }

    /// Whether the image is a clone that still reads from its parent (not flattened yet).
    pub fn has_parent(&self) -> Result<bool> {
        Ok(self.parent()?.is_some())
    }

    /// The parent of a clone not flattened yet: its pool ID, image name and snapshot name.
    pub fn parent(&self) -> Result<Option<(i64, String, String)>> {
        // SAFETY: a plain C struct for which all-zero is a valid (empty) value.
        let mut image: sys::rbd_linked_image_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: the same, for the snapshot's spec.
        let mut snap: sys::rbd_snap_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: the image is open; `image` and `snap` are out-pointers that librbd fills
        // with strings it allocates, freed below.
        match unsafe { sys::rbd_get_parent(self.handle, &mut image, &mut snap) } {
            r if r == -libc::ENOENT => Ok(None),
            r => {
                check("rbd_get_parent", r)?;
                let text = |p: *mut c_char| {
                    if p.is_null() {
                        String::new()
                    } else {
                        // SAFETY: librbd filled the spec with NUL-terminated strings.
                        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
                    }
                };
                let parent = (image.pool_id, text(image.image_name), text(snap.name));
                // SAFETY: librbd filled both specs; each is cleaned up once.
                unsafe {
                    sys::rbd_linked_image_spec_cleanup(&mut image);
                    sys::rbd_snap_spec_cleanup(&mut snap);
                }
                Ok(Some(parent))
            }
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        // SAFETY: the image is open.
        check("rbd_flush", unsafe { sys::rbd_flush(self.handle) })?;
        Ok(())
    }

    /// The value of metadata `key`, `None` if unset.
    pub fn metadata(&self, key: &str) -> Result<Option<String>> {
        let ckey = cstring("metadata key", key)?;
        read_string("rbd_metadata_get", |buf, len| {
            // SAFETY: the image is open, `ckey` outlives the call, `buf` has `*len` writable
            // bytes and `len` is an in/out pointer.
            unsafe { sys::rbd_metadata_get(self.handle, ckey.as_ptr(), buf, len) }
        })
    }

    pub fn set_metadata(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (cstring("metadata key", key)?, cstring("metadata value", value)?);
        // SAFETY: the image is open and both strings outlive the call.
        check("rbd_metadata_set", unsafe { sys::rbd_metadata_set(self.handle, k.as_ptr(), v.as_ptr()) })?;
        Ok(())
    }

    /// The image's snapshots.
    pub fn snapshots(&self) -> Result<Vec<SnapInfo>> {
        let mut cap = 16usize;
        loop {
            let mut snaps: Vec<sys::rbd_snap_info_t> = Vec::with_capacity(cap);
            let mut max = cap as c_int;
            // SAFETY: `snaps` has room for `max` entries; librbd fills at most that many and
            // returns their count, or -ERANGE with the count it needs in `max`.
            let ret = unsafe { sys::rbd_snap_list(self.handle, snaps.as_mut_ptr(), &mut max) };
            if ret == -libc::ERANGE {
                cap = (max as usize).max(cap * 2);
                continue;
            }
            let count = check("rbd_snap_list", ret)? as usize;
            // SAFETY: librbd initialised `count` entries, plus a terminating one it may have
            // written (within capacity, which `set_len` does not cover).
            unsafe { snaps.set_len(count) };
            let mut out = Vec::with_capacity(count);
            for s in &snaps {
                // SAFETY: each entry's name is a NUL-terminated string owned by the list until
                // `rbd_snap_list_end`.
                let name = unsafe { CStr::from_ptr(s.name) }.to_string_lossy().into_owned();
                let mut ts = sys::timespec { tv_sec: 0, tv_nsec: 0 };
                // SAFETY: the image is open and `ts` an out-pointer.
                let ret = unsafe { sys::rbd_snap_get_timestamp(self.handle, s.id, &mut ts) };
                let created = if ret < 0 { (0, 0) } else { (ts.tv_sec, ts.tv_nsec as i32) };
                out.push(SnapInfo { name, size: s.size, created });
            }
            // SAFETY: frees the names of the entries librbd filled in; called once.
            unsafe { sys::rbd_snap_list_end(snaps.as_mut_ptr()) };
            return Ok(out);
        }
    }

    /// Takes a snapshot (crash-consistent: librbd has the lock's owner take it if another
    /// client writes the image).
    pub fn create_snapshot(&self, snap: &str) -> Result<()> {
        let s = cstring("snapshot", snap)?;
        // SAFETY: the image is open and `s` outlives the call.
        check("rbd_snap_create", unsafe { sys::rbd_snap_create(self.handle, s.as_ptr()) })
            .map_err(|e| e.context(format!("snapshot {}@{snap}", self.name)))?;
        Ok(())
    }

    pub fn remove_snapshot(&self, snap: &str) -> Result<()> {
        let s = cstring("snapshot", snap)?;
        // SAFETY: the image is open and `s` outlives the call.
        check("rbd_snap_remove", unsafe { sys::rbd_snap_remove(self.handle, s.as_ptr()) })
            .map_err(|e| e.context(format!("snapshot {}@{snap}", self.name)))?;
        Ok(())
    }

    /// Protects a snapshot so it can be cloned; protecting a protected one is not an error.
    pub fn protect_snapshot(&self, snap: &str) -> Result<()> {
        let s = cstring("snapshot", snap)?;
        // SAFETY: the image is open and `s` outlives the call.
        match unsafe { sys::rbd_snap_protect(self.handle, s.as_ptr()) } {
            r if r == -libc::EBUSY => Ok(()),
            r => check("rbd_snap_protect", r).map(drop),
        }
    }

    /// Unprotects a snapshot; `EBUSY` while a clone still depends on it.
    pub fn unprotect_snapshot(&self, snap: &str) -> Result<()> {
        let s = cstring("snapshot", snap)?;
        let mut protected: c_int = 0;
        // SAFETY: the image is open, `s` outlives the call, `protected` is an out-pointer.
        check("rbd_snap_is_protected", unsafe { sys::rbd_snap_is_protected(self.handle, s.as_ptr(), &mut protected) })?;
        if protected == 0 {
            return Ok(());
        }
        // SAFETY: as above.
        check("rbd_snap_unprotect", unsafe { sys::rbd_snap_unprotect(self.handle, s.as_ptr()) })?;
        Ok(())
    }

    /// Takes the exclusive lock and keeps it: librbd then refuses other clients' requests
    /// to hand it over, so their writes fail, until this handle is closed. A lock held by a
    /// dead client (no watch on the image) is broken, and that client blocklisted, on the
    /// way; a live holder makes this fail with `EROFS` or `EBUSY`.
    pub fn lock_exclusive(&self) -> Result<()> {
        // SAFETY: the image is open.
        check("rbd_lock_acquire", unsafe { sys::rbd_lock_acquire(self.handle, sys::RBD_LOCK_MODE_EXCLUSIVE) })
            .map_err(|e| e.context(format!("exclusive lock of image {}", self.name)))?;
        Ok(())
    }

    /// The addresses of the clients holding the image's lock (empty when unlocked).
    pub fn lock_owners(&self) -> Result<Vec<String>> {
        let mut mode: sys::rbd_lock_mode_t = sys::RBD_LOCK_MODE_EXCLUSIVE;
        let mut owners: [*mut c_char; 8] = [ptr::null_mut(); 8];
        let mut count = owners.len();
        // SAFETY: `owners` has room for `count` pointers, which librbd fills with strings it
        // allocates; `mode` and `count` are out-pointers.
        match unsafe { sys::rbd_lock_get_owners(self.handle, &mut mode, owners.as_mut_ptr(), &mut count) } {
            r if r == -libc::ENOENT => return Ok(Vec::new()),
            r => check("rbd_lock_get_owners", r)?,
        };
        let list = owners[..count.min(owners.len())]
            .iter()
            // SAFETY: librbd wrote `count` NUL-terminated strings.
            .map(|p| unsafe { CStr::from_ptr(*p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: frees the `count` strings librbd allocated above, once.
        unsafe { sys::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), count) };
        Ok(list)
    }

    /// Breaks `owner`'s exclusive lock and blocklists that client, so nothing it still has in
    /// flight can land afterwards.
    pub fn break_lock(&self, owner: &str) -> Result<()> {
        let o = cstring("lock owner", owner)?;
        // SAFETY: the image is open and `o` outlives the call.
        check("rbd_lock_break", unsafe { sys::rbd_lock_break(self.handle, sys::RBD_LOCK_MODE_EXCLUSIVE, o.as_ptr()) })
            .map_err(|e| e.context(format!("break the lock of {owner} on image {}", self.name)))?;
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rbd_open` and no I/O is in flight: queue engines hold
        // an `Arc` of the image and reap everything before they drop it.
        let ret = unsafe { sys::rbd_close(self.handle) };
        if ret < 0 {
            tracing::warn!(image = %self.name, error = %io::Error::from_raw_os_error(-ret), "rbd_close failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(op_timeout: Option<std::time::Duration>) -> ClusterConfig {
        ClusterConfig { monitors: "127.0.0.1:1".into(), user: "kubernetes".into(), key: None, op_timeout }
    }

    /// The first number of an option's value ("20/20", "30.000000").
    fn number(cluster: &Cluster, name: &str) -> f64 {
        let value = cluster.option(name).expect("option");
        let digits: String = value.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        digits.parse().unwrap_or_else(|_| panic!("{name} = {value:?}"))
    }

    #[test]
    fn ceph_args_tune_but_cannot_undo_what_the_plugin_relies_on() {
        let args =
            "--rbd_cache=true --rados_osd_op_timeout=5 --mon_host=10.9.9.9 --debug_rbd=20 --client-mount-timeout=7";
        let data = Cluster::configured(&config(None), args).expect("configured");
        assert_eq!(data.option("rbd_cache").expect("rbd_cache"), "false");
        assert_eq!(number(&data, "rados_osd_op_timeout"), 0.0, "a device's I/O waits for ever");
        assert_eq!(data.option("mon_host").expect("mon_host"), "127.0.0.1:1");
        assert_eq!(number(&data, "debug_rbd"), 20.0, "diagnosis options pass");
        assert_eq!(number(&data, "client_mount_timeout"), 7.0, "defaults may be tuned");
        let control = Cluster::configured(&config(Some(std::time::Duration::from_secs(12))), "").expect("configured");
        assert_eq!(number(&control, "rados_osd_op_timeout"), 12.0);
        assert_eq!(number(&control, "client_mount_timeout"), 12.0, "a control connection waits no longer");
        assert_eq!(number(&control, "rados_mon_op_timeout"), 12.0);
        assert_eq!(control.option("auth_client_required").expect("auth"), "none");
    }
}
