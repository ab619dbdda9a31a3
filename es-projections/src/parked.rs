//! Events a projection could not apply, set aside so the runner could go on.

use chrono::{DateTime, Utc};
use es_core::{Position, ProjectionError, RecordedEvent, StreamId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An event the projection failed on, recorded instead of applied under
/// [`OnError::DeadLetter`](crate::OnError::DeadLetter): the projection's dead
/// letters.
///
/// Unlike a bus's [`es_core::DeadLetter`], a message a consumer group gave up
/// on, a parked event stays in the log: this records which one it is and why
/// the projection failed on it, so it can be read again from its position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedEvent {
    /// The projection's name.
    pub projection: String,
    /// The event's id.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// The event's stream.
    pub stream_id: StreamId,
    /// The event's global position.
    pub position: Position,
    /// What the projection said.
    pub error: String,
    /// When the runner set the event aside.
    pub failed_at: DateTime<Utc>,
}

impl ParkedEvent {
    pub(crate) fn new(projection: &str, event: &RecordedEvent, error: &ProjectionError) -> Self {
        Self {
            projection: projection.to_owned(),
            event_id: event.event_id,
            event_type: event.event_type.to_string(),
            stream_id: event.stream_id.clone(),
            position: event.position,
            error: error.to_string(),
            failed_at: Utc::now(),
        }
    }
}
