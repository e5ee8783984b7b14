//! virtio-blk request parsing: turns a descriptor chain into a validated operation without
//! touching the backend (VDUSE.md §9 is the checklist). The one request answered here is
//! GET_ID, whose few bytes are copied into the driver's buffer directly.
//!
//! The layout is not assumed: the header is the first 16 readable bytes wherever they lie, the
//! status is the last writable byte, and data is whatever is between. Every descriptor must lie
//! inside one mapped region, no writable descriptor may precede a readable one, and sector
//! arithmetic is overflow-safe. A request that fails validation still gets a status byte if it
//! has one, so the driver sees an error instead of a hang.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestRegionMmap, VolatileSlice};

use crate::backend::{BufRange, IoBuf, IoOp, SliceSource, region_slice};

/// The one region where request buffers may lie: headers, data, status bytes and indirect
/// tables (with VDUSE, the bounce range). A descriptor that points anywhere else, a vring
/// included, is refused. Lookups are one subtraction and one bounds check.
#[derive(Debug, Clone, Copy)]
pub struct DataWindow<'a> {
    region: &'a GuestRegionMmap<()>,
    /// See [`SliceSource::pinnable`].
    pinnable: bool,
}

impl<'a> DataWindow<'a> {
    pub fn new(region: &'a GuestRegionMmap<()>, pinnable: bool) -> Self {
        Self { region, pinnable }
    }
}

impl SliceSource for DataWindow<'_> {
    fn slice(&self, addr: GuestAddress, len: usize) -> Option<VolatileSlice<'_, ()>> {
        region_slice(self.region, addr, len)
    }

    fn pinnable(&self) -> bool {
        self.pinnable
    }
}

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_SIZE: usize = 16;
/// Size of a discard / write-zeroes segment.
pub const DISCARD_SEGMENT_SIZE: u64 = 16;
/// Bytes of the device ID returned by GET_ID.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What the device is, as far as validating a request goes.
#[derive(Debug, Clone)]
pub struct DeviceLimits {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// Longest chain accepted (descriptors, indirect ones included).
    pub max_descriptors: usize,
    /// Largest total of bytes one request may name.
    pub max_request_bytes: u64,
    pub max_discard_sectors: u32,
    /// GET_ID answer, zero-padded.
    pub serial: [u8; ID_BYTES],
}

/// A descriptor of the chain being parsed.
#[derive(Debug, Clone, Copy)]
pub struct ChainDesc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// Scratch space reused across requests so parsing does not allocate on the hot path.
#[derive(Debug, Default)]
pub struct ParseScratch {
    descs: Vec<ChainDesc>,
}

/// What to do with a parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run this backend operation; the status depends on its result.
    Io(IoOp),
    /// Nothing more to do: complete with this status.
    Complete(u8),
}

/// What a request asked for, as far as its header could be read (for accounting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
    /// A type we do not implement, or a chain whose header could not be read.
    Other,
}

impl RequestKind {
    /// Every kind, in the order of [`RequestKind::index`].
    pub const ALL: [RequestKind; 7] = [
        RequestKind::Read,
        RequestKind::Write,
        RequestKind::Flush,
        RequestKind::Discard,
        RequestKind::WriteZeroes,
        RequestKind::GetId,
        RequestKind::Other,
    ];

    fn of(req_type: u32) -> Self {
        match req_type {
            VIRTIO_BLK_T_IN => RequestKind::Read,
            VIRTIO_BLK_T_OUT => RequestKind::Write,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            _ => RequestKind::Other,
        }
    }

