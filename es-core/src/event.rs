//! Domain events, and the codec that turns them into payloads and back through
//! one registry of upcasters.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, Visitor};
use serde::{de::DeserializeOwned, Serialize};

use crate::{Metadata, NewEvent, Payload, RecordedEvent};

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
    /// The stable name of this event's type: its serde variant name.
    fn event_type(&self) -> &'static str;

    /// The version of this event's payload schema. Bump it when the payload's
    /// shape changes, and register an [`Upcaster`] from the old version.
    fn schema_version(&self) -> u32 {
        1
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
}

type Transform = dyn Fn(serde_json::Value) -> Result<serde_json::Value, String> + Send + Sync;

/// Turns the payload of one stored event type and schema version into the next
/// version (and optionally a new type name), so old history is read as current
/// events without ever being rewritten.
#[derive(Clone)]
pub struct Upcaster {
    event_type: String,
    from_version: u32,
    renamed_to: Option<String>,
    transform: Arc<Transform>,
}

impl fmt::Debug for Upcaster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upcaster")
            .field("event_type", &self.event_type)
            .field("from_version", &self.from_version)
            .field("renamed_to", &self.renamed_to)
            .finish_non_exhaustive()
    }
}

impl Upcaster {
    /// An upcaster from `event_type` at `from_version` to `from_version + 1`.
    pub fn new(
        event_type: impl Into<String>,
        from_version: u32,
        transform: impl Fn(serde_json::Value) -> Result<serde_json::Value, String>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        Self {
            event_type: event_type.into(),
            from_version,
            renamed_to: None,
            transform: Arc::new(transform),
        }
    }

    /// Also renames the type: the upcast payload is read as `new_type` at
    /// `from_version + 1`.
    #[must_use]
    pub fn renamed_to(mut self, new_type: impl Into<String>) -> Self {
        self.renamed_to = Some(new_type.into());
        self
    }
}

/// The registry of upcasters every read path decodes through.
#[derive(Clone, Debug, Default)]
pub struct Upcasters {
    by_type: HashMap<(String, u32), Upcaster>,
}

impl Upcasters {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an upcaster; a later one for the same type and version replaces
    /// the earlier.
    pub fn register(&mut self, upcaster: Upcaster) {
        self.by_type.insert(
            (upcaster.event_type.clone(), upcaster.from_version),
            upcaster,
        );
    }

    /// Whether no upcaster is registered.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// Runs every upcaster that applies, in order of version, and returns the
    /// current type name, version and payload (`None` when none applied).
    pub fn upcast(
        &self,
        event_type: &str,
        schema_version: u32,
        payload: &Payload,
    ) -> Result<Option<(String, u32, Payload)>, CodecError> {
        let mut current: Option<(String, u32, serde_json::Value)> = None;
        loop {
            let (ty, version) = match &current {
                Some((ty, version, _)) => (ty.as_str(), *version),
                None => (event_type, schema_version),
            };
            let Some(upcaster) = self.by_type.get(&(ty.to_owned(), version)) else {
                break;
            };
            let value = match current.take() {
                Some((_, _, value)) => value,
                None => payload.to_value().map_err(|e| CodecError::Upcast {
                    event_type: event_type.to_owned(),
                    from_version: schema_version,
                    reason: e.to_string(),
                })?,
            };
            let next = (upcaster.transform)(value).map_err(|reason| CodecError::Upcast {
                event_type: upcaster.event_type.clone(),
                from_version: upcaster.from_version,
                reason,
            })?;
            let next_type = upcaster
                .renamed_to
                .clone()
                .unwrap_or_else(|| upcaster.event_type.clone());
            current = Some((next_type, upcaster.from_version + 1, next));
        }
        current
            .map(|(ty, version, value)| {
                Payload::from_value(&value)
                    .map(|p| (ty, version, p))
                    .map_err(|e| CodecError::Upcast {
                        event_type: event_type.to_owned(),
                        from_version: schema_version,
                        reason: e.to_string(),
                    })
            })
            .transpose()
    }
}

/// Encodes events of type `E` into [`NewEvent`]s and decodes stored events back,
/// upcasting old schema versions on the way.
///
/// Cloning is cheap; share one codec (and so one registry of upcasters) between
/// every reader of a type.
pub struct EventCodec<E> {
    upcasters: Arc<Upcasters>,
    _event: PhantomData<fn() -> E>,
}

impl<E> Clone for EventCodec<E> {
    fn clone(&self) -> Self {
        Self {
            upcasters: Arc::clone(&self.upcasters),
            _event: PhantomData,
        }
    }
}

impl<E> fmt::Debug for EventCodec<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventCodec")
            .field("event", &std::any::type_name::<E>())
            .field("upcasters", &self.upcasters)
            .finish()
    }
}

impl<E: DomainEvent> Default for EventCodec<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: DomainEvent> EventCodec<E> {
    /// A codec with no upcasters.
    pub fn new() -> Self {
        Self::with_upcasters(Upcasters::new())
    }

    /// A codec reading through this registry of upcasters.
    pub fn with_upcasters(upcasters: Upcasters) -> Self {
        Self {
            upcasters: Arc::new(upcasters),
            _event: PhantomData,
        }
    }

