//! The envelopes events travel in: [`NewEvent`] going into a store and
//! [`RecordedEvent`] coming out, or [`StreamEvent`] when only a replay
//! reads it.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Metadata, Payload, Position, StreamId, Tag};

/// An event about to be appended: its id, type, schema version, payload and
/// metadata. The store assigns the stream version, global position and time.
///
/// # Event ids: v7 when fresh, v5 when derived
///
/// A fresh event ([`NewEvent::new`], and so every event an
/// [`EventCodec`](crate::EventCodec) encodes) gets a random, time-ordered
/// UUID v7. An event written as the effect of an identified cause — a command
/// run with a command id ([`Repository::execute_once`](crate::Repository::execute_once),
/// [`Repository::create_once`](crate::Repository::create_once)) or a saga's
/// reaction to a message — gets a name-based UUID v5 from [`derived_id`]
/// instead: deterministic by design, so a retried or redelivered cause appends
/// the same ids and the store answers with an idempotent success rather than
/// writing the effects twice. Such ids carry no timestamp; nothing orders
/// events by their id (the log's order is the [`Position`]), so the two kinds
/// mix freely in one stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Unique id of the event; appending the same id again at the same position
    /// is an idempotent success. A fresh UUID v7, or a UUID v5 from
    /// [`derived_id`] for an idempotent effect (see the type's docs).
    pub event_id: Uuid,
    /// The stable name of the event type (never a Rust type path).
    pub event_type: Arc<str>,
    /// The version of the payload's schema.
    pub schema_version: u32,
    /// The event's data.
    pub payload: Payload,
    /// Correlation, causation, trace context and headers.
    pub metadata: Metadata,
    /// The `kind:value` tags that place it in consistency boundaries (see
    /// [`crate::dcb`]); empty for an event no [`Query`](crate::Query)
    /// selects.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub tags: BTreeSet<Tag>,
}

impl NewEvent {
    /// A new event with a fresh UUID v7 id.
    pub fn new(
        event_type: impl Into<Arc<str>>,
        schema_version: u32,
        payload: Payload,
        metadata: Metadata,
    ) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version,
            payload,
            metadata,
            tags: BTreeSet::new(),
        }
    }

    /// Adds a tag.
    #[must_use]
    pub fn tagged(mut self, tag: Tag) -> Self {
        self.tags.insert(tag);
        self
    }

    /// Adds tags.
    #[must_use]
    pub fn with_tags(mut self, tags: impl IntoIterator<Item = Tag>) -> Self {
        self.tags.extend(tags);
        self
    }

    /// Replaces the event id, for callers that derive ids deterministically
    /// (a UUID v5 from [`derived_id`]) so that a retried write is recognised
    /// as the same.
    #[must_use]
    pub fn with_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }
}

/// An event as the store recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Unique id of the event.
    pub event_id: Uuid,
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Its version in the stream: 1 for the stream's first event.
    pub stream_version: u64,
    /// Its position in the store's global log.
    pub position: Position,
    /// The stable name of the event type.
    pub event_type: Arc<str>,
    /// The version of the payload's schema as it was written.
    pub schema_version: u32,
    /// The event's data.
    pub payload: Payload,
    /// Correlation, causation, trace context and headers.
    pub metadata: Metadata,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// Its tags, as appended.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub tags: BTreeSet<Tag>,
}

/// An event of a stream as replaying the stream into state needs it: its
/// id, version, type, schema version and payload, without the log position,
/// metadata, time and tags of a [`RecordedEvent`]. See
/// [`EventStore::read_stream_events`](crate::EventStore::read_stream_events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamEvent {
    /// Unique id of the event.
    pub event_id: Uuid,
    /// Its version in the stream: 1 for the stream's first event.
    pub stream_version: u64,
    /// The stable name of the event type.
    pub event_type: Arc<str>,
    /// The version of the payload's schema as it was written.
    pub schema_version: u32,
    /// The event's data.
    pub payload: Payload,
}

