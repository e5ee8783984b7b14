//! Queue-loop tests with virtio-queue's mock driver: good chains in every framing, and hostile
//! ones. The worker must answer each bad request with a status and keep serving, and stop the
//! queue (never the process) when the ring itself is corrupt or a chain leaves nowhere to put
//! a status.
//!
//! Longer than the other files on purpose: one scenario after another, each short, sharing one
//! harness; splitting them would only scatter the harness.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::request::{DeviceLimits, ID_BYTES, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};
use super::{QueueError, QueueMemory, QueueWorker};
use crate::backend::{Backend, Completion, IoBuf, IoOp, MemoryBackend, QueueIo, SliceSource};

const QUEUE_SIZE: u16 = 32;
const DATA: u64 = 0x10_0000;
const CAPACITY: u64 = 1 << 20;

type Mem = GuestMemoryMmap<()>;

fn memory() -> Mem {
    // Rings in the first MiB, buffers in the second; nothing mapped above 2 MiB.
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000), (GuestAddress(DATA), 0x10_0000)]).expect("memory")
}

pub(super) fn limits(read_only: bool) -> DeviceLimits {
    let mut serial = [0u8; ID_BYTES];
    serial[..7].copy_from_slice(b"vol-123");
    DeviceLimits {
        capacity_sectors: CAPACITY / 512,
        read_only,
        max_descriptors: usize::from(QUEUE_SIZE),
        max_request_bytes: 1 << 20,
        max_discard_sectors: 1 << 21,
        serial,
    }
}

/// The mock driver's memory as a worker sees it: rings in the first MiB, the data window
/// (where every request buffer must lie) in the second. With `data_mapped` false the window
/// is hidden, like a VDUSE bounce range not mapped yet; `can_map` says whether asking for it
/// maps it.
pub(super) struct TestMemory {
    mem: Mem,
    data_mapped: bool,
    can_map: bool,
    map_calls: usize,
}

impl TestMemory {
    pub(super) fn new(mem: &Mem) -> Self {
        Self { mem: mem.clone(), data_mapped: true, can_map: true, map_calls: 0 }
    }
}

impl GuestMemoryBackend for TestMemory {
    type R = GuestRegionMmap<()>;

    fn num_regions(&self) -> usize {
        self.mem.num_regions()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&Self::R> {
        self.mem.find_region(addr).filter(|r| self.data_mapped || r.start_addr() != GuestAddress(DATA))
    }

    fn iter(&self) -> impl Iterator<Item = &Self::R> {
        self.mem.iter()
    }
}

impl QueueMemory for TestMemory {
    fn data_region(&self) -> Option<&GuestRegionMmap<()>> {
        if self.data_mapped { self.mem.find_region(GuestAddress(DATA)) } else { None }
    }

    fn map_data_region(&mut self) -> bool {
        if !self.data_mapped {
            self.map_calls += 1;
            self.data_mapped = self.can_map;
        }
        self.data_mapped
    }
}

/// An engine that runs each operation on a RAM disk at once but hands its completion out only
/// when the test releases its tag: completions in any order the test likes.
struct ScriptedIo {
    inner: Box<dyn QueueIo>,
    held: Vec<Completion>,
    release: Arc<Mutex<Vec<u16>>>,
}

impl QueueIo for ScriptedIo {
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn submit(&mut self, mem: &dyn SliceSource, bufs: &[IoBuf], op: IoOp, tag: u16) {
        self.inner.submit(mem, bufs, op, tag);
        self.inner.reap(&mut self.held);
    }
    fn commit(&mut self) {}
    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut release = self.release.lock().expect("release list");
        let mut i = 0;
        while i < self.held.len() {
            if let Some(r) = release.iter().position(|t| *t == self.held[i].tag) {
                release.remove(r);
                out.push(self.held.remove(i));
            } else {
                i += 1;
            }
        }
    }
    fn in_flight(&self) -> usize {
        self.held.len()
    }
    fn has_completions(&mut self) -> bool {
        let release = self.release.lock().expect("release list");
        self.held.iter().any(|c| release.contains(&c.tag))
    }
    fn wait(&mut self) {
        // Nothing completes on its own: release everything so a drain can finish.
        let mut release = self.release.lock().expect("release list");
        release.extend(self.held.iter().map(|c| c.tag));
    }
    fn notifier(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// A descriptor as the test writes it: address, length, device-writable.
#[derive(Clone, Copy)]
struct D(u64, u32, bool);

struct Harness<'a> {
    mock: MockSplitQueue<'a, Mem>,
    qmem: TestMemory,
    worker: QueueWorker,
    backend: MemoryBackend,
    next_desc: u16,
    notifications: usize,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a Mem, read_only: bool) -> Self {
        let backend = MemoryBackend::new(CAPACITY, read_only);
        let io = backend.open_queue(QUEUE_SIZE).expect("io");
        Self::with_io(mem, backend, io)
    }