    /// Serializes an event into the payload of a [`NewEvent`] with a fresh id.
    pub fn encode(&self, event: &E, metadata: Metadata) -> Result<NewEvent, CodecError> {
        let event_type = event.event_type();
        let payload = encode_variant(event, event_type)?;
        Ok(NewEvent::new(
            event_type,
            event.schema_version(),
            payload,
            metadata,
        ))
    }

    /// Serializes an event into a [`NewEvent`] with the given id (a
    /// [`derived_id`](crate::derived_id), say), without making a fresh one
    /// first.
    pub fn encode_with_id(
        &self,
        event: &E,
        metadata: Metadata,
        event_id: uuid::Uuid,
    ) -> Result<NewEvent, CodecError> {
        let event_type = event.event_type();
        Ok(NewEvent {
            event_id,
            event_type: event_type.into(),
            schema_version: event.schema_version(),
            payload: encode_variant(event, event_type)?,
            metadata,
        })
    }

    /// Serializes an event's content: its type name, schema version and
    /// payload.
    pub fn encode_parts(&self, event: &E) -> Result<(&'static str, u32, Payload), CodecError> {
        let event_type = event.event_type();
        Ok((
            event_type,
            event.schema_version(),
            encode_variant(event, event_type)?,
        ))
    }

    /// Decodes a recorded event.
    pub fn decode(&self, recorded: &RecordedEvent) -> Result<E, CodecError> {
        self.decode_parts(
            &recorded.event_type,
            recorded.schema_version,
            &recorded.payload,
        )
    }

    /// Decodes a stored type name, schema version and payload.
    pub fn decode_parts(
        &self,
        event_type: &str,
        schema_version: u32,
        payload: &Payload,
    ) -> Result<E, CodecError> {
        if !self.upcasters.is_empty() {
            if let Some((ty, version, upcast)) =
                self.upcasters.upcast(event_type, schema_version, payload)?
            {
                return decode_variant(&ty, version, upcast.as_str());
            }
        }
        decode_variant(event_type, schema_version, payload.as_str())
    }
}

/// Serializes `event` and strips the enum tag, checking it equals `event_type`.
fn encode_variant<E: Serialize>(event: &E, event_type: &str) -> Result<Payload, CodecError> {
    let encode_err = |source| CodecError::Encode {
        event_type: event_type.to_owned(),
        source,
    };
    let json = serde_json::to_string(event).map_err(encode_err)?;
    // Fast path: serde_json writes an externally tagged variant as `{"Tag":…}`.
    let prefix_len = event_type.len() + 4;
    if json.len() > prefix_len
        && json.starts_with("{\"")
        && json[2..].starts_with(event_type)
        && json[2 + event_type.len()..].starts_with("\":")
        && json.ends_with('}')
    {
        return Ok(Payload::from_trusted_json(
            &json[prefix_len..json.len() - 1],
        ));
    }
    let mismatch = |found: String| CodecError::TagMismatch {
        event_type: event_type.to_owned(),
        found,
    };
    match serde_json::from_str::<serde_json::Value>(&json).map_err(encode_err)? {
        serde_json::Value::String(tag) if tag == event_type => {
            Ok(Payload::from_trusted_json("null"))
        }
        serde_json::Value::Object(mut map) if map.len() == 1 => match map.remove(event_type) {
            Some(content) => Payload::from_value(&content).map_err(|e| encode_err(e.source)),
            None => Err(mismatch(json)),
        },
        _ => Err(mismatch(json)),
    }
}

/// Deserializes the enum variant `event_type` whose content is `payload`.
fn decode_variant<E: DeserializeOwned>(
    event_type: &str,
    schema_version: u32,
    payload: &str,
) -> Result<E, CodecError> {
    E::deserialize(TaggedPayload {
        tag: event_type,
        payload,
    })
    .map_err(|source| CodecError::Decode {
        event_type: event_type.to_owned(),
        schema_version,
        source,
    })
}

/// A deserializer that presents (tag, payload) as an externally tagged enum.
struct TaggedPayload<'a> {
    tag: &'a str,
    payload: &'a str,
}

impl<'de> de::Deserializer<'de> for TaggedPayload<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

impl<'de> de::EnumAccess<'de> for TaggedPayload<'de> {
    type Error = serde_json::Error;
    type Variant = PayloadContent<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), Self::Error> {
        let value = seed.deserialize(de::value::BorrowedStrDeserializer::new(self.tag))?;
        Ok((
            value,
            PayloadContent {
                payload: self.payload,
            },
        ))
    }
}

struct PayloadContent<'a> {
    payload: &'a str,
}

impl<'de> PayloadContent<'de> {
    fn with_json<T>(
        self,
        read: impl FnOnce(
            &mut serde_json::Deserializer<serde_json::de::StrRead<'de>>,
        ) -> Result<T, serde_json::Error>,
    ) -> Result<T, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(self.payload);
        let value = read(&mut de)?;
        de.end()?;
        Ok(value)
    }
}

