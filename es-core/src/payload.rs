//! A JSON document the store keeps without looking inside.

use std::fmt;
use std::sync::Arc;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// A JSON document: an event's payload or an aggregate snapshot.
///
/// The store checks that a payload is JSON and otherwise treats it as opaque
/// bytes, so a codec can later swap marked fields for ciphertext without the store
/// knowing. Cloning is cheap (the text is shared).
///
/// ```
/// use es_core::Payload;
/// let p = Payload::from_json(r#"{"sku":"A-1","qty":2}"#).unwrap();
/// assert!(Payload::from_json("{not json").is_err());
/// assert!(p.json_eq(&Payload::from_json(r#"{ "qty": 2, "sku": "A-1" }"#).unwrap()));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Payload(Arc<str>);

/// A payload was not valid JSON, or a value could not be turned into JSON.
#[derive(Debug, thiserror::Error)]
#[error("payload is not valid JSON: {source}")]
pub struct InvalidPayload {
    /// What the JSON parser or serializer said.
    #[source]
    pub source: serde_json::Error,
}

impl Payload {
    /// Checks that `json` is one JSON value and wraps it as it is.
    pub fn from_json(json: impl Into<Arc<str>>) -> Result<Self, InvalidPayload> {
        let json = json.into();
        serde_json::from_str::<serde::de::IgnoredAny>(&json)
            .map_err(|source| InvalidPayload { source })?;
        Ok(Self(json))
    }

    /// Serializes a value to a payload.
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<Self, InvalidPayload> {
        serde_json::to_string(value)
            .map(|s| Self(Arc::from(s)))
            .map_err(|source| InvalidPayload { source })
    }

    /// Wraps text already known to be JSON (it came out of a JSON serializer or a
    /// database column of JSON type). Used by backends; everyone else should use
    /// [`Payload::from_json`].
    pub fn from_trusted_json(json: impl Into<Arc<str>>) -> Self {
        Self(json.into())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Deserializes the payload.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// The payload as a `serde_json::Value`.
    pub fn to_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// Whether two payloads hold the same JSON value, whatever their formatting or
    /// key order.
    pub fn json_eq(&self, other: &Self) -> bool {
        if self.0 == other.0 {
            return true;
        }
        match (self.to_value(), other.to_value()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }

    /// The length of the JSON text in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the JSON text is empty (never true for a checked payload).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw: &serde_json::value::RawValue =
            serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
        Ok(Self(Arc::from(raw.get())))
    }
}
