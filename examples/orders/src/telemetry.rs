//! Metrics and logs.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use es_core::relay::Blocked;
use es_core::{CancellationToken, CheckpointStore, EventStore, InMemoryBus, Position};
use es_postgres::sqlx::PgPool;
use es_postgres::PgEventStore;
use es_rabbit::RabbitBus;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::backends::Backends;
use crate::query::OrderQueries;

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
pub(crate) type LogGuard = tracing_appender::non_blocking::WorkerGuard;

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

/// One relay's gauges: how far it is behind its store, and the store's xmin
/// hold-back on PostgreSQL.
pub(crate) struct RelayGauge {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) checkpoints: Arc<dyn CheckpointStore>,
    pub(crate) name: String,
    pub(crate) label: &'static str,
    pub(crate) pg: Option<PgEventStore>,
    pub(crate) blocked: watch::Receiver<Option<Blocked>>,
}

/// The process's gauges, updated every second: queue depths of the groups
/// it consumes, relay lag per store, projection lag, the PostgreSQL xmin
/// hold-back and pool size.
pub(crate) struct Gauges {
    memory_bus: Option<InMemoryBus>,
    rabbit: Option<(RabbitBus, PgPool)>,
    pub(crate) groups: Vec<&'static str>,
    pub(crate) relays: Vec<RelayGauge>,
    pub(crate) query: Option<Arc<dyn OrderQueries>>,
}

impl Gauges {
    pub(crate) fn new(backends: &Backends) -> Self {
        Self {
            memory_bus: backends.memory_bus().cloned(),
            rabbit: backends
                .distributed()
                .map(|(_, pool, bus)| (bus.clone(), pool.clone())),
            groups: Vec::new(),
            relays: Vec::new(),
            query: None,
        }
    }

    /// Updates the gauges every second until `stop` is cancelled.
    pub(crate) async fn run(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            self.measure().await;
        }
    }

    async fn measure(&self) {
        for group in &self.groups {
            if let Some(bus) = &self.memory_bus {
                metrics::gauge!("bus_queue_depth", "group" => *group)
                    .set(bus.queue_depth(group) as f64);
            }
            if let Some((bus, _)) = &self.rabbit {
                if let Ok(depth) = bus.queue_depth(group).await {
                    metrics::gauge!("bus_queue_depth", "group" => *group).set(f64::from(depth));
                }
                if let Ok(depth) = bus.dead_letter_depth(group).await {
                    metrics::gauge!("bus_dead_letter_depth", "group" => *group)
                        .set(f64::from(depth));
                }
            }
        }
        for relay in &self.relays {
            let blocked = relay.blocked.borrow().is_some();
            metrics::gauge!("relay_blocked", "store" => relay.label).set(if blocked {
                1.0
            } else {
                0.0
            });
            let relayed = relay
                .checkpoints
                .load(&relay.name)
                .await
                .ok()
                .flatten()
                .unwrap_or(Position::START);
            if let Ok(lag) =
                es_projections::telemetry::measure_lag(relay.store.as_ref(), relayed, 10_000).await
            {
                metrics::gauge!("relay_lag_events", "store" => relay.label).set(lag.events as f64);
                metrics::gauge!("relay_lag_seconds", "store" => relay.label).set(lag.seconds);
            }
            if let Some(store) = &relay.pg {
                if let Ok(holdback) = store.holdback().await {
                    metrics::gauge!("store_xmin_holdback_events", "store" => relay.label)
                        .set(holdback.events_held_back as f64);
                    metrics::gauge!("store_xids_in_flight", "store" => relay.label)
                        .set(holdback.xids_in_flight() as f64);
                }
            }
        }
        if let Some(query) = &self.query {
            if let Ok(lag) = query.lag().await {
                metrics::gauge!("projection_lag_events", "projection" => "orders_read_model")
                    .set(lag.events as f64);
                metrics::gauge!("projection_lag_seconds", "projection" => "orders_read_model")
                    .set(lag.seconds);
            }
        }
        if let Some((_, pool)) = &self.rabbit {
            metrics::gauge!("pg_pool_connections").set(f64::from(pool.size()));
        }
    }
}
