//! Event sourcing and CQRS for Rust.
//!
//! This umbrella crate re-exports [`es_core`] and, behind features, its
//! backends:
//!
//! | feature | what it adds |
//! |---|---|
//! | `testing` | `es::testing`: fixtures and the conformance suites, for dev-dependencies |
//! | `derive` | `#[derive(DomainEvent)]`, beside the trait |
//! | `postgres` | `es::postgres` (es-postgres): the PostgreSQL store, snapshots, checkpoints, inbox, leader lock |
//! | `rabbit` | `es::rabbit` (es-rabbit): the RabbitMQ bus and relay |
//! | `postgres` + `rabbit` | [`production`]: the single-active relay from PostgreSQL to RabbitMQ |
//! | `projections` | `es::projections` (es-projections): the in-memory projection runner, no database client |
//! | `projections-postgres` | the PostgreSQL projection runner and rebuilds |
//! | `redis` | the Redis read-model sink |
//! | `otel` | the framework's spans continue, in OpenTelemetry, the W3C trace their events and messages carry (`es::otel`); the application installs the `tracing-opentelemetry` layer and exporter |
//! | `full` | all of the above |
//!
//! [`prelude`] holds what an application usually names:
//!
//! ```
//! use std::sync::Arc;
//! use es::prelude::*;
//! # use es::doc_support::counter::{Counter, CounterCommand};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
//! let counters = Repository::<Counter>::new(store);
//! counters
//!     .execute("c1", CounterCommand::Increment { by: 2 }, &Metadata::new())
//!     .await
//!     .unwrap();
//! assert_eq!(counters.load("c1").await.unwrap().state.value, 2);
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use es_core::*;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use es_postgres as postgres;
#[cfg(feature = "projections")]
#[cfg_attr(docsrs, doc(cfg(feature = "projections")))]
pub use es_projections as projections;
#[cfg(feature = "rabbit")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbit")))]
pub use es_rabbit as rabbit;

/// What an application usually names, in one `use es::prelude::*`: the
/// traits, the repository, the command handler, the saga manager and its
/// bus handler, the in-memory backends and the relay, and (by feature) the
/// production store and bus.
pub mod prelude {
    pub use es_core::prelude::*;
    pub use es_core::{
        App, CancellationToken, CommandHandler, CommandRefused, DeadlineScheduler, InMemoryBus,
        InMemoryCheckpointStore, InMemoryEventStore, Relay, SagaHandler, SagaManager, SystemClock,
    };
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub use es_postgres::PgEventStore;
    #[cfg(feature = "rabbit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rabbit")))]
    pub use es_rabbit::{RabbitBus, RabbitConfig};
}

/// PostgreSQL and RabbitMQ together (features `postgres` and `rabbit`).
#[cfg(all(feature = "postgres", feature = "rabbit"))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "postgres", feature = "rabbit"))))]
pub mod production {
    use std::sync::Arc;

    use es_core::{App, RelayFactory, RelayPlan, RunRelay};
    use es_postgres::{PgCheckpointStore, PgConfig, PgEventStore, PgLeaderLock};
    use es_rabbit::{RabbitBus, RabbitConfig, RabbitRelay};

    /// The relay for production: follows `store`'s log and publishes to
    /// `bus` with confirms, with one active instance per `name` among every
    /// process that runs one (the others wait on a PostgreSQL advisory
    /// lock, [`PgLeaderLock`], on the store's pool, and take over when it
    /// dies), and its checkpoint in the store's schema
    /// ([`PgCheckpointStore`]). Run it in every process of a service:
    /// `tokio::spawn(async move { relay.run(stop).await })`.
    ///
    /// `name` names the checkpoint and the lock (the lock is the whole
    /// database's: two stores in two schemas need two names). Name the
    /// command topics with
    /// [`with_mandatory_topics`](RabbitRelay::with_mandatory_topics), and
    /// keep a saga's state in the store with
    /// [`with_route`](RabbitRelay::with_route) and
    /// [`route_without_saga_state`](es_core::relay::route_without_saga_state).
    ///
    /// ```no_run
    /// # async fn run(store: es::postgres::PgEventStore, bus: es::rabbit::RabbitBus) {
    /// let relay = es::production::relay("bank", &store, &bus)
    ///     .with_mandatory_topics(["account_commands"]);
    /// let stop = es::CancellationToken::new();
    /// tokio::spawn(async move { relay.run(stop).await });
    /// # }
    /// ```
    pub fn relay(name: impl Into<String>, store: &PgEventStore, bus: &RabbitBus) -> RabbitRelay {
        RabbitRelay::new(
            name,
            Arc::new(store.clone()),
            bus,
            Arc::new(PgCheckpointStore::new(store.pool().clone(), store.schema())),
            Arc::new(PgLeaderLock::new(store.pool().clone())),
        )
    }

