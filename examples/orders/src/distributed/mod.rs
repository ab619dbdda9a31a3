//! The distributed deployment: any subset of the services in one OS process,
//! over PostgreSQL (one schema per service), RabbitMQ and Redis, with an HTTP
//! gateway in front.
//!
//! ```text
//! orders serve --services order,inventory,payment,notification,query --listen 127.0.0.1:8081
//! orders serve --services gateway --listen 127.0.0.1:8080 --order-url http://127.0.0.1:8081 ...
//! ```
//!
//! Every service owns a PostgreSQL schema named `<namespace>_<service>`: the
//! order service's event store (orders, the saga, the catalog it learns from
//! the inventory, idempotency keys), the inventory's (products, reservations,
//! snapshots), the payment service's, the notification service's inbox, and
//! the query service's read model. Each store is relayed to RabbitMQ by one
//! active relay (a PostgreSQL advisory lock elects it; standbys take over).
//! Services talk only through RabbitMQ: the query service, too, learns the
//! orders from the order events the order store's relay publishes, which it
//! copies into a replica log in its own schema and projects from there.

mod catalog;
mod gateway;
mod metrics;
mod query_pg;
mod smtp;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::routing::get;
use axum::{Json, Router};
use es_core::{
    DeadlineScheduler, Delivery, EventBus, EventStore, MessageHandler, Outcome, SagaHandler,
    SagaManager, SnapshotPolicy, Subscription, SubscriptionHandle, SystemClock,
};
use es_postgres::sqlx::postgres::PgConnectOptions;
use es_postgres::sqlx::PgPool;
use es_postgres::{
    PgCheckpointStore, PgConfig, PgEventStore, PgInbox, PgLeaderLock, PgSnapshotStore,
};
use es_rabbit::{RabbitBus, RabbitConfig, RabbitRelay};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use catalog::PgCatalog;
pub use gateway::{gateway_router, Owner, Upstreams};
pub use query_pg::{PgOrderProjection, PgQueryService};
pub use smtp::SmtpSink;

use crate::inventory::{InventoryCommandHandler, InventoryService};
use crate::messages::topics;
use crate::notification::{NotificationHandler, NotificationService};
use crate::order::{Catalog, OrderCommandHandler, OrderService};
use crate::payment::{PaymentCommandHandler, PaymentService};
use crate::saga::OrderSaga;
use crate::system::groups;
use crate::{telemetry, Error, Result};

/// The services a process can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    /// The HTTP gateway: forwards each path to its owner.
    Gateway,
    /// Orders, the saga and the catalog read model.
    Order,
    /// Products and stock.
    Inventory,
    /// The simulated card gateway.
    Payment,
    /// Email through SMTP.
    Notification,
    /// Read models in PostgreSQL and Redis.
    Query,
    /// Only the relays of the order, inventory and payment stores (each
    /// store-owning service also runs its own relay; one is active).
    Relay,
}

impl Service {
    /// Every service (what `all` means).
    pub const ALL: [Self; 7] = [
        Self::Gateway,
        Self::Order,
        Self::Inventory,
        Self::Payment,
        Self::Notification,
        Self::Query,
        Self::Relay,
    ];

    /// Its name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Order => "order",
            Self::Inventory => "inventory",
            Self::Payment => "payment",
            Self::Notification => "notification",
            Self::Query => "query",
            Self::Relay => "relay",
        }
    }
}

impl FromStr for Service {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown service {s:?}: use gateway, order, inventory, payment, notification, query, relay or all"
                )
            })
    }
}

/// Parses a `--services` list (`all` is every service).
///
/// # Errors
/// A message naming the unknown service.
pub fn parse_services(list: &[String]) -> std::result::Result<BTreeSet<Service>, String> {
    let mut set = BTreeSet::new();
    for item in list.iter().flat_map(|s| s.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        if item == "all" {
            set.extend(Service::ALL);
        } else {
            set.insert(item.parse()?);
        }
    }
    if set.is_empty() {
        return Err("no service named: use e.g. --services all".to_owned());
    }
    Ok(set)
}

