//! A [`Message`] in AMQP terms: the payload is the body; the envelope travels
//! in the properties and headers.
//!
//! | `Message` | AMQP |
//! |---|---|
//! | `message_id` | property `message-id` |
//! | `metadata.correlation_id` | property `correlation-id` |
//! | `message_type` | property `type` |
//! | `topic` | header `x-es-topic` |
//! | `schema_version` | header `x-es-schema-version` |
//! | `metadata.causation_id` | header `x-es-causation-id` |
//! | `metadata.traceparent` | header `traceparent` (the publish span's context) |
//! | `metadata.headers` | header `x-es-headers` (a table of strings) |
//! | `source` | header `x-es-source-stream` |
//! | `payload` | the body, `application/json` |

use std::collections::BTreeMap;
use std::sync::Arc;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use uuid::Uuid;

use es_core::{Message, Metadata, Payload, StreamId, TraceParent};

use crate::topology::{string, ATTEMPT_HEADER};

/// Header: the message's topic (bounded context).
pub const TOPIC_HEADER: &str = "x-es-topic";
/// Header: the payload's schema version.
pub const SCHEMA_VERSION_HEADER: &str = "x-es-schema-version";
/// Header: the causation id.
pub const CAUSATION_HEADER: &str = "x-es-causation-id";
/// Header: the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Header: the metadata's free-form headers.
pub const HEADERS_HEADER: &str = "x-es-headers";
/// Header: the stream whose event the message copies.
pub const SOURCE_HEADER: &str = "x-es-source-stream";
/// Header set by quorum queues: how many times the message was returned.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Why a delivery could not be turned back into a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A required property or header is absent.
    #[error("missing {0}")]
    Missing(&'static str),
    /// A property or header has an unusable value.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The property or header.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The AMQP properties of `message`, carrying `traceparent` as its trace
/// context. Fails only for a field longer than AMQP's 255-byte limit.
pub fn properties(message: &Message, traceparent: &str) -> Result<BasicProperties, DecodeError> {
    let mut headers = FieldTable::default();
    headers.insert(TOPIC_HEADER.into(), string(&message.topic));
    headers.insert(
        SCHEMA_VERSION_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(message.schema_version)),
    );
    if let Some(causation) = message.metadata.causation_id {
        headers.insert(CAUSATION_HEADER.into(), string(&causation.to_string()));
    }
    headers.insert(TRACEPARENT_HEADER.into(), string(traceparent));
    if let Some(source) = &message.source {
        headers.insert(SOURCE_HEADER.into(), string(source.as_str()));
    }
    if !message.metadata.headers.is_empty() {
        let mut table = FieldTable::default();
        for (key, value) in &message.metadata.headers {
            table.insert(short("metadata header", key)?, string(value));
        }
        headers.insert(HEADERS_HEADER.into(), AMQPValue::FieldTable(table));
    }
    let mut props = BasicProperties::default()
        .with_message_id(message.message_id.to_string().into())
        .with_type(short("type", &message.message_type)?)
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(now_secs())
        .with_headers(headers);
    if let Some(correlation) = message.metadata.correlation_id {
        props = props.with_correlation_id(correlation.to_string().into());
    }
    Ok(props)
}

/// The message in a delivery's properties and body, and the attempt this
/// delivery is: the `x-es-attempt` header (1 when absent) plus the broker's
/// `x-delivery-count` (returns after a consumer failed to settle it).
pub fn decode(properties: &BasicProperties, body: &[u8]) -> (Result<Message, DecodeError>, u32) {
    let empty = FieldTable::default();
    let headers = properties.headers().as_ref().unwrap_or(&empty);
    let attempt = attempt(headers);
    (decode_message(properties, headers, body), attempt)
}

/// The attempt a delivery with these headers is (see [`decode`]).
pub(crate) fn attempt(headers: &FieldTable) -> u32 {
    let first = header_int(headers, ATTEMPT_HEADER).unwrap_or(1).max(1);
    let returns = header_int(headers, DELIVERY_COUNT_HEADER)
        .unwrap_or(0)
        .max(0);
    u32::try_from(first.saturating_add(returns)).unwrap_or(u32::MAX)
}