    fn with_io(mem: &'a Mem, backend: MemoryBackend, io: Box<dyn QueueIo>) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let queue: Queue = mock.create_queue().expect("queue");
        let shared: Arc<dyn Backend> = Arc::new(backend.clone());
        let read_only = backend.read_only();
        let worker = QueueWorker::new(queue, shared, io, limits(read_only));
        Self { mock, qmem: TestMemory::new(mem), worker, backend, next_desc: 0, notifications: 0 }
    }

    /// Makes a chain of `descs` available; returns its head.
    fn add(&mut self, descs: &[D]) -> u16 {
        // Reuse the table from the start once it is full; callers process in between.
        if usize::from(self.next_desc) + descs.len() > usize::from(QUEUE_SIZE) {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut flags = if d.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(d.0, d.1, flags, head + i as u16 + 1))
            })
            .collect();
        self.mock.add_desc_chains(&raw, head).expect("add chain");
        self.next_desc += descs.len() as u16;
        head
    }

    /// Runs passes until one does nothing, as the queue thread does before it sleeps.
    fn process(&mut self) -> Result<(), QueueError> {
        let mut count = 0;
        let result = loop {
            match self.worker.run(&mut self.qmem, &mut || count += 1) {
                Ok(pass) if pass.busy() => continue,
                Ok(_) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.notifications += count;
        result
    }

    fn used(&self, n: u16) -> (u32, u32) {
        let elem = self.mock.used().ring().ref_at(usize::from(n)).expect("used elem").load();
        (elem.id(), elem.len())
    }

    fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }
}

fn header(mem: &Mem, at: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).expect("header");
}

fn status(mem: &Mem, at: u64) -> u8 {
    mem.read_obj(GuestAddress(at)).expect("status")
}

const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0xf000;

#[test]
fn write_then_read_round_trips() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 8);
    mem.write_slice(&pattern, GuestAddress(BUF)).expect("data");
    mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
    let head = h.add(&[D(HDR, 16, false), D(BUF, 4096, false), D(STATUS, 1, true)]);
    h.process().expect("process");
    assert_eq!(status(&mem, STATUS), STATUS_OK);
    assert_eq!(h.used(0), (u32::from(head), 1));
    assert_eq!(&h.backend.contents()[8 * 512..8 * 512 + 4096], &pattern[..]);

    let out = BUF + 0x2000;
    header(&mem, HDR + 0x100, VIRTIO_BLK_T_IN, 8);
    let head = h.add(&[D(HDR + 0x100, 16, false), D(out, 4096, true), D(STATUS + 1, 1, true)]);
    h.process().expect("process");
    assert_eq!(status(&mem, STATUS + 1), STATUS_OK);
    assert_eq!(h.used(1), (u32::from(head), 4097));
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(out)).expect("read back");
    assert_eq!(back, pattern);
}

#[test]
fn any_framing_is_accepted() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    // Header and data in one readable descriptor, status in its own.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    mem.write_slice(&[0xabu8; 512], GuestAddress(HDR + 16)).expect("data");
    h.add(&[D(HDR, 16 + 512, false), D(STATUS, 1, true)]);
    // Read data and status in one writable descriptor.
    header(&mem, HDR + 0x1000, VIRTIO_BLK_T_IN, 0);
    h.add(&[D(HDR + 0x1000, 16, false), D(BUF, 513, true)]);
    h.process().expect("process");
    assert_eq!(status(&mem, STATUS), STATUS_OK);
    assert_eq!(status(&mem, BUF + 512), STATUS_OK);
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(BUF)).expect("read");
    assert_eq!(back, [0xab; 512]);
    assert_eq!(h.used(1).1, 513);
}

