//! The per-process gauges of the distributed deployment: queue depths of the
//! groups this process consumes, relay lag per store, projection lag, the
//! PostgreSQL xmin hold-back.

use std::sync::Arc;
use std::time::Duration;

use es_core::{CheckpointStore, Position};
use es_postgres::sqlx::PgPool;
use es_postgres::{PgCheckpointStore, PgEventStore};
use es_rabbit::RabbitBus;
use tokio::sync::watch;

use super::PgQueryService;

/// What the gauges measure.
pub(super) struct Gauges {
    bus: RabbitBus,
    /// The consumer groups this process serves.
    pub groups: Vec<&'static str>,
    /// The stores whose relays run here (name, store).
    pub relays: Vec<(&'static str, PgEventStore)>,
    /// The query service, when it runs here.
    pub projection: Option<Arc<PgQueryService>>,
    /// The process's pool.
    pub pool: Option<PgPool>,
}

impl Gauges {
    pub(super) fn new(bus: &RabbitBus) -> Self {
        Self {
            bus: bus.clone(),
            groups: Vec::new(),
            relays: Vec::new(),
            projection: None,
            pool: None,
        }
    }

    /// Updates the gauges every second until `stop` turns true.
    pub(super) async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if *stop.borrow() {
                return;
            }
            self.measure().await;
        }
    }

    async fn measure(&self) {
        for group in &self.groups {
            if let Ok(depth) = self.bus.queue_depth(group).await {
                metrics::gauge!("bus_queue_depth", "group" => *group).set(f64::from(depth));
            }
            if let Ok(depth) = self.bus.dead_letter_depth(group).await {
                metrics::gauge!("bus_dead_letter_depth", "group" => *group).set(f64::from(depth));
            }
        }
        for (name, store) in &self.relays {
            let checkpoints = PgCheckpointStore::new(store.pool().clone(), store.schema());
            let relayed = checkpoints
                .load(&format!("{}_relay", store.schema()))
                .await
                .ok()
                .flatten()
                .unwrap_or(Position::START);
            if let Ok(lag) = es_projections::telemetry::measure_lag(store, relayed, 10_000).await {
                metrics::gauge!("relay_lag_events", "store" => *name).set(lag.events as f64);
                metrics::gauge!("relay_lag_seconds", "store" => *name).set(lag.seconds);
            }
            if let Ok(holdback) = store.holdback().await {
                metrics::gauge!("store_xmin_holdback_events", "store" => *name)
                    .set(holdback.xids_in_flight() as f64);
            }
        }
        if let Some(query) = &self.projection {
            if let Ok(lag) = query.lag().await {
                metrics::gauge!("projection_lag_events", "projection" => "orders_read_model")
                    .set(lag.events as f64);
                metrics::gauge!("projection_lag_seconds", "projection" => "orders_read_model")
                    .set(lag.seconds);
            }
        }
        if let Some(pool) = &self.pool {
            metrics::gauge!("pg_pool_connections").set(f64::from(pool.size()));
        }
    }
}
