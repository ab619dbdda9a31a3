//! Wiring: every service, the saga, the relay and the deadline scheduler over
//! one set of backends, and the merged HTTP API.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use es_core::{
    CheckpointStore, Clock, DeadlineScheduler, Delivery, EventBus, EventStore, InMemoryBus,
    InMemoryCheckpointStore, InMemoryEventStore, InMemoryInbox, InMemorySnapshotStore, Inbox,
    MessageHandler, Outcome, Relay, SagaHandler, SagaManager, SnapshotPolicy, SnapshotStore,
    Subscription, SubscriptionHandle, SystemClock,
};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use utoipa::{OpenApi, ToSchema};

use crate::inventory::{InventoryApi, InventoryCommandHandler, InventoryService};
use crate::messages::topics;
use crate::notification::{NotificationHandler, NotificationService, RecordingSink};
use crate::order::{Catalog, CatalogHandler, OrderApi, OrderCommandHandler, OrderService};
use crate::payment::{PaymentCommandHandler, PaymentService};
use crate::query::{QueryApi, QueryService};
use crate::saga::OrderSaga;
use crate::{telemetry, Result};

/// How the system runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long payment may take once stock is reserved (default 30 s).
    pub payment_timeout: Duration,
    /// Where time comes from (a `ManualClock` in tests).
    pub clock: Arc<dyn Clock>,
    /// How often the deadline scheduler looks at the clock.
    pub deadline_tick: Duration,
    /// Concurrent consumers per subscription.
    pub consumers: u16,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            payment_timeout: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
            deadline_tick: Duration::from_millis(50),
            consumers: 16,
        }
    }
}

/// The backends every service is written against. The embedded default is
/// all in memory; part 2 plugs PostgreSQL and RabbitMQ in here.
#[derive(Clone)]
pub struct Backends {
    /// The event store.
    pub store: Arc<dyn EventStore>,
    /// The message bus.
    pub bus: Arc<dyn EventBus>,
    /// The relay's checkpoints.
    pub checkpoints: Arc<dyn CheckpointStore>,
    /// Aggregate snapshots.
    pub snapshots: Arc<dyn SnapshotStore>,
    /// Processed-message ids.
    pub inbox: Arc<dyn Inbox>,
    memory_bus: Option<InMemoryBus>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("embedded", &self.memory_bus.is_some())
            .finish_non_exhaustive()
    }
}

impl Backends {
    /// Everything in process memory.
    pub fn in_memory() -> Self {
        let bus = InMemoryBus::new();
        Self {
            store: Arc::new(InMemoryEventStore::new()),
            bus: Arc::new(bus.clone()),
            checkpoints: Arc::new(InMemoryCheckpointStore::new()),
            snapshots: Arc::new(InMemorySnapshotStore::new()),
            inbox: Arc::new(InMemoryInbox::new()),
            memory_bus: Some(bus),
        }
    }

    /// Custom backends.
    pub fn new(
        store: Arc<dyn EventStore>,
        bus: Arc<dyn EventBus>,
        checkpoints: Arc<dyn CheckpointStore>,
        snapshots: Arc<dyn SnapshotStore>,
        inbox: Arc<dyn Inbox>,
    ) -> Self {
        Self {
            store,
            bus,
            checkpoints,
            snapshots,
            inbox,
            memory_bus: None,
        }
    }
}

/// Subscription group names.
pub mod groups {
    /// The saga's inputs.
    pub const SAGA: &str = "order_saga";
    /// The order service's commands.
    pub const ORDER: &str = "order_service";
    /// The order service's catalog read model.
    pub const CATALOG: &str = "order_catalog";
    /// The inventory's commands.
    pub const INVENTORY: &str = "inventory_service";
    /// The payment service's commands.
    pub const PAYMENT: &str = "payment_service";
    /// The notification service's commands.
    pub const NOTIFICATION: &str = "notification_service";
    /// The query service's replica of the order events (the distributed
    /// deployment; in one process the query service follows the store).
    pub const QUERY: &str = "order_query";
    /// Every group.
    pub const ALL: [&str; 7] = [
        SAGA,
        ORDER,
        CATALOG,
        INVENTORY,
        PAYMENT,
        NOTIFICATION,
        QUERY,
    ];
}