#[test]
fn get_id_returns_the_serial() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xee; 20], GuestAddress(BUF)).expect("fill");
    h.add(&[D(HDR, 16, false), D(BUF, 20, true), D(STATUS, 1, true)]);
    h.process().expect("process");
    assert_eq!(status(&mem, STATUS), STATUS_OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(BUF)).expect("id");
    assert_eq!(&id[..8], b"vol-123\0");
    assert_eq!(h.used(0).1, 21);
}

#[test]
fn bad_requests_get_an_error_status_and_the_queue_keeps_serving() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    let cases: &[(&str, u32, u64, &[D], u8)] = &[
        ("past capacity", VIRTIO_BLK_T_IN, CAPACITY / 512, &[D(BUF, 512, true)], STATUS_IOERR),
        ("straddles the end", VIRTIO_BLK_T_OUT, CAPACITY / 512 - 1, &[D(BUF, 1024, false)], STATUS_IOERR),
        ("huge sector", VIRTIO_BLK_T_IN, u64::MAX, &[D(BUF, 512, true)], STATUS_IOERR),
        ("not a sector multiple", VIRTIO_BLK_T_IN, 0, &[D(BUF, 100, true)], STATUS_IOERR),
        ("buffer outside memory", VIRTIO_BLK_T_IN, 0, &[D(0x40_0000, 512, true)], STATUS_IOERR),
        ("buffer crossing regions", VIRTIO_BLK_T_IN, 0, &[D(DATA - 256, 512, true)], STATUS_IOERR),
        ("buffer in the vring memory", VIRTIO_BLK_T_IN, 0, &[D(0x8000, 512, true)], STATUS_IOERR),
        ("buffer past the data window", VIRTIO_BLK_T_IN, 0, &[D(DATA + 0x10_0000 - 256, 512, true)], STATUS_IOERR),
        ("zero-length buffer", VIRTIO_BLK_T_IN, 0, &[D(BUF, 0, true)], STATUS_IOERR),
        ("writable before readable", VIRTIO_BLK_T_OUT, 0, &[D(BUF, 512, true), D(BUF + 512, 512, false)], STATUS_IOERR),
        ("unknown type", 0x55, 0, &[], STATUS_UNSUPP),
        ("secure erase", VIRTIO_BLK_T_SECURE_ERASE, 0, &[], STATUS_UNSUPP),
    ];
    let mut n = 0;
    for (what, req_type, sector, data, expected) in cases {
        let hdr = HDR + 0x100 * n;
        let st = STATUS + n;
        header(&mem, hdr, *req_type, *sector);
        mem.write_obj(0xffu8, GuestAddress(st)).expect("status");
        let mut chain = vec![D(hdr, 16, false)];
        chain.extend_from_slice(data);
        chain.push(D(st, 1, true));
        h.add(&chain);
        h.process().unwrap_or_else(|e| panic!("{what}: queue stopped: {e}"));
        assert_eq!(status(&mem, st), *expected, "{what}");
        assert_eq!(h.used_idx(), n as u16 + 1, "{what}: completed");
        n += 1;
    }
    // A good request right after all of that still works.
    header(&mem, HDR + 0x100 * n, VIRTIO_BLK_T_IN, 0);
    h.add(&[D(HDR + 0x100 * n, 16, false), D(BUF, 512, true), D(STATUS + n, 1, true)]);
    h.process().expect("process");
    assert_eq!(status(&mem, STATUS + n), STATUS_OK);
    assert!(h.backend.contents().iter().all(|b| *b == 0), "no bad request wrote data");
}

#[test]
fn short_header_gets_an_error_status() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    h.add(&[D(HDR, 8, false), D(STATUS, 1, true)]);
    h.process().expect("process");
    assert_eq!(status(&mem, STATUS), STATUS_IOERR);
    assert_eq!(h.used(0).1, 1);
}

