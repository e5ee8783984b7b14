//! Per-device QoS: token buckets over requests and bytes, shared by the device's queues.
//!
//! Each limit is a bucket that fills at its rate and holds at most one second's worth, so an
//! idle device may burst that much. A request is admitted while every bucket holds a whole
//! token, and then charged, which may drive a bucket below zero: a large request is never refused for being
//! larger than the bucket, and the debt it leaves holds the next ones back until it is paid.
//! A queue that finds a bucket in debt stops popping (the ring is FIFO, so it holds back
//! whatever comes next, read or write) and sleeps until the debt is paid; nothing sleeps per
//! request and nothing spins.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::IoOp;

/// Sets one limit.
pub type SetLimit = fn(&mut QosLimits, u64);

/// A device's limits; `None` is unlimited. Discards and write-zeroes count as write requests
/// but move no bytes; flushes count as write requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QosLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_read_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_write_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_read_bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_write_bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_sec: Option<u64>,
}

impl QosLimits {
    /// The StorageClass parameter names, each with a setter.
    pub const PARAMETERS: [(&'static str, SetLimit); 6] = [
        ("maxReadIops", |l, v| l.max_read_iops = Some(v)),
        ("maxWriteIops", |l, v| l.max_write_iops = Some(v)),
        ("maxIops", |l, v| l.max_iops = Some(v)),
        ("maxReadBytesPerSec", |l, v| l.max_read_bytes_per_sec = Some(v)),
        ("maxWriteBytesPerSec", |l, v| l.max_write_bytes_per_sec = Some(v)),
        ("maxBytesPerSec", |l, v| l.max_bytes_per_sec = Some(v)),
    ];

    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        *self != QosLimits::default()
    }

    /// Reads the limits from key/value parameters; unknown keys are ignored. A value that is
    /// not a positive integer is an error naming the parameter.
    pub fn from_parameters<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut limits = QosLimits::default();
        for (key, value) in params {
            let Some((name, set)) = Self::PARAMETERS.iter().find(|(name, _)| *name == key) else { continue };
            match value.trim().parse::<u64>() {
                Ok(v) if v > 0 => set(&mut limits, v),
                _ => return Err(format!("{name} must be a positive integer, not {value:?}")),
            }
        }
        Ok(limits)
    }
}

/// One bucket: `level` tokens, filled at `rate` per second up to `rate`.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    level: f64,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        // Starts full: a device that just came up may burst like one that was idle.
        Self { rate: rate as f64, level: rate as f64 }
    }

    fn refill(&mut self, seconds: f64) {
        self.level = (self.level + self.rate * seconds).min(self.rate);
    }

    /// How long until the bucket holds a whole token again (one request, or one byte).
    fn debt_time(&self) -> Option<Duration> {
        (self.level < 1.0).then(|| Duration::from_secs_f64((1.0 - self.level) / self.rate + 1e-6))
    }
}

/// The buckets of one limit set, by what they charge.
#[derive(Debug)]
struct Buckets {
    read_iops: Option<Bucket>,
    write_iops: Option<Bucket>,
    iops: Option<Bucket>,
    read_bytes: Option<Bucket>,
    write_bytes: Option<Bucket>,
    bytes: Option<Bucket>,
    last: Instant,
}

impl Buckets {
    fn all(&mut self) -> [&mut Option<Bucket>; 6] {
        [
            &mut self.read_iops,
            &mut self.write_iops,
            &mut self.iops,
            &mut self.read_bytes,
            &mut self.write_bytes,
            &mut self.bytes,
        ]
    }

    fn refill(&mut self, now: Instant) {
        let seconds = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        for b in self.all().into_iter().flatten() {
            b.refill(seconds);
        }
    }
}

/// A device's throttle, shared by its queue threads.
#[derive(Debug)]
pub struct Throttle {
    buckets: Mutex<Buckets>,
}

/// What a queue may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Pop and charge.
    Open,
    /// Pop nothing for this long.
    Closed(Duration),
}

impl Throttle {
    /// A throttle for `limits`, or `None` if nothing is limited.
    pub fn new(limits: &QosLimits) -> Option<Self> {
        if !limits.any() {
            return None;
        }
        Some(Self {
            buckets: Mutex::new(Buckets {
                read_iops: limits.max_read_iops.map(Bucket::new),
                write_iops: limits.max_write_iops.map(Bucket::new),
                iops: limits.max_iops.map(Bucket::new),
                read_bytes: limits.max_read_bytes_per_sec.map(Bucket::new),
                write_bytes: limits.max_write_bytes_per_sec.map(Bucket::new),
                bytes: limits.max_bytes_per_sec.map(Bucket::new),
                last: Instant::now(),
            }),
        })
    }

