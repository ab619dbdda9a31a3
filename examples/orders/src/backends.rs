//! Where the services keep their state and how they talk: the one value the
//! composition root ([`crate::node`]) wires every service against.
//!
//! [`Backends::in_memory`] is the embedded default: one in-memory store
//! shared by every service, the in-process bus, in-memory read models, and a
//! recording mail sink. [`Backends::connect`] is the distributed deployment:
//! each service its own PostgreSQL schema, RabbitMQ between services, Redis
//! in front of the query service's read model, email through SMTP. Nothing
//! else differs between the two.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use es_core::relay::Blocked;
use es_core::{
    CancellationToken, CheckpointStore, DcbStore, EventBus, EventStore, InMemoryBus,
    InMemoryCheckpointStore, InMemoryEventStore, InMemoryInbox, InMemorySnapshotStore, Inbox,
    MessageHandler, Relay, RelayError, Schema, SnapshotPolicy, SnapshotStore,
};
use es_postgres::sqlx::postgres::PgConnectOptions;
use es_postgres::sqlx::PgPool;
use es_postgres::{PgConfig, PgEventStore, PgInbox, PgLeaderLock, PgSnapshotStore};
use es_rabbit::{RabbitBus, RabbitConfig, RabbitRelay};
use tokio::sync::watch;

use crate::distributed::{PgCatalog, PgQueryService, ServeArgs, SmtpSink, Upstreams};
use crate::node::Service;
use crate::notification::{NotificationSink, RecordingSink};
use crate::order::{Catalog, CatalogHandler};
use crate::query::{OrderQueries, QueryService};
use crate::topology::{self, Delivery};
use crate::{Error, Result};

/// The backends of one process.
#[derive(Clone)]
pub struct Backends {
    /// The message bus.
    pub bus: Arc<dyn EventBus>,
    /// How the bus delivers.
    pub delivery: Delivery,
    /// The events' schema: every codec of every service comes from it.
    pub event_schema: Schema,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Memory(Memory),
    Postgres(Arc<Postgres>),
}

#[derive(Clone)]
struct Memory {
    store: Arc<InMemoryEventStore>,
    bus: InMemoryBus,
    snapshots: Arc<dyn SnapshotStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    inbox: Arc<dyn Inbox>,
    sent: Arc<RecordingSink>,
}

struct Postgres {
    args: ServeArgs,
    pool: PgPool,
    bus: RabbitBus,
    migrated: Mutex<BTreeSet<String>>,
    /// One store per schema in a process: every component that reads or
    /// writes a schema (the service, its relay, the deadline scheduler)
    /// shares its wake-ups, its `LISTEN` connection and its notifier.
    stores: Mutex<std::collections::BTreeMap<String, PgEventStore>>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Memory(_) => "in memory".to_owned(),
            Kind::Postgres(pg) => {
                format!("PostgreSQL and RabbitMQ, namespace {}", pg.args.namespace)
            }
        };
        f.debug_struct("Backends")
            .field("kind", &kind)
            .field("delivery", &self.delivery)
            .finish_non_exhaustive()
    }
}

/// A store's relay and what its gauges read.
pub(crate) struct RelayParts {
    /// The relay.
    pub(crate) relay: StoreRelay,
    /// The store it follows.
    pub(crate) store: Arc<dyn EventStore>,
    /// Where it keeps its checkpoint.
    pub(crate) checkpoints: Arc<dyn CheckpointStore>,
    /// Its name (its checkpoint's and lock's).
    pub(crate) name: String,
    /// The store's label in metrics.
    pub(crate) label: &'static str,
    /// The store on PostgreSQL (for its xmin hold-back).
    pub(crate) pg: Option<PgEventStore>,
}

/// A store's relay, as the deployment runs it.
pub(crate) enum StoreRelay {
    /// Publishes into the in-process bus.
    Memory(Relay),
    /// Publishes to RabbitMQ while it holds the store's relay lock.
    Rabbit(RabbitRelay),
}