/// A chain whose status byte cannot be written (none at all, or outside the data window) has
/// no answer the driver could read: completing it would hand the driver whatever byte was
/// there as a status, a lost write reported as done. The chains before it are completed, and
/// the queue stops with the reason.
#[test]
fn a_chain_without_a_status_byte_stops_the_queue_after_completing_the_others() {
    for (what, last) in [
        ("no writable byte", vec![D(HDR + 0x100, 16, false)]),
        ("status outside memory", vec![D(HDR + 0x100, 16, false), D(0x50_0000, 1, true)]),
        ("status in the vring memory", vec![D(HDR + 0x100, 16, false), D(0x8000, 1, true)]),
    ] {
        let mem = memory();
        let mut h = Harness::new(&mem, false);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        header(&mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
        h.add(&[D(HDR, 16, false), D(BUF, 512, true), D(STATUS, 1, true)]);
        h.add(&last);
        assert!(matches!(h.process(), Err(QueueError::NoStatus(_))), "{what}");
        assert_eq!(h.used_idx(), 1, "{what}: the good chain before it is completed");
        assert_eq!(status(&mem, STATUS), STATUS_OK, "{what}");
        assert_eq!(h.worker.outstanding(), 0, "{what}");
    }
}

/// The bounce range appears only with the driver's first DMA mapping, possibly after the
/// worker started. A chain that arrives then must wait for the mapping, not be completed
/// without a status.
#[test]
fn a_chain_that_arrives_before_the_data_window_is_mapped_waits_for_it() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    h.qmem.data_mapped = false;
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    mem.write_slice(&[0x5a; 512], GuestAddress(BUF)).expect("data");
    mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
    h.add(&[D(HDR, 16, false), D(BUF, 512, false), D(STATUS, 1, true)]);
    // The mapping is missing and cannot be made yet: nothing is popped, nothing completed.
    h.qmem.can_map = false;
    h.process().expect("process");
    assert_eq!(h.used_idx(), 0);
    assert_eq!(h.worker.queue().next_avail(), 0, "not popped");
    assert_eq!(status(&mem, STATUS), 0xff);
    // Now the kernel has it: the worker maps it on its own and answers properly.
    h.qmem.can_map = true;
    h.process().expect("process");
    assert!(h.qmem.map_calls >= 2);
    assert_eq!(h.used_idx(), 1);
    assert_eq!(status(&mem, STATUS), STATUS_OK);
    assert_eq!(&h.backend.contents()[..512], &[0x5a; 512]);
}

/// Requests finish out of order; the used ring still lists them in pop order, each published
/// only once every earlier one is, so `used.idx` counts the chains fully handled.
#[test]
fn completions_out_of_order_are_published_in_pop_order() {
    let mem = memory();
    let backend = MemoryBackend::new(CAPACITY, false);
    let release = Arc::new(Mutex::new(Vec::new()));
    let io = Box::new(ScriptedIo {
        inner: backend.open_queue(QUEUE_SIZE).expect("io"),
        held: Vec::new(),
        release: Arc::clone(&release),
    });
    let mut h = Harness::with_io(&mem, backend, io);
    let mut heads = Vec::new();
    for i in 0..3u64 {
        header(&mem, HDR + 0x100 * i, VIRTIO_BLK_T_IN, i);
        heads.push(h.add(&[D(HDR + 0x100 * i, 16, false), D(BUF + 0x1000 * i, 512, true), D(STATUS + i, 1, true)]));
    }
    h.process().expect("process");
    assert_eq!(h.worker.outstanding(), 3, "all three in flight at once");
    assert_eq!(h.used_idx(), 0);

    release.lock().expect("release").push(heads[2]);
    h.process().expect("process");
    assert_eq!(h.used_idx(), 0, "the last one finished first but must wait");
    release.lock().expect("release").push(heads[0]);
    h.process().expect("process");
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.notifications, 1);
    release.lock().expect("release").push(heads[1]);
    h.process().expect("process");
    assert_eq!(h.used_idx(), 3);
    assert_eq!(h.notifications, 2, "one interrupt per publishing pass");
    let order: Vec<u32> = (0..3).map(|n| h.used(n).0).collect();
    assert_eq!(order, heads.iter().map(|h| u32::from(*h)).collect::<Vec<_>>());
    for i in 0..3 {
        assert_eq!(status(&mem, STATUS + i), STATUS_OK);
    }
}

