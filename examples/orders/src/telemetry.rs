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

/// Keeps the log writer's thread running; dropping it flushes what is
/// buffered. Hold it until the process ends.
pub type LogGuard = tracing_appender::non_blocking::WorkerGuard;

/// Logs to stderr, filtered by `RUST_LOG` (else `default_level`), with the
/// spans' fields (correlation and causation ids) on every line.
///
/// Lines are written by a thread of their own, so a slow terminal or pipe
/// never blocks the runtime's workers (a write to stderr is a blocking
/// system call, one per line). The writer does not drop lines: when its
/// buffer is full, logging waits, as a direct write would. Colours are used
/// only when stderr is a terminal.
pub fn init_tracing(json: bool, default_level: &str) -> LogGuard {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("orders-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    guard
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
