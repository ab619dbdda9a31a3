//! Projections: read models built from the event log.

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::{BoxError, Position, RecordedEvent};

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

/// A runner's progress: the position of the last event a projection has
/// applied (or skipped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The projection's (or relay's) name.
    pub name: String,
    /// The last position handled.
    pub position: Position,
}