/// The whole system in one process.
pub struct System {
    backends: Backends,
    /// The order service.
    pub orders: Arc<OrderService>,
    /// The inventory service.
    pub inventory: Arc<InventoryService>,
    /// The payment service.
    pub payments: Arc<PaymentService>,
    /// The notification service.
    pub notifications: Arc<NotificationService>,
    /// What the notification service sent.
    pub sent: Arc<RecordingSink>,
    /// The query service.
    pub query: Arc<QueryService>,
    /// The saga's manager.
    pub saga: Arc<SagaManager<OrderSaga>>,
    config: Config,
    subscriptions: Vec<SubscriptionHandle>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("System")
            .field("backends", &self.backends)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Times the saga's reactions.
struct TimedSaga(SagaHandler<OrderSaga>);

#[async_trait]
impl MessageHandler for TimedSaga {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let started = std::time::Instant::now();
        let outcome = self.0.handle(delivery).await;
        metrics::histogram!("saga_step_seconds", "input" => delivery.message.message_type.to_string())
            .record(started.elapsed().as_secs_f64());
        outcome
    }
}

impl System {
    /// The embedded default: in-memory store, bus and read models.
    pub async fn embedded(config: Config) -> Result<Self> {
        Self::start(Backends::in_memory(), config).await
    }

