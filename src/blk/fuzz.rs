//! Structure-aware fuzzing of the queue engine, on stable Rust and in the normal test run (the
//! vm-virtio model: random but well-formed-enough rings driven through the real code).
//!
//! Each case builds a ring with virtio-queue's mock driver: random descriptor tables (flags,
//! lengths, `next` links, addresses inside the data window, in the vring memory, outside all
//! memory or straddling a boundary), indirect tables, request headers of every type with
//! random sectors, and an avail ring with random heads (duplicates and out-of-range ones
//! included) and sometimes a corrupt index. It runs parse + engine + the in-memory backend
//! until the worker has nothing left to do, and checks:
//! - nothing panics;
//! - every popped chain was published with a status, unless the queue stopped with a reason,
//!   and nothing popped is left in flight either way;
//! - no byte of memory changed outside the writable buffers of the descriptors and the used
//!   ring.
//!
//! `cargo test fuzz` runs a bounded pass (about two seconds); `FUZZ_SECONDS=N` runs longer
//! and `FUZZ_SEED=N` replays one case.

use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::QueueWorker;
use super::tests::{TestMemory, limits};
use crate::backend::{Backend, MemoryBackend};

const SIZE: u16 = 16;
const RINGS: u64 = 0;
const DATA: u64 = 0x10_0000;
const DATA_LEN: u64 = 0x10_0000;
/// Offset of the indirect tables inside the data window.
const TABLES: u64 = DATA + 0xe_0000;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A random but mostly plausible descriptor; `in_table` limits `next` to a table's size.
fn descriptor(rng: &mut Rng, links: u16, allow_indirect: bool) -> (SplitDescriptor, Option<(u64, u32)>) {
    let addr = match rng.below(10) {
        0 => RINGS + rng.below(0x1000),            // the vrings
        1 => 0x40_0000 + rng.below(0x1000),        // no memory at all
        2 => DATA + DATA_LEN - rng.below(64),      // straddles the window's end
        3 => u64::MAX - rng.below(16),             // wraps
        _ => DATA + rng.below(0xd_0000) / 16 * 16, // inside the data window
    };
    let len = match rng.below(8) {
        0 => 0,
        1 => 1,
        2 => 16,
        3 => 512,
        4 => 4096,
        5 => rng.below(70_000) as u32,
        _ => (1 + rng.below(8) as u32) * 512,
    };
    let mut flags = 0u16;
    if rng.chance(60) {
        flags |= VRING_DESC_F_NEXT as u16;
    }
    if rng.chance(50) {
        flags |= VRING_DESC_F_WRITE as u16;
    }
    let next = if rng.chance(5) { rng.below(u64::from(u16::MAX)) as u16 } else { rng.below(u64::from(links)) as u16 };
    if allow_indirect && rng.chance(10) {
        let entries = 1 + rng.below(6) as u32;
        let table = TABLES + rng.below(8) * 0x100;
        let len = if rng.chance(10) { 1 + rng.below(100) as u32 } else { entries * 16 };
        let flags = VRING_DESC_F_INDIRECT as u16 | if rng.chance(10) { VRING_DESC_F_NEXT as u16 } else { 0 };
        return (SplitDescriptor::new(table, len, flags, next), Some((table, entries)));
    }
    (SplitDescriptor::new(addr, len, flags, next), None)
}