/// The worker never pops more chains than the engine can hold.
#[test]
fn popping_stops_when_the_engine_is_full() {
    let mem = memory();
    let backend = MemoryBackend::new(CAPACITY, false);
    let release = Arc::new(Mutex::new(Vec::new()));
    let io = Box::new(ScriptedIo {
        inner: backend.open_queue(2).expect("io"),
        held: Vec::new(),
        release: Arc::clone(&release),
    });
    let mut h = Harness::with_io(&mem, backend, io);
    for i in 0..4u64 {
        header(&mem, HDR + 0x100 * i, VIRTIO_BLK_T_FLUSH, 0);
        h.add(&[D(HDR + 0x100 * i, 16, false), D(STATUS + i, 1, true)]);
    }
    h.process().expect("process");
    assert_eq!(h.worker.queue().next_avail(), 2);
    release.lock().expect("release").extend([0u16, 2]);
    h.process().expect("process");
    assert_eq!(h.used_idx(), 2);
    assert_eq!(h.worker.queue().next_avail(), 4);
}

#[test]
fn read_only_device_refuses_writes() {
    let mem = memory();
    let mut h = Harness::new(&mem, true);
    for (i, t) in [VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES].into_iter().enumerate() {
        let hdr = HDR + 0x100 * i as u64;
        header(&mem, hdr, t, 0);
        h.add(&[D(hdr, 16, false), D(BUF, 512, false), D(STATUS + i as u64, 1, true)]);
    }
    h.process().expect("process");
    for i in 0..3 {
        assert_eq!(status(&mem, STATUS + i), STATUS_IOERR);
    }
}

fn discard_segment(mem: &Mem, at: u64, sector: u64, num: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(at)).expect("segment");
}

#[test]
fn discard_write_zeroes_and_flush() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    h.backend.fill(0, &[0x11; 4096]);
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    discard_segment(&mem, BUF, 0, 4, 0);
    h.add(&[D(HDR, 16, false), D(BUF, 16, false), D(STATUS, 1, true)]);
    header(&mem, HDR + 0x100, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    discard_segment(&mem, BUF + 0x100, 4, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    h.add(&[D(HDR + 0x100, 16, false), D(BUF + 0x100, 16, false), D(STATUS + 1, 1, true)]);
    // DISCARD with the UNMAP flag is not allowed by the spec.
    header(&mem, HDR + 0x200, VIRTIO_BLK_T_DISCARD, 0);
    discard_segment(&mem, BUF + 0x200, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    h.add(&[D(HDR + 0x200, 16, false), D(BUF + 0x200, 16, false), D(STATUS + 2, 1, true)]);
    // Two segments: more than we advertise.
    header(&mem, HDR + 0x300, VIRTIO_BLK_T_DISCARD, 0);
    h.add(&[D(HDR + 0x300, 16, false), D(BUF + 0x300, 32, false), D(STATUS + 3, 1, true)]);
    // Out of range.
    header(&mem, HDR + 0x400, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    discard_segment(&mem, BUF + 0x400, CAPACITY / 512 - 1, 2, 0);
    h.add(&[D(HDR + 0x400, 16, false), D(BUF + 0x400, 16, false), D(STATUS + 4, 1, true)]);
    header(&mem, HDR + 0x500, VIRTIO_BLK_T_FLUSH, 0);
    h.add(&[D(HDR + 0x500, 16, false), D(STATUS + 5, 1, true)]);
    h.process().expect("process");
    let statuses: Vec<u8> = (0..6).map(|i| status(&mem, STATUS + i)).collect();
    assert_eq!(statuses, [STATUS_OK, STATUS_OK, STATUS_UNSUPP, STATUS_UNSUPP, STATUS_IOERR, STATUS_OK]);
    assert!(h.backend.contents()[..4096].iter().all(|b| *b == 0));
    assert_eq!(h.backend.flush_count(), 1);
}

#[test]
fn indirect_chains_work_and_nested_indirect_is_refused() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    let table = DATA + 0x8000;
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let entries = [
        SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(BUF, 512, (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16, 2),
        SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        mem.write_obj(RawDescriptor::from(*e), GuestAddress(table + 16 * i as u64)).expect("table");
    }
    let raw = RawDescriptor::from(SplitDescriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0));
    h.mock.add_desc_chains(&[raw], 0).expect("add");
    h.next_desc = 1;
    h.process().expect("process");
    assert_eq!(status(&mem, STATUS), STATUS_OK);
    assert_eq!(h.used(0).1, 513);

    // A table that points at another indirect table ends the chain early, leaving no status
    // byte: the queue stops.
    let nested = DATA + 0x9000;
    mem.write_obj(
        RawDescriptor::from(SplitDescriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0)),
        GuestAddress(nested),
    )
    .expect("nested");
    let raw = RawDescriptor::from(SplitDescriptor::new(nested, 16, VRING_DESC_F_INDIRECT as u16, 0));
    h.mock.add_desc_chains(&[raw], 1).expect("add");
    assert!(matches!(h.process(), Err(QueueError::NoStatus(1))));
    assert_eq!(h.used_idx(), 1);
}

#[test]
fn a_descriptor_loop_is_bounded() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // Descriptor 0 points at itself forever.
    let raw = RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 0));
    h.mock.add_desc_chains(&[raw], 0).expect("add");
    // The chain is cut at the ring size; it has no writable byte, so the queue stops rather
    // than loop or hang.
    assert!(matches!(h.process(), Err(QueueError::NoStatus(0))));
}

