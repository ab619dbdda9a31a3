//! The query service: read models built by a projection over the store
//! (order details, a customer's orders, counts and revenue by status,
//! search), and an order's history straight from the store.

mod http;
mod model;

use std::sync::Arc;
use std::time::Duration;

use crate::order::OrderEvent;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use es_core::replica::Source;
use es_core::{EventCodec, EventStore, Position, RecordedEvent, StreamId};
use es_projections::ProjectionHandle;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

pub(crate) use http::QueryApi;
pub use http::{router, ListFilter};
pub(crate) use model::{decode_cursor, OrderProjection};
pub use model::{OrderItemView, OrderPage, OrderReadModel, OrderView, Stats, StatusStats};

use crate::backends::QueryBackend;
use crate::distributed::Owner;
use crate::node::Wiring;
use crate::order::OrderStatus;
use crate::topology::groups;
use crate::{Error, Result};

/// Starts the query service in `w`: its read model (fed from the bus when
/// it keeps a replica) and its routes.
pub(crate) async fn wire(w: &mut Wiring) -> Result<QueryBackend> {
    let backend = w.backends.query(w.stop()).await?;
    if let Some(feed) = backend.feed() {
        w.consume(groups::QUERY, feed).await?;
    }
    w.serve(Owner::Query, router(backend.queries()));
    w.reads(backend.queries());
    Ok(backend)
}

/// Whether the read models take events of this type (the order's own).
pub(crate) fn is_order_event(event_type: &str) -> bool {
    matches!(
        event_type,
        "OrderCreated"
            | "OrderInventoryConfirmed"
            | "OrderPaymentConfirmed"
            | "OrderCompleted"
            | "OrderCancelled"
    )
}

/// Where `event` stands in the order service's store: its own place for an
/// event of the order store itself, its source's for a replicated one.
pub(crate) fn source_of(event: &RecordedEvent) -> Source {
    Source::of_event(event).unwrap_or_else(|| Source::of_recorded(event))
}

/// An order's events from `store` (the order store, or a replica of it),
/// with their places and times in the order store.
pub(crate) async fn history(store: &dyn EventStore, order_id: Uuid) -> Result<Vec<HistoryEvent>> {
    let stream = StreamId::for_aggregate("order", order_id).map_err(es_core::StoreError::from)?;
    let events = store.read_stream(&stream, 1, 10_000).await?;
    if events.is_empty() {
        return Err(Error::NotFound {
            what: format!("order {order_id}"),
        });
    }
    Ok(events
        .into_iter()
        .map(|e| {
            let source = source_of(&e);
            let mut data = e.payload.to_value().unwrap_or(serde_json::Value::Null);
            // Card tokens are never shown, whoever asks.
            crate::auth::mask_card_tokens(&mut data);
            HistoryEvent {
                version: e.stream_version,
                position: source.position.to_string(),
                event_type: e.event_type.to_string(),
                recorded_at: source.recorded_at,
                data,
                causation_id: e.metadata.causation_id,
                correlation_id: e.metadata.correlation_id,
            }
        })
        .collect())
}

/// The longest a read waits for the read model to reach a position.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// One event of an order's history.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryEvent {
    /// Its version in the order's stream.
    pub version: u64,
    /// Its position in the store.
    pub position: String,
    /// Its type.
    pub event_type: String,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// Its payload.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// What caused it.
    pub causation_id: Option<Uuid>,
    /// The conversation (the order).
    pub correlation_id: Option<Uuid>,
}

/// What the query routes read, from either read model: [`QueryService`] (in
/// memory, following the store) or
/// [`PgQueryService`](crate::distributed::PgQueryService) (PostgreSQL and
/// Redis, fed by the bus).
#[async_trait]
pub trait OrderQueries: Send + Sync + 'static {
    /// One order, after the read model reflects `min_position` if given.
    async fn order(&self, order_id: Uuid, min_position: Option<Position>) -> Result<OrderView>;
    /// One order as the read model holds it now, bypassing any cache.
    async fn fresh(&self, order_id: Uuid) -> Result<OrderView>;
    /// Waits (at most [`MAX_WAIT`]) until the read model reflects `position`
    /// for `order_id`.
    async fn wait_for(&self, order_id: Uuid, position: Position) -> Result<()>;
    /// Waits up to `timeout` for an order to reach a terminal status: the
    /// order as it was when it got there, or `None` when it did not in time.
    async fn wait_terminal(&self, order_id: Uuid, timeout: Duration) -> Option<OrderView>;
    /// A page of orders, newest first.
    async fn list(&self, filter: ListFilter) -> Result<OrderPage>;
    /// Orders whose customer email or product names match `q`.
    async fn search(&self, q: &str, limit: usize) -> Result<Vec<OrderView>>;
    /// Counts and revenue by status.
    async fn stats(&self) -> Result<Stats>;
    /// An order's events.
    async fn history(&self, order_id: Uuid) -> Result<Vec<HistoryEvent>>;
    /// How far the read model is behind its source.
    async fn lag(&self) -> Result<es_projections::Lag>;
    /// The source position the read model has applied up to.
    async fn position(&self) -> Result<Position>;
    /// How many events the read model has parked (refused and set aside).
    async fn parked(&self) -> Result<u64>;
    /// The parked events, oldest first (at most `limit`).
    async fn parked_events(&self, limit: u32) -> Result<Vec<es_projections::ParkedEvent>>;
    /// Applies the parked events again, after a fix: each one applied
    /// leaves the dead letters in the same transaction (applied once); one
    /// refused again stays parked.
    async fn replay_parked(&self) -> Result<es_projections::postgres::ReplayReport>;
}

