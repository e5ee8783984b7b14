//! The VDUSE user-space API (`include/uapi/linux/vduse.h`, API version 0) for x86_64.
//!
//! Layouts and ioctl numbers are the ones in VDUSE.md §11; the unit tests at the bottom assert
//! them so a mistake fails at `cargo test`, not as an `EINVAL` inside a guest.

#![allow(non_camel_case_types)]

use nix::{ioctl_none_bad, ioctl_read_bad, ioctl_readwrite_bad, ioctl_write_ptr_bad};

/// The only API version the 6.12 kernels know; always set explicitly (VDUSE.md §1 step 2).
pub const VDUSE_API_VERSION: u64 = 0;
/// Length of the device-name buffer of `VDUSE_DESTROY_DEV` and `vduse_dev_config.name`.
pub const VDUSE_NAME_MAX: usize = 256;

pub const VDUSE_GET_API_VERSION: libc::c_ulong = 0x8008_8100;
pub const VDUSE_SET_API_VERSION: libc::c_ulong = 0x4008_8101;
pub const VDUSE_CREATE_DEV: libc::c_ulong = 0x4150_8102;
pub const VDUSE_DESTROY_DEV: libc::c_ulong = 0x4100_8103;
pub const VDUSE_IOTLB_GET_FD: libc::c_ulong = 0xc020_8110;
pub const VDUSE_DEV_GET_FEATURES: libc::c_ulong = 0x8008_8111;
pub const VDUSE_DEV_SET_CONFIG: libc::c_ulong = 0x4008_8112;
pub const VDUSE_DEV_INJECT_CONFIG_IRQ: libc::c_ulong = 0x0000_8113;
pub const VDUSE_VQ_SETUP: libc::c_ulong = 0x4020_8114;
pub const VDUSE_VQ_GET_INFO: libc::c_ulong = 0xc030_8115;
pub const VDUSE_VQ_SETUP_KICKFD: libc::c_ulong = 0x4008_8116;
pub const VDUSE_VQ_INJECT_IRQ: libc::c_ulong = 0x4004_8117;
pub const VDUSE_IOTLB_REG_UMEM: libc::c_ulong = 0x4030_8118;

/// Message types read from the device fd.
pub const VDUSE_GET_VQ_STATE: u32 = 0;
pub const VDUSE_SET_STATUS: u32 = 1;
pub const VDUSE_UPDATE_IOTLB: u32 = 2;

pub const VDUSE_REQ_RESULT_OK: u32 = 0;
pub const VDUSE_REQ_RESULT_FAILED: u32 = 1;

/// `perm` values of an IOTLB entry.
pub const VDUSE_ACCESS_RO: u8 = 1;
pub const VDUSE_ACCESS_WO: u8 = 2;
pub const VDUSE_ACCESS_RW: u8 = 3;

/// `struct vduse_dev_config` without the trailing config space.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_config {
    pub name: [u8; VDUSE_NAME_MAX],
    pub vendor_id: u32,
    pub device_id: u32,
    pub features: u64,
    pub vq_num: u32,
    pub vq_align: u32,
    pub reserved: [u32; 13],
    pub config_size: u32,
}

/// Largest config space the kernel accepts (`config_size <= PAGE_SIZE`).
pub const MAX_CONFIG_SIZE: usize = 4096;

/// `VDUSE_CREATE_DEV` argument: the kernel reads `config_size` bytes right after the header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_config_with_space {
    pub hdr: vduse_dev_config,
    pub config: [u8; MAX_CONFIG_SIZE],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct vduse_iotlb_entry {
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
    pub padding: [u8; 7],
}