impl From<RecordedEvent> for StreamEvent {
    fn from(event: RecordedEvent) -> Self {
        Self {
            event_id: event.event_id,
            stream_version: event.stream_version,
            event_type: event.event_type,
            schema_version: event.schema_version,
            payload: event.payload,
        }
    }
}

/// What a successful append reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    /// The stream's version after the append: the version to expect next time.
    pub stream_version: u64,
    /// The global position of the last event of the batch (for an empty batch,
    /// [`Position::START`]).
    pub position: Position,
    /// False when every event was already stored at these positions and the
    /// append was an idempotent no-op.
    pub written: bool,
}

/// A deterministic event id derived from the id of what caused it, the scope
/// the effects land in (a stream id, a consumer name), and the event's index
/// among the effects of that cause in that scope.
///
/// The id is a name-based UUID v5 (SHA-1 of cause, index and scope in a fixed
/// namespace), not the UUID v7 a fresh [`NewEvent`] gets: it must come out the
/// same every time for the same inputs, which a time-based id cannot. The
/// idempotent paths use it: [`Repository::execute_once`](crate::Repository::execute_once),
/// [`Repository::create_once`](crate::Repository::create_once) and the saga
/// manager's reactions.
///
/// A handler that derives its events' ids this way appends the same ids when a
/// message is redelivered, and the store answers the second append as an
/// idempotent success instead of writing the effects twice.
///
/// ```
/// use es_core::derived_id;
/// use uuid::Uuid;
/// let cause = Uuid::now_v7();
/// assert_eq!(derived_id(cause, "order-1", 0), derived_id(cause, "order-1", 0));
/// assert_ne!(derived_id(cause, "order-1", 0), derived_id(cause, "order-1", 1));
/// assert_ne!(derived_id(cause, "order-1", 0), derived_id(cause, "order-2", 0));
/// // Name-based, where a fresh event's id is time-based.
/// assert_eq!(derived_id(cause, "order-1", 0).get_version_num(), 5);
/// assert_eq!(cause.get_version_num(), 7);
/// ```
pub fn derived_id(cause: Uuid, scope: &str, index: u32) -> Uuid {
    // Exactly `Uuid::new_v5(&DERIVED_NAMESPACE, cause ++ index ++ scope)`
    // (a test pins it: stored ids depend on it), hashed without building the
    // name and by the `sha1` crate, which uses the CPU's SHA instructions
    // where there are any: sagas derive several ids per reaction.
    use sha1::Digest;
    let digest = sha1::Sha1::new()
        .chain_update(DERIVED_NAMESPACE.as_bytes())
        .chain_update(cause.as_bytes())
        .chain_update(index.to_be_bytes())
        .chain_update(scope.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// The namespace of [`derived_id`]'s name-based ids.
const DERIVED_NAMESPACE: Uuid = Uuid::from_u128(0x6f1e_2a7c_94b3_4d5e_8a1f_0c3b_5d7e_9f21);

#[cfg(test)]
mod derived_id_tests {
    use super::*;

    proptest::proptest! {
        /// Ids already stored were made by `Uuid::new_v5` over this name: a
        /// faster hash must give the very same ids.
        #[test]
        fn derived_ids_are_the_v5_ids_of_cause_index_and_scope(
            cause in proptest::prelude::any::<u128>(),
            index in proptest::prelude::any::<u32>(),
            scope in "\\PC{0,80}",
        ) {
            let cause = Uuid::from_u128(cause);
            let mut name = Vec::new();
            name.extend_from_slice(cause.as_bytes());
            name.extend_from_slice(&index.to_be_bytes());
            name.extend_from_slice(scope.as_bytes());
            proptest::prop_assert_eq!(
                derived_id(cause, &scope, index),
                Uuid::new_v5(&DERIVED_NAMESPACE, &name)
            );
        }
    }

    #[test]
    fn a_derived_id_is_stable_across_releases() {
        // Computed independently (Python's hashlib over the same name).
        let cause = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        assert_eq!(
            derived_id(cause, "order-1", 0).to_string(),
            "e12843ed-e7e7-58d2-ad1e-39dd63b10d8f"
        );
    }
}