#[test]
fn one_notification_per_batch() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    for i in 0..5u64 {
        header(&mem, HDR + 0x100 * i, VIRTIO_BLK_T_IN, i);
        h.add(&[D(HDR + 0x100 * i, 16, false), D(BUF + 0x1000 * i, 512, true), D(STATUS + i, 1, true)]);
    }
    h.process().expect("process");
    assert_eq!(h.used_idx(), 5);
    assert_eq!(h.notifications, 1);
}

#[test]
fn corrupt_avail_index_stops_the_queue() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    h.mock.avail().idx().store(QUEUE_SIZE + 5);
    assert!(matches!(h.process(), Err(QueueError::Ring(_))));
}

#[test]
fn head_out_of_range_stops_the_queue() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    h.mock.avail().ring().ref_at(0).expect("slot").store(QUEUE_SIZE + 1);
    h.mock.avail().idx().store(1);
    assert!(matches!(h.process(), Err(QueueError::HeadOutOfRange { .. })));
}

#[test]
fn duplicate_head_in_flight_stops_the_queue() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    h.add(&[D(HDR, 16, false), D(STATUS, 1, true)]);
    // The same head offered twice in one batch.
    h.mock.avail().ring().ref_at(1).expect("slot").store(0);
    h.mock.avail().idx().store(2);
    assert!(matches!(h.process(), Err(QueueError::DuplicateHead(0))));
}

/// A chain cut short by a `next` index outside the table: its last descriptor still names a
/// next one, so the status byte the driver will read is unknown. Writing a status into what
/// happens to be the last writable buffer seen would leave a stale byte as the answer; the
/// queue stops instead.
#[test]
fn a_chain_cut_by_a_bad_next_index_stops_the_queue() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    mem.write_slice(&[0xee; 512], GuestAddress(BUF)).expect("fill");
    let raw = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            BUF,
            512,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            QUEUE_SIZE + 7,
        )),
    ];
    h.mock.add_desc_chains(&raw, 0).expect("add");
    assert!(matches!(h.process(), Err(QueueError::NoStatus(0))));
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(BUF)).expect("read");
    assert_eq!(back[511], 0xee, "no status written into a data buffer");
}