/// `VDUSE_IOTLB_REG_UMEM`: our memory at `uaddr` becomes the bounce range `[iova, iova+size)`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct vduse_iova_umem {
    pub uaddr: u64,
    pub iova: u64,
    pub size: u64,
    pub reserved: [u64; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct vduse_vq_config {
    pub index: u32,
    pub max_size: u16,
    pub reserved: [u16; 13],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct vduse_vq_info {
    pub index: u32,
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    /// `split.avail_index` (the packed variant shares these bytes; we only do split rings).
    pub avail_index: u16,
    pub packed_rest: [u16; 3],
    pub ready: u8,
    pub padding: [u8; 7],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct vduse_vq_eventfd {
    pub index: u32,
    pub fd: i32,
}

/// `struct vduse_config_data` header.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct vduse_config_data {
    pub offset: u32,
    pub length: u32,
}

/// `VDUSE_DEV_SET_CONFIG` argument with room for any config space.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_config_data_with_space {
    pub hdr: vduse_config_data,
    pub buffer: [u8; MAX_CONFIG_SIZE],
}

/// `struct vduse_dev_request` (152 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_request {
    pub type_: u32,
    pub request_id: u32,
    pub reserved: [u32; 4],
    /// The union: `vq_state {index u32, avail_index u16}`, `s.status u8`, `iova {start, last}`.
    pub payload: [u8; 128],
}

impl Default for vduse_dev_request {
    fn default() -> Self {
        Self { type_: 0, request_id: 0, reserved: [0; 4], payload: [0; 128] }
    }
}

impl vduse_dev_request {
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_ne_bytes([self.payload[off], self.payload[off + 1], self.payload[off + 2], self.payload[off + 3]])
    }
    /// `s.status` of a `VDUSE_SET_STATUS` message.
    pub fn status(&self) -> u8 {
        self.payload[0]
    }
    /// `vq_state.index` of a `VDUSE_GET_VQ_STATE` message.
    pub fn vq_index(&self) -> u32 {
        self.u32_at(0)
    }
    /// `iova.{start,last}` of a `VDUSE_UPDATE_IOTLB` message.
    pub fn iova_range(&self) -> (u64, u64) {
        let lo = |o| u64::from(self.u32_at(o)) | (u64::from(self.u32_at(o + 4)) << 32);
        (lo(0), lo(8))
    }
}

/// `struct vduse_dev_response` (152 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_response {
    pub request_id: u32,
    pub result: u32,
    pub reserved: [u32; 4],
    /// The union: `vq_state {index u32, split.avail_index u16}` or padding.
    pub payload: [u8; 128],
}

impl vduse_dev_response {
    pub fn new(request_id: u32, result: u32) -> Self {
        Self { request_id, result, reserved: [0; 4], payload: [0; 128] }
    }
    /// Fills the `vq_state` answer of `VDUSE_GET_VQ_STATE`.
    pub fn set_vq_state(&mut self, index: u32, avail_index: u16) {
        self.payload[0..4].copy_from_slice(&index.to_ne_bytes());
        self.payload[4..6].copy_from_slice(&avail_index.to_ne_bytes());
    }
}

ioctl_write_ptr_bad!(ioc_set_api_version, VDUSE_SET_API_VERSION, u64);
ioctl_write_ptr_bad!(ioc_create_dev, VDUSE_CREATE_DEV, vduse_dev_config_with_space);
ioctl_write_ptr_bad!(ioc_destroy_dev, VDUSE_DESTROY_DEV, [u8; VDUSE_NAME_MAX]);
ioctl_readwrite_bad!(ioc_iotlb_get_fd, VDUSE_IOTLB_GET_FD, vduse_iotlb_entry);
ioctl_read_bad!(ioc_get_features, VDUSE_DEV_GET_FEATURES, u64);
ioctl_write_ptr_bad!(ioc_set_config, VDUSE_DEV_SET_CONFIG, vduse_config_data_with_space);
ioctl_none_bad!(ioc_inject_config_irq, VDUSE_DEV_INJECT_CONFIG_IRQ);
ioctl_write_ptr_bad!(ioc_vq_setup, VDUSE_VQ_SETUP, vduse_vq_config);
ioctl_readwrite_bad!(ioc_vq_get_info, VDUSE_VQ_GET_INFO, vduse_vq_info);
ioctl_write_ptr_bad!(ioc_vq_setup_kickfd, VDUSE_VQ_SETUP_KICKFD, vduse_vq_eventfd);
ioctl_write_ptr_bad!(ioc_vq_inject_irq, VDUSE_VQ_INJECT_IRQ, u32);
ioctl_write_ptr_bad!(ioc_iotlb_reg_umem, VDUSE_IOTLB_REG_UMEM, vduse_iova_umem);

