//! The event codec: domain events to payloads and back, through the
//! upcasters.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, Visitor};
use serde::{de::DeserializeOwned, Serialize};

use super::{CodecError, DomainEvent, Upcasters};
use crate::{Metadata, NewEvent, Payload, RecordedEvent};

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

    /// A codec reading through this registry of upcasters (a
    /// [`Schema`](super::Schema) also checks them against the event types
    /// and shares them between codecs).
    pub fn with_upcasters(upcasters: Upcasters) -> Self {
        Self::sharing(Arc::new(upcasters))
    }

    pub(super) fn sharing(upcasters: Arc<Upcasters>) -> Self {
        Self {
            upcasters,
            _event: PhantomData,
        }
    }

    /// Serializes an event into the payload of a [`NewEvent`] with a fresh id.
    pub fn encode(&self, event: &E, metadata: Metadata) -> Result<NewEvent, CodecError> {
        let event_type = event.event_type();
        let payload = encode_variant(event, event_type)?;
        Ok(
            NewEvent::new(event_type, event.schema_version(), payload, metadata)
                .with_tags(event.tags()?),
        )
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
            tags: event.tags()?.into_iter().collect(),
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

    /// Decodes a recorded event that reads as exactly one event (see
    /// [`decode_parts`](Self::decode_parts)).
    pub fn decode(&self, recorded: &RecordedEvent) -> Result<E, CodecError> {
        self.decode_parts(
            &recorded.event_type,
            recorded.schema_version,
            &recorded.payload,
        )
    }

    /// Decodes a recorded event as the events it reads as today: one, or
    /// any number when an upcaster splits or drops it (see
    /// [`decode_parts_all`](Self::decode_parts_all)).
    pub fn decode_all(&self, recorded: &RecordedEvent) -> Result<Decoded<E>, CodecError> {
        self.decode_parts_all(
            &recorded.event_type,
            recorded.schema_version,
            &recorded.payload,
        )
    }

    /// Decodes a stored type name, schema version and payload that reads as
    /// exactly one event; one that an upcaster split or dropped is
    /// [`CodecError::NotOne`].
    pub fn decode_parts(
        &self,
        event_type: &str,
        schema_version: u32,
        payload: &Payload,
    ) -> Result<E, CodecError> {
        self.decode_one(event_type, schema_version, payload)?
            .ok_or_else(|| CodecError::NotOne {
                event_type: event_type.to_owned(),
                schema_version,
                count: 0,
            })
    }

    /// Decodes a stored message that reads as at most one event: `None`
    /// when an upcaster dropped it, [`CodecError::NotOne`] when one split
    /// it (a message is handled, and acknowledged, as one).
    pub fn decode_one(
        &self,
        event_type: &str,
        schema_version: u32,
        payload: &Payload,
    ) -> Result<Option<E>, CodecError> {
        let mut decoded = self.decode_parts_all(event_type, schema_version, payload)?;
        match decoded.len() {
            0 | 1 => Ok(decoded.next()),
            count => Err(CodecError::NotOne {
                event_type: event_type.to_owned(),
                schema_version,
                count,
            }),
        }
    }

    /// Decodes a stored message for a consumer of some of `E`'s types: the
    /// events it reads as, in order, leaving out the parts an upcaster
    /// split it into whose types `E` does not declare (its
    /// [`DomainEvent::EVENT_TYPES`]; none is left out when it declares
    /// none). A message no upcaster reads is decoded as one event, as
    /// [`EventCodec::decode_parts_all`] does.
    pub fn decode_declared(
        &self,
        event_type: &str,
        schema_version: u32,
        payload: &Payload,
    ) -> Result<Decoded<E>, CodecError> {
        self.decode_parts_where(event_type, schema_version, payload, |t| {
            E::EVENT_TYPES.is_empty() || E::EVENT_TYPES.contains(&t)
        })
    }

    /// Decodes a stored type name, schema version and payload through the
    /// upcasters: the events it reads as, in order (none when an upcaster
    /// dropped it). Without upcasters for it, exactly one.
    pub fn decode_parts_all(
        &self,
        event_type: &str,
        schema_version: u32,
        payload: &Payload,
    ) -> Result<Decoded<E>, CodecError> {
        self.decode_parts_where(event_type, schema_version, payload, |_| true)
    }

    /// Decodes through the upcasters, keeping the upcast parts whose type
    /// `keep` accepts; an event no upcaster reads is decoded as it is.
    fn decode_parts_where(
        &self,
        event_type: &str,
        schema_version: u32,
        payload: &Payload,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Decoded<E>, CodecError> {
        if !self.upcasters.is_empty() {
            if let Some(upcast) = self.upcasters.upcast(event_type, schema_version, payload)? {
                let events = upcast
                    .into_iter()
                    .filter(|up| keep(&up.event_type))
                    .map(|up| {
                        check_known::<E>(&up.event_type, up.schema_version)?;
                        let payload =
                            Payload::from_value(&up.payload).map_err(|e| CodecError::Upcast {
                                event_type: event_type.to_owned(),
                                from_version: schema_version,
                                reason: e.to_string(),
                            })?;
                        decode_variant(&up.event_type, up.schema_version, payload.as_str())
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(Decoded(Inner::Many(events.into_iter())));
            }
        }
        check_known::<E>(event_type, schema_version)?;
        decode_variant(event_type, schema_version, payload.as_str())
            .map(|event| Decoded(Inner::One(Some(event))))
    }
}

/// The events one stored event reads as: an iterator, without allocating
/// when it is one.
#[derive(Debug)]
pub struct Decoded<E>(Inner<E>);

#[derive(Debug)]
enum Inner<E> {
    One(Option<E>),
    Many(std::vec::IntoIter<E>),
}

impl<E> Iterator for Decoded<E> {
    type Item = E;

    fn next(&mut self) -> Option<E> {
        match &mut self.0 {
            Inner::One(event) => event.take(),
            Inner::Many(events) => events.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match &self.0 {
            Inner::One(event) => usize::from(event.is_some()),
            Inner::Many(events) => events.len(),
        };
        (n, Some(n))
    }
}

impl<E> ExactSizeIterator for Decoded<E> {}

/// Refuses a version later than the one `E` writes for `event_type`.
/// Versions start at 1, so a version-1 event (most of them) is never later
/// and is not looked up.
fn check_known<E: DomainEvent>(event_type: &str, version: u32) -> Result<(), CodecError> {
    if version <= 1 {
        return Ok(());
    }
    match E::known_version(event_type) {
        Some(known) if version > known => Err(CodecError::UnknownSchemaVersion {
            event_type: event_type.to_owned(),
            version,
            known,
        }),
        _ => Ok(()),
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
    use crate::event::{Upcast, Upcaster};
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

    /// A consumer of `Newtype` only.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum OnlyNewtype {
        Newtype(u64),
    }

    impl DomainEvent for OnlyNewtype {
        const EVENT_TYPES: &'static [&'static str] = &["Newtype"];
        fn event_type(&self) -> &'static str {
            "Newtype"
        }
    }

    /// An event split into a declared type twice and an undeclared one reads
    /// as the two declared parts, in order; whole, it is not one of the
    /// consumer's events.
    #[test]
    fn decoding_for_a_consumer_leaves_out_the_parts_it_does_not_declare() {
        let split = Upcaster::split(
            "Pair",
            1,
            [("Newtype", 1), ("Unit", 1)],
            |v: serde_json::Value| {
                Ok(vec![
                    Upcast::new("Newtype", 1, v["a"].clone()),
                    Upcast::new("Unit", 1, serde_json::Value::Null),
                    Upcast::new("Newtype", 1, v["b"].clone()),
                ])
            },
        );
        let codec =
            EventCodec::<OnlyNewtype>::with_upcasters(Upcasters::new().with(split).unwrap());
        let payload = Payload::from_json(r#"{"a": 1, "b": 2}"#).unwrap();
        assert_eq!(
            codec
                .decode_declared("Pair", 1, &payload)
                .unwrap()
                .collect::<Vec<_>>(),
            [OnlyNewtype::Newtype(1), OnlyNewtype::Newtype(2)]
        );
        assert!(codec.decode_parts_all("Pair", 1, &payload).is_err());
        let plain = Payload::from_json("5").unwrap();
        assert_eq!(
            codec
                .decode_declared("Newtype", 1, &plain)
                .unwrap()
                .collect::<Vec<_>>(),
            [OnlyNewtype::Newtype(5)]
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
        up.register(Upcaster::new("Made", 0, Ok).renamed_to("Created"))
            .unwrap();
        up.register(Upcaster::new("Created", 1, |mut v| {
            let title = v
                .as_object_mut()
                .and_then(|o| o.remove("title"))
                .ok_or("no title")?;
            Ok(serde_json::json!({ "name": title }))
        }))
        .unwrap();
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
