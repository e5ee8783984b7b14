//! The Prometheus endpoint: a registry rendered in the Prometheus text format at `/metrics`,
//! served by the same tokio runtime as the gRPC server, and the encoding of the datapath's
//! per-queue counters (read from the queues at scrape time, never pushed by them).

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::blk::request::RequestKind;
use crate::blk::stats::{DeviceStats, FAILED_STATUSES, LATENCY_BOUNDS_US, QueueStats};

/// The default `--metrics-address`: loopback, so a node that runs the binary by hand exposes
/// nothing; the DaemonSet passes the pod's (the node's) own address instead.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9810";

/// Parses `--metrics-address`: empty turns the endpoint off.
pub fn parse_address(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| format!("metrics address {s:?} is not HOST:PORT with a numeric host: {e}"))
}

/// Renders `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding the metrics failed");
    }
    out
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = Arc::clone(&registry);
            async move {
                // Reading every queue's counters is quick, but it is not async work.
                let body = tokio::task::spawn_blocking(move || render(&registry)).await.unwrap_or_default();
                ([(CONTENT_TYPE, prometheus_client::encoding::prometheus_text::CONTENT_TYPE)], body)
            }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Binds `addr` and serves `registry` there on the current tokio runtime. Returns the address
/// bound (port 0 picks one).
pub async fn start(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, String> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot bind metrics address {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, registry, shutdown).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "serving metrics at /metrics");
    Ok(bound)
}

/// Serves `registry` on `listener` from a thread of its own (for a program without a tokio
/// runtime), until the process exits.
pub fn spawn_thread(listener: std::net::TcpListener, registry: Registry) -> Result<(), String> {
    listener.set_nonblocking(true).map_err(|e| format!("metrics listener: {e}"))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the metrics runtime: {e}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, Arc::new(registry), std::future::pending()).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "metrics endpoint stopped");
                }
            })
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    tracing::info!(%address, "serving metrics at /metrics");
    Ok(())
}

/// Lists the devices to report: (volume ID, counters).
pub type DeviceLister = dyn Fn() -> Vec<(String, Arc<DeviceStats>)> + Send + Sync;

/// Reports every listed device's datapath counters at each scrape.
pub struct DatapathCollector {
    devices: Box<DeviceLister>,
}

impl DatapathCollector {
    pub fn new(devices: Box<DeviceLister>) -> Self {
        Self { devices }
    }
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathCollector")
    }
}

/// Writes one sample.
fn sample<S: prometheus_client::encoding::EncodeLabelSet>(
    metric: &mut MetricEncoder<'_>,
    labels: &S,
    value: impl EncodeMetric,
) -> std::fmt::Result {
    value.encode(metric.encode_family(labels)?)
}

/// A family with one sample per device and queue, and per value of `by` (a label name and its
/// values) if given: `value` gets the queue and the index of the label value.
fn per_queue<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    devices: &[(String, Arc<DeviceStats>)],
    (name, help, kind): (&str, &str, MetricType),
    by: Option<(&str, &[&str])>,
    value: impl Fn(&QueueStats, usize) -> M,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    let (label, values) = by.unwrap_or(("", &[""]));
    for (volume, stats) in devices {
        for (q, queue) in stats.queues.iter().enumerate() {
            let q = q.to_string();
            for (i, v) in values.iter().enumerate() {
                let mut labels = vec![("volume_id", volume.as_str()), ("queue", q.as_str())];
                if by.is_some() {
                    labels.push((label, v));
                }
                sample(&mut metric, &labels, value(queue, i))?;
            }
        }
    }
    Ok(())
}