/// The distributed deployment's settings (flags and environment variables
/// of `orders serve`).
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Run these services in this process over PostgreSQL, RabbitMQ and Redis
    /// (comma-separated: gateway, order, inventory, payment, notification,
    /// query, relay, or all). Without it, everything runs embedded in memory.
    #[arg(long, env = "ORDERS_SERVICES", value_delimiter = ',')]
    pub services: Option<Vec<String>>,
    /// PostgreSQL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// RabbitMQ.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Redis (the query service's hot cache).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// The SMTP server the notification service sends through (host:port).
    #[arg(long, env = "ORDERS_SMTP", default_value = "127.0.0.1:2525")]
    pub smtp: String,
    /// The sender of the notification emails.
    #[arg(long, env = "ORDERS_MAIL_FROM", default_value = "orders@example.com")]
    pub mail_from: String,
    /// Prefix of the PostgreSQL schemas (`<namespace>_order`, ...), the
    /// RabbitMQ exchanges and queues (`<namespace>.`) and the Redis keys.
    #[arg(long, env = "ORDERS_NAMESPACE", default_value = "orders")]
    pub namespace: String,
    /// Where the gateway finds the order service.
    #[arg(
        long,
        env = "ORDERS_ORDER_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub order_url: String,
    /// Where the gateway finds the inventory service.
    #[arg(
        long,
        env = "ORDERS_INVENTORY_URL",
        default_value = "http://127.0.0.1:8082"
    )]
    pub inventory_url: String,
    /// Where the gateway finds the query service.
    #[arg(
        long,
        env = "ORDERS_QUERY_URL",
        default_value = "http://127.0.0.1:8085"
    )]
    pub query_url: String,
    /// Deliveries each subscription handles at once (RabbitMQ prefetch).
    #[arg(long, env = "ORDERS_PREFETCH", default_value_t = 32)]
    pub prefetch: u16,
    /// PostgreSQL connections per process.
    #[arg(long, env = "ORDERS_PG_POOL", default_value_t = 8)]
    pub pg_pool: u32,
    /// Appends each event store runs at once; appends arriving meanwhile are
    /// group-committed (see es-postgres). On the 2-core test machine one slot
    /// gave the most orders/s (117-128 against 94-115 with 8).
    #[arg(long, env = "ORDERS_APPEND_SLOTS", default_value_t = 1)]
    pub append_slots: usize,
    /// When set, RabbitMQ deletes this deployment's queues after they have
    /// gone unused this many seconds (`x-expires`): for throw-away
    /// deployments such as test runs.
    #[arg(long, env = "ORDERS_QUEUE_EXPIRES_SECS")]
    pub queue_expires_secs: Option<u64>,
}

impl ServeArgs {
    /// Settings with every default (the environment is not read).
    pub fn defaults() -> Self {
        Self {
            services: None,
            database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            smtp: "127.0.0.1:2525".into(),
            mail_from: "orders@example.com".into(),
            namespace: "orders".into(),
            order_url: "http://127.0.0.1:8081".into(),
            inventory_url: "http://127.0.0.1:8082".into(),
            query_url: "http://127.0.0.1:8085".into(),
            prefetch: 32,
            pg_pool: 8,
            append_slots: 1,
            queue_expires_secs: None,
        }
    }

    /// The schema a service owns.
    pub fn schema(&self, service: &str) -> String {
        format!("{}_{service}", self.namespace)
    }
}

fn infra(what: &str) -> impl Fn(String) -> Error + '_ {
    move |e| Error::internal(format!("{what}: {e}"))
}

