//! Metrics and logs.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use es_core::{EventStore, InMemoryBus, Position};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::query::QueryService;
use crate::system::groups;

/// The process's Prometheus recorder (installed on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::debug!("a metrics recorder was already installed");
        }
        handle
    })
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default_level`), with the
/// spans' fields (correlation and causation ids) on every line.
pub fn init_tracing(json: bool, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Updates queue-depth and lag gauges every second until `stop` turns true.
pub(crate) async fn gauges(
    store: Arc<dyn EventStore>,
    bus: Option<InMemoryBus>,
    query: Arc<QueryService>,
    relay: watch::Receiver<Position>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if *stop.borrow() {
            return;
        }
        if let Some(bus) = &bus {
            for group in groups::ALL {
                metrics::gauge!("bus_queue_depth", "group" => group)
                    .set(bus.queue_depth(group) as f64);
            }
        }
        if let Ok(lag) = query.projection().lag().await {
            metrics::gauge!("projection_lag_events", "projection" => "orders_read_model")
                .set(lag.events as f64);
            metrics::gauge!("projection_lag_seconds", "projection" => "orders_read_model")
                .set(lag.seconds);
        }
        let relayed = *relay.borrow();
        if let Ok(lag) =
            es_projections::telemetry::measure_lag(store.as_ref(), relayed, 10_000).await
        {
            metrics::gauge!("relay_lag_events").set(lag.events as f64);
        }
    }
}
