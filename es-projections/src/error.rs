//! The crate's error type.

use std::sync::Arc;
use std::time::Duration;

use es_core::{Position, ProjectionError, StoreError, StreamId};
use uuid::Uuid;

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a runner stopped, or why a call on a projection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The projection failed to apply an event and the runner is configured to
    /// stop ([`OnError::Stop`](crate::OnError::Stop)). The event was not
    /// applied and the checkpoint stays before it.
    #[error(
        "projection {projection} failed on event {event_id} ({event_type}) of stream {stream_id} \
         at position {position}: {source}"
    )]
    Apply {
        /// The projection's name.
        projection: String,
        /// The failing event.
        event_id: Uuid,
        /// Its type.
        event_type: String,
        /// Its stream.
        stream_id: StreamId,
        /// Its global position.
        position: Position,
        /// What the projection said.
        #[source]
        source: Box<ProjectionError>,
    },
    /// The read model's storage failed while an event was applied
    /// ([`ProjectionError::Storage`]): a failure of the infrastructure, not of
    /// the event. The batch is rolled back and retried from the checkpoint
    /// with backoff; the event is never set aside for it.
    #[error("projection {projection}: storage failed on the event at {position}: {source}")]
    ReadModel {
        /// The projection's name.
        projection: String,
        /// Where the event stands.
        position: Position,
        /// What the projection said.
        #[source]
        source: Box<ProjectionError>,
    },
    /// The projection could not create its read model's tables.
    #[error("projection {projection} could not set up its read model: {source}")]
    Setup {
        /// The projection's name.
        projection: String,
        /// What the projection said.
        #[source]
        source: Box<ProjectionError>,
    },
    /// The event store failed (subscription, head, read).
    #[error("projection {projection}: event store failed: {source}")]
    Store {
        /// The projection's name.
        projection: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The read model's database failed (begin, checkpoint, commit).
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    #[error("projection {projection}: database error: {source}")]
    Database {
        /// The projection's name.
        projection: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// An es-postgres operation (checkpoint store, leader lock, migration)
    /// failed.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    #[error("projection {projection}: {source}")]
    Postgres {
        /// The projection's name.
        projection: String,
        /// The backend's error.
        #[source]
        source: es_postgres::Error,
    },
    /// Redis failed.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    #[error("redis error: {source}")]
    Redis {
        /// The driver's error.
        #[source]
        source: redis::RedisError,
    },
    /// Another runner instance moved the projection's checkpoint (a standby
    /// took over, or a rebuild swapped the model in): this runner's batch was
    /// rolled back. The runner reloads the checkpoint and goes on.
    #[error(
        "projection {projection}: checkpoint moved under this runner \
         (expected {expected}, found {found:?}); batch rolled back"
    )]
    Fenced {
        /// The projection's name.
        projection: String,
        /// Where this runner believed the checkpoint was.
        expected: Position,
        /// Where it was.
        found: Option<Position>,
    },
    /// A stored checkpoint could not be read back.
    #[error("projection {projection}: stored checkpoint {value:?} is not a position")]
    BadCheckpoint {
        /// The projection's name.
        projection: String,
        /// The stored text.
        value: String,
    },
    /// [`wait_for`](crate::ProjectionHandle::wait_for) gave up: the projection
    /// had not reached the position in time.
    #[error(
        "projection {projection} did not reach position {wanted} within {timeout:?} \
         (it is at {reached})"
    )]
    Timeout {
        /// The projection's name.
        projection: String,
        /// The position waited for.
        wanted: Position,
        /// Where the projection was when the wait gave up.
        reached: Position,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// The projection is stopped and will not reach the position.
    #[error("projection {projection} is stopped at {position}")]
    Stopped {
        /// The projection's name.
        projection: String,
        /// Where it stopped.
        position: Position,
    },
    /// The projection's runner failed earlier with this error.
    #[error("projection {projection} has failed: {source}")]
    Failed {
        /// The projection's name.
        projection: String,
        /// The runner's error.
        #[source]
        source: Arc<Self>,
    },
    /// The projection panicked while applying an event.
    #[error("projection {projection} panicked: {message}")]
    Panicked {
        /// The projection's name.
        projection: String,
        /// The panic's message, when it had one.
        message: String,
    },
    /// A name or option was rejected.
    #[error("invalid configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// Whether the runner should stop on this error rather than reload its
    /// checkpoint and retry.
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::Apply { .. }
                | Self::BadCheckpoint { .. }
                | Self::Failed { .. }
                | Self::Panicked { .. }
                | Self::Setup { .. }
                | Self::Config { .. }
        )
    }

    pub(crate) fn store(projection: &str, source: StoreError) -> Self {
        Self::Store {
            projection: projection.to_owned(),
            source,
        }
    }

    #[cfg(feature = "postgres")]
    pub(crate) fn pg(projection: &str, source: es_postgres::Error) -> Self {
        Self::Postgres {
            projection: projection.to_owned(),
            source,
        }
    }

    #[cfg(feature = "postgres")]
    pub(crate) fn db(projection: &str, source: sqlx::Error) -> Self {
        Self::Database {
            projection: projection.to_owned(),
            source,
        }
    }
}
