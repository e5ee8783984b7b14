//! Host microbenchmark of the queue engine: virtio-queue's mock driver makes 4 KiB read
//! requests available in batches, a null backend finishes each at once, and the worker pops,
//! parses, submits, reaps and publishes them. Prints requests per second on one core: the
//! framework's cost per request, with no I/O and no kernel.
//!
//! Run: `cargo bench --bench engine` (env: ENGINE_BENCH_SECONDS, default 3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use vduse_csi::backend::{Backend, NullBackend};
use vduse_csi::blk::{DeviceLimits, QueueMemory, QueueWorker};

const QUEUE_SIZE: u16 = 256;
/// Chains per batch: three descriptors each, so 85 fill the descriptor table.
const BATCH: u16 = 64;
const DATA: u64 = 0x10_0000;

/// Rings in the first MiB, request buffers (the data window) in the next 2 MiB.
struct Memory(GuestMemoryMmap<()>);

impl GuestMemoryBackend for Memory {
    type R = GuestRegionMmap<()>;
    fn num_regions(&self) -> usize {
        self.0.num_regions()
    }
    fn find_region(&self, addr: GuestAddress) -> Option<&Self::R> {
        self.0.find_region(addr)
    }
    fn iter(&self) -> impl Iterator<Item = &Self::R> {
        self.0.iter()
    }
}

impl QueueMemory for Memory {
    fn data_region(&self) -> Option<&GuestRegionMmap<()>> {
        self.0.find_region(GuestAddress(DATA))
    }
    fn map_data_region(&mut self) -> bool {
        true
    }
}

fn main() {
    let seconds: u64 = std::env::var("ENGINE_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000), (GuestAddress(DATA), 0x20_0000)])
        .expect("memory");
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    // One descriptor table for the whole run: chain k is header, 4 KiB buffer, status.
    let mut descs = Vec::new();
    for k in 0..u64::from(BATCH) {
        let d = (k * 3) as u16;
        let hdr = DATA + k * 32;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&(k * 8).to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).expect("header");
        descs.push(RawDescriptor::from(Descriptor::new(hdr, 16, VRING_DESC_F_NEXT as u16, d + 1)));
        let buf = DATA + 0x1_0000 + k * 4096;
        descs.push(RawDescriptor::from(Descriptor::new(
            buf,
            4096,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            d + 2,
        )));
        descs.push(RawDescriptor::from(Descriptor::new(hdr + 16, 1, VRING_DESC_F_WRITE as u16, 0)));
    }
    for (i, d) in descs.iter().enumerate() {
        mock.desc_table().store(i as u16, *d).expect("descriptor");
    }
    let queue: Queue = mock.create_queue().expect("queue");
    let backend: Arc<dyn Backend> = Arc::new(NullBackend::new(1 << 30).expect("size"));
    let io = backend.open_queue(QUEUE_SIZE).expect("engine");
    let limits = DeviceLimits {
        capacity_sectors: (1 << 30) / 512,
        read_only: false,
        max_descriptors: 512,
        max_request_bytes: 1 << 20,
        max_discard_sectors: 1 << 21,
        serial: [0; 20],
    };
    let mut worker = QueueWorker::new(queue, Arc::clone(&backend), io, limits);
    let mut qmem = Memory(mem.clone());
    let mut interrupts = 0u64;
    let mut requests = 0u64;
    let mut busy = Duration::ZERO;
    let mut avail: u16 = 0;
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        // The driver's side, not timed: make the batch available again.
        for k in 0..BATCH {
            mock.avail().ring().ref_at(usize::from(avail.wrapping_add(k) % QUEUE_SIZE)).expect("slot").store(k * 3);
        }
        avail = avail.wrapping_add(BATCH);
        mock.avail().idx().store(avail);
        let start = Instant::now();
        let mut published = 0;
        while published < usize::from(BATCH) {
            let pass = worker.run(&mut qmem, &mut || interrupts += 1).expect("queue fault");
            published += pass.published;
        }
        busy += start.elapsed();
        requests += u64::from(BATCH);
        assert_eq!(worker.queue().next_avail(), avail);
    }
    let per_core = requests as f64 / busy.as_secs_f64();
    println!(
        "queue engine, null backend, 4 KiB reads in batches of {BATCH}: {requests} requests in {:.3} s of worker time = {:.2} M requests/s per core ({:.0} ns each), {interrupts} interrupts",
        busy.as_secs_f64(),
        per_core / 1e6,
        1e9 / per_core
    );
}
