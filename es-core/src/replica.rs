//! Replicas: a service's own copy of another service's streams, built from
//! the messages that service's relay publishes, so that a reader (a query
//! service, a reporting context) never reads another service's store.
//!
//! The source side relays its events with [`with_source`], which adds where
//! each event stands in its own store ([`Source`]) to the message's headers.
//! The reading side subscribes a [`ReplicaHandler`] to those messages: it
//! appends each one to a local store as the same event (same id, same stream,
//! same version), expecting the version before it. That makes the copy exact
//! under the bus's at-least-once, possibly reordered delivery:
//!
//! - a duplicate is the store's idempotent re-append, and is acknowledged;
//! - an event that arrives before its predecessor is retried until the
//!   predecessor is in, so every replicated stream is the source's, in order,
//!   with no gap;
//! - an event the replica holds differently is dead-lettered: the copies
//!   have diverged, and no retry will mend that.
//!
//! The replica's own log then serves projections, rebuilds and history
//! exactly as a local store would. Its positions are its own; each replicated
//! event keeps its source's position and recording time in its headers
//! ([`Source::of_event`]).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use es_core::replica::{with_source, ReplicaHandler, Source};
//! use es_core::relay::default_route;
//! use es_core::{Delivery, EventStore, ExpectedVersion, InMemoryEventStore, MessageHandler,
//!               Metadata, NewEvent, Outcome, Payload, StreamId};
//!
//! // The source service's store, and what its relay publishes.
//! let source = InMemoryEventStore::new();
//! let stream = StreamId::new("order-1").unwrap();
//! let event = NewEvent::new("OrderCreated", 1, Payload::from_json("{}").unwrap(), Metadata::new());
//! source.append(&stream, ExpectedVersion::NoStream, vec![event]).await.unwrap();
//! let recorded = source.read_stream(&stream, 1, 10).await.unwrap().remove(0);
//! let message = with_source(Arc::new(default_route), &["order"])(&recorded).unwrap();
//!
//! // The reading service's replica.
//! let replica = Arc::new(InMemoryEventStore::new());
//! let handler = ReplicaHandler::new(replica.clone());
//! let delivery = Delivery { message, attempt: 1 };
//! assert_eq!(handler.handle(&delivery).await, Outcome::Ack);
//! assert_eq!(handler.handle(&delivery).await, Outcome::Ack); // a duplicate
//! let copy = replica.read_stream(&stream, 1, 10).await.unwrap();
//! assert_eq!(copy.len(), 1);
//! assert_eq!(copy[0].event_id, recorded.event_id);
//! assert_eq!(Source::of_event(&copy[0]).unwrap().position, recorded.position);
//! # });
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};

use crate::bus::{Delivery, Message, MessageHandler, Outcome};
use crate::relay::Route;
use crate::{
    EventStore, ExpectedVersion, Metadata, NewEvent, Position, RecordedEvent, StoreError, StreamId,
};

/// Header: the stream the event belongs to in its source store.
pub const STREAM_HEADER: &str = "es-source-stream";
/// Header: the event's version in that stream.
pub const VERSION_HEADER: &str = "es-source-version";
/// Header: the event's position in the source store's log.
pub const POSITION_HEADER: &str = "es-source-position";
/// Header: when the source store recorded it (RFC 3339).
pub const RECORDED_AT_HEADER: &str = "es-source-recorded-at";

/// Where a replicated event stands in its source store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// Its stream.
    pub stream_id: StreamId,
    /// Its version in the stream (1 for the first event).
    pub version: u64,
    /// Its position in the source's log.
    pub position: Position,
    /// When the source recorded it.
    pub recorded_at: DateTime<Utc>,
}

