//! The event store: an append-only log of streams with optimistic concurrency.

use std::ops::ControlFlow;

use async_trait::async_trait;
use futures::stream::BoxStream;
use uuid::Uuid;

use crate::{
    AppendResult, ExpectedVersion, InvalidStreamId, NewEvent, Position, RecordedEvent, StreamEvent,
    StreamId,
};

/// A boxed error from a backend's transport or driver.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store, checkpoint store, snapshot store or inbox refused or failed an
/// operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stream's version was not what the append expected. Nothing was
    /// written.
    #[error(
        "wrong expected version on stream {stream}: expected {expected}, actual version {actual}"
    )]
    WrongExpectedVersion {
        /// The stream appended to.
        stream: StreamId,
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's actual version (0 when it has no events).
        actual: u64,
    },
    /// Some events of the batch were already stored, but not as exactly this
    /// batch at these positions (a partial overlap, another stream, or another
    /// payload under the same id). Nothing was written.
    #[error("event {event_id} on stream {stream} is already stored differently: {reason}")]
    IdempotencyConflict {
        /// The stream appended to.
        stream: StreamId,
        /// The first event id that did not match.
        event_id: Uuid,
        /// What did not match.
        reason: &'static str,
    },
    /// A conditional append ([`DcbStore::append_if`](crate::DcbStore::append_if))
    /// found an event matching its condition's query recorded after the
    /// condition's marker: the decision was made on stale facts. Nothing was
    /// written; read again and decide again.
    #[error("the consistency boundary moved: an event matching the append condition was recorded after {}", DisplayMarker(.after))]
    BoundaryMoved {
        /// The stream appended to.
        stream: StreamId,
        /// The condition's marker.
        after: Option<Position>,
    },
    /// The stream id was rejected.
    #[error(transparent)]
    InvalidStreamId(#[from] InvalidStreamId),
    /// An event of the batch is malformed (an empty type name, an id that
    /// appears twice in the batch). Nothing was written.
    #[error("invalid event {event_id}: {reason}")]
    InvalidEvent {
        /// The offending event.
        event_id: Uuid,
        /// What is wrong with it.
        reason: String,
    },
    /// An event's payload or metadata is not valid JSON. Nothing was written.
    #[error("event {event_id} has a payload that is not valid JSON")]
    InvalidPayload {
        /// The offending event.
        event_id: Uuid,
    },
    /// The batch holds more events than the backend takes in one append.
    #[error("batch of {len} events is larger than the maximum of {max}")]
    BatchTooLarge {
        /// The batch's length.
        len: usize,
        /// The backend's limit.
        max: usize,
    },
    /// A multi-stream write named one stream twice. Nothing was written.
    #[error("stream {stream} appears twice in one write")]
    DuplicateStream {
        /// The stream named twice.
        stream: StreamId,
    },
    /// The backend could not be reached (connection refused, pool timed out).
    /// The operation may be retried; for an append, retry with the same event
    /// ids so an append that did commit is recognised.
    #[error("event store unavailable: {source}")]
    Unavailable {
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// Any other backend failure.
    #[error("event store backend error: {source}")]
    Backend {
        /// The driver's error.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// Whether the same operation fails this way every time: the request
    /// itself is refused (a malformed stream id, event or payload, a batch
    /// too large, a stream named twice, ids already stored differently). A
    /// message handler gives such a failure to the dead letters at once
    /// instead of retrying it until its attempts run out. A lost race
    /// ([`StoreError::WrongExpectedVersion`], [`StoreError::BoundaryMoved`])
    /// and a backend failure are not.
    ///
    /// ```
    /// use es_core::{StoreError, StreamId, ExpectedVersion};
    /// let refused = StoreError::InvalidPayload { event_id: uuid::Uuid::nil() };
    /// assert!(refused.is_deterministic());
    /// let race = StoreError::WrongExpectedVersion {
    ///     stream: StreamId::new("order-1").unwrap(),
    ///     expected: ExpectedVersion::NoStream,
    ///     actual: 1,
    /// };
    /// assert!(!race.is_deterministic());
    /// ```
    pub fn is_deterministic(&self) -> bool {
        matches!(
            self,
            Self::InvalidStreamId(_)
                | Self::InvalidEvent { .. }
                | Self::InvalidPayload { .. }
                | Self::BatchTooLarge { .. }
                | Self::DuplicateStream { .. }
                | Self::IdempotencyConflict { .. }
        )
    }
}

/// Shows a condition's marker, or that it had none.
struct DisplayMarker<'a>(&'a Option<Position>);

impl std::fmt::Display for DisplayMarker<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(position) => write!(f, "position {position}"),
            None => f.write_str("the start of the log"),
        }
    }
}