/// Retries `f` until it succeeds or `patience` has passed (start-up against
/// services that are still coming up).
async fn patiently<T, F, Fut>(what: &str, patience: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(Error::internal(format!("{what}: {e}")))
            }
            Err(e) => {
                tracing::warn!(what, error = %e, "not ready yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One process of the distributed deployment.
pub struct Node {
    services: BTreeSet<Service>,
    router: Router,
    subscriptions: Vec<SubscriptionHandle>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    bus: RabbitBus,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("services", &self.services)
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
        ::metrics::histogram!("saga_step_seconds", "input" => delivery.message.message_type.to_string())
            .record(started.elapsed().as_secs_f64());
        outcome
    }
}

/// The saga's bindings (the same as the embedded wiring's).
fn saga_bindings() -> Vec<String> {
    let on = |topic: &str, types: &[&str]| -> Vec<String> {
        types.iter().map(|t| format!("{topic}.{t}")).collect()
    };
    let mut b = on(
        topics::ORDER,
        &[
            "OrderCreated",
            "OrderInventoryConfirmed",
            "OrderPaymentConfirmed",
            "OrderCompleted",
            "OrderCancelled",
        ],
    );
    b.extend(on(
        topics::INVENTORY,
        &["InventoryReserved", "InventoryReservationFailed"],
    ));
    b.extend(on(
        topics::PAYMENT,
        &["PaymentSucceeded", "PaymentDeclined"],
    ));
    b
}

/// A consumer group of the deployment, with its bindings and delivery
/// settings. Every process declares them all at start-up (see
/// [`Node::start`]), so that no event is published before the queues of its
/// consumers exist, whichever process starts first.
pub fn subscription(args: &ServeArgs, group: &str) -> Subscription {
    let bindings = match group {
        groups::SAGA => saga_bindings(),
        groups::ORDER => vec![format!("{}.*", topics::ORDER_COMMANDS)],
        groups::CATALOG => vec![format!("{}.ProductCreated", topics::PRODUCT)],
        groups::INVENTORY => vec![format!("{}.*", topics::INVENTORY_COMMANDS)],
        groups::PAYMENT => vec![format!("{}.*", topics::PAYMENT_COMMANDS)],
        groups::NOTIFICATION => vec![format!("{}.*", topics::NOTIFICATION_COMMANDS)],
        groups::QUERY => vec![format!("{}.*", topics::ORDER)],
        _ => Vec::new(),
    };
    Subscription::new(group, bindings)
        .with_prefetch(args.prefetch)
        // PostgreSQL may be away for a while: keep retrying for about two
        // minutes before a message is set aside.
        .with_max_attempts(600)
        .with_retry_delay(RETRY_DELAY)
}

/// Connects a PostgreSQL pool named after the process's services (visible as
/// `application_name` in `pg_stat_activity`).
async fn pg_pool(args: &ServeArgs, application: &str) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(&args.database_url)
        .map_err(|e| Error::internal(format!("invalid database URL {}: {e}", args.database_url)))?
        .application_name(application);
    let config = PgConfig::with_options(options)
        .max_connections(args.pg_pool)
        .acquire_timeout(Duration::from_secs(5));
    patiently(
        &format!("PostgreSQL at {}", args.database_url),
        Duration::from_secs(60),
        || {
            let config = config.clone();
            async move { config.pool().await.map_err(|e| e.to_string()) }
        },
    )
    .await
}