/// Why a message cannot be replicated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// A source header is absent: the message was not relayed with
    /// [`with_source`].
    #[error("missing header {0}")]
    Missing(&'static str),
    /// A source header does not parse.
    #[error("invalid header {header}: {reason}")]
    Invalid {
        /// The header.
        header: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl Source {
    /// Where `event` stands in the store that recorded it.
    pub fn of_recorded(event: &RecordedEvent) -> Self {
        Self {
            stream_id: event.stream_id.clone(),
            version: event.stream_version,
            position: event.position,
            recorded_at: event.recorded_at,
        }
    }

    /// The source headers of `metadata`.
    ///
    /// # Errors
    /// [`SourceError`] when one is missing or malformed.
    pub fn from_metadata(metadata: &Metadata) -> Result<Self, SourceError> {
        fn header<'a>(m: &'a Metadata, name: &'static str) -> Result<&'a str, SourceError> {
            m.headers
                .get(name)
                .map(String::as_str)
                .ok_or(SourceError::Missing(name))
        }
        fn invalid(header: &'static str) -> impl Fn(String) -> SourceError {
            move |reason| SourceError::Invalid { header, reason }
        }
        let stream_id = StreamId::new(header(metadata, STREAM_HEADER)?)
            .map_err(|e| invalid(STREAM_HEADER)(e.to_string()))?;
        let version = header(metadata, VERSION_HEADER)?
            .parse::<u64>()
            .map_err(|e| invalid(VERSION_HEADER)(e.to_string()))
            .and_then(|v| {
                if v == 0 {
                    Err(invalid(VERSION_HEADER)("versions start at 1".to_owned()))
                } else {
                    Ok(v)
                }
            })?;
        let position = header(metadata, POSITION_HEADER)?
            .parse::<Position>()
            .map_err(|e| invalid(POSITION_HEADER)(e.to_string()))?;
        let recorded_at = DateTime::parse_from_rfc3339(header(metadata, RECORDED_AT_HEADER)?)
            .map_err(|e| invalid(RECORDED_AT_HEADER)(e.to_string()))?
            .with_timezone(&Utc);
        Ok(Self {
            stream_id,
            version,
            position,
            recorded_at,
        })
    }

    /// Where a replica's event came from, or `None` for an event that was
    /// not replicated.
    pub fn of_event(event: &RecordedEvent) -> Option<Self> {
        Self::from_metadata(&event.metadata).ok()
    }

    /// Writes this source into `metadata`'s headers.
    pub fn write_to(&self, metadata: &mut Metadata) {
        let headers = &mut metadata.headers;
        headers.insert(STREAM_HEADER.to_owned(), self.stream_id.to_string());
        headers.insert(VERSION_HEADER.to_owned(), self.version.to_string());
        headers.insert(POSITION_HEADER.to_owned(), self.position.to_string());
        headers.insert(
            RECORDED_AT_HEADER.to_owned(),
            self.recorded_at
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        );
    }
}

/// `route`, with the [`Source`] headers added to the messages it makes of
/// events in streams of the given categories (the streams a replica copies).
/// Messages made of other events, such as the commands a saga's records
/// hold, are left as they are.
pub fn with_source(route: Route, categories: &[&str]) -> Route {
    let categories: Vec<String> = categories.iter().map(|c| (*c).to_owned()).collect();
    Arc::new(move |event: &RecordedEvent| {
        let mut message = route(event)?;
        let copied = *message.message_type == *event.event_type
            && categories.iter().any(|c| c == event.stream_id.category());
        if copied {
            Source::of_recorded(event).write_to(&mut message.metadata);
        }
        Some(message)
    })
}

/// Appends relayed events to a replica store (see the [module docs](self)).
pub struct ReplicaHandler {
    store: Arc<dyn EventStore>,
}

impl std::fmt::Debug for ReplicaHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaHandler").finish_non_exhaustive()
    }
}

impl ReplicaHandler {
    /// A handler appending to `store`.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self { store }
    }

    /// Appends `message` to the replica: `Ack` when the replica holds it
    /// (now or already), `Retry` while its predecessor is missing or the
    /// store fails, `DeadLetter` when it cannot be replicated.
    pub async fn replicate(&self, message: &Message) -> Outcome {
        let source = match Source::from_metadata(&message.metadata) {
            Ok(source) => source,
            Err(error) => return Outcome::dead_letter(format!("not a replicable event: {error}")),
        };
        let event = NewEvent {
            event_id: message.message_id,
            event_type: Arc::clone(&message.message_type),
            schema_version: message.schema_version,
            payload: message.payload.clone(),
            metadata: message.metadata.clone(),
            tags: Default::default(),
        };
        let expected = ExpectedVersion::Exact(source.version - 1);
        match self
            .store
            .append(&source.stream_id, expected, vec![event])
            .await
        {
            Ok(_) => Outcome::Ack,
            Err(StoreError::WrongExpectedVersion { actual, .. }) if actual < source.version => {
                tracing::debug!(
                    stream = %source.stream_id,
                    version = source.version,
                    replica_version = actual,
                    "replicated event ahead of its predecessor; retrying"
                );
                Outcome::retry(format!(
                    "stream {} is at version {actual} in the replica; waiting for version {}",
                    source.stream_id,
                    source.version - 1
                ))
            }
            Err(
                error @ (StoreError::WrongExpectedVersion { .. }
                | StoreError::IdempotencyConflict { .. }),
            ) => Outcome::dead_letter(format!(
                "the replica holds version {} of {} differently: {error}",
                source.version, source.stream_id
            )),
            Err(error @ (StoreError::Unavailable { .. } | StoreError::Backend { .. })) => {
                Outcome::retry(error)
            }
            Err(error) => Outcome::dead_letter(error),
        }
    }
}

#[async_trait]
impl MessageHandler for ReplicaHandler {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        self.replicate(&delivery.message).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::default_route;
    use crate::{InMemoryEventStore, Payload};
    use proptest::prelude::*;

