//! What travels with every event and message besides its payload.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
    /// The W3C `traceparent` of the span that produced this. Shared, not
    /// copied, when metadata is cloned: every event of an order carries it and
    /// every reader of the log clones events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<Arc<str>>,
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

    /// Sets the W3C traceparent.
    #[must_use]
    pub fn with_traceparent(mut self, traceparent: impl Into<Arc<str>>) -> Self {
        self.traceparent = Some(traceparent.into());
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
            traceparent: self.traceparent.clone(),
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