async fn migrate(pool: &PgPool, schema: &str) -> Result<()> {
    patiently(
        &format!("migrating schema {schema}"),
        Duration::from_secs(60),
        || async {
            es_postgres::migrate(pool, schema)
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await
}

fn store(pool: &PgPool, schema: &str, append_slots: usize) -> Result<PgEventStore> {
    // Subscribers (relay, projection, deadlines) of a store written by
    // another process are woken by NOTIFY; the poll is the fallback when a
    // wake-up finds rows still held back by the xmin horizon.
    Ok(PgEventStore::try_new(pool.clone(), schema.to_owned())
        .map_err(|e| infra("event store")(e.to_string()))?
        .with_poll_interval(Duration::from_millis(50))
        .with_group_commit(append_slots, es_postgres::DEFAULT_MAX_GROUP))
}

/// How long a message that failed waits before its next attempt, in every
/// subscription of the distributed deployment (its retry queues are named
/// after it).
pub const RETRY_DELAY: Duration = Duration::from_millis(200);

impl Node {
    /// Starts `args.services` in this process: migrations, topology,
    /// consumers, relays, projections and the HTTP router.
    ///
    /// # Errors
    /// When a backend cannot be reached within a minute, or the settings are
    /// invalid.
    pub async fn start(args: &ServeArgs, payment_timeout: Duration) -> Result<Self> {
        telemetry::prometheus();
        let services =
            parse_services(args.services.as_deref().unwrap_or(&[])).map_err(Error::internal)?;
        let names: Vec<&str> = services.iter().map(|s| s.as_str()).collect();
        let application = format!("{}:{}", args.namespace, names.join("+"));
        let needs_pg = services.iter().any(|s| *s != Service::Gateway);
        let (stop, stopped) = watch::channel(false);
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        let mut subscriptions = Vec::new();
        let bus_config = RabbitConfig::new(args.amqp_url.clone())
            .with_prefix(format!("{}.", args.namespace))
            .with_connection_name(application.clone())
            .with_queue_expires(args.queue_expires_secs.map(Duration::from_secs));
        let bus = if needs_pg {
            patiently(
                &format!("RabbitMQ at {}", args.amqp_url),
                Duration::from_secs(60),
                || {
                    let c = bus_config.clone();
                    async move { RabbitBus::connect(c).await.map_err(|e| e.to_string()) }
                },
            )
            .await?
        } else {
            RabbitBus::lazy(bus_config)
        };
        let mut local = Router::new();
        let mut owners = BTreeSet::new();
        let mut gauges = metrics::Gauges::new(&bus);

        if needs_pg {
            let pool = pg_pool(args, &application).await?;
            // Every group's queues, before any relay of this process runs:
            // an event published to an exchange with no queue bound is lost
            // to the consumers that start later.
            for group in groups::ALL {
                bus.declare(&subscription(args, group))
                    .await
                    .map_err(|e| infra("declare")(e.to_string()))?;
            }
            let sub = |group: &str| subscription(args, group);
            let clock: Arc<dyn es_core::Clock> = Arc::new(SystemClock);
            let mut relays: BTreeSet<&'static str> = BTreeSet::new();
            if services.contains(&Service::Relay) {
                relays.extend(["order", "inventory", "payment"]);
            }

            if services.contains(&Service::Order) {
                let schema = args.schema("order");
                migrate(&pool, &schema).await?;
                let store = store(&pool, &schema, args.append_slots)?;
                let shared: Arc<dyn EventStore> = Arc::new(store.clone());
                let pg_catalog = PgCatalog::start(pool.clone(), &schema, stopped.clone()).await?;
                let catalog: Arc<Catalog> = pg_catalog.catalog();
                let orders = Arc::new(OrderService::new(
                    crate::repository(Arc::clone(&shared)),
                    Arc::clone(&catalog),
                    Arc::clone(&clock),
                    payment_timeout,
                ));
                let saga = Arc::new(
                    SagaManager::<OrderSaga>::new(Arc::clone(&shared), Arc::clone(&clock))
                        .with_instance_cache(crate::CACHED_STATES),
                );
                let wiring: Vec<(Subscription, Arc<dyn MessageHandler>)> = vec![
                    (
                        sub(groups::SAGA),
                        Arc::new(TimedSaga(SagaHandler(Arc::clone(&saga)))),
                    ),
                    (
                        sub(groups::ORDER),
                        Arc::new(OrderCommandHandler(Arc::clone(&orders))),
                    ),
                    (sub(groups::CATALOG), Arc::new(pg_catalog.handler())),
                ];
                for (s, h) in wiring {
                    subscriptions.push(
                        bus.subscribe(s, h)
                            .await
                            .map_err(|e| infra("subscribe")(e.to_string()))?,
                    );
                }
                let s = stopped.clone();
                let saga_for_deadlines = Arc::clone(&saga);
                tasks.push(tokio::spawn(async move {
                    // The scheduler stops on a store failure: start it again.
                    loop {
                        let scheduler = DeadlineScheduler::new(
                            Arc::clone(&saga_for_deadlines),
                            Duration::from_millis(100),
                        );
                        match scheduler.run(s.clone()).await {
                            Ok(()) => return,
                            Err(error) => {
                                tracing::warn!(%error, "deadline scheduler failed; restarting")
                            }
                        }
                        if *s.borrow() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }));
                local = local.merge(crate::order::router(orders));
                owners.insert(Owner::Order);
                relays.insert("order");
                gauges
                    .groups
                    .extend([groups::SAGA, groups::ORDER, groups::CATALOG]);
            }

            if services.contains(&Service::Inventory) {
                let schema = args.schema("inventory");
                migrate(&pool, &schema).await?;
                let shared: Arc<dyn EventStore> =
                    Arc::new(store(&pool, &schema, args.append_slots)?);
                let snapshots = Arc::new(PgSnapshotStore::new(pool.clone(), &schema));
                let inventory = Arc::new(InventoryService::new(
                    crate::repository(Arc::clone(&shared)).with_snapshots(
                        snapshots,
                        SnapshotPolicy::Every(64),
                        1,
                    ),
                    crate::repository(Arc::clone(&shared)),
                ));
                subscriptions.push(
                    bus.subscribe(
                        sub(groups::INVENTORY),
                        Arc::new(InventoryCommandHandler(Arc::clone(&inventory))),
                    )
                    .await
                    .map_err(|e| infra("subscribe")(e.to_string()))?,
                );
                local = local.merge(crate::inventory::router(inventory));
                owners.insert(Owner::Inventory);
                relays.insert("inventory");
                gauges.groups.push(groups::INVENTORY);
            }

            if services.contains(&Service::Payment) {
                let schema = args.schema("payment");
                migrate(&pool, &schema).await?;
                let shared: Arc<dyn EventStore> =
                    Arc::new(store(&pool, &schema, args.append_slots)?);
                let payments = Arc::new(PaymentService::new(crate::repository(shared)));
                subscriptions.push(
                    bus.subscribe(
                        sub(groups::PAYMENT),
                        Arc::new(PaymentCommandHandler(payments)),
                    )
                    .await
                    .map_err(|e| infra("subscribe")(e.to_string()))?,
                );
                relays.insert("payment");
                gauges.groups.push(groups::PAYMENT);
            }

            if services.contains(&Service::Notification) {
                let schema = args.schema("notification");
                migrate(&pool, &schema).await?;
                let inbox = Arc::new(PgInbox::new(pool.clone(), &schema));
                let sink = Arc::new(SmtpSink::new(&args.smtp, &args.mail_from)?);
                let service = Arc::new(NotificationService::new(inbox, sink));
                subscriptions.push(
                    bus.subscribe(
                        sub(groups::NOTIFICATION),
                        Arc::new(NotificationHandler(service)),
                    )
                    .await
                    .map_err(|e| infra("subscribe")(e.to_string()))?,
                );
                gauges.groups.push(groups::NOTIFICATION);
            }

            if services.contains(&Service::Query) {
                let schema = args.schema("query");
                let query = PgQueryService::start(
                    pool.clone(),
                    store(&pool, &schema, args.append_slots)?,
                    &schema,
                    &args.redis_url,
                    &format!("{}:", args.namespace),
                    stopped.clone(),
                )
                .await?;
                subscriptions.push(
                    bus.subscribe(sub(groups::QUERY), Arc::new(query.replica_handler()))
                        .await
                        .map_err(|e| infra("subscribe")(e.to_string()))?,
                );
                gauges.groups.push(groups::QUERY);
                gauges.projection = Some(Arc::clone(&query));
                local = local.merge(query_pg::router(query));
                owners.insert(Owner::Query);
            }

            for name in relays {
                let schema = args.schema(name);
                migrate(&pool, &schema).await?;
                let store = store(&pool, &schema, args.append_slots)?;
                let route = if name == "order" {
                    order_store_route()
                } else {
                    es_core::relay::route_without_saga_state(&[
                        <crate::saga::OrderSaga as es_core::Saga>::TYPE,
                    ])
                };
                let relay = Arc::new(
                    RabbitRelay::new(
                        format!("{schema}_relay"),
                        Arc::new(store.clone()),
                        &bus,
                        Arc::new(PgCheckpointStore::new(store.pool().clone(), store.schema())),
                        Arc::new(PgLeaderLock::new(store.pool().clone())),
                    )
                    .with_batch_size(512)
                    .with_route(route)
                    .with_mandatory_topics(topics::COMMANDS),
                );
                gauges.relays.push((name, store));
                let s = stopped.clone();
                let mut active = relay.active();
                tasks.push(tokio::spawn(async move {
                    let watcher = tokio::spawn(async move {
                        while active.changed().await.is_ok() {
                            let on = *active.borrow();
                            ::metrics::gauge!("relay_active", "store" => name).set(if on {
                                1.0
                            } else {
                                0.0
                            });
                            tracing::info!(store = name, active = on, "relay leadership changed");
                        }
                    });
                    // The relay stops on a store failure: start it again.
                    loop {
                        match relay.run(s.clone()).await {
                            Ok(()) => break,
                            Err(error) => {
                                tracing::warn!(%error, store = name, "relay failed; restarting")
                            }
                        }
                        if *s.borrow() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    watcher.abort();
                }));
            }
            gauges.pool = Some(pool);
        }

        tasks.push(tokio::spawn(gauges.run(stopped)));

        let router = if services.contains(&Service::Gateway) {
            let upstreams = Upstreams {
                order: args.order_url.clone(),
                inventory: args.inventory_url.clone(),
                query: args.query_url.clone(),
            };
            gateway_router(&upstreams, local, owners)?
        } else {
            with_operations(local, names.join(","))
        };
        tracing::info!(services = %names.join(","), namespace = %args.namespace, "services started");
        Ok(Self {
            services,
            router,
            subscriptions,
            stop,
            tasks,
            bus,
        })
    }

    /// The process's HTTP API.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Stops consumers, relays and background tasks.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        for s in self.subscriptions {
            // A consumer stuck on a dead connection must not hold the exit.
            let _ = tokio::time::timeout(Duration::from_secs(5), s.stop()).await;
        }
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.bus.close().await;
    }
}

/// The relay's route for the order store: saga state stays in the store, and
/// the order events carry where they stand in it, for the query service's
/// replica.
fn order_store_route() -> es_core::relay::Route {
    es_core::replica::with_source(
        es_core::relay::route_without_saga_state(&[
            <crate::saga::OrderSaga as es_core::Saga>::TYPE,
        ]),
        &[<crate::order::Order as es_core::Aggregate>::TYPE],
    )
}

/// Publishes every order event of the order store, from the start of its
/// log, into the query service's queue only, with their source headers, as
/// `orders replay-orders` does: it fills the replica of a query service that
/// joins a deployment with orders from before its queue existed. Safe at any
/// time and more than once: the replica takes an event it already holds as a
/// duplicate. Returns how many events were published.
///
/// # Errors
/// When PostgreSQL or RabbitMQ fails.
pub async fn replay_orders(args: &ServeArgs) -> Result<u64> {
    let pool = pg_pool(args, &format!("{}:replay-orders", args.namespace)).await?;
    let bus = RabbitBus::connect(
        RabbitConfig::new(args.amqp_url.clone())
            .with_prefix(format!("{}.", args.namespace))
            .with_queue_expires(args.queue_expires_secs.map(Duration::from_secs)),
    )
    .await
    .map_err(|e| infra("RabbitMQ")(e.to_string()))?;
    bus.declare(&subscription(args, groups::QUERY))
        .await
        .map_err(|e| infra("declare")(e.to_string()))?;
    let store = store(&pool, &args.schema("order"), 1)?;
    let route = order_store_route();
    let mut after = es_core::Position::START;
    let mut published = 0u64;
    loop {
        let page = store.read_all(after, 1_000).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        // The order streams' events only: the saga's command records in the
        // same store are commands, not part of the replica.
        let messages: Vec<es_core::Message> = page
            .iter()
            .filter(|event| {
                event.stream_id.category() == <crate::order::Order as es_core::Aggregate>::TYPE
            })
            .filter_map(|event| route(event))
            .collect();
        bus.publish_to_group(groups::QUERY, &messages)
            .await
            .map_err(|e| infra("publish")(e.to_string()))?;
        published += messages.len() as u64;
    }
    bus.close().await;
    tracing::info!(published, "order events replayed to the query service");
    Ok(published)
}

/// A service's own `/health`, `/metrics` and `/openapi.json` around its routes.
fn with_operations(local: Router, services: String) -> Router {
    let services = Arc::new(services);
    let router = local
        .route(
            "/health",
            get(move || {
                let services = Arc::clone(&services);
                async move { Json(serde_json::json!({"status": "ok", "services": *services})) }
            }),
        )
        .route("/metrics", get(gateway::metrics_text))
        .route(
            "/openapi.json",
            get(|| async { Json(crate::system::openapi()) }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::http::MAX_BODY_BYTES,
        ));
    crate::http::with_json_fallbacks(router)
}

/// Runs `orders serve --services ...` until Ctrl-C or SIGTERM.
///
/// # Errors
/// When start-up fails or the address cannot be bound.
pub async fn serve(args: ServeArgs, listen: SocketAddr, payment_timeout: Duration) -> Result<()> {
    let node = Node::start(&args, payment_timeout).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::internal(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener.local_addr().map_err(Error::internal)?;
    tracing::info!(%addr, "listening");
    // A line on stdout for scripts and tests that wait for start-up.
    println!("orders listening on http://{addr}");
    axum::serve(listener, node.router())
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(Error::internal)?;
    node.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}