/// The query service.
pub struct QueryService {
    model: Arc<OrderReadModel>,
    projection: ProjectionHandle,
    store: Arc<dyn EventStore>,
}

impl std::fmt::Debug for QueryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryService")
            .field("projection", &self.projection)
            .finish_non_exhaustive()
    }
}

impl QueryService {
    /// Starts the projection over `store`, decoding through `codec`, and
    /// serves reads from it.
    pub fn start(store: Arc<dyn EventStore>, codec: EventCodec<OrderEvent>) -> Self {
        let model = Arc::new(OrderReadModel::new());
        let projection = es_projections::spawn_in_memory(
            Arc::clone(&store),
            Arc::new(OrderProjection::new(Arc::clone(&model), codec)),
        );
        Self {
            model,
            projection,
            store,
        }
    }

    /// The read model.
    pub fn model(&self) -> &Arc<OrderReadModel> {
        &self.model
    }

    /// The projection's handle (position, lag).
    pub fn projection(&self) -> &ProjectionHandle {
        &self.projection
    }

    /// Waits (at most [`MAX_WAIT`]) until the read model has applied
    /// everything up to `position`.
    ///
    /// # Errors
    /// [`Error::Validation`] for a position past the store's head (no write
    /// answered it), [`Error::NotCaughtUp`] when the time runs out or the
    /// read model has stopped.
    pub(crate) async fn wait_for_position(&self, position: Position) -> Result<()> {
        let head = self.store.head().await?;
        if position > head {
            return Err(Error::validation(
                "min_position",
                format!("{position} is past the store's head ({head}): no write answered it"),
            ));
        }
        match self.projection.wait_for(position, MAX_WAIT).await {
            Ok(()) => Ok(()),
            Err(es_projections::Error::Timeout { .. }) => Err(Error::NotCaughtUp {
                what: format!("position {position} within {MAX_WAIT:?}"),
            }),
            // A read model that has stopped will not get there either: the
            // read side is unavailable (and the operator is told), which is
            // not the client's fault nor an answer to hide in a 500.
            Err(error) => {
                tracing::error!(%error, "the read model is not running");
                Err(Error::NotCaughtUp {
                    what: format!("position {position}: the read model is not running"),
                })
            }
        }
    }

    /// Waits up to `timeout` for an order to reach a terminal status, and
    /// says which.
    pub async fn terminal_status(&self, order_id: Uuid, timeout: Duration) -> Option<OrderStatus> {
        let status = tokio::time::timeout(timeout, self.model.terminal(order_id))
            .await
            .ok()
            .and_then(Result::ok);
        if status.is_none() {
            self.model.forget_abandoned(order_id);
        }
        status
    }
}

#[async_trait]
impl OrderQueries for QueryService {
    async fn order(&self, order_id: Uuid, min_position: Option<Position>) -> Result<OrderView> {
        if let Some(position) = min_position {
            self.wait_for_position(position).await?;
        }
        self.fresh(order_id).await
    }

    async fn fresh(&self, order_id: Uuid) -> Result<OrderView> {
        self.model.get(order_id).ok_or_else(|| Error::NotFound {
            what: format!("order {order_id}"),
        })
    }

    async fn wait_for(&self, _order_id: Uuid, position: Position) -> Result<()> {
        self.wait_for_position(position).await
    }

    async fn wait_terminal(&self, order_id: Uuid, timeout: Duration) -> Option<OrderView> {
        self.terminal_status(order_id, timeout).await?;
        self.model.get(order_id)
    }

    async fn list(&self, filter: ListFilter) -> Result<OrderPage> {
        Ok(self.model.list(
            filter.customer_email.as_deref(),
            filter.status,
            filter.limit,
            filter.cursor,
        ))
    }

    async fn search(&self, q: &str, limit: usize) -> Result<Vec<OrderView>> {
        Ok(self.model.search(q, limit))
    }