    /// A dense index, for per-kind tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name metrics use for it.
    pub const fn name(self) -> &'static str {
        match self {
            RequestKind::Read => "read",
            RequestKind::Write => "write",
            RequestKind::Flush => "flush",
            RequestKind::Discard => "discard",
            RequestKind::WriteZeroes => "write_zeroes",
            RequestKind::GetId => "get_id",
            RequestKind::Other => "other",
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub kind: RequestKind,
    pub action: Action,
    /// Where the status byte goes; `None` for a chain without a usable writable byte.
    pub status_addr: Option<GuestAddress>,
    /// `used.len` on success: bytes written into device-writable buffers, status included.
    pub used_len_ok: u32,
}

impl Parsed {
    fn fail(status_addr: Option<GuestAddress>, status: u8) -> Self {
        Parsed {
            kind: RequestKind::Other,
            action: Action::Complete(status),
            status_addr,
            used_len_ok: u32::from(status_addr.is_some()),
        }
    }
}

/// Parses one chain whose buffers must lie in `mem`. Data buffers are appended to `bufs`;
/// the returned action names them.
pub fn parse<I>(
    chain: I,
    mem: &DataWindow<'_>,
    limits: &DeviceLimits,
    scratch: &mut ParseScratch,
    bufs: &mut Vec<IoBuf>,
) -> Parsed
where
    I: Iterator<Item = Descriptor>,
{
    let descs = &mut scratch.descs;
    descs.clear();
    let mut valid = true;
    let mut seen_writable = false;
    let mut total: u64 = 0;
    let (mut cut, mut overlong) = (false, false);
    for d in chain {
        // A chain whose iterator ends on a descriptor that still names a next one was cut
        // short (a bad `next` index, a loop, a nested indirect table): its real status byte
        // is unknown.
        cut = d.has_next();
        if descs.len() >= limits.max_descriptors {
            overlong = true;
            break;
        }
        let desc = ChainDesc { addr: GuestAddress(d.addr().0), len: d.len(), writable: d.is_write_only() };
        total = total.saturating_add(u64::from(desc.len));
        if desc.len == 0
            || mem.slice(desc.addr, desc.len as usize).is_none()
            || (seen_writable && !desc.writable)
            || total > limits.max_request_bytes
        {
            valid = false;
        }
        seen_writable |= desc.writable;
        descs.push(desc);
    }

    // The status byte is the last byte of the last writable descriptor, if that one is usable.
    let status_addr = descs
        .iter()
        .rev()
        .find(|d| d.writable)
        .filter(|d| d.len > 0 && mem.slice(d.addr, d.len as usize).is_some())
        .map(|d| GuestAddress(d.addr.0 + u64::from(d.len) - 1));
    if cut || overlong {
        // Where the driver expects the status is unknown; writing one anywhere else would
        // leave a stale byte as the answer. The worker stops the queue instead.
        return Parsed::fail(None, STATUS_IOERR);
    }
    if !valid || status_addr.is_none() {
        return Parsed::fail(status_addr, STATUS_IOERR);
    }

    let readable_len: u64 = descs.iter().filter(|d| !d.writable).map(|d| u64::from(d.len)).sum();
    if readable_len < HEADER_SIZE as u64 {
        return Parsed::fail(status_addr, STATUS_IOERR);
    }
    let mut header = [0u8; HEADER_SIZE];
    if gather(mem, descs.iter().filter(|d| !d.writable), 0, &mut header).is_err() {
        return Parsed::fail(status_addr, STATUS_IOERR);
    }
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));

    let kind = RequestKind::of(req_type);
    let fail = |status| Parsed { kind, ..Parsed::fail(status_addr, status) };
    match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = req_type == VIRTIO_BLK_T_OUT;
            if write && limits.read_only {
                return fail(STATUS_IOERR);
            }
            let (range, len) = if write { data_out(descs, bufs) } else { data_in(descs, bufs) };
            if len % 512 != 0 || !in_bounds(sector, len / 512, limits.capacity_sectors) {
                bufs.truncate(range.start);
                return fail(STATUS_IOERR);
            }
            let offset = sector * 512;
            let (action, written) = if write {
                (IoOp::Write { offset, bufs: range }, 0)
            } else {
                (IoOp::Read { offset, bufs: range }, len as u32)
            };
            Parsed { kind, action: Action::Io(action), status_addr, used_len_ok: written + 1 }
        }
        VIRTIO_BLK_T_FLUSH => Parsed { kind, action: Action::Io(IoOp::Flush), status_addr, used_len_ok: 1 },
        VIRTIO_BLK_T_GET_ID => {
            let (range, len) = data_in(descs, bufs);
            let n = (len as usize).min(ID_BYTES);
            let written = scatter(mem, &bufs[range.start..range.end], &limits.serial[..n]);
            bufs.truncate(range.start);
            match written {
                Ok(()) if n > 0 => {
                    Parsed { kind, action: Action::Complete(STATUS_OK), status_addr, used_len_ok: n as u32 + 1 }
                }
                _ => fail(STATUS_IOERR),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if limits.read_only {
                return fail(STATUS_IOERR);
            }
            // Exactly one 16-byte segment after the header (we advertise max_*_seg = 1).
            if readable_len - HEADER_SIZE as u64 != DISCARD_SEGMENT_SIZE {
                return fail(STATUS_UNSUPP);
            }
            let mut seg = [0u8; 16];
            if gather(mem, descs.iter().filter(|d| !d.writable), HEADER_SIZE as u64, &mut seg).is_err() {
                return fail(STATUS_IOERR);
            }
            let seg_sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let num_sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
            let allowed_flags = if req_type == VIRTIO_BLK_T_DISCARD { 0 } else { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP };
            if flags & !allowed_flags != 0 {
                return fail(STATUS_UNSUPP);
            }
            if num_sectors > limits.max_discard_sectors
                || !in_bounds(seg_sector, u64::from(num_sectors), limits.capacity_sectors)
            {
                return fail(STATUS_IOERR);
            }
            let (offset, len) = (seg_sector * 512, u64::from(num_sectors) * 512);
            let op = if req_type == VIRTIO_BLK_T_DISCARD {
                IoOp::Discard { offset, len }
            } else {
                IoOp::WriteZeroes { offset, len }
            };
            if len == 0 {
                return Parsed { kind, action: Action::Complete(STATUS_OK), status_addr, used_len_ok: 1 };
            }
            Parsed { kind, action: Action::Io(op), status_addr, used_len_ok: 1 }
        }
        _ => fail(STATUS_UNSUPP),
    }
}