/// The names of the request kinds, in index order.
const KIND_NAMES: [&str; RequestKind::ALL.len()] = {
    let mut names = [""; RequestKind::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = RequestKind::ALL[i].name();
        i += 1;
    }
    names
};

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let devices = (self.devices)();
        let counter = MetricType::Counter;
        let statuses = FAILED_STATUSES.map(|(_, name)| name);
        per_queue(
            &mut encoder,
            &devices,
            ("vduse_csi_requests", "Requests completed with status OK, by operation.", counter),
            Some(("op", &KIND_NAMES)),
            |q, k| ConstCounter::new(q.completed[k].get()),
        )?;
        per_queue(
            &mut encoder,
            &devices,
            (
                "vduse_csi_bytes",
                "Bytes read or written (discard, write_zeroes: bytes covered) by requests completed with status OK.",
                counter,
            ),
            Some(("op", &KIND_NAMES)),
            |q, k| ConstCounter::new(q.bytes[k].get()),
        )?;
        per_queue(
            &mut encoder,
            &devices,
            ("vduse_csi_requests_failed", "Requests completed with a failure status (ioerr, unsupp).", counter),
            Some(("status", &statuses)),
            |q, i| ConstCounter::new(q.failed[i].get()),
        )?;
        per_queue(
            &mut encoder,
            &devices,
            ("vduse_csi_requests_in_flight", "Requests popped from the ring and not completed yet.", MetricType::Gauge),
            None,
            |q, _| ConstGauge::new(q.in_flight.get() as i64),
        )?;
        per_queue(
            &mut encoder,
            &devices,
            ("vduse_csi_kicks", "Wake-ups of the queue thread by the driver's kick.", counter),
            None,
            |q, _| ConstCounter::new(q.kicks.get()),
        )?;
        per_queue(
            &mut encoder,
            &devices,
            ("vduse_csi_interrupts", "Interrupts injected into the driver.", counter),
            None,
            |q, _| ConstCounter::new(q.interrupts.get()),
        )?;
        per_queue(
            &mut encoder,
            &devices,
            (
                "vduse_csi_qos_throttled_seconds",
                "Time the queue held requests back to keep the volume within its QoS limits.",
                counter,
            ),
            None,
            |q, _| ConstCounter::new(q.throttled_ns.get() as f64 / 1e9),
        )?;
        let mut metric = encoder.encode_descriptor(
            "vduse_csi_request_duration_seconds",
            "Time from popping a request off the ring to completing it, by operation (all queues).",
            None,
            MetricType::Histogram,
        )?;
        for (volume, stats) in &devices {
            for kind in RequestKind::ALL {
                let k = kind.index();
                let count = stats.sum(|q| q.latency[k].count());
                if count == 0 {
                    continue;
                }
                let sum = stats.sum(|q| q.latency[k].sum_ns.get()) as f64 / 1e9;
                let buckets: Vec<(f64, u64)> = (0..=LATENCY_BOUNDS_US.len())
                    .map(|b| {
                        let bound = LATENCY_BOUNDS_US.get(b).map_or(f64::INFINITY, |us| *us as f64 / 1e6);
                        (bound, stats.sum(|q| q.latency[k].buckets[b].get()))
                    })
                    .collect();
                let labels = [("volume_id", volume.as_str()), ("op", kind.name())];
                metric.encode_family(&labels)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "vduse_csi_device_takeovers",
            "Times this process took the volume's device over from a server that had died.",
            None,
            counter,
        )?;
        for (volume, stats) in &devices {
            let value = stats.takeovers.load(std::sync::atomic::Ordering::Relaxed);
            sample(&mut metric, &[("volume_id", volume.as_str())], ConstCounter::new(value))?;
        }
        let mut metric = encoder.encode_descriptor(
            "vduse_csi_queue_faults",
            "Queue threads that stopped on a fault (the device is degraded until it is served again).",
            None,
            counter,
        )?;
        for (volume, stats) in &devices {
            let value = stats.queue_faults.load(std::sync::atomic::Ordering::Relaxed);
            sample(&mut metric, &[("volume_id", volume.as_str())], ConstCounter::new(value))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::request::{STATUS_IOERR, STATUS_OK};

    #[test]
    fn an_empty_address_turns_the_endpoint_off() {
        assert_eq!(parse_address("").unwrap(), None);
        assert_eq!(parse_address("127.0.0.1:9810").unwrap(), Some("127.0.0.1:9810".parse().unwrap()));
        assert!(parse_address("localhost:9810").is_err());
    }

    #[test]
    fn queue_counters_are_summed_into_the_text_format() {
        let stats = Arc::new(DeviceStats::new(2));
        stats.queues[0].record(RequestKind::Read, STATUS_OK, 4096, 20_000);
        stats.queues[1].record(RequestKind::Read, STATUS_OK, 4096, 2_000_000);
        stats.queues[1].record(RequestKind::Write, STATUS_IOERR, 4096, 20_000);
        let devices = Arc::clone(&stats);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(DatapathCollector::new(Box::new(move || {
            vec![("pvc-1".to_owned(), Arc::clone(&devices))]
        }))));
        let text = render(&registry);
        for line in [
            "# TYPE vduse_csi_requests_total counter",
            r#"vduse_csi_requests_total{volume_id="pvc-1",queue="0",op="read"} 1"#,
            r#"vduse_csi_requests_total{volume_id="pvc-1",queue="1",op="read"} 1"#,
            r#"vduse_csi_bytes_total{volume_id="pvc-1",queue="1",op="read"} 4096"#,
            r#"vduse_csi_requests_failed_total{volume_id="pvc-1",queue="1",status="ioerr"} 1"#,
            r#"vduse_csi_request_duration_seconds_bucket{volume_id="pvc-1",op="read",le="2.5e-05"} 1"#,
            r#"vduse_csi_request_duration_seconds_count{volume_id="pvc-1",op="read"} 2"#,
            r#"vduse_csi_device_takeovers_total{volume_id="pvc-1"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