    async fn stats(&self) -> Result<Stats> {
        Ok(self.model.stats())
    }

    async fn lag(&self) -> Result<es_projections::Lag> {
        Ok(self.projection.lag().await?)
    }

    async fn position(&self) -> Result<Position> {
        Ok(self.projection.position())
    }

    async fn parked(&self) -> Result<u64> {
        Ok(self.projection.dead_letters().len() as u64)
    }

    async fn parked_events(&self, limit: u32) -> Result<Vec<es_projections::ParkedEvent>> {
        let mut parked = self.projection.dead_letters();
        parked.truncate(limit as usize);
        Ok(parked)
    }

    async fn replay_parked(&self) -> Result<es_projections::postgres::ReplayReport> {
        Err(Error::Conflict {
            message: "the embedded read model is rebuilt from the log at every start: \
                      restart the fixed build to apply parked events"
                .to_owned(),
        })
    }

    async fn history(&self, order_id: Uuid) -> Result<Vec<HistoryEvent>> {
        history(self.store.as_ref(), order_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use es_core::{
        AppendResult, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, Payload,
        RecordedEvent, StoreError,
    };
    use futures::stream::BoxStream;

    /// A store whose log never reaches its subscribers: the read model
    /// stays running but never gets anywhere.
    struct Stalled(InMemoryEventStore);

    #[async_trait]
    impl EventStore for Stalled {
        async fn append(
            &self,
            stream: &StreamId,
            expected: ExpectedVersion,
            events: Vec<NewEvent>,
        ) -> Result<AppendResult, StoreError> {
            self.0.append(stream, expected, events).await
        }

        async fn append_streams(
            &self,
            parts: Vec<es_core::StreamAppend>,
        ) -> Result<Vec<AppendResult>, StoreError> {
            self.0.append_streams(parts).await
        }

        async fn read_stream(
            &self,
            stream: &StreamId,
            from_version: u64,
            max_count: usize,
        ) -> Result<Vec<RecordedEvent>, StoreError> {
            self.0.read_stream(stream, from_version, max_count).await
        }

        async fn read_all(
            &self,
            after: Position,
            max_count: usize,
        ) -> Result<Vec<RecordedEvent>, StoreError> {
            self.0.read_all(after, max_count).await
        }

        async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
            self.0.stream_version(stream).await
        }

        async fn head(&self) -> Result<Position, StoreError> {
            self.0.head().await
        }

        fn subscribe_all(
            &self,
            _after: Position,
        ) -> BoxStream<'static, Result<RecordedEvent, StoreError>> {
            Box::pin(futures::stream::pending())
        }
    }

    /// The wait for a position the running read model does not reach runs
    /// out after [`MAX_WAIT`] and is `NotCaughtUp` (a 503 `not_caught_up`
    /// over HTTP), not an error of the server's and not a stale answer.
    #[tokio::test(start_paused = true)]
    async fn a_wait_the_read_model_does_not_finish_in_time_is_not_caught_up() {
        let inner = InMemoryEventStore::new();
        let stream = StreamId::new("order-1").unwrap();
        let event = NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "OrderCreated".into(),
            schema_version: 1,
            payload: Payload::from_trusted_json("{}"),
            metadata: Metadata::new(),
            tags: Default::default(),
        };
        let written = inner
            .append(&stream, ExpectedVersion::NoStream, vec![event])
            .await
            .unwrap();
        let service = QueryService::start(Arc::new(Stalled(inner)), EventCodec::new());
        let started = tokio::time::Instant::now();
        let error = service
            .wait_for_position(written.position)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, Error::NotCaughtUp { what } if what.contains("within")),
            "{error:?}"
        );
        assert!(started.elapsed() >= MAX_WAIT, "{:?}", started.elapsed());
        let answer = crate::http::ApiError::from(error);
        assert_eq!(answer.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.body.code, "not_caught_up");
    }

    /// Waiting for orders that never end (unknown ones) leaves nothing
    /// behind once the waits time out, however many there were.
    #[tokio::test(start_paused = true)]
    async fn abandoned_waits_for_an_end_hold_no_memory() {
        let service = QueryService::start(Arc::new(InMemoryEventStore::new()), EventCodec::new());
        let waits = (0..100)
            .map(|_| service.terminal_status(Uuid::now_v7(), std::time::Duration::from_secs(1)));
        let ended = futures::future::join_all(waits).await;
        assert!(ended.iter().all(Option::is_none));
        assert_eq!(service.model().waiting(), 0);

        // A wait that is answered leaves nothing either.
        let again = service.terminal_status(Uuid::now_v7(), std::time::Duration::from_millis(10));
        assert_eq!(again.await, None);
        assert_eq!(service.model().waiting(), 0);
    }
}