    /// Starts every service over `backends`.
    pub async fn start(backends: Backends, config: Config) -> Result<Self> {
        telemetry::prometheus();
        let store = Arc::clone(&backends.store);
        let bus = Arc::clone(&backends.bus);
        let catalog = Arc::new(Catalog::new());
        let orders = Arc::new(OrderService::new(
            crate::repository(Arc::clone(&store)),
            Arc::clone(&catalog),
            Arc::clone(&config.clock),
            config.payment_timeout,
        ));
        let inventory = Arc::new(InventoryService::new(
            crate::repository(Arc::clone(&store)).with_snapshots(
                Arc::clone(&backends.snapshots),
                SnapshotPolicy::Every(16),
                1,
            ),
            crate::repository(Arc::clone(&store)),
        ));
        let payments = Arc::new(PaymentService::new(crate::repository(Arc::clone(&store))));
        let sent = Arc::new(RecordingSink::default());
        let notifications = Arc::new(NotificationService::new(
            Arc::clone(&backends.inbox),
            Arc::clone(&sent) as Arc<dyn crate::notification::NotificationSink>,
        ));
        let saga = Arc::new(
            SagaManager::<OrderSaga>::new(Arc::clone(&store), Arc::clone(&config.clock))
                .with_instance_cache(crate::CACHED_STATES),
        );
        let query = Arc::new(QueryService::start(Arc::clone(&store)));

        let sub = |group: &str, bindings: &[String]| {
            Subscription::new(group, bindings.iter().cloned())
                .with_prefetch(config.consumers)
                .with_max_attempts(50)
                .with_retry_delay(Duration::from_millis(20))
        };
        let on = |topic: &str, types: &[&str]| -> Vec<String> {
            types.iter().map(|t| format!("{topic}.{t}")).collect()
        };
        let mut saga_bindings = on(
            topics::ORDER,
            &[
                "OrderCreated",
                "OrderInventoryConfirmed",
                "OrderPaymentConfirmed",
                "OrderCompleted",
                "OrderCancelled",
            ],
        );
        saga_bindings.extend(on(
            topics::INVENTORY,
            &["InventoryReserved", "InventoryReservationFailed"],
        ));
        saga_bindings.extend(on(
            topics::PAYMENT,
            &["PaymentSucceeded", "PaymentDeclined"],
        ));
        let wiring: Vec<(Subscription, Arc<dyn MessageHandler>)> = vec![
            (
                sub(groups::SAGA, &saga_bindings),
                Arc::new(TimedSaga(SagaHandler(Arc::clone(&saga)))),
            ),
            (
                sub(groups::ORDER, &[format!("{}.*", topics::ORDER_COMMANDS)]),
                Arc::new(OrderCommandHandler(Arc::clone(&orders))),
            ),
            (
                sub(groups::CATALOG, &on(topics::PRODUCT, &["ProductCreated"])),
                Arc::new(CatalogHandler(Arc::clone(&catalog))),
            ),
            (
                sub(
                    groups::INVENTORY,
                    &[format!("{}.*", topics::INVENTORY_COMMANDS)],
                ),
                Arc::new(InventoryCommandHandler(Arc::clone(&inventory))),
            ),
            (
                sub(
                    groups::PAYMENT,
                    &[format!("{}.*", topics::PAYMENT_COMMANDS)],
                ),
                Arc::new(PaymentCommandHandler(Arc::clone(&payments))),
            ),
            (
                sub(
                    groups::NOTIFICATION,
                    &[format!("{}.*", topics::NOTIFICATION_COMMANDS)],
                ),
                Arc::new(NotificationHandler(Arc::clone(&notifications))),
            ),
        ];
        let mut subscriptions = Vec::new();
        for (subscription, handler) in wiring {
            subscriptions.push(bus.subscribe(subscription, handler).await?);
        }

        // Consumers are in place: now the relay may publish.
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let relay = Arc::new(
            Relay::new(
                "orders_relay",
                Arc::clone(&store),
                Arc::clone(&bus),
                Arc::clone(&backends.checkpoints),
            )
            .with_batch_size(512)
            .with_route(es_core::relay::route_without_saga_state(&[
                <OrderSaga as es_core::Saga>::TYPE,
            ])),
        );
        {
            let relay = Arc::clone(&relay);
            let stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(error) = relay.run(stopped).await {
                    tracing::error!(%error, "relay stopped");
                }
            }));
        }
        let scheduler = DeadlineScheduler::new(Arc::clone(&saga), config.deadline_tick);
        {
            let stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(error) = scheduler.run(stopped).await {
                    tracing::error!(%error, "deadline scheduler stopped");
                }
            }));
        }
        tasks.push(tokio::spawn(telemetry::gauges(
            Arc::clone(&store),
            backends.memory_bus.clone(),
            Arc::clone(&query),
            relay.progress(),
            stopped,
        )));
        Ok(Self {
            backends,
            orders,
            inventory,
            payments,
            notifications,
            sent,
            query,
            saga,
            config,
            subscriptions,
            stop,
            tasks,
        })
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.backends.store
    }

    /// The in-memory bus, on the embedded default.
    pub fn memory_bus(&self) -> Option<&InMemoryBus> {
        self.backends.memory_bus.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Every service's routes merged, with `/health`, `/metrics` and
    /// `/openapi.json`.
    pub fn router(&self) -> Router {
        let health = Arc::new(HealthState {
            store: Arc::clone(&self.backends.store),
            query: Arc::clone(&self.query),
        });
        let router = Router::new()
            .merge(crate::order::router(Arc::clone(&self.orders)))
            .merge(crate::inventory::router(Arc::clone(&self.inventory)))
            .merge(crate::query::router(Arc::clone(&self.query)))
            .merge(
                Router::new()
                    .route("/health", get(health_check))
                    .with_state(health),
            )
            .route("/metrics", get(metrics_text))
            .route("/openapi.json", get(|| async { Json(openapi()) }))
            .layer(axum::extract::DefaultBodyLimit::max(
                crate::http::MAX_BODY_BYTES,
            ));
        crate::http::with_json_fallbacks(router)
    }

    /// Stops every consumer and background task.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        for s in self.subscriptions {
            s.stop().await;
        }
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.query.projection().stop().await;
    }
}

struct HealthState {
    store: Arc<dyn EventStore>,
    query: Arc<QueryService>,
}

/// The service's health.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: &'static str,
    /// The store's head position.
    pub store_head: String,
    /// The read model's position.
    pub read_model_position: String,
}

/// Health: answers 200 when the store answers.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Healthy", body = Health), (status = 503, description = "The store does not answer")))]
async fn health_check(State(state): State<Arc<HealthState>>) -> axum::response::Response {
    match state.store.head().await {
        Ok(head) => Json(Health {
            status: "ok",
            store_head: head.to_string(),
            read_model_position: state.query.projection().position().to_string(),
        })
        .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unavailable", "error": error.to_string()})),
        )
            .into_response(),
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::prometheus().render(),
    )
}

#[derive(OpenApi)]
#[openapi(
    info(title = "orders", description = "The event-driven order-processing system"),
    paths(health_check, metrics_text),
    components(schemas(Health)),
    tags((name = "operations", description = "Health and metrics"))
)]
struct SystemApi;

/// The merged OpenAPI document of every service.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = SystemApi::openapi();
    doc.merge(OrderApi::openapi());
    doc.merge(InventoryApi::openapi());
    doc.merge(QueryApi::openapi());
    doc
}