    /// Takes the throttle for one batch of pops.
    pub fn gate(&self, now: Instant) -> Gate<'_> {
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            // A queue thread panicked while charging: the buckets are still numbers.
            Err(poisoned) => poisoned.into_inner(),
        };
        buckets.refill(now);
        Gate { buckets }
    }
}

/// The throttle held for one batch of pops.
pub struct Gate<'a> {
    buckets: std::sync::MutexGuard<'a, Buckets>,
}

impl Gate<'_> {
    /// Whether the next request may be popped.
    pub fn admission(&mut self) -> Admission {
        match self.buckets.all().into_iter().flatten().filter_map(|b| b.debt_time()).max() {
            None => Admission::Open,
            Some(wait) => Admission::Closed(wait),
        }
    }

    /// Charges a popped request of `bytes` data bytes.
    pub fn charge(&mut self, op: &IoOp, bytes: u64) {
        let b = &mut *self.buckets;
        let (requests, moved): ([&mut Option<Bucket>; 2], [&mut Option<Bucket>; 2]) = match op {
            IoOp::Read { .. } => ([&mut b.read_iops, &mut b.iops], [&mut b.read_bytes, &mut b.bytes]),
            IoOp::Write { .. } => ([&mut b.write_iops, &mut b.iops], [&mut b.write_bytes, &mut b.bytes]),
            IoOp::Flush | IoOp::Discard { .. } | IoOp::WriteZeroes { .. } => {
                for bucket in [&mut b.write_iops, &mut b.iops].into_iter().flatten() {
                    bucket.level -= 1.0;
                }
                return;
            }
        };
        for bucket in requests.into_iter().flatten() {
            bucket.level -= 1.0;
        }
        for bucket in moved.into_iter().flatten() {
            bucket.level -= bytes as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BufRange;

    fn read() -> IoOp {
        IoOp::Read { offset: 0, bufs: BufRange { start: 0, end: 0 } }
    }

    #[test]
    fn parameters_are_positive_integers() {
        let l = QosLimits::from_parameters([("maxReadIops", "500"), ("queues", "2"), ("maxBytesPerSec", "1048576")])
            .unwrap();
        assert_eq!(l.max_read_iops, Some(500));
        assert_eq!(l.max_bytes_per_sec, Some(1 << 20));
        assert!(l.any());
        for bad in ["0", "-1", "1.5", "", "lots"] {
            let e = QosLimits::from_parameters([("maxIops", bad)]).unwrap_err();
            assert!(e.contains("maxIops"), "{e}");
        }
        assert!(!QosLimits::default().any());
        assert!(Throttle::new(&QosLimits::default()).is_none());
    }

    #[test]
    fn a_full_bucket_admits_one_seconds_worth_then_holds_until_the_debt_is_paid() {
        let limits = QosLimits { max_read_iops: Some(100), ..Default::default() };
        let t = Throttle::new(&limits).unwrap();
        let start = Instant::now();
        let mut gate = t.gate(start);
        let mut admitted = 0;
        while gate.admission() == Admission::Open {
            gate.charge(&read(), 4096);
            admitted += 1;
        }
        assert_eq!(admitted, 100);
        assert!(matches!(gate.admission(), Admission::Closed(d) if (9..=10).contains(&d.as_millis())));
        drop(gate);
        // After 5 ms half a request's worth has come back: still closed, for 5 ms more.
        let mut gate = t.gate(start + Duration::from_millis(5));
        assert!(matches!(gate.admission(), Admission::Closed(d) if (4..=5).contains(&d.as_millis())));
        drop(gate);
        let mut gate = t.gate(start + Duration::from_millis(10) + Duration::from_micros(10));
        assert_eq!(gate.admission(), Admission::Open);
        gate.charge(&read(), 4096);
        assert!(matches!(gate.admission(), Admission::Closed(_)));
    }

    #[test]
    fn a_large_request_leaves_a_debt_in_proportion() {
        let limits = QosLimits { max_bytes_per_sec: Some(1 << 20), ..Default::default() };
        let t = Throttle::new(&limits).unwrap();
        let start = Instant::now();
        let mut gate = t.gate(start);
        gate.charge(&read(), 3 << 20);
        // 2 MiB in debt at 1 MiB/s: two seconds until a byte's worth is back.
        match gate.admission() {
            Admission::Closed(d) => assert!((1990..=2010).contains(&d.as_millis()), "{d:?}"),
            Admission::Open => panic!("admitted in debt"),
        }
    }
}