/// One stream's part of an [`EventStore::append_streams`] write.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamAppend {
    /// The stream appended to.
    pub stream: StreamId,
    /// What its version must be.
    pub expected: ExpectedVersion,
    /// Its new events.
    pub events: Vec<NewEvent>,
}

impl StreamAppend {
    /// A part appending `events` to `stream`, expecting `expected`.
    pub fn new(stream: StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        Self {
            stream,
            expected,
            events,
        }
    }
}

/// Writes a [`Repository`](crate::Repository)'s appends in place of
/// [`EventStore::append`] (see
/// [`Repository::with_writer`](crate::Repository::with_writer)), possibly
/// together with other streams in one atomic write.
#[async_trait]
pub trait AppendWriter: Send + Sync + 'static {
    /// Appends `part` with the guarantees and answers of
    /// [`EventStore::append`] for that stream.
    async fn write(&self, part: StreamAppend) -> Result<AppendResult, StoreError>;
}

/// An append-only store of event streams with a global, totally ordered log.
///
/// The guarantees every implementation gives (and the conformance suite in
/// `es_core::testing::conformance` checks):
///
/// - `append` is atomic: all events of the batch are written, or none.
/// - The expected version is checked by the store at write time; a mismatch is
///   [`StoreError::WrongExpectedVersion`] carrying the actual version.
/// - Re-appending events whose ids are already stored, as the same batch at
///   the same positions with the same payloads, is a success that writes nothing
///   (`written: false`); a partial overlap or a changed payload is
///   [`StoreError::IdempotencyConflict`] and writes nothing. Event ids are unique
///   across the store.
/// - `append_streams` is atomic across its parts: every part is written, or
///   none; each part is decided as `append` decides one.
/// - Stream versions are contiguous from 1.
/// - Global positions strictly increase in log order; `read_all` and
///   `subscribe_all` return committed events in that order and never skip one,
///   even one committed late by a slow concurrent writer.
///
/// The trait is object-safe: use it as `Arc<dyn EventStore>`.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends a batch of events to one stream, atomically.
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError>;

    /// Appends to several distinct streams in one atomic write: every part is
    /// written, or none is. Each part is decided as [`EventStore::append`]
    /// decides one (its expected version, the idempotent re-append of its
    /// ids); the first part that fails fails the whole write with its error.
    /// Answers one result per part, in order. The events of the write are
    /// contiguous in the log, each part's in order (the parts' order among
    /// themselves is the store's choice).
    ///
    /// A stream named twice is [`StoreError::DuplicateStream`].
    async fn append_streams(
        &self,
        parts: Vec<StreamAppend>,
    ) -> Result<Vec<AppendResult>, StoreError>;

    /// Reads up to `max_count` events of a stream, starting at version
    /// `from_version` (inclusive; 1 is the first event). A missing stream reads
    /// as empty.
    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// [`EventStore::read_stream`] with only what replaying the stream into
    /// state needs ([`StreamEvent`]), which a store may fetch and decode at a
    /// lower cost. The default reads the full events.
    async fn read_stream_events(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<StreamEvent>, StoreError> {
        Ok(self
            .read_stream(stream, from_version, max_count)
            .await?
            .into_iter()
            .map(StreamEvent::from)
            .collect())
    }

    /// [`EventStore::read_stream_events`], handed to `each` one event at a
    /// time, in order, until `each` breaks; returns how many events were
    /// handed over. A store that decodes rows as they arrive lets the
    /// caller fold each event while the next ones are still on the way. The
    /// default reads the page, then hands it over.
    async fn visit_stream_events(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
        each: &mut (dyn FnMut(StreamEvent) -> ControlFlow<()> + Send),
    ) -> Result<usize, StoreError> {
        let page = self
            .read_stream_events(stream, from_version, max_count)
            .await?;
        let mut handed = 0;
        for event in page {
            handed += 1;
            if each(event).is_break() {
                break;
            }
        }
        Ok(handed)
    }

    /// Reads up to `max_count` events of the global log whose position is after
    /// `after`, in log order.
    async fn read_all(
        &self,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The stream's current version: the version of its last event, 0 when it
    /// has none.
    async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError>;

    /// The position of the last event readable by `read_all` now
    /// ([`Position::START`] for an empty log).
    async fn head(&self) -> Result<Position, StoreError>;

    /// Every event after `after`: first the committed history, then new events
    /// as they commit, in log order, never skipping or repeating one. The
    /// stream ends only when the store is dropped or fails; an error item is
    /// followed by the end of the stream (subscribe again from the last
    /// position seen).
    fn subscribe_all(
        &self,
        after: Position,
    ) -> BoxStream<'static, Result<RecordedEvent, StoreError>>;
}

/// The checks every store makes on a multi-stream write before writing
/// anything: [`validate_batch`] over all its events together (an event id
/// may appear once in the whole write), and no stream named twice.
pub fn validate_parts(parts: &[StreamAppend]) -> Result<(), StoreError> {
    for (i, part) in parts.iter().enumerate() {
        if parts[..i].iter().any(|p| p.stream == part.stream) {
            return Err(StoreError::DuplicateStream {
                stream: part.stream.clone(),
            });
        }
    }
    for part in parts {
        validate_batch(&part.events)?;
    }
    if parts.len() > 1 {
        let mut seen = std::collections::HashSet::new();
        for event in parts.iter().flat_map(|p| &p.events) {
            if !seen.insert(event.event_id) {
                return Err(StoreError::InvalidEvent {
                    event_id: event.event_id,
                    reason: "the event id appears twice in the write".into(),
                });
            }
        }
    }
    Ok(())
}

/// The checks every store makes on a batch before writing anything: no event
/// has an empty type name, and no event id appears twice in the batch.
/// Backends call it first and add their own limits.
pub fn validate_batch(events: &[NewEvent]) -> Result<(), StoreError> {
    // Most batches hold one to a few events: comparing with the ones before
    // costs less than building a set (this runs on every append).
    let mut seen =
        (events.len() > 16).then(|| std::collections::HashSet::with_capacity(events.len()));
    for (i, event) in events.iter().enumerate() {
        if event.event_type.is_empty() {
            return Err(StoreError::InvalidEvent {
                event_id: event.event_id,
                reason: "the event type is empty".into(),
            });
        }
        let repeated = match seen.as_mut() {
            Some(seen) => !seen.insert(event.event_id),
            None => events[..i].iter().any(|e| e.event_id == event.event_id),
        };
        if repeated {
            return Err(StoreError::InvalidEvent {
                event_id: event.event_id,
                reason: "the event id appears twice in the batch".into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Metadata, Payload};

    fn batch(n: usize) -> Vec<NewEvent> {
        (0..n)
            .map(|_| NewEvent::new("E", 1, Payload::from_trusted_json("{}"), Metadata::new()))
            .collect()
    }

    #[test]
    fn a_repeated_event_id_is_refused_in_small_and_large_batches() {
        // Small batches are checked pairwise, large ones with a set.
        for n in [2, 3, 16, 17, 40] {
            assert!(validate_batch(&batch(n)).is_ok(), "{n}");
            let mut repeated = batch(n);
            repeated[n - 1].event_id = repeated[n / 2 - 1].event_id;
            match validate_batch(&repeated) {
                Err(StoreError::InvalidEvent { event_id, reason }) => {
                    assert_eq!(event_id, repeated[n - 1].event_id);
                    assert!(reason.contains("twice"), "{reason}");
                }
                other => panic!("{n}: {other:?}"),
            }
        }
        assert!(validate_batch(&[]).is_ok());
    }
}