#[cfg(test)]
mod tests {
    use super::*;
    use nix::{request_code_none, request_code_read, request_code_readwrite, request_code_write};
    use std::mem::{offset_of, size_of};

    #[test]
    fn struct_sizes_match_the_kernel_abi() {
        assert_eq!(size_of::<vduse_dev_config>(), 336);
        assert_eq!(offset_of!(vduse_dev_config, vendor_id), 256);
        assert_eq!(offset_of!(vduse_dev_config, features), 264);
        assert_eq!(offset_of!(vduse_dev_config, vq_num), 272);
        assert_eq!(offset_of!(vduse_dev_config, reserved), 280);
        assert_eq!(offset_of!(vduse_dev_config, config_size), 332);
        assert_eq!(offset_of!(vduse_dev_config_with_space, config), 336);
        assert_eq!(size_of::<vduse_iotlb_entry>(), 32);
        assert_eq!(offset_of!(vduse_iotlb_entry, perm), 24);
        assert_eq!(size_of::<vduse_iova_umem>(), 48);
        assert_eq!(offset_of!(vduse_iova_umem, reserved), 24);
        assert_eq!(size_of::<vduse_vq_config>(), 32);
        assert_eq!(size_of::<vduse_vq_info>(), 48);
        assert_eq!(offset_of!(vduse_vq_info, avail_index), 32);
        assert_eq!(offset_of!(vduse_vq_info, ready), 40);
        assert_eq!(size_of::<vduse_vq_eventfd>(), 8);
        assert_eq!(size_of::<vduse_config_data>(), 8);
        assert_eq!(offset_of!(vduse_config_data_with_space, buffer), 8);
        assert_eq!(size_of::<vduse_dev_request>(), 152);
        assert_eq!(offset_of!(vduse_dev_request, payload), 24);
        assert_eq!(size_of::<vduse_dev_response>(), 152);
        assert_eq!(offset_of!(vduse_dev_response, payload), 24);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        // The "bad" ioctl macros take the numbers verbatim; recompute them from the header's
        // _IOx() definitions (type 0x81, argument sizes of the kernel structs).
        let t = 0x81;
        assert_eq!(VDUSE_GET_API_VERSION, request_code_read!(t, 0x00, 8) as libc::c_ulong);
        assert_eq!(VDUSE_SET_API_VERSION, request_code_write!(t, 0x01, 8) as libc::c_ulong);
        assert_eq!(VDUSE_CREATE_DEV, request_code_write!(t, 0x02, 336) as libc::c_ulong);
        assert_eq!(VDUSE_DESTROY_DEV, request_code_write!(t, 0x03, 256) as libc::c_ulong);
        assert_eq!(VDUSE_IOTLB_GET_FD, request_code_readwrite!(t, 0x10, 32) as libc::c_ulong);
        assert_eq!(VDUSE_DEV_GET_FEATURES, request_code_read!(t, 0x11, 8) as libc::c_ulong);
        assert_eq!(VDUSE_DEV_SET_CONFIG, request_code_write!(t, 0x12, 8) as libc::c_ulong);
        assert_eq!(VDUSE_DEV_INJECT_CONFIG_IRQ, request_code_none!(t, 0x13) as libc::c_ulong);
        assert_eq!(VDUSE_VQ_SETUP, request_code_write!(t, 0x14, 32) as libc::c_ulong);
        assert_eq!(VDUSE_VQ_GET_INFO, request_code_readwrite!(t, 0x15, 48) as libc::c_ulong);
        assert_eq!(VDUSE_VQ_SETUP_KICKFD, request_code_write!(t, 0x16, 8) as libc::c_ulong);
        assert_eq!(VDUSE_VQ_INJECT_IRQ, request_code_write!(t, 0x17, 4) as libc::c_ulong);
        assert_eq!(VDUSE_IOTLB_REG_UMEM, request_code_write!(t, 0x18, 48) as libc::c_ulong);
    }

    #[test]
    fn request_accessors_decode_the_union() {
        let mut r = vduse_dev_request::default();
        r.payload[0] = 0x0f;
        assert_eq!(r.status(), 0x0f);
        r.payload[0..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_ne_bytes());
        r.payload[8..16].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert_eq!(r.iova_range(), (0x1122_3344_5566_7788, u64::MAX));
    }
}
