//! The production backends: es-postgres's store, checkpoints and leader lock
//! in a fresh schema, RabbitMQ under a unique prefix, es-rabbit's relay, and
//! es-projections' PostgreSQL runner with its own pool (named, so that a test
//! can cut exactly its connections).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use es_core::relay::route_without_saga_state;
use es_core::{CancellationToken, EventBus, EventStore, Saga, Subscription};
use es_postgres::{PgCheckpointStore, PgEventStore, PgLeaderLock};
use es_projections::postgres::PgProjectionRunner;
use es_projections::{ProjectionHandle, RunnerOptions};
use es_rabbit::{RabbitBus, RabbitConfig, RabbitRelay};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::balances::{self, Balances, PgBalances};
use crate::bank::{Transfer, ACCOUNT_COMMANDS};
use crate::pipeline::{Backend, Crash};

/// The pipeline on PostgreSQL and RabbitMQ.
#[derive(Debug)]
pub struct Production {
    pool: PgPool,
    schema: String,
    model_schema: String,
    store: PgEventStore,
    /// The relay's connection.
    bus: RabbitBus,
    /// The consumers' connection.
    consumers: RabbitBus,
    /// The projection runner's pool, under `application`.
    projection_pool: PgPool,
    application: String,
}

/// A RabbitMQ config with a unique prefix (the connection name too) for
/// `test`: tests never share exchanges or queues, and a test can tell its
/// connections apart.
pub fn rabbit_config(test: &str) -> RabbitConfig {
    let prefix = format!("t-{test}-{}.", &Uuid::new_v4().simple().to_string()[..8]);
    RabbitConfig::from_env()
        .with_connection_name(prefix.clone())
        .with_prefix(prefix)
        .with_reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .with_operation_timeout(Duration::from_secs(5))
        // A test that fails before deleting its queues leaves none for long.
        .with_queue_expires(Some(Duration::from_secs(1800)))
}

/// Connects to RabbitMQ, failing with the URL tried when it is absent.
///
/// # Panics
/// When the broker cannot be reached.
pub async fn rabbit(config: RabbitConfig) -> RabbitBus {
    let url = es_core::redact_url(&config.url);
    match RabbitBus::connect(config).await {
        Ok(bus) => bus,
        Err(error) => panic!("RabbitMQ is required at {url} (set AMQP_URL): {error}"),
    }
}

impl Production {
    /// Fresh schemas and a unique queue prefix for `test`.
    ///
    /// # Panics
    /// When PostgreSQL or RabbitMQ cannot be reached, with the URL tried.
    pub async fn start(test: &str) -> Arc<Self> {
        let (pool, schema) = es_postgres::testing::fresh_schema_with(16).await;
        let store = PgEventStore::new(pool.clone(), schema.clone())
            .with_read_wait(Duration::from_secs(10))
            .with_poll_interval(Duration::from_millis(200));
        let config = rabbit_config(test);
        let bus = rabbit(config.clone()).await;
        let consumers = rabbit(
            config
                .clone()
                .with_connection_name(format!("{}consumers", config.prefix)),
        )
        .await;
        let id = Uuid::new_v4().simple().to_string();
        let application = format!("es-tests-{}", &id[..12]);
        let url = es_postgres::testing::database_url();
        let options = PgConnectOptions::from_str(&url)
            .unwrap_or_else(|e| panic!("DATABASE_URL {}: {e}", es_core::redact_url(&url)))
            .application_name(&application);
        let projection_pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is not reachable at {}: {e}",
                    es_core::redact_url(&url)
                )
            });
        Arc::new(Self {
            pool,
            model_schema: format!("m_{}", &id[..16]),
            schema,
            store,
            bus,
            consumers,
            projection_pool,
            application,
        })
    }

    /// The main pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The relay's bus.
    pub fn bus(&self) -> &RabbitBus {
        &self.bus
    }

    /// The consumers' bus.
    pub fn consumers(&self) -> &RabbitBus {
        &self.consumers
    }
}

#[async_trait]
impl Backend for Production {
    fn name(&self) -> &'static str {
        "PostgreSQL and RabbitMQ"
    }

    fn store(&self) -> Arc<dyn EventStore> {
        Arc::new(self.store.clone())
    }

    fn consumer_bus(&self) -> Arc<dyn EventBus> {
        Arc::new(self.consumers.clone())
    }

    fn crash(&self) -> Crash {
        Crash::Hang
    }

    fn spawn_relay(&self, stop: CancellationToken) -> JoinHandle<()> {
        let relay = RabbitRelay::new(
            format!("{}_relay", self.schema),
            self.store(),
            &self.bus,
            Arc::new(PgCheckpointStore::new(self.pool.clone(), &self.schema)),
            Arc::new(
                PgLeaderLock::new(self.pool.clone()).retry_interval(Duration::from_millis(50)),
            ),
        )
        .with_batch_size(64)
        .with_route(route_without_saga_state(&[<Transfer as Saga>::TYPE]))
        .with_mandatory_topics([ACCOUNT_COMMANDS]);
        tokio::spawn(async move {
            relay
                .run(stop)
                .await
                .unwrap_or_else(|e| panic!("relay: {e}"));
        })
    }

    async fn spawn_projection(&self) -> ProjectionHandle {
        PgProjectionRunner::new(
            self.projection_pool.clone(),
            &self.schema,
            &self.model_schema,
            self.store(),
            Arc::new(PgBalances),
        )
        .unwrap_or_else(|e| panic!("projection runner: {e}"))
        .with_options(
            RunnerOptions::default()
                .batch_size(50)
                .backoff(Duration::from_millis(20), Duration::from_millis(500)),
        )
        .with_leader_check(Duration::from_millis(100))
        .spawn()
    }

    async fn read_model(&self) -> Balances {
        balances::read_pg(&self.pool, &self.model_schema).await
    }

    async fn queue_depth(&self, group: &str) -> u64 {
        u64::from(
            self.bus
                .queue_depth(group)
                .await
                .unwrap_or_else(|e| panic!("depth of {group}: {e}")),
        )
    }

    async fn dead_letters(&self, group: &str) -> u64 {
        u64::from(
            self.bus
                .dead_letter_depth(group)
                .await
                .unwrap_or_else(|e| panic!("dead letters of {group}: {e}")),
        )
    }

    async fn drop_consumer_connection(&self) {
        self.consumers.close().await;
    }

    async fn drop_publisher_connection(&self) {
        self.bus.close().await;
    }

    async fn cut_projection_connections(&self) -> u64 {
        let cut: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&self.application)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_else(|e| panic!("terminating the projection's connections: {e}"));
        cut.iter().filter(|(done,)| *done).count() as u64
    }

    async fn cleanup(&self, subscriptions: &[Subscription]) {
        for subscription in subscriptions {
            let _ = self.bus.delete_group(subscription).await;
        }
        let _ = self
            .bus
            .delete_exchanges(&["account", ACCOUNT_COMMANDS])
            .await;
        self.bus.close().await;
        self.consumers.close().await;
        self.projection_pool.close().await;
        for schema in [&self.model_schema, &self.schema] {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .execute(&self.pool)
                .await;
        }
        self.pool.close().await;
    }
}
