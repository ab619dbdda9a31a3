//! Projections: read models built from the event log.

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::{BoxError, DomainEvent, EventCodec, Position, RecordedEvent};

/// Why a projection could not apply an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The event could not be decoded or did not make sense to the projection.
    #[error("projection {projection} cannot apply event {event_id} at {position}: {reason}")]
    InvalidEvent {
        /// The projection's name.
        projection: String,
        /// The event.
        event_id: uuid::Uuid,
        /// Its position.
        position: Position,
        /// What went wrong.
        reason: String,
    },
    /// The read model's storage failed.
    #[error("projection {projection} storage failed: {source}")]
    Storage {
        /// The projection's name.
        projection: String,
        /// The storage's error.
        #[source]
        source: BoxError,
    },
}

impl ProjectionError {
    /// [`InvalidEvent`](Self::InvalidEvent): the projection named
    /// `projection` cannot apply `event`, for `reason`.
    pub fn invalid(
        projection: &str,
        event: &RecordedEvent,
        reason: impl std::fmt::Display,
    ) -> Self {
        Self::InvalidEvent {
            projection: projection.to_owned(),
            event_id: event.event_id,
            position: event.position,
            reason: reason.to_string(),
        }
    }

    /// [`Storage`](Self::Storage): the read model of the projection named
    /// `projection` failed with `source`.
    pub fn storage(projection: &str, source: impl Into<BoxError>) -> Self {
        Self::Storage {
            projection: projection.to_owned(),
            source: source.into(),
        }
    }
}

/// Decodes `event` as an `E` for the projection named `projection` (with no
/// upcasters: decode through an [`EventCodec`] that has them otherwise); an
/// event that does not decode is [`ProjectionError::InvalidEvent`].
///
/// ```
/// # use es_core::doc_support::counter::{CounterEvent, CounterMessage};
/// use es_core::projection::decode;
/// use es_core::{ProjectionError, StreamId};
///
/// let stream = StreamId::for_aggregate("counter", "c1").unwrap();
/// let events = es_core::testing::recorded(&stream, 1, [CounterEvent::Incremented { by: 2 }]);
/// let decoded: CounterEvent = decode("totals", &events[0]).unwrap();
/// assert_eq!(decoded, CounterEvent::Incremented { by: 2 });
/// // Read as another type, the event is invalid for the projection.
/// let wrong = decode::<CounterMessage>("totals", &events[0]);
/// assert!(matches!(wrong, Err(ProjectionError::InvalidEvent { .. })));
/// ```
pub fn decode<E: DomainEvent>(
    projection: &str,
    event: &RecordedEvent,
) -> Result<E, ProjectionError> {
    EventCodec::<E>::new()
        .decode(event)
        .map_err(|e| ProjectionError::invalid(projection, event, e))
}

/// A projection: handles recorded events into a read model.
///
/// The runner hands each event to `apply` together with its unit of work
/// (`Tx`): a PostgreSQL transaction in `es-projections`, or a plain in-memory
/// handle. The runner commits the unit of work together with the checkpoint,
/// so a read model never holds an event its checkpoint does not, and the
/// reverse.
///
/// Like the saga handlers, this runner-generic trait returns `impl Future +
/// Send` rather than boxing: it is used through generics, never as `dyn`.
pub trait Projection: Send + Sync + 'static {
    /// The unit of work the runner passes to `apply`.
    type Tx: Send;

    /// The projection's name; its checkpoint is kept under this name.
    fn name(&self) -> &str;

    /// Whether the projection wants events of this type. The runner skips the
    /// others without calling `apply` (their positions still advance the
    /// checkpoint).
    fn accepts(&self, event_type: &str) -> bool {
        let _ = event_type;
        true
    }

    /// Applies one event to the read model inside `tx`. Must be deterministic:
    /// a rebuild from position 0 must give the model an incremental run gives.
    fn apply(
        &self,
        tx: &mut Self::Tx,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// A runner's progress as one value: a name and the position of the last
/// event that runner (a projection runner, the relay) has handled, applied or
/// skipped.
///
/// Resuming reads *after* the position: `store.subscribe_all(checkpoint.position)`
/// continues with the next event, so a checkpoint of [`Position::START`] means
/// "from the beginning".
///
/// A [`CheckpointStore`](crate::CheckpointStore) keeps the same pair but takes
/// its parts separately (`save(name, position)`, `load(name)`), since its
/// backends key a row by name; the runners use that trait, not this type.
/// `Checkpoint` is for code that passes a checkpoint around whole, to report
/// or serialise where a runner stands; the test kit's `Projected::checkpoint`
/// (feature `testing`) returns one to tell what a runner would store after
/// the given events. Its JSON form carries the position's string form:
///
/// ```
/// use es_core::{Checkpoint, Position};
/// let checkpoint = Checkpoint { name: "orders_read_model".into(), position: Position::new(812, 3) };
/// let json = serde_json::to_string(&checkpoint).unwrap();
/// assert_eq!(json, r#"{"name":"orders_read_model","position":"812.3"}"#);
/// assert_eq!(serde_json::from_str::<Checkpoint>(&json).unwrap(), checkpoint);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The projection's (or relay's) name.
    pub name: String,
    /// The last position handled.
    pub position: Position,
}