impl<'de> de::VariantAccess<'de> for PayloadContent<'de> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        self.with_json(|de| de::Deserialize::deserialize(de))
            .map(|de::IgnoredAny| ())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, Self::Error> {
        self.with_json(|de| seed.deserialize(de))
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.with_json(|de| de::Deserializer::deserialize_seq(de, visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.with_json(|de| de::Deserializer::deserialize_struct(de, "", fields, visitor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Ev {
        Created {
            name: String,
        },
        #[serde(rename = "renamed")]
        Tuple(u32, String),
        Newtype(u64),
        Unit,
    }

    impl DomainEvent for Ev {
        fn event_type(&self) -> &'static str {
            match self {
                Self::Created { .. } => "Created",
                Self::Tuple(..) => "renamed",
                Self::Newtype(_) => "Newtype",
                Self::Unit => "Unit",
            }
        }
        fn schema_version(&self) -> u32 {
            match self {
                Self::Created { .. } => 2,
                _ => 1,
            }
        }
    }

    #[test]
    fn every_variant_shape_round_trips() {
        let codec = EventCodec::<Ev>::new();
        for ev in [
            Ev::Created {
                name: "a\"b".into(),
            },
            Ev::Tuple(3, "x".into()),
            Ev::Newtype(9),
            Ev::Unit,
        ] {
            let new = codec.encode(&ev, Metadata::new()).unwrap();
            assert_eq!(&*new.event_type, ev.event_type());
            let back = codec
                .decode_parts(&new.event_type, new.schema_version, &new.payload)
                .unwrap();
            assert_eq!(back, ev);
        }
    }

    #[test]
    fn encoding_with_an_id_or_in_parts_gives_what_encode_gives() {
        let codec = EventCodec::<Ev>::new();
        let ev = Ev::Created { name: "n".into() };
        let fresh = codec.encode(&ev, Metadata::new()).unwrap();
        let id = uuid::Uuid::from_u128(7);
        let with_id = codec.encode_with_id(&ev, Metadata::new(), id).unwrap();
        assert_eq!(with_id.event_id, id);
        assert_eq!(
            (
                &with_id.event_type,
                with_id.schema_version,
                &with_id.payload
            ),
            (&fresh.event_type, fresh.schema_version, &fresh.payload)
        );
        let (event_type, schema_version, payload) = codec.encode_parts(&ev).unwrap();
        assert_eq!(
            (event_type, schema_version, &payload),
            ("Created", 2, &fresh.payload)
        );
    }

    #[test]
    fn payload_holds_the_content_only() {
        let codec = EventCodec::<Ev>::new();
        let new = codec.encode(&Ev::Newtype(9), Metadata::new()).unwrap();
        assert_eq!(new.payload.as_str(), "9");
        let unit = codec.encode(&Ev::Unit, Metadata::new()).unwrap();
        assert_eq!(unit.payload.as_str(), "null");
    }

    #[test]
    fn wrong_tag_is_a_typed_error() {
        #[derive(Serialize, Deserialize)]
        enum Liar {
            A,
        }
        impl DomainEvent for Liar {
            fn event_type(&self) -> &'static str {
                "B"
            }
        }
        let err = EventCodec::<Liar>::new()
            .encode(&Liar::A, Metadata::new())
            .unwrap_err();
        assert!(matches!(err, CodecError::TagMismatch { .. }), "{err}");
    }

    #[test]
    fn unknown_type_and_bad_payload_are_decode_errors() {
        let codec = EventCodec::<Ev>::new();
        let p = Payload::from_json("{}").unwrap();
        assert!(matches!(
            codec.decode_parts("Nope", 1, &p),
            Err(CodecError::Decode { .. })
        ));
        assert!(matches!(
            codec.decode_parts("Created", 2, &p),
            Err(CodecError::Decode { .. })
        ));
        let trailing = Payload::from_trusted_json("9 9");
        assert!(codec.decode_parts("Newtype", 1, &trailing).is_err());
    }

    #[test]
    fn upcasters_chain_and_rename() {
        let mut up = Upcasters::new();
        // v0 "Made" {"title"} -> v1 "Created" {"title"} -> v2 "Created" {"name"}
        up.register(Upcaster::new("Made", 0, Ok).renamed_to("Created"));
        up.register(Upcaster::new("Created", 1, |mut v| {
            let title = v
                .as_object_mut()
                .and_then(|o| o.remove("title"))
                .ok_or("no title")?;
            Ok(serde_json::json!({ "name": title }))
        }));
        let codec = EventCodec::<Ev>::with_upcasters(up);
        let old = Payload::from_json(r#"{"title":"t"}"#).unwrap();
        assert_eq!(
            codec.decode_parts("Made", 0, &old).unwrap(),
            Ev::Created { name: "t".into() }
        );
        let current = Payload::from_json(r#"{"name":"n"}"#).unwrap();
        assert_eq!(
            codec.decode_parts("Created", 2, &current).unwrap(),
            Ev::Created { name: "n".into() }
        );
        let broken = Payload::from_json(r#"{"other":1}"#).unwrap();
        assert!(matches!(
            codec.decode_parts("Created", 1, &broken),
            Err(CodecError::Upcast { .. })
        ));
    }
}
