//! What travels with every event and message besides its payload.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::TraceParent;

/// Correlation and causation ids, the W3C trace context, and free-form headers.
///
/// The correlation id names the whole conversation (in the orders system, the
/// order id); the causation id names the message or command that directly caused
/// this one. [`Metadata::caused_by`] derives the metadata of an event or command
/// caused by a message, so a chain of hops keeps one correlation id and each hop
/// names its cause.
///
/// ```
/// use es_core::Metadata;
/// use uuid::Uuid;
/// let order = Uuid::now_v7();
/// let command = Metadata::new().with_correlation_id(order);
/// let caused = command.caused_by(Uuid::now_v7());
/// assert_eq!(caused.correlation_id, Some(order));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The conversation this belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The message or command that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// The W3C trace context of the span that produced this (stored and sent
    /// in its standard text form; a stored value that does not parse reads
    /// back as none).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::trace::lenient"
    )]
    pub traceparent: Option<TraceParent>,
    /// Free-form string headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl Metadata {
    /// Empty metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id.
    #[must_use]
    pub fn with_causation_id(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Sets the W3C trace context.
    #[must_use]
    pub fn with_traceparent(mut self, traceparent: TraceParent) -> Self {
        self.traceparent = Some(traceparent);
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// The metadata of something caused by the message `cause_id` that carried
    /// this metadata: same correlation id (or `cause_id` when there was none),
    /// causation id `cause_id`, same trace context and headers.
    #[must_use]
    pub fn caused_by(&self, cause_id: Uuid) -> Self {
        Self {
            correlation_id: Some(self.correlation_id.unwrap_or(cause_id)),
            causation_id: Some(cause_id),
            traceparent: self.traceparent,
            headers: self.headers.clone(),
        }
    }

    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.correlation_id.is_none()
            && self.causation_id.is_none()
            && self.traceparent.is_none()
            && self.headers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_context_is_stored_as_its_text_and_a_bad_one_reads_back_as_none() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let metadata = Metadata::new().with_traceparent(tp.parse().unwrap());
        let json = serde_json::to_string(&metadata).unwrap();
        assert_eq!(json, format!(r#"{{"traceparent":"{tp}"}}"#));
        assert_eq!(serde_json::from_str::<Metadata>(&json).unwrap(), metadata);

        // A stored value that does not parse loses the trace, not the event.
        let bad: Metadata = serde_json::from_str(
            r#"{"correlation_id":"0190a0b1-0000-7000-8000-000000000001","traceparent":"garbage"}"#,
        )
        .unwrap();
        assert_eq!(bad.traceparent, None);
        assert!(bad.correlation_id.is_some());
        let null: Metadata = serde_json::from_str(r#"{"traceparent":null}"#).unwrap();
        assert_eq!(null.traceparent, None);
    }
}
