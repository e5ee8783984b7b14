//! What a queue worker counts, for the metrics endpoint. Each queue has its own [`QueueStats`]
//! with one writer, its queue thread, so counting is a plain load and store (no locked
//! instruction, no cache line shared with another queue); a scrape reads every queue's
//! counters and sums them.

use std::sync::atomic::{AtomicU64, Ordering};

use super::request::{RequestKind, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};

/// A counter written by one thread and read by any. `add` from two threads would lose counts.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`; only the owning thread may call it.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Replaces the value (for gauges); only the owning thread may call it.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds, in microseconds, of the latency buckets (pop to publish). Wide enough for a
/// RAM-backed queue (tens of µs) and for a disk under a throttle (hundreds of ms).
pub const LATENCY_BOUNDS_US: [u64; 15] =
    [10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Latency {
    /// Requests per bucket (not cumulative); the last one is `+Inf`.
    pub buckets: [Counter; LATENCY_BOUNDS_US.len() + 1],
    pub sum_ns: Counter,
}

impl Latency {
    #[inline]
    fn record(&self, ns: u64) {
        let us = ns / 1000;
        let at = LATENCY_BOUNDS_US.iter().position(|&b| us < b).unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[at].add(1);
        self.sum_ns.add(ns);
    }

    /// Requests recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(Counter::get).sum()
    }
}

/// Statuses other than OK that a request can end with, as the metrics name them.
pub const FAILED_STATUSES: [(u8, &str); 2] = [(STATUS_IOERR, "ioerr"), (STATUS_UNSUPP, "unsupp")];

const KINDS: usize = RequestKind::ALL.len();

/// One queue's counters. Aligned to 128 bytes (two cache lines, the unit the prefetcher pulls
/// in) so that neighbouring queues' counters never share a line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueStats {
    /// Requests completed with OK, by kind.
    pub completed: [Counter; KINDS],
    /// Bytes moved (read, write) or covered (discard, write_zeroes) by completed requests.
    pub bytes: [Counter; KINDS],
    /// Requests completed with a failure status, by the index in [`FAILED_STATUSES`].
    pub failed: [Counter; FAILED_STATUSES.len()],
    /// Pop-to-publish time of every request, by kind.
    pub latency: [Latency; KINDS],
    /// Requests popped and not published yet (a gauge).
    pub in_flight: Counter,
    /// Wake-ups by the driver's kick (kicks that arrive together wake the thread once).
    pub kicks: Counter,
    /// Interrupts asked of the kernel.
    pub interrupts: Counter,
    /// Time the queue held requests back for its QoS limits.
    pub throttled_ns: Counter,
}

impl QueueStats {
    /// Records a published request.
    #[inline]
    pub fn record(&self, kind: RequestKind, status: u8, bytes: u64, latency_ns: u64) {
        let k = kind.index();
        if status == STATUS_OK {
            self.completed[k].add(1);
            self.bytes[k].add(bytes);
        } else if let Some(at) = FAILED_STATUSES.iter().position(|(s, _)| *s == status) {
            self.failed[at].add(1);
        }
        self.latency[k].record(latency_ns);
    }
}

/// A device's counters: one [`QueueStats`] per queue plus the device's own events. Shared by
/// the server (which hands each queue thread its part) and whoever exposes them.
#[derive(Debug)]
pub struct DeviceStats {
    pub queues: Vec<QueueStats>,
    /// Times a server took this device over from one that died (written by the control thread).
    pub takeovers: AtomicU64,
    /// Queue threads that stopped on a fault (rare; any thread may add).
    pub queue_faults: AtomicU64,
}

impl DeviceStats {
    /// Counters for a device of `num_queues` queues.
    pub fn new(num_queues: u16) -> Self {
        Self {
            queues: (0..num_queues).map(|_| QueueStats::default()).collect(),
            takeovers: AtomicU64::new(0),
            queue_faults: AtomicU64::new(0),
        }
    }

    /// Sums `f` over the queues.
    pub fn sum(&self, f: impl Fn(&QueueStats) -> u64) -> u64 {
        self.queues.iter().map(f).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_their_kind_status_and_latency_bucket() {
        let q = QueueStats::default();
        q.record(RequestKind::Read, STATUS_OK, 4096, 30_000);
        q.record(RequestKind::Read, STATUS_OK, 4096, 5_000_000_000);
        q.record(RequestKind::Write, STATUS_IOERR, 512, 1_000);
        q.record(RequestKind::Other, STATUS_UNSUPP, 0, 1_000);
        let read = RequestKind::Read.index();
        assert_eq!(q.completed[read].get(), 2);
        assert_eq!(q.bytes[read].get(), 8192);
        assert_eq!(q.completed[RequestKind::Write.index()].get(), 0);
        assert_eq!(q.failed.iter().map(Counter::get).collect::<Vec<_>>(), [1, 1]);
        // 30 µs is in the ≤50 µs bucket; 5 s only in +Inf.
        assert_eq!(q.latency[read].buckets[2].get(), 1);
        assert_eq!(q.latency[read].buckets[LATENCY_BOUNDS_US.len()].get(), 1);
        assert_eq!(q.latency[read].count(), 2);
        assert_eq!(q.latency[read].sum_ns.get(), 5_000_030_000);
    }
}