fn header(rng: &mut Rng) -> [u8; 16] {
    let req_type = match rng.below(8) {
        0 => VIRTIO_BLK_T_OUT,
        1 => VIRTIO_BLK_T_FLUSH,
        2 => VIRTIO_BLK_T_GET_ID,
        3 => VIRTIO_BLK_T_DISCARD,
        4 => VIRTIO_BLK_T_WRITE_ZEROES,
        5 => rng.next() as u32,
        _ => VIRTIO_BLK_T_IN,
    };
    let sector = if rng.chance(10) { rng.next() } else { rng.below(4096) };
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Byte ranges a correct device may write: every writable descriptor's buffer (of the ring's
/// table and of the indirect tables) and the used ring.
fn writable_ranges(descs: &[SplitDescriptor], used: (u64, u64)) -> Vec<(u64, u64)> {
    let mut ranges = vec![used];
    for d in descs {
        if d.is_write_only() && d.flags() & VRING_DESC_F_INDIRECT as u16 == 0 {
            ranges.push((d.addr().0, d.addr().0.saturating_add(u64::from(d.len()))));
        }
    }
    ranges
}

fn run_case(seed: u64) {
    let mut rng = Rng(seed | 1);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(RINGS), 0x10_0000),
        (GuestAddress(DATA), DATA_LEN as usize),
    ])
    .expect("memory");
    // Random bytes everywhere in the window, then plausible headers at many 16-byte slots.
    let mut noise = vec![0u8; DATA_LEN as usize];
    noise.iter_mut().for_each(|b| *b = rng.next() as u8);
    mem.write_slice(&noise, GuestAddress(DATA)).expect("noise");
    for _ in 0..256 {
        let at = DATA + rng.below(0xd_0000) / 16 * 16;
        mem.write_slice(&header(&mut rng), GuestAddress(at)).expect("header");
    }
    let mock = MockSplitQueue::create(&mem, GuestAddress(RINGS), SIZE);
    let mut all_descs = Vec::new();
    for i in 0..SIZE {
        let (d, table) = descriptor(&mut rng, SIZE, true);
        mock.desc_table().store(i, RawDescriptor::from(d)).expect("descriptor");
        all_descs.push(d);
        if let Some((at, entries)) = table {
            for e in 0..entries {
                // Nested indirect tables are refused by virtio-queue; offer some anyway.
                let nested = rng.chance(10);
                let (d, _) = descriptor(&mut rng, entries as u16, nested);
                mem.write_obj(RawDescriptor::from(d), GuestAddress(at + 16 * u64::from(e))).expect("table");
                all_descs.push(d);
            }
        }
    }
    let chains = rng.below(u64::from(SIZE) + 1) as u16;
    for slot in 0..chains {
        let head = if rng.chance(5) { SIZE + rng.below(8) as u16 } else { rng.below(u64::from(SIZE)) as u16 };
        mock.avail().ring().ref_at(usize::from(slot)).expect("slot").store(head);
    }
    let avail_idx = if rng.chance(5) { chains.wrapping_add(SIZE + 1) } else { chains };
    mock.avail().idx().store(avail_idx);

    let used_start = mock.used_addr().0;
    let used = (used_start, used_start + 6 + 8 * u64::from(SIZE));
    let allowed = writable_ranges(&all_descs, used);
    let mut before = vec![0u8; 0x20_0000];
    mem.read_slice(&mut before, GuestAddress(0)).expect("snapshot");

    let queue: Queue = mock.create_queue().expect("queue");
    let backend = MemoryBackend::new(2 << 20, rng.chance(10));
    let io = backend.open_queue(SIZE).expect("engine");
    let shared: std::sync::Arc<dyn Backend> = std::sync::Arc::new(backend);
    let mut worker = QueueWorker::new(queue, shared, io, limits(false));
    let mut qmem = TestMemory::new(&mem);
    let mut stopped = None;
    for _ in 0..64 {
        match worker.run(&mut qmem, &mut || {}) {
            Ok(pass) if pass.busy() => continue,
            Ok(_) => break,
            Err(e) => {
                stopped = Some(e);
                break;
            }
        }
    }

    assert_eq!(worker.outstanding(), 0, "seed {seed}: popped chains left in flight");
    let used_idx = mock.used().idx().load();
    if stopped.is_none() {
        assert_eq!(used_idx, worker.queue().next_avail(), "seed {seed}: a popped chain was not completed");
    }
    let mut after = vec![0u8; 0x20_0000];
    mem.read_slice(&mut after, GuestAddress(0)).expect("snapshot");
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if a != b {
            let addr = i as u64;
            let ok = allowed.iter().any(|(s, e)| addr >= *s && addr < *e);
            assert!(ok, "seed {seed}: byte at {addr:#x} written outside every writable buffer");
        }
    }
}

#[test]
fn fuzz_queue_engine_with_random_rings() {
    if let Some(seed) = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()) {
        run_case(seed);
        return;
    }
    let seconds = std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut cases = 0u64;
    let mut seed = 0x5eed_u64;
    while cases < 50 || Instant::now() < end {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        run_case(seed);
        cases += 1;
    }
    eprintln!("fuzz: {cases} random rings, no invariant broken");
}
