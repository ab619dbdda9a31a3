//! The embedded system: every service in one process over in-memory
//! backends, started by the same composition root as a distributed process.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use es_core::{Clock, EventStore, InMemoryBus, SagaManager, SystemClock};

use crate::backends::{Backends, QueryBackend};
use crate::inventory::InventoryService;
use crate::node::{Node, Service};
use crate::notification::{NotificationService, RecordingSink};
use crate::order::OrderService;
use crate::payment::PaymentService;
use crate::query::QueryService;
use crate::saga::OrderSaga;
use crate::topology::Delivery;
use crate::{Error, Result};

pub use crate::topology::groups;

/// How the services run.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long payment may take once stock is reserved (default 30 s).
    pub payment_timeout: Duration,
    /// Where time comes from (a `ManualClock` in tests).
    pub clock: Arc<dyn Clock>,
    /// How often the deadline scheduler looks at the clock.
    pub deadline_tick: Duration,
    /// Concurrent consumers per subscription (embedded).
    pub consumers: u16,
    /// Checks the bearer tokens of the HTTP API; `None` leaves it open
    /// (see [`crate::auth`]).
    pub auth: Option<Arc<crate::auth::Authenticator>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            payment_timeout: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
            deadline_tick: Duration::from_millis(50),
            consumers: Delivery::EMBEDDED.prefetch,
            auth: None,
        }
    }
}

/// The whole system in one process.
pub struct System {
    node: Node,
    store: Arc<dyn EventStore>,
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
}

impl std::fmt::Debug for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("System")
            .field("node", &self.node)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl System {
    /// The embedded default: in-memory store, bus and read models.
    ///
    /// # Errors
    /// When a service fails to start.
    pub async fn embedded(config: Config) -> Result<Self> {
        let backends = Backends::in_memory(Delivery {
            prefetch: config.consumers,
            ..Delivery::EMBEDDED
        })?;
        let missing = || Error::internal("the embedded system misses a service");
        let store = backends.store(Service::Order).await?;
        let sent = Arc::clone(backends.sent().ok_or_else(missing)?);
        let (node, started) =
            Node::start(backends, Service::EMBEDDED.into(), config.clone()).await?;
        let order = started.order.ok_or_else(missing)?;
        let Some(QueryBackend::Memory(query)) = started.query else {
            return Err(missing());
        };
        Ok(Self {
            node,
            store,
            orders: order.service,
            inventory: started.inventory.ok_or_else(missing)?,
            payments: started.payment.ok_or_else(missing)?,
            notifications: started.notification.ok_or_else(missing)?,
            sent,
            query,
            saga: order.saga,
            config,
        })
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The in-memory bus.
    pub fn memory_bus(&self) -> Option<&InMemoryBus> {
        self.node.backends().memory_bus()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Every service's routes merged, with `/health`, `/metrics` and
    /// `/openapi.json`.
    pub fn router(&self) -> Router {
        self.node.router()
    }

    /// Stops every consumer, background task and the read model.
    pub async fn shutdown(self) {
        self.node.shutdown().await;
        let _ = self.query.projection().stop().await;
    }
}