    /// Why [`connect`] could not reach a backend.
    #[derive(Debug, thiserror::Error)]
    pub enum Error {
        /// PostgreSQL could not be reached, or its schema is not migrated.
        #[error(transparent)]
        Postgres(#[from] es_postgres::Error),
        /// RabbitMQ could not be reached.
        #[error(transparent)]
        Rabbit(#[from] es_rabbit::Error),
    }

    /// An [`App`] named `name` on `store` (its checkpoints in the store's
    /// schema) and `bus`, relayed by [`relay`] (the app's command topics
    /// mandatory).
    pub fn app(name: impl Into<String>, store: &PgEventStore, bus: &RabbitBus) -> App {
        let name = name.into();
        let checkpoints = Arc::new(PgCheckpointStore::new(store.pool().clone(), store.schema()));
        let factory: RelayFactory = {
            let (name, store, bus) = (name.clone(), store.clone(), bus.clone());
            Box::new(move |plan: RelayPlan| {
                Arc::new(
                    relay(name, &store, &bus)
                        .with_route(plan.route)
                        .with_mandatory_topics(plan.mandatory_topics),
                ) as Arc<dyn RunRelay>
            })
        };
        App::new(
            name,
            Arc::new(store.clone()),
            Arc::new(bus.clone()),
            checkpoints,
            factory,
        )
    }

    /// Connects to PostgreSQL at `postgres` (schema `namespace`, migrated)
    /// and to RabbitMQ by `rabbit` (exchanges and queues prefixed
    /// `<namespace>.`), and answers the [`app`] named `namespace` on them.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), es::production::Error> {
    /// let rabbit = es::rabbit::RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f");
    /// let mut app = es::production::connect("bank", "postgres://127.0.0.1/bank", rabbit).await?;
    /// app.start();
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(
        namespace: &str,
        postgres: &str,
        rabbit: RabbitConfig,
    ) -> Result<App, Error> {
        let store = PgConfig::from_url(postgres)?
            .schema(namespace)
            .event_store()
            .await?;
        let bus = RabbitBus::connect(rabbit.with_prefix(format!("{namespace}."))).await?;
        Ok(app(namespace, &store, &bus))
    }
}

/// The guide's chapters (`docs/src`), whose `rust` blocks run as doc tests
/// (they derive `DomainEvent`): `cargo test --doc -p es --all-features`.
#[cfg(all(doctest, feature = "derive"))]
mod guide {
    #[doc = include_str!("../docs/src/getting-started.md")]
    struct GettingStarted;
    #[doc = include_str!("../docs/src/events.md")]
    struct Events;
    #[doc = include_str!("../docs/src/schema-evolution.md")]
    struct SchemaEvolution;
    #[doc = include_str!("../docs/src/store.md")]
    struct Store;
    #[doc = include_str!("../docs/src/messaging.md")]
    struct Messaging;
    #[doc = include_str!("../docs/src/sagas.md")]
    struct Sagas;
    #[doc = include_str!("../docs/src/projections.md")]
    struct Projections;
    #[doc = include_str!("../docs/src/testing.md")]
    struct Testing;
    #[doc = include_str!("../docs/src/dcb.md")]
    struct Dcb;
}
