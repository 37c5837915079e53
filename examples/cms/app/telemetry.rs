//! Metrics in the Prometheus text format: the listeners' counters (the
//! `event-bus` crate's `metrics` feature), the CMS's own, and per-request
//! counts and latencies, all through the `metrics` facade and recorded by
//! `metrics-exporter-prometheus`.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the process's recorder, once: a listener registers its counters
/// with whatever recorder is installed when it is spawned, so this runs
/// before the listeners are. Every `AppState` of the process shares it.
pub(crate) fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
                ])
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder (a test harness's) keeps its place; this
            // handle then renders what was recorded here, which is nothing.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was installed already");
            }
            handle
        })
        .clone()
}

/// Counts each request by route, method and status, and times it.
pub(crate) async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let labels = [
        ("route", route),
        ("method", method),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("cms_http_requests_total", &labels).increment(1);
    metrics::histogram!("cms_http_request_seconds", &labels[..2])
        .record(started.elapsed().as_secs_f64());
    response
}