/// `sector + count <= capacity`, without overflow.
fn in_bounds(sector: u64, count: u64, capacity: u64) -> bool {
    sector <= capacity && count <= capacity - sector
}

/// Appends the readable bytes after the header to `bufs`.
fn data_out(descs: &[ChainDesc], bufs: &mut Vec<IoBuf>) -> (BufRange, u64) {
    let start = bufs.len();
    let mut skip = HEADER_SIZE as u64;
    let mut len = 0;
    for d in descs.iter().filter(|d| !d.writable) {
        let dl = u64::from(d.len);
        if skip >= dl {
            skip -= dl;
            continue;
        }
        bufs.push(IoBuf { addr: GuestAddress(d.addr.0 + skip), len: (dl - skip) as u32 });
        len += dl - skip;
        skip = 0;
    }
    (BufRange { start, end: bufs.len() }, len)
}

/// Appends the writable bytes before the status byte to `bufs`.
fn data_in(descs: &[ChainDesc], bufs: &mut Vec<IoBuf>) -> (BufRange, u64) {
    let start = bufs.len();
    let mut len = 0;
    let last = descs.iter().rposition(|d| d.writable);
    for (i, d) in descs.iter().enumerate().filter(|(_, d)| d.writable) {
        let dl = if Some(i) == last { d.len - 1 } else { d.len };
        if dl > 0 {
            bufs.push(IoBuf { addr: d.addr, len: dl });
            len += u64::from(dl);
        }
    }
    (BufRange { start, end: bufs.len() }, len)
}

/// Copies `out.len()` bytes starting `skip` bytes into the concatenation of `descs`.
fn gather<'a>(
    mem: &DataWindow<'_>,
    descs: impl Iterator<Item = &'a ChainDesc>,
    mut skip: u64,
    out: &mut [u8],
) -> Result<(), ()> {
    let mut filled = 0;
    for d in descs {
        if filled == out.len() {
            break;
        }
        let dl = u64::from(d.len);
        if skip >= dl {
            skip -= dl;
            continue;
        }
        let n = ((dl - skip) as usize).min(out.len() - filled);
        let src = mem.slice(GuestAddress(d.addr.0 + skip), n).ok_or(())?;
        if src.copy_to(&mut out[filled..filled + n]) != n {
            return Err(());
        }
        filled += n;
        skip = 0;
    }
    if filled == out.len() { Ok(()) } else { Err(()) }
}

/// Copies `data` into the buffers, in order.
fn scatter(mem: &DataWindow<'_>, bufs: &[IoBuf], mut data: &[u8]) -> Result<(), ()> {
    for b in bufs {
        if data.is_empty() {
            break;
        }
        let n = (b.len as usize).min(data.len());
        mem.slice(b.addr, n).ok_or(())?.copy_from(&data[..n]);
        data = &data[n..];
    }
    if data.is_empty() { Ok(()) } else { Err(()) }
}