fn decode_message(
    properties: &BasicProperties,
    headers: &FieldTable,
    body: &[u8],
) -> Result<Message, DecodeError> {
    let message_id = properties
        .message_id()
        .as_ref()
        .ok_or(DecodeError::Missing("message-id"))?;
    let message_id = parse_uuid("message-id", message_id.as_str())?;
    let message_type = properties
        .kind()
        .as_ref()
        .ok_or(DecodeError::Missing("type"))?;
    if message_type.as_str().is_empty() {
        return Err(DecodeError::Missing("type"));
    }
    let topic = header_str(headers, TOPIC_HEADER).ok_or(DecodeError::Missing(TOPIC_HEADER))?;
    let schema_version = match header_int(headers, SCHEMA_VERSION_HEADER) {
        None => 1,
        Some(v) => u32::try_from(v).map_err(|_| DecodeError::Invalid {
            field: SCHEMA_VERSION_HEADER,
            reason: format!("{v} is not a version"),
        })?,
    };
    let correlation_id = properties
        .correlation_id()
        .as_ref()
        .map(|c| parse_uuid("correlation-id", c.as_str()))
        .transpose()?;
    let causation_id = header_str(headers, CAUSATION_HEADER)
        .map(|c| parse_uuid(CAUSATION_HEADER, &c))
        .transpose()?;
    let traceparent = header_str(headers, TRACEPARENT_HEADER);
    let source = header_str(headers, SOURCE_HEADER)
        .map(|s| {
            StreamId::new(s).map_err(|e| DecodeError::Invalid {
                field: SOURCE_HEADER,
                reason: e.to_string(),
            })
        })
        .transpose()?;
    let mut extra = BTreeMap::new();
    if let Some(AMQPValue::FieldTable(table)) = headers.inner().get(HEADERS_HEADER) {
        for (key, value) in table {
            if let Some(value) = value_str(value) {
                extra.insert(key.to_string(), value);
            }
        }
    }
    let text = std::str::from_utf8(body).map_err(|e| DecodeError::Invalid {
        field: "body",
        reason: e.to_string(),
    })?;
    let payload = Payload::from_json(text).map_err(|e| DecodeError::Invalid {
        field: "body",
        reason: e.to_string(),
    })?;
    Ok(Message {
        message_id,
        topic: Arc::from(topic),
        message_type: Arc::from(message_type.as_str()),
        schema_version,
        payload,
        metadata: Metadata {
            correlation_id,
            causation_id,
            traceparent: traceparent.as_deref().and_then(TraceParent::parse),
            headers: extra,
        },
        source,
    })
}

fn short(field: &'static str, value: &str) -> Result<ShortString, DecodeError> {
    ShortString::try_new(value).map_err(|e| DecodeError::Invalid {
        field,
        reason: e.to_string(),
    })
}

fn parse_uuid(field: &'static str, value: &str) -> Result<Uuid, DecodeError> {
    Uuid::parse_str(value).map_err(|e| DecodeError::Invalid {
        field,
        reason: e.to_string(),
    })
}

pub(crate) fn header_str(headers: &FieldTable, key: &str) -> Option<String> {
    headers.inner().get(key).and_then(value_str)
}

fn value_str(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

pub(crate) fn header_int(headers: &FieldTable, key: &str) -> Option<i64> {
    match headers.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use es_core::{Message, Metadata, Payload, StreamId, TraceParent};
    use lapin::types::AMQPValue;
    use uuid::Uuid;

    use super::{decode, properties, DecodeError, SOURCE_HEADER};

    fn message() -> Message {
        Message {
            message_id: Uuid::now_v7(),
            topic: "order".into(),
            message_type: "OrderPlaced".into(),
            schema_version: 3,
            payload: Payload::from_json(r#"{"qty":2}"#).unwrap(),
            metadata: Metadata::new()
                .with_correlation_id(Uuid::now_v7())
                .with_causation_id(Uuid::now_v7())
                .with_header("tenant", "acme"),
            source: Some(StreamId::new("order-42").unwrap()),
        }
    }

    #[test]
    fn round_trip() {
        let m = message();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let props = properties(&m, tp).unwrap();
        assert_eq!(*props.delivery_mode(), Some(2));
        let (back, attempt) = decode(&props, m.payload.as_str().as_bytes());
        let back = back.unwrap();
        assert_eq!(attempt, 1);
        assert_eq!(
            back.metadata.traceparent.map(|t| t.to_string()).as_deref(),
            Some(tp)
        );
        let mut expected = m;
        expected.metadata.traceparent = TraceParent::parse(tp);
        assert_eq!(back, expected);
    }

    #[test]
    fn attempts_add_broker_returns() {
        let m = message();
        let mut props = properties(&m, "x").unwrap();
        let mut headers = props.headers().clone().unwrap();
        headers.insert("x-es-attempt".into(), AMQPValue::LongLongInt(3));
        headers.insert("x-delivery-count".into(), AMQPValue::LongInt(2));
        props = props.with_headers(headers);
        assert_eq!(decode(&props, b"{}").1, 5);
    }

    #[test]
    fn undecodable() {
        let m = message();
        let props = properties(&m, "x").unwrap();
        assert!(matches!(
            decode(&props, b"{not json").0,
            Err(DecodeError::Invalid { field: "body", .. })
        ));
        let bare = lapin::BasicProperties::default();
        assert_eq!(
            decode(&bare, b"{}").0,
            Err(DecodeError::Missing("message-id"))
        ); // A source that is no stream id is refused, not passed on.
        let mut headers = props.headers().clone().unwrap();
        headers.insert(SOURCE_HEADER.into(), AMQPValue::LongString("".into()));
        assert!(matches!(
            decode(&props.with_headers(headers), b"{}").0,
            Err(DecodeError::Invalid {
                field: SOURCE_HEADER,
                ..
            })
        ));
    }
}
