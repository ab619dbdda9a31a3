//! The composition root: any set of the services, started over one
//! [`Backends`] value. The embedded system ([`crate::System`]) is every
//! service over in-memory backends; a process of the distributed deployment
//! (`orders serve --services ...`) is the services it names over PostgreSQL,
//! RabbitMQ and Redis. Each service module wires itself (`wire`); this module
//! holds what they share: consumers, supervised tasks, the relays, the HTTP
//! router with `/health`, `/metrics` and `/openapi.json`, and the gauges.

use std::collections::BTreeSet;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use es_core::relay::Blocked;
use es_core::{CancellationToken, EventStore, MessageHandler, SubscriptionHandle};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::DropGuard;
use utoipa::{OpenApi, ToSchema};

use crate::backends::{Backends, RelayParts};
use crate::distributed::{gateway_router, Owner};
use crate::query::OrderQueries;
use crate::telemetry::{self, Gauges};
use crate::{topology, Config, Result};

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

    /// The services of the embedded system: all but the gateway and the
    /// stand-alone relay.
    pub(crate) const EMBEDDED: [Self; 5] = [
        Self::Order,
        Self::Inventory,
        Self::Payment,
        Self::Notification,
        Self::Query,
    ];

    /// The services that own an event store, relayed to the bus.
    const WITH_STORES: [Self; 3] = [Self::Order, Self::Inventory, Self::Payment];

    /// Its name on the command line (and its PostgreSQL schema's suffix).
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
pub(crate) fn parse_services(list: &[String]) -> std::result::Result<BTreeSet<Service>, String> {
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

/// What the services of a process are wired into while it starts.
pub(crate) struct Wiring {
    pub(crate) backends: Backends,
    pub(crate) config: Config,
    stop: CancellationToken,
    subscriptions: Vec<SubscriptionHandle>,
    tasks: Vec<JoinHandle<()>>,
    routes: Router,
    owners: BTreeSet<Owner>,
    relayed: BTreeSet<Service>,
    gauges: Gauges,
    stores: Vec<Arc<dyn EventStore>>,
    query: Option<Arc<dyn OrderQueries>>,
    /// Each relay's blocked state, by store label, for `/health`.
    blocked: Vec<(&'static str, watch::Receiver<Option<Blocked>>)>,
}

impl Wiring {
    /// A child of the process's stop token: cancelled when the process
    /// stops.
    pub(crate) fn stop(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// Consumes `group` (bound as the topology says) with `handler`.
    pub(crate) async fn consume(
        &mut self,
        group: &'static str,
        handler: Arc<dyn MessageHandler>,
    ) -> Result<()> {
        let subscription = topology::subscription(group, self.backends.delivery);
        self.subscriptions
            .push(self.backends.bus.subscribe(subscription, handler).await?);
        self.gauges.groups.push(group);
        Ok(())
    }

    /// Runs `task` until the process stops, starting it again a second after
    /// it fails (a store or broker outage ends a run; the next run resumes
    /// from its checkpoint).
    pub(crate) fn supervise<F, Fut, E>(&mut self, name: &'static str, task: F)
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send,
        E: std::fmt::Display,
    {
        self.tasks.push(es_core::supervise(name, self.stop(), task));
    }

    /// Serves `routes` here, as the owner of `owner`'s paths.
    pub(crate) fn serve(&mut self, owner: Owner, routes: Router) {
        self.routes = std::mem::take(&mut self.routes).merge(routes);
        self.owners.insert(owner);
    }

    /// Relays `service`'s store to the bus from this process, and reports it
    /// in `/health`.
    pub(crate) fn relay(&mut self, service: Service, store: &Arc<dyn EventStore>) {
        self.relayed.insert(service);
        // In memory the services share one store: check it once.
        if !self.stores.iter().any(|s| Arc::ptr_eq(s, store)) {
            self.stores.push(Arc::clone(store));
        }
    }

    /// The read model behind `/health`'s position and the projection gauges.
    pub(crate) fn reads(&mut self, query: Arc<dyn OrderQueries>) {
        self.gauges.query = Some(Arc::clone(&query));
        self.query = Some(query);
    }

    async fn start_relays(&mut self, services: &BTreeSet<Service>) -> Result<()> {
        if services.contains(&Service::Relay) {
            self.relayed.extend(Service::WITH_STORES);
        }
        let mut relays = Vec::new();
        for service in &self.relayed {
            relays.push(self.backends.relay(*service).await?);
            if self.backends.memory_bus().is_some() {
                // In memory every service shares one store: one relay.
                break;
            }
        }
        for RelayParts {
            relay,
            store,
            checkpoints,
            name,
            label,
            pg,
        } in relays
        {
            if let Some(mut active) = relay.active() {
                self.tasks.push(tokio::spawn(async move {
                    while active.changed().await.is_ok() {
                        let on = *active.borrow();
                        metrics::gauge!("relay_active", "store" => label).set(if on {
                            1.0
                        } else {
                            0.0
                        });
                        tracing::info!(store = label, active = on, "relay leadership changed");
                    }
                }));
            }
            let blocked = relay.blocked();
            self.blocked.push((label, blocked.clone()));
            self.gauges.relays.push(telemetry::RelayGauge {
                store,
                checkpoints,
                name,
                label,
                pg,
                blocked,
            });
            let relay = Arc::new(relay);
            self.supervise("relay", move |stop| {
                let relay = Arc::clone(&relay);
                async move { relay.run(stop).await }
            });
        }
        Ok(())
    }
}

/// The services of one process, running.
pub struct Node {
    services: BTreeSet<Service>,
    router: Router,
    subscriptions: Vec<SubscriptionHandle>,
    /// The process's stop token, cancelled by [`Node::shutdown`] or when the
    /// node is dropped.
    stop: DropGuard,
    tasks: Vec<JoinHandle<()>>,
    backends: Backends,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("services", &self.services)
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

/// What [`Node::start`] started, for callers that keep the services (the
/// embedded system, tests).
#[derive(Debug, Default)]
pub struct Started {
    /// The order service and its saga.
    pub order: Option<crate::order::Wired>,
    /// The inventory service.
    pub inventory: Option<Arc<crate::inventory::InventoryService>>,
    /// The payment service.
    pub payment: Option<Arc<crate::payment::PaymentService>>,
    /// The notification service.
    pub notification: Option<Arc<crate::notification::NotificationService>>,
    /// The query service.
    pub query: Option<crate::backends::QueryBackend>,
}

impl Node {
    /// Starts `services` over `backends`: queues, consumers, relays, read
    /// models, deadlines, gauges and the HTTP router (the gateway's, when it
    /// is one of them).
    ///
    /// # Errors
    /// When a backend fails during start-up.
    pub async fn start(
        backends: Backends,
        services: BTreeSet<Service>,
        config: Config,
    ) -> Result<(Self, Started)> {
        telemetry::prometheus();
        // Cancelled on drop too: a start-up that fails stops what it started.
        let stop = CancellationToken::new().drop_guard();
        backends.declare_topology().await?;
        let mut w = Wiring {
            gauges: Gauges::new(&backends),
            backends,
            config,
            stop: stop.token().clone(),
            subscriptions: Vec::new(),
            tasks: Vec::new(),
            routes: Router::new(),
            owners: BTreeSet::new(),
            relayed: BTreeSet::new(),
            stores: Vec::new(),
            query: None,
            blocked: Vec::new(),
        };
        // Consumers first, relays last: nothing is published before the
        // consumers of this process are in place.
        let mut started = Started::default();
        for service in &services {
            match service {
                Service::Order => started.order = Some(crate::order::wire(&mut w).await?),
                Service::Inventory => {
                    started.inventory = Some(crate::inventory::wire(&mut w).await?);
                }
                Service::Payment => started.payment = Some(crate::payment::wire(&mut w).await?),
                Service::Notification => {
                    started.notification = Some(crate::notification::wire(&mut w).await?);
                }
                Service::Query => started.query = Some(crate::query::wire(&mut w).await?),
                Service::Gateway | Service::Relay => {}
            }
        }
        w.start_relays(&services).await?;
        let gauges = Arc::new(std::mem::replace(&mut w.gauges, Gauges::new(&w.backends)));

        let names: Vec<&str> = services.iter().map(|s| s.as_str()).collect();
        let health = Arc::new(HealthState {
            services: names.join(","),
            stores: w.stores,
            query: w.query,
            blocked: w.blocked,
        });
        let local = with_operations(w.routes, health, Arc::clone(&gauges));
        let router = match w.backends.upstreams() {
            Some(upstreams) if services.contains(&Service::Gateway) => {
                gateway_router(&upstreams, local, w.owners, gauges)?
            }
            _ => local,
        };
        // The process's edge: the gateway's router, or the services'.
        let router = crate::auth::protect(router, w.config.auth.clone());
        tracing::info!(services = %names.join(","), backends = ?w.backends, "services started");
        Ok((
            Self {
                services,
                router,
                subscriptions: w.subscriptions,
                stop,
                tasks: w.tasks,
                backends: w.backends,
            },
            started,
        ))
    }

    /// The process's HTTP API.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The backends the services run on.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// Stops consumers, relays and background tasks.
    pub async fn shutdown(self) {
        self.stop.token().cancel();
        for s in self.subscriptions {
            // A consumer stuck on a dead connection must not hold the exit.
            let _ = tokio::time::timeout(Duration::from_secs(5), s.stop()).await;
        }
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Some((_, _, bus)) = self.backends.distributed() {
            bus.close().await;
        }
    }
}

struct HealthState {
    services: String,
    stores: Vec<Arc<dyn EventStore>>,
    query: Option<Arc<dyn OrderQueries>>,
    blocked: Vec<(&'static str, watch::Receiver<Option<Blocked>>)>,
}

/// A process's health.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok`, or `degraded` while the read model holds parked events or a
    /// relay of this process is blocked.
    pub status: &'static str,
    /// The services this process runs.
    pub services: String,
    /// The head position of the (first) store this process relays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_head: Option<String>,
    /// The read model's position, when the query service runs here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_model_position: Option<String>,
    /// Events the read model refused and parked, when the query service
    /// runs here; any makes the status `degraded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parked_events: Option<u64>,
    /// The stores whose relay (in this process) is held up by messages the
    /// bus keeps refusing, with the routing key no queue receives when that
    /// is the cause; any makes the status `degraded`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub relays_blocked: Vec<RelayBlocked>,
}

/// A relay held up by messages the bus keeps refusing.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RelayBlocked {
    /// The store it relays.
    pub store: &'static str,
    /// The routing key of a message that must be delivered and that no
    /// queue receives, when that is the cause.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unroutable: Option<String>,
    /// Publish attempts refused so far.
    pub attempts: u32,
}

/// Health: 200 when every store this process relays answers, 503 otherwise.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Healthy", body = Health), (status = 503, description = "A store does not answer")))]
async fn health_check(State(state): State<Arc<HealthState>>) -> axum::response::Response {
    let mut heads = Vec::new();
    for store in &state.stores {
        match store.head().await {
            Ok(head) => heads.push(head.to_string()),
            Err(error) => {
                // The cause is for the operator's log, not the answer.
                tracing::warn!(%error, "health: a store does not answer");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(serde_json::json!({"status": "unavailable", "error": "a store does not answer"})),
                )
                    .into_response();
            }
        }
    }
    let (read_model_position, parked_events) = match &state.query {
        Some(query) => (
            query.position().await.ok().map(|p| p.to_string()),
            query.parked().await.ok(),
        ),
        None => (None, None),
    };
    // What a refusal says can name internal addresses: only the routing key
    // and the count are shown.
    let relays_blocked: Vec<RelayBlocked> = state
        .blocked
        .iter()
        .filter_map(|(store, blocked)| {
            blocked.borrow().as_ref().map(|b| RelayBlocked {
                store,
                unroutable: b.unroutable.clone(),
                attempts: b.attempts,
            })
        })
        .collect();
    let degraded = parked_events.is_some_and(|n| n > 0) || !relays_blocked.is_empty();
    Json(Health {
        status: if degraded { "degraded" } else { "ok" },
        services: state.services.clone(),
        store_head: heads.into_iter().next(),
        read_model_position,
        parked_events,
        relays_blocked,
    })
    .into_response()
}

/// Prometheus metrics, the gauges measured for the scrape.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics_text(State(gauges): State<Arc<Gauges>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gauges.render().await,
    )
}

/// `/health`, `/metrics` and `/openapi.json` around a process's routes.
fn with_operations(routes: Router, health: Arc<HealthState>, gauges: Arc<Gauges>) -> Router {
    let router = routes
        .merge(
            Router::new()
                .route("/health", get(health_check))
                .with_state(health),
        )
        .merge(
            Router::new()
                .route("/metrics", get(metrics_text))
                .with_state(gauges),
        )
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::http::MAX_BODY_BYTES,
        ));
    crate::http::with_json_fallbacks(router)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "orders", description = "The event-driven order-processing system"),
    paths(health_check, metrics_text),
    components(schemas(Health, RelayBlocked)),
    tags((name = "operations", description = "Health and metrics"))
)]
struct OperationsApi;

/// The merged OpenAPI document of every service.
pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = OperationsApi::openapi();
    doc.merge(crate::order::OrderApi::openapi());
    doc.merge(crate::inventory::InventoryApi::openapi());
    doc.merge(crate::query::QueryApi::openapi());
    crate::auth::document(&mut doc);
    doc
}