#[test]
fn a_throttled_queue_pops_what_its_bucket_admits_and_counts_everything() {
    let mem = memory();
    let mut h = Harness::new(&mem, false);
    let stats = Arc::new(super::stats::DeviceStats::new(1));
    let qos = super::qos::QosLimits { max_read_iops: Some(3), ..Default::default() };
    let throttle = Arc::new(super::qos::Throttle::new(&qos).expect("a throttle"));
    h.worker = QueueWorker::new(
        h.mock.create_queue().expect("queue"),
        Arc::new(h.backend.clone()),
        h.backend.open_queue(QUEUE_SIZE).expect("io"),
        limits(false),
    )
    .with_stats(Arc::clone(&stats), 0)
    .with_throttle(throttle);
    for i in 0..5u64 {
        header(&mem, HDR + 0x100 * i, VIRTIO_BLK_T_IN, i);
        h.add(&[D(HDR + 0x100 * i, 16, false), D(BUF + 0x1000 * i, 512, true), D(STATUS + i, 1, true)]);
    }
    h.process().expect("process");
    // A full bucket holds one second's worth: three reads, then the queue waits for tokens.
    assert_eq!(h.used_idx(), 3);
    let wait = h.worker.throttled_for().expect("throttled");
    assert!(!wait.is_zero() && wait <= std::time::Duration::from_millis(334), "{wait:?}");
    assert!(!h.worker.has_work(&h.qmem), "a throttled queue has no work to pop");
    std::thread::sleep(wait + std::time::Duration::from_millis(5));
    // Once the tokens are due the worker still says so (a sleeper must not wait for a kick
    // that the held-back chains will never bring) and has work again.
    assert_eq!(h.worker.throttled_for(), Some(std::time::Duration::ZERO));
    assert!(h.worker.has_work(&h.qmem));
    h.process().expect("process");
    assert_eq!(h.used_idx(), 4, "one more token is due after a third of a second");
    let q = &stats.queues[0];
    let read = super::request::RequestKind::Read.index();
    assert_eq!(q.completed[read].get(), 4);
    assert_eq!(q.bytes[read].get(), 4 * 512);
    assert_eq!(q.latency[read].count(), 4);
    assert_eq!(q.interrupts.get(), h.notifications as u64);
    assert!(q.throttled_ns.get() > 0);
    assert_eq!(q.in_flight.get(), 0);
    // Nothing left to pop: the throttle lets go, and an idle queue sleeps without a timeout.
    std::thread::sleep(std::time::Duration::from_millis(340));
    h.process().expect("process");
    assert_eq!(h.used_idx(), 5);
    h.process().expect("process");
    assert_eq!(h.worker.throttled_for(), None);
}

/// An engine whose flushes fail (a writeback error of the image), everything else as the
/// memory backend does it.
struct FailingFlushIo {
    inner: Box<dyn QueueIo>,
    flushes: Vec<u16>,
}

impl QueueIo for FailingFlushIo {
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn submit(&mut self, mem: &dyn SliceSource, bufs: &[IoBuf], op: IoOp, tag: u16) {
        if op == IoOp::Flush {
            self.flushes.push(tag);
        }
        self.inner.submit(mem, bufs, op, tag);
    }
    fn commit(&mut self) {
        self.inner.commit();
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        let start = out.len();
        self.inner.reap(out);
        for c in &mut out[start..] {
            if let Some(i) = self.flushes.iter().position(|t| *t == c.tag) {
                self.flushes.remove(i);
                c.result = Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
        }
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn has_completions(&mut self) -> bool {
        self.inner.has_completions()
    }
    fn wait(&mut self) {
        self.inner.wait();
    }
    fn notifier(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// A failed FLUSH is answered IOERR and stays recorded: later flushes that succeed (the
/// kernel reports a writeback error only once) do not clear it, and failed reads do not set it.
#[test]
fn a_failed_flush_is_remembered() {
    let mem = memory();
    let backend = MemoryBackend::new(CAPACITY, false);
    let io = Box::new(FailingFlushIo { inner: backend.open_queue(QUEUE_SIZE).expect("io"), flushes: Vec::new() });
    let mut h = Harness::with_io(&mem, backend, io);
    let failure = Arc::new(super::FlushFailure::default());
    h.worker = std::mem::replace(
        &mut h.worker,
        QueueWorker::new(
            h.mock.create_queue().expect("queue"),
            Arc::new(MemoryBackend::new(CAPACITY, false)),
            MemoryBackend::new(CAPACITY, false).open_queue(QUEUE_SIZE).expect("io"),
            limits(false),
        ),
    )
    .with_flush_failure(Arc::clone(&failure));
    // A read past the end fails, and is no flush.
    header(&mem, HDR, VIRTIO_BLK_T_IN, CAPACITY / 512);
    h.add(&[D(HDR, 16, false), D(BUF, 512, true), D(STATUS, 1, true)]);
    h.process().expect("process");
    assert_eq!(status(&mem, STATUS), STATUS_IOERR);
    assert_eq!(failure.get(), None, "a failed read is not a failed flush");
    header(&mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
    h.add(&[D(HDR + 0x100, 16, false), D(STATUS + 1, 1, true)]);
    h.process().expect("process");
    assert_eq!(status(&mem, STATUS + 1), STATUS_IOERR, "the driver is told");
    let first = failure.get().expect("recorded");
    failure.record("a later one".into());
    assert_eq!(failure.get(), Some(first), "the first failure is kept");
}
