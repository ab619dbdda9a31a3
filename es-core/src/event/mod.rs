//! Domain events, and the codec that turns them into payloads and back through
//! one registry of upcasters.

use serde::{de::DeserializeOwned, Serialize};

mod codec;
mod schema;
mod upcast;

pub use codec::{Decoded, EventCodec};
pub use schema::{Schema, SchemaBuilder, SchemaError};
pub use upcast::{Upcast, Upcaster, Upcasters};

/// A domain event type: an enum whose variants are the events.
///
/// Events are plain serde enums in serde's default (externally tagged)
/// representation. The variant's serde name is the event's stable type name,
/// stored beside the payload; the payload is the variant's content alone. Rename
/// variants with `#[serde(rename = "...")]` to keep stored names stable when the
/// Rust name changes. [`DomainEvent::event_type`] must return the same name.
///
/// The same trait describes any typed message with stable names: the commands a
/// saga sends and the inputs it reacts to are `DomainEvent`s too.
///
/// ```
/// use es_core::{DomainEvent, EventCodec, Metadata};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// enum CounterEvent {
///     Incremented { by: u32 },
///     Reset,
/// }
///
/// impl DomainEvent for CounterEvent {
///     fn event_type(&self) -> &'static str {
///         match self {
///             Self::Incremented { .. } => "Incremented",
///             Self::Reset => "Reset",
///         }
///     }
/// }
///
/// let codec = EventCodec::<CounterEvent>::new();
/// let new = codec.encode(&CounterEvent::Incremented { by: 2 }, Metadata::new()).unwrap();
/// assert_eq!(&*new.event_type, "Incremented");
/// assert_eq!(new.payload.as_str(), r#"{"by":2}"#);
/// let back = codec.decode_parts("Incremented", 1, &new.payload).unwrap();
/// assert_eq!(back, CounterEvent::Incremented { by: 2 });
/// ```
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Every name [`event_type`](Self::event_type) can answer, in variant
    /// order; `#[derive(DomainEvent)]` lists them. A saga's bindings are
    /// derived from its input's list ([`App::saga`](crate::App::saga)), so
    /// a hand-written implementation that leaves it empty must bind its
    /// saga by hand.
    const EVENT_TYPES: &'static [&'static str] = &[];

    /// The stable name of this event's type: its serde variant name.
    fn event_type(&self) -> &'static str;

    /// The version of this event's payload schema. Bump it when the payload's
    /// shape changes, and register an [`Upcaster`] from the old version.
    fn schema_version(&self) -> u32 {
        1
    }

    /// The schema version this code writes for the type named `event_type`
    /// (what [`schema_version`](Self::schema_version) answers for its
    /// events), `None` when it does not say; `#[derive(DomainEvent)]` says.
    /// A stored event of a later version was written by newer code: the
    /// codec refuses it as [`CodecError::UnknownSchemaVersion`] rather than
    /// read it as the older shape, and readers set it aside.
    fn known_version(event_type: &str) -> Option<u32>
    where
        Self: Sized,
    {
        let _ = event_type;
        None
    }

    /// The [`Tag`](crate::Tag)s that place this event in consistency
    /// boundaries (see [`crate::dcb`]); none by default. The codec stores
    /// them with the event.
    fn tags(&self) -> Result<Vec<crate::Tag>, crate::InvalidTag> {
        Ok(Vec::new())
    }
}

/// An event could not be encoded, upcast, or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Serializing the event failed.
    #[error("cannot encode event {event_type}: {source}")]
    Encode {
        /// The event's type name.
        event_type: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The event did not serialize as an externally tagged enum variant named
    /// like its `event_type()`.
    #[error("event type {event_type} serialized as {found}: events must be externally tagged enum variants named like their event_type()")]
    TagMismatch {
        /// What `event_type()` returned.
        event_type: String,
        /// What serde produced instead.
        found: String,
    },
    /// The stored payload did not match the current schema of its type.
    #[error("cannot decode event {event_type} (schema version {schema_version}): {source}")]
    Decode {
        /// The stored type name (after upcasting).
        event_type: String,
        /// The stored schema version (after upcasting).
        schema_version: u32,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The event named an invalid tag.
    #[error(transparent)]
    InvalidTag(#[from] crate::InvalidTag),
    /// An upcaster refused a payload.
    #[error("upcasting {event_type} from schema version {from_version} failed: {reason}")]
    Upcast {
        /// The type name the upcaster was registered for.
        event_type: String,
        /// The version it upcasts from.
        from_version: u32,
        /// What the upcaster said.
        reason: String,
    },
    /// The stored event read as `count` events (an upcaster split or
    /// dropped it) where the reader takes exactly one, or at most one for a
    /// message.
    #[error("event {event_type} (schema version {schema_version}) reads as {count} events, where one is expected")]
    NotOne {
        /// The stored type name.
        event_type: String,
        /// The stored schema version.
        schema_version: u32,
        /// How many events it reads as.
        count: usize,
    },
    /// The stored event is of a later schema version than this code knows
    /// (written by a newer release, during a rolling upgrade): it cannot be
    /// read as the older shape.
    #[error("event {event_type} has schema version {version}, newer than {known}, the latest this code reads")]
    UnknownSchemaVersion {
        /// The stored type name (after upcasting).
        event_type: String,
        /// Its stored version (after upcasting).
        version: u32,
        /// The version this code writes and reads.
        known: u32,
    },
}