impl StoreRelay {
    /// Relays until `stop` is cancelled; an error ends one run (the caller
    /// supervises it).
    pub(crate) async fn run(&self, stop: CancellationToken) -> Result<(), RelayError> {
        match self {
            Self::Memory(relay) => relay.run(stop).await,
            Self::Rabbit(relay) => relay.run(stop).await,
        }
    }

    /// Whether this instance is the active one (a standby waits for the
    /// lock), when the relay is elected.
    pub(crate) fn active(&self) -> Option<watch::Receiver<bool>> {
        match self {
            Self::Memory(_) => None,
            Self::Rabbit(relay) => Some(relay.active()),
        }
    }

    /// Whether the relay is held up by a batch the bus keeps refusing.
    pub(crate) fn blocked(&self) -> watch::Receiver<Option<Blocked>> {
        match self {
            Self::Memory(relay) => relay.blocked(),
            Self::Rabbit(relay) => relay.blocked(),
        }
    }
}

impl Backends {
    /// Everything in process memory, delivering with `delivery`.
    ///
    /// # Errors
    /// When the event schema is inconsistent ([`crate::schema::build`]).
    pub fn in_memory(delivery: Delivery) -> Result<Self> {
        let bus = InMemoryBus::new();
        Ok(Self {
            bus: Arc::new(bus.clone()),
            delivery,
            event_schema: crate::schema::build()?,
            kind: Kind::Memory(Memory {
                store: Arc::new(InMemoryEventStore::new()),
                bus,
                snapshots: Arc::new(InMemorySnapshotStore::new()),
                checkpoints: Arc::new(InMemoryCheckpointStore::new()),
                inbox: Arc::new(InMemoryInbox::new()),
                sent: Arc::new(RecordingSink::default()),
            }),
        })
    }

    /// PostgreSQL, RabbitMQ, Redis and SMTP as `args` names them, waiting up
    /// to a minute for PostgreSQL and RabbitMQ to answer; `application`
    /// names this process's connections. A process that runs only the
    /// gateway connects to nothing.
    ///
    /// # Errors
    /// When a server does not answer within a minute, a URL is invalid, or
    /// the event schema is inconsistent.
    pub async fn connect(args: &ServeArgs, application: &str, gateway_only: bool) -> Result<Self> {
        let schema = crate::schema::build()?;
        let bus_config = RabbitConfig::new(args.amqp_url.clone())
            .with_prefix(format!("{}.", args.namespace))
            .with_connection_name(application.to_owned())
            .with_queue_expires(args.queue_expires_secs.map(Duration::from_secs));
        let options = PgConnectOptions::from_str(&args.database_url)
            .map_err(|e| Error::caused("invalid database URL", e))?
            .application_name(application);
        let config = PgConfig::with_options(options)
            .max_connections(args.pg_pool)
            .acquire_timeout(Duration::from_secs(5));
        let (bus, pool) = if gateway_only {
            (RabbitBus::lazy(bus_config), config.pool_lazy())
        } else {
            let bus = patiently("RabbitMQ", || {
                let c = bus_config.clone();
                async move { RabbitBus::connect(c).await.map_err(|e| e.to_string()) }
            })
            .await?;
            let pool = patiently("PostgreSQL", || {
                let config = config.clone();
                async move { config.pool().await.map_err(|e| e.to_string()) }
            })
            .await?;
            (bus, pool)
        };
        Ok(Self {
            bus: Arc::new(bus.clone()),
            delivery: Delivery {
                prefetch: args.prefetch,
                ..Delivery::DISTRIBUTED
            },
            event_schema: schema,
            kind: Kind::Postgres(Arc::new(Postgres {
                args: args.clone(),
                pool,
                bus,
                migrated: Mutex::new(BTreeSet::new()),
                stores: Mutex::new(std::collections::BTreeMap::new()),
            })),
        })
    }

