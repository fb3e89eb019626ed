//! Prometheus metrics. Every process installs the recorder once; the gateway renders it on its
//! own `/metrics` route, workers and the treasury serve it on `METRICS_ADDR` when set.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder (once per process) and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
                ])
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            spawn_upkeep(handle.clone());
            // Another recorder may already be installed in tests that run several services in
            // one process; then this handle renders nothing, which is harmless there.
            drop(metrics::set_global_recorder(recorder));
            handle
        })
        .clone()
}

/// How often the recorded histogram samples are folded into their buckets.
const UPKEEP_INTERVAL_MS: u64 = 5_000;

/// Folds the histograms' samples into their buckets every `UPKEEP_INTERVAL_MS`, on a thread of its
/// own for the life of the process. The recorder keeps every sample a histogram records until
/// upkeep (or a render of `/metrics`) drains it, so without this a process nobody scrapes would
/// grow by every request's and every batch's samples, and the first scrape after a long run
/// would stall on millions of them. A thread rather than a task, because tests run several
/// services, each on a runtime of its own, in one process that has one recorder.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_string())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(UPKEEP_INTERVAL_MS));
                handle.run_upkeep();
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "could not start the metrics upkeep thread: histograms are drained only when /metrics is read");
    }
}

/// Serves `GET /metrics` on `address` until `shutdown`.
pub async fn serve(address: String, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handle = install();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    let listener = tokio::net::TcpListener::bind(&address).await?;
    tracing::info!(%address, "serving metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

/// Installs the recorder and, when `address` is set, serves it in the background until
/// `shutdown` (workers and the treasury; the gateway renders on its own router).
pub fn install_and_serve(address: Option<String>, shutdown: &CancellationToken) {
    install();
    if let Some(address) = address {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) = serve(address, shutdown).await {
                tracing::error!(error = format!("{error:#}"), "metrics server failed");
            }
        });
    }
}
