//! The plugin's metrics: every CSI call by method and gRPC code (a tower layer around the
//! gRPC server), the node's volumes and backing store, and each staged volume's datapath
//! counters (read from its device server at scrape time).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::Plugin;
use crate::metrics::DatapathCollector;
use crate::server::HealthState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: String,
}

/// CSI calls, counted and timed.
#[derive(Debug)]
pub struct CallMetrics {
    calls: Family<CallLabels, Counter>,
    durations: Family<CallLabels, Histogram>,
}

impl CallMetrics {
    fn new() -> Self {
        Self {
            calls: Family::default(),
            // 1 ms to ~65 s: a Probe answers in microseconds, a NodeStage with mkfs in seconds.
            durations: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 4.0, 9))),
        }
    }

    fn observe(&self, method: &str, code: tonic::Code, seconds: f64) {
        let code = match code {
            tonic::Code::Ok => "OK".to_owned(),
            other => format!("{other:?}"),
        };
        let labels = CallLabels { method: method.to_owned(), code };
        self.calls.get_or_create(&labels).inc();
        self.durations.get_or_create(&labels).observe(seconds);
    }
}

/// The registry the plugin serves: CSI calls, the node, the volumes' datapaths. Returns the
/// layer that counts the calls.
pub fn registry(plugin: &Arc<Plugin>) -> (Registry, CallMetricsLayer) {
    let mut registry = Registry::default();
    let calls = Arc::new(CallMetrics::new());
    registry.register("vduse_csi_csi_calls", "CSI calls by method and gRPC code.", calls.calls.clone());
    registry.register(
        "vduse_csi_csi_call_duration_seconds",
        "Time to answer a CSI call, by method and gRPC code.",
        calls.durations.clone(),
    );
    let p = Arc::clone(plugin);
    registry.register_collector(Box::new(DatapathCollector::new(Box::new(move || {
        p.agent.servers().into_iter().filter_map(|(id, s)| s.stats().map(|st| (id, Arc::clone(st)))).collect()
    }))));
    registry.register_collector(Box::new(NodeCollector(Arc::clone(plugin))));
    (registry, CallMetricsLayer(calls))
}

/// The node's volumes and backing store.
struct NodeCollector(Arc<Plugin>);

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let servers = self.0.agent.servers();
        let served = servers.len();
        let unhealthy = servers.iter().filter(|(_, s)| s.health() != HealthState::Serving).count();
        drop(servers);
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64| -> std::fmt::Result {
            ConstGauge::new(v as i64).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
        };
        gauge(&mut encoder, "vduse_csi_volumes_staged", "Volumes whose device this plugin serves.", served as u64)?;
        gauge(
            &mut encoder,
            "vduse_csi_devices_unhealthy",
            "Served devices with a queue or control thread stopped on a fault.",
            unhealthy as u64,
        )?;
        if let Ok(space) = self.0.agent.store().space() {
            gauge(
                &mut encoder,
                "vduse_csi_backing_store_used_bytes",
                "Bytes used on the filesystem of the state dir.",
                space.total.saturating_sub(space.free),
            )?;
            gauge(
                &mut encoder,
                "vduse_csi_backing_store_free_bytes",
                "Bytes new data can still take on the filesystem of the state dir.",
                space.free,
            )?;
            gauge(
                &mut encoder,
                "vduse_csi_provisioned_bytes",
                "Sum of the capacities of every volume on this node.",
                space.provisioned,
            )?;
        }
        Ok(())
    }
}

/// Counts and times every gRPC call that passes through it.
#[derive(Debug, Clone)]
pub struct CallMetricsLayer(Arc<CallMetrics>);

impl<S> tower::Layer<S> for CallMetricsLayer {
    type Service = CallMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallMetricsService { inner, metrics: Arc::clone(&self.0) }
    }
}

#[derive(Debug, Clone)]
pub struct CallMetricsService<S> {
    inner: S,
    metrics: Arc<CallMetrics>,
}

impl<S, B, R> tower::Service<axum::http::Request<B>> for CallMetricsService<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        // "/csi.v1.Node/NodeStageVolume" → "NodeStageVolume".
        let method = req.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
        let metrics = Arc::clone(&self.metrics);
        let start = Instant::now();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await;
            // Our calls are unary: an error comes as a trailers-only response, its code in
            // the headers; a success carries no grpc-status header.
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from),
                Err(_) => tonic::Code::Unknown,
            };
            metrics.observe(&method, code, start.elapsed().as_secs_f64());
            response
        })
    }
}