    /// The in-process bus, on the embedded default.
    pub fn memory_bus(&self) -> Option<&InMemoryBus> {
        match &self.kind {
            Kind::Memory(m) => Some(&m.bus),
            Kind::Postgres(_) => None,
        }
    }

    /// What the recording mail sink holds, on the embedded default.
    pub fn sent(&self) -> Option<&Arc<RecordingSink>> {
        match &self.kind {
            Kind::Memory(m) => Some(&m.sent),
            Kind::Postgres(_) => None,
        }
    }

    /// The PostgreSQL pool and RabbitMQ bus of the distributed deployment.
    pub(crate) fn distributed(&self) -> Option<(&ServeArgs, &PgPool, &RabbitBus)> {
        match &self.kind {
            Kind::Memory(_) => None,
            Kind::Postgres(pg) => Some((&pg.args, &pg.pool, &pg.bus)),
        }
    }

    /// Where the gateway forwards what this process does not serve.
    pub(crate) fn upstreams(&self) -> Option<Upstreams> {
        self.distributed().map(|(args, _, _)| Upstreams {
            order: args.order_url.clone(),
            inventory: args.inventory_url.clone(),
            query: args.query_url.clone(),
        })
    }

    /// Declares every group's queues (RabbitMQ), so that nothing a relay of
    /// this process publishes finds no queue.
    pub(crate) async fn declare_topology(&self) -> Result<()> {
        if let Some((_, _, bus)) = self.distributed() {
            for group in topology::groups::ALL {
                bus.declare(&topology::subscription(group, self.delivery))
                    .await
                    .map_err(|e| Error::caused(format!("declaring {group}"), e))?;
            }
        }
        Ok(())
    }