    /// A source store with `streams` streams of `len` events each, and the
    /// messages its relay publishes, in log order.
    async fn published(streams: usize, len: usize) -> (InMemoryEventStore, Vec<Message>) {
        let source = InMemoryEventStore::new();
        for v in 0..len {
            for s in 0..streams {
                let stream = StreamId::new(format!("order-{s}")).unwrap();
                let payload = Payload::from_json(format!("{{\"n\":{v}}}")).unwrap();
                let event = NewEvent::new("Changed", 1, payload, Metadata::new());
                source
                    .append(&stream, ExpectedVersion::Exact(v as u64), vec![event])
                    .await
                    .unwrap();
            }
        }
        let route = with_source(Arc::new(default_route), &["order"]);
        let log = source.read_all(Position::START, 10_000).await.unwrap();
        let messages = log.iter().filter_map(|e| route(e)).collect();
        (source, messages)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn the_source_headers_round_trip_and_only_copied_events_get_them() {
        runtime().block_on(async {
            let (source, messages) = published(1, 2).await;
            let log = source.read_all(Position::START, 10).await.unwrap();
            for (event, message) in log.iter().zip(&messages) {
                let read = Source::from_metadata(&message.metadata).unwrap();
                assert_eq!(read, Source::of_recorded(event));
            }
            // Another category is relayed unchanged.
            let route = with_source(Arc::new(default_route), &["product"]);
            assert!(route(&log[0]).unwrap().metadata.headers.is_empty());
        });
    }

    #[test]
    fn bad_source_headers_are_typed() {
        let mut metadata = Metadata::new();
        assert_eq!(
            Source::from_metadata(&metadata),
            Err(SourceError::Missing(STREAM_HEADER))
        );
        Source {
            stream_id: StreamId::new("order-1").unwrap(),
            version: 1,
            position: Position::new(1, 0),
            recorded_at: Utc::now(),
        }
        .write_to(&mut metadata);
        metadata
            .headers
            .insert(VERSION_HEADER.to_owned(), "0".to_owned());
        assert!(matches!(
            Source::from_metadata(&metadata),
            Err(SourceError::Invalid {
                header: VERSION_HEADER,
                ..
            })
        ));
    }

    #[test]
    fn an_event_ahead_of_its_predecessor_waits_and_a_changed_copy_is_dead_lettered() {
        runtime().block_on(async {
            let (_, messages) = published(1, 2).await;
            let replica = Arc::new(InMemoryEventStore::new());
            let handler = ReplicaHandler::new(replica.clone());
            assert!(matches!(
                handler.replicate(&messages[1]).await,
                Outcome::Retry { .. }
            ));
            assert_eq!(handler.replicate(&messages[0]).await, Outcome::Ack);
            assert_eq!(handler.replicate(&messages[1]).await, Outcome::Ack);
            // The same id and place with another payload: the copies diverged.
            let mut changed = messages[1].clone();
            changed.payload = Payload::from_json("{\"n\":99}").unwrap();
            assert!(matches!(
                handler.replicate(&changed).await,
                Outcome::DeadLetter { .. }
            ));
            // A message relayed without source headers cannot be placed.
            let mut plain = messages[0].clone();
            plain.metadata.headers.clear();
            assert!(matches!(
                handler.replicate(&plain).await,
                Outcome::DeadLetter { .. }
            ));
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the order and the duplicates the bus delivers, with each
        /// retried message coming back later, the replica ends up holding
        /// every stream exactly as the source does.
        #[test]
        fn any_delivery_order_builds_an_exact_copy(
            order in Just((0..12usize).collect::<Vec<_>>()).prop_shuffle(),
            duplicates in proptest::collection::vec(0..12usize, 0..8),
        ) {
            runtime().block_on(async {
                let (source, messages) = published(3, 4).await;
                let replica = Arc::new(InMemoryEventStore::new());
                let handler = ReplicaHandler::new(replica.clone());
                let mut queue: std::collections::VecDeque<&Message> =
                    order.iter().chain(&duplicates).map(|i| &messages[*i]).collect();
                let mut deliveries = 0;
                while let Some(message) = queue.pop_front() {
                    deliveries += 1;
                    prop_assert!(deliveries < 1_000, "replication does not converge");
                    match handler.replicate(message).await {
                        Outcome::Ack => {}
                        Outcome::Retry { .. } => queue.push_back(message),
                        other => prop_assert!(false, "unexpected {other:?}"),
                    }
                }
                for s in 0..3 {
                    let stream = StreamId::new(format!("order-{s}")).unwrap();
                    let want = source.read_stream(&stream, 1, 100).await.unwrap();
                    let got = replica.read_stream(&stream, 1, 100).await.unwrap();
                    let key = |e: &RecordedEvent| (e.event_id, e.stream_version, e.payload.clone());
                    prop_assert_eq!(
                        got.iter().map(key).collect::<Vec<_>>(),
                        want.iter().map(key).collect::<Vec<_>>()
                    );
                    for (g, w) in got.iter().zip(&want) {
                        prop_assert_eq!(Source::of_event(g), Some(Source::of_recorded(w)));
                    }
                }
                Ok(())
            })?;
        }
    }
}
