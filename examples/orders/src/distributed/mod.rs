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
mod query_pg;
mod smtp;

use std::net::SocketAddr;
use std::time::Duration;

use es_core::Subscription;

pub(crate) use crate::node::parse_services;
pub use crate::node::{Node, Service};
pub(crate) use catalog::PgCatalog;
pub(crate) use gateway::{gateway_router, Owner, Upstreams};
pub(crate) use query_pg::replay_parked;
pub use query_pg::PgQueryService;
pub(crate) use smtp::SmtpSink;

use crate::backends::Backends;
use crate::order::Order;
use crate::topology::{self, groups, Delivery};
use crate::{Config, Error, Result};

/// The distributed deployment's settings (flags and environment variables
/// of `orders serve`).
#[derive(Clone, clap::Args)]
pub struct ServeArgs {
    /// Run these services in this process over PostgreSQL, RabbitMQ and Redis
    /// (comma-separated: gateway, order, inventory, payment, notification,
    /// query, relay, or all). Without it, everything runs embedded in memory.
    #[arg(long, env = "ORDERS_SERVICES", value_delimiter = ',')]
    pub services: Option<Vec<String>>,
    /// PostgreSQL (default postgres://postgres@127.0.0.1:5432/postgres).
    /// URLs are never shown with their passwords, in help, logs or errors.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_default_value = true,
        hide_env_values = true
    )]
    pub database_url: String,
    /// RabbitMQ (default amqp://guest:***@127.0.0.1:5672/%2f).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_default_value = true,
        hide_env_values = true
    )]
    pub amqp_url: String,
    /// Redis, the query service's hot cache (default redis://127.0.0.1:6379).
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_default_value = true,
        hide_env_values = true
    )]
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
    /// The bearer-token settings (the global `--jwt-*` flags, set by the
    /// caller).
    #[arg(skip)]
    pub auth: crate::auth::AuthArgs,
}

impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeArgs")
            .field("services", &self.services)
            .field("database_url", &es_core::redact_url(&self.database_url))
            .field("amqp_url", &es_core::redact_url(&self.amqp_url))
            .field("redis_url", &es_core::redact_url(&self.redis_url))
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
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
            auth: crate::auth::AuthArgs::default(),
        }
    }

    /// The schema a service owns.
    pub fn schema(&self, service: &str) -> String {
        format!("{}_{service}", self.namespace)
    }
}

/// A consumer group of the deployment, with its bindings and delivery
/// settings (see `topology.rs`).
pub fn subscription(args: &ServeArgs, group: &str) -> Subscription {
    topology::subscription(
        group,
        Delivery {
            prefetch: args.prefetch,
            ..Delivery::DISTRIBUTED
        },
    )
}

/// How long a message that failed waits before its next attempt, in every
/// subscription of the distributed deployment (its retry queues are named
/// after it).
pub const RETRY_DELAY: Duration = Delivery::DISTRIBUTED.retry_delay;

/// Starts `args.services` in this process over PostgreSQL, RabbitMQ and
/// Redis.
///
/// # Errors
/// When a backend cannot be reached within a minute, or the settings are
/// invalid.
pub async fn start(args: &ServeArgs, payment_timeout: Duration) -> Result<Node> {
    let services =
        parse_services(args.services.as_deref().unwrap_or(&[])).map_err(Error::internal)?;
    let names: Vec<&str> = services.iter().map(|s| s.as_str()).collect();
    let application = format!("{}:{}", args.namespace, names.join("+"));
    let gateway_only = services.iter().all(|s| *s == Service::Gateway);
    let backends = Backends::connect(args, &application, gateway_only).await?;
    let auth = args.auth.authenticator()?;
    if auth.is_none() && services.contains(&Service::Gateway) {
        tracing::warn!(
            "AUTHENTICATION IS OFF: anyone who reaches the gateway may do anything; \
             set --jwt-hs256-secret (ORDERS_JWT_SECRET) or --jwt-rs256-public-key-file"
        );
    }
    let config = Config {
        payment_timeout,
        auth,
        ..Config::default()
    };
    Ok(Node::start(backends, services, config).await?.0)
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
    let backends =
        Backends::connect(args, &format!("{}:replay-orders", args.namespace), false).await?;
    backends.declare_topology().await?;
    let (_, _, bus) = backends
        .distributed()
        .ok_or_else(|| Error::internal("not distributed"))?;
    let store = backends.store(Service::Order).await?;
    let route = topology::relay_route(true);
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
            .filter(|event| event.stream_id.category() == <Order as es_core::Aggregate>::TYPE)
            .filter_map(|event| route(event))
            .collect();
        bus.publish_to_group(groups::QUERY, &messages)
            .await
            .map_err(|e| Error::caused("publishing", e))?;
        published += messages.len() as u64;
    }
    bus.close().await;
    tracing::info!(published, "order events replayed to the query service");
    Ok(published)
}

/// SQLSTATE class 22, data exceptions: PostgreSQL refused the value itself
/// (a NUL in text, a number out of range), so writing it again fails again.
const DATA_EXCEPTION_CLASS: &str = "22";

/// Whether PostgreSQL refused the data of a write (SQLSTATE class 22), not
/// the write's circumstances: the same write fails the same way every time.
pub(crate) fn is_data_exception(error: &es_postgres::sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code.starts_with(DATA_EXCEPTION_CLASS))
}

/// `orders replay-parked`: applies the events the query service's read
/// model parked again, after a fix, and says what became of them. Safe to
/// run while the query service runs (each replayed event leaves the parked
/// list in the transaction that applies it).
///
/// # Errors
/// When the database cannot be reached or fails.
pub async fn replay_parked_events(
    args: &ServeArgs,
) -> Result<es_projections::postgres::ReplayReport> {
    let backends =
        Backends::connect(args, &format!("{}:replay-parked", args.namespace), false).await?;
    let report = backends.replay_parked().await;
    if let Some((_, _, bus)) = backends.distributed() {
        bus.close().await;
    }
    report
}

/// Runs `orders serve --services ...` until Ctrl-C or SIGTERM.
///
/// # Errors
/// When start-up fails or the address cannot be bound.
pub async fn serve(
    args: ServeArgs,
    listen: SocketAddr,
    limits: crate::http::Limits,
    payment_timeout: Duration,
) -> Result<()> {
    let node = start(&args, payment_timeout).await?;
    crate::http::serve(node.router(), listen, limits, |addr| {
        // A line on stdout for scripts and tests that wait for start-up.
        println!("orders listening on http://{addr}");
    })
    .await?;
    node.shutdown().await;
    Ok(())
}