    /// The PostgreSQL schema `service` owns, migrated once per process.
    async fn schema(&self, pg: &Postgres, service: Service) -> Result<String> {
        let schema = pg.args.schema(service.as_str());
        let done = pg
            .migrated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&schema);
        if !done {
            patiently("migrating the schema", || async {
                es_postgres::migrate(&pg.pool, &schema)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await?;
            pg.migrated
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(schema.clone());
        }
        Ok(schema)
    }

    /// The store of `service`'s schema: one per schema and process, so an
    /// append wakes the process's own subscribers of it (its relay, its
    /// deadline scheduler) at once, and they share one `LISTEN` connection.
    async fn pg_store(&self, pg: &Postgres, service: Service) -> Result<PgEventStore> {
        let schema = self.schema(pg, service).await?;
        let mut stores = pg.stores.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(store) = stores.get(&schema) {
            return Ok(store.clone());
        }
        // Subscribers of a store written by another process are woken by
        // NOTIFY, and a read held back by the xmin horizon waits for it (the
        // store's read wait); the poll is the fallback for a wake-up lost or
        // given up on.
        let store = PgEventStore::try_new(pg.pool.clone(), schema.clone())
            .map_err(|e| Error::caused("event store", e))?
            .with_poll_interval(Duration::from_millis(500))
            .with_group_commit(pg.args.append_slots, es_postgres::DEFAULT_MAX_GROUP);
        stores.insert(schema, store.clone());
        Ok(store)
    }

    /// The event store `service` writes: the shared one in memory, its own
    /// schema's on PostgreSQL.
    pub(crate) async fn store(&self, service: Service) -> Result<Arc<dyn EventStore>> {
        Ok(self.dcb_store(service).await?)
    }

    /// The same store, with its dynamic-consistency-boundary operations
    /// (conditional appends on queries of tagged events).
    pub(crate) async fn dcb_store(&self, service: Service) -> Result<Arc<dyn DcbStore>> {
        match &self.kind {
            Kind::Memory(m) => Ok(Arc::clone(&m.store) as Arc<dyn DcbStore>),
            Kind::Postgres(pg) => Ok(Arc::new(self.pg_store(pg, service).await?)),
        }
    }

    /// `service`'s snapshots, and how often to take them.
    pub(crate) async fn snapshots(
        &self,
        service: Service,
    ) -> Result<(Arc<dyn SnapshotStore>, SnapshotPolicy)> {
        match &self.kind {
            Kind::Memory(m) => Ok((Arc::clone(&m.snapshots), SnapshotPolicy::Every(16))),
            Kind::Postgres(pg) => {
                let schema = self.schema(pg, service).await?;
                Ok((
                    Arc::new(PgSnapshotStore::new(pg.pool.clone(), &schema)),
                    SnapshotPolicy::Every(64),
                ))
            }
        }
    }

    /// Where the runners that follow `service`'s store (its deadline
    /// scheduler) keep their checkpoints: beside the store.
    pub(crate) async fn checkpoints(&self, service: Service) -> Result<Arc<dyn CheckpointStore>> {
        match &self.kind {
            Kind::Memory(m) => Ok(Arc::clone(&m.checkpoints)),
            Kind::Postgres(pg) => {
                let schema = self.schema(pg, service).await?;
                Ok(Arc::new(es_postgres::PgCheckpointStore::new(
                    pg.pool.clone(),
                    &schema,
                )))
            }
        }
    }

    /// `service`'s inbox of processed message ids.
    pub(crate) async fn inbox(&self, service: Service) -> Result<Arc<dyn Inbox>> {
        match &self.kind {
            Kind::Memory(m) => Ok(Arc::clone(&m.inbox)),
            Kind::Postgres(pg) => {
                let schema = self.schema(pg, service).await?;
                Ok(Arc::new(PgInbox::new(pg.pool.clone(), &schema)))
            }
        }
    }

    /// Where the notification service sends email.
    pub(crate) fn mail(&self) -> Result<Arc<dyn NotificationSink>> {
        match &self.kind {
            Kind::Memory(m) => Ok(Arc::clone(&m.sent) as Arc<dyn NotificationSink>),
            Kind::Postgres(pg) => Ok(Arc::new(SmtpSink::new(&pg.args.smtp, &pg.args.mail_from)?)),
        }
    }

    /// The order service's catalog of products, and the handler that feeds
    /// it from the inventory's events (durable in the order schema on
    /// PostgreSQL, followed by every instance until `stop`).
    pub(crate) async fn catalog(
        &self,
        stop: CancellationToken,
    ) -> Result<(Arc<Catalog>, Arc<dyn MessageHandler>)> {
        match &self.kind {
            Kind::Memory(_) => {
                let catalog = Arc::new(Catalog::new());
                let feed =
                    CatalogHandler::new(Arc::clone(&catalog), None, self.event_schema.codec());
                Ok((catalog, Arc::new(feed)))
            }
            Kind::Postgres(pg) => {
                let schema = self.schema(pg, Service::Order).await?;
                let table = PgCatalog::start(pg.pool.clone(), &schema, stop).await?;
                let catalog = table.catalog();
                let feed = CatalogHandler::new(
                    Arc::clone(&catalog),
                    Some(Arc::new(table)),
                    self.event_schema.codec(),
                );
                Ok((catalog, Arc::new(feed)))
            }
        }
    }

    /// The query service's read model: in memory, following the store;
    /// on PostgreSQL, a replica of the order events fed by the bus (the
    /// returned handler, for the `QUERY` group), projected into its schema
    /// with Redis in front.
    pub(crate) async fn query(&self, stop: CancellationToken) -> Result<QueryBackend> {
        match &self.kind {
            Kind::Memory(m) => Ok(QueryBackend::Memory(Arc::new(QueryService::start(
                Arc::clone(&m.store) as Arc<dyn EventStore>,
                self.event_schema.codec(),
            )))),
            Kind::Postgres(pg) => {
                let replica = self.pg_store(pg, Service::Query).await?;
                let schema = pg.args.schema(Service::Query.as_str());
                let query = PgQueryService::start(
                    pg.pool.clone(),
                    replica,
                    &schema,
                    &pg.args.redis_url,
                    &format!("{}:", pg.args.namespace),
                    self.event_schema.codec(),
                    stop,
                )
                .await?;
                Ok(QueryBackend::Postgres(query))
            }
        }
    }

    /// Applies the parked events of the query service's read model again,
    /// without running the service (PostgreSQL only: the embedded read
    /// model is rebuilt at every start).
    pub(crate) async fn replay_parked(&self) -> Result<es_projections::postgres::ReplayReport> {
        match &self.kind {
            Kind::Memory(_) => Err(Error::internal(
                "the embedded read model is rebuilt from the log at every start",
            )),
            Kind::Postgres(pg) => {
                let replica = self.pg_store(pg, Service::Query).await?;
                let schema = pg.args.schema(Service::Query.as_str());
                let codec = self.event_schema.codec();
                crate::distributed::replay_parked(&pg.pool, &replica, &schema, codec).await
            }
        }
    }

    /// The relay of `service`'s store.
    pub(crate) async fn relay(&self, service: Service) -> Result<RelayParts> {
        match &self.kind {
            Kind::Memory(m) => {
                let name = "orders_relay".to_owned();
                let relay = Relay::new(
                    name.clone(),
                    Arc::clone(&m.store) as Arc<dyn EventStore>,
                    Arc::clone(&self.bus),
                    Arc::clone(&m.checkpoints),
                )
                .with_batch_size(512)
                .with_route(topology::relay_route(false));
                Ok(RelayParts {
                    relay: StoreRelay::Memory(relay),
                    store: Arc::clone(&m.store) as Arc<dyn EventStore>,
                    checkpoints: Arc::clone(&m.checkpoints),
                    name,
                    label: "orders",
                    pg: None,
                })
            }
            Kind::Postgres(pg) => {
                let store = self.pg_store(pg, service).await?;
                let name = format!("{}_relay", store.schema());
                let checkpoints = self.checkpoints(service).await?;
                let relay = RabbitRelay::new(
                    name.clone(),
                    Arc::new(store.clone()),
                    &pg.bus,
                    Arc::clone(&checkpoints),
                    Arc::new(PgLeaderLock::new(pg.pool.clone())),
                )
                .with_batch_size(512)
                .with_route(topology::relay_route(service == Service::Order))
                .with_mandatory_topics(crate::messages::topics::COMMANDS);
                Ok(RelayParts {
                    relay: StoreRelay::Rabbit(relay),
                    store: Arc::new(store.clone()),
                    checkpoints,
                    name,
                    label: service.as_str(),
                    pg: Some(store),
                })
            }
        }
    }
}

/// The query service's read model, as the deployment runs it.
#[derive(Clone, Debug)]
pub enum QueryBackend {
    /// In memory, following the store.
    Memory(Arc<QueryService>),
    /// On PostgreSQL and Redis, from a replica fed by the bus.
    Postgres(Arc<PgQueryService>),
}

impl QueryBackend {
    /// The handler that keeps the read model's replica, when it keeps one.
    pub(crate) fn feed(&self) -> Option<Arc<dyn MessageHandler>> {
        match self {
            Self::Memory(_) => None,
            Self::Postgres(q) => Some(Arc::new(q.replica_handler())),
        }
    }

    /// The read model behind the query routes.
    pub fn queries(&self) -> Arc<dyn OrderQueries> {
        match self {
            Self::Memory(q) => Arc::clone(q) as Arc<dyn OrderQueries>,
            Self::Postgres(q) => Arc::clone(q) as Arc<dyn OrderQueries>,
        }
    }
}

/// Retries `f` until it succeeds or a minute has passed (start-up against
/// services that are still coming up). The error is logged without the URL,
/// which may hold a password.
async fn patiently<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(Error::caused(what, e))
            }
            Err(e) => {
                tracing::warn!(what, error = %e, "not ready yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
