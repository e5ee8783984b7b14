//! Attach and detach through the `vdpa` generic-netlink family (VDUSE.md §2).
//!
//! `VDPA_CMD_DEV_NEW` probes virtio_vdpa → virtio_blk synchronously: the call returns only
//! after the kernel has read the partition table through our datapath, so callers must have the
//! message loop and the queue workers running on other threads before they attach. The family
//! exists only in the initial network namespace and needs CAP_NET_ADMIN.

use neli::consts::nl::NlmF;
use neli::consts::socket::NlFamily;
use neli::err::RouterError;
use neli::genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, NlattrBuilder};
use neli::nl::NlPayload;
use neli::router::synchronous::NlRouter;
use neli::types::GenlBuffer;
use neli::utils::Groups;

use super::{Error, Result, validate_device_name};

const VDPA_GENL_NAME: &str = "vdpa";
const VDPA_GENL_VERSION: u8 = 1;
/// The management device VDUSE registers on the vdpa bus.
const VDUSE_MGMTDEV: &str = "vduse";

use wire::{VdpaAttr, VdpaCmd};

/// Wire enums. In their own module because `neli_enum` expands to code that names `Result`
/// unqualified, which must be the std one.
mod wire {
    use neli::neli_enum;

    /// `enum vdpa_command` (include/uapi/linux/vdpa.h).
    #[neli_enum(serialized_type = "u8")]
    pub enum VdpaCmd {
        Unspec = 0,
        DevNew = 3,
        DevDel = 4,
    }
    impl neli::consts::genl::Cmd for VdpaCmd {}

    /// `enum vdpa_attr`, the attributes we send.
    #[neli_enum(serialized_type = "u16")]
    pub enum VdpaAttr {
        Unspec = 0,
        MgmtdevDevName = 2,
        DevName = 4,
    }
    impl neli::consts::genl::NlAttrType for VdpaAttr {}
}

/// Creates vdpa device `name` on the VDUSE management device (`vdpa dev add name NAME
/// mgmtdev vduse`). Blocks until the host driver has probed the device.
pub fn dev_add(name: &str) -> Result<()> {
    // No bus name: the vduse management device has none, and sending one makes the kernel's
    // lookup fail with ENODEV.
    request("DEV_NEW", name, VdpaCmd::DevNew, &[(VdpaAttr::DevName, name), (VdpaAttr::MgmtdevDevName, VDUSE_MGMTDEV)])
}

/// Deletes vdpa device `name` (`vdpa dev del NAME`). Blocks while the host driver drains I/O
/// and resets the device, which needs our message loop and datapath.
pub fn dev_del(name: &str) -> Result<()> {
    request("DEV_DEL", name, VdpaCmd::DevDel, &[(VdpaAttr::DevName, name)])
}

fn request(op: &'static str, name: &str, cmd: VdpaCmd, attrs: &[(VdpaAttr, &str)]) -> Result<()> {
    validate_device_name(name)?;
    let fail = |reason: String| Error::Netlink { op, name: name.to_owned(), reason };
    let (router, _) = NlRouter::connect(NlFamily::Generic, Some(0), Groups::empty())
        .map_err(|e| fail(format!("cannot open a generic netlink socket: {e}")))?;
    let family = router.resolve_genl_family(VDPA_GENL_NAME).map_err(|e| {
        fail(format!(
            "the vdpa netlink family is not available ({e}): load the `vdpa` module and run in the host network namespace"
        ))
    })?;
    let mut buffer = GenlBuffer::new();
    for (attr, value) in attrs {
        let nla = NlattrBuilder::default()
            .nla_type(AttrTypeBuilder::default().nla_type(*attr).build().map_err(|e| fail(e.to_string()))?)
            .nla_payload(*value)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        buffer.push(nla);
    }
    let msg = GenlmsghdrBuilder::default()
        .cmd(cmd)
        .version(VDPA_GENL_VERSION)
        .attrs(buffer)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let replies = router
        .send::<_, _, u16, Genlmsghdr<VdpaCmd, VdpaAttr>>(family, NlmF::ACK, NlPayload::Payload(msg))
        .map_err(|e| fail(e.to_string()))?;
    for reply in replies {
        if let Err(e) = reply {
            return Err(fail(describe(&e)));
        }
    }
    Ok(())
}

/// Turns a netlink error into something an operator can act on.
fn describe<T, P>(e: &RouterError<T, P>) -> String
where
    RouterError<T, P>: std::fmt::Display,
{
    if let RouterError::Nlmsgerr(err) = e {
        let errno = -*err.error();
        let hint = match errno {
            libc::EPERM => " (CAP_NET_ADMIN in the initial network namespace is required)",
            libc::ENODEV => " (is the vduse module loaded and the VDUSE device created?)",
            libc::EEXIST => " (a vdpa device of that name already exists)",
            _ => "",
        };
        return format!("{}{hint}", std::io::Error::from_raw_os_error(errno));
    }
    e.to_string()
}
