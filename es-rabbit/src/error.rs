//! The crate's error type.

use es_core::BusError;

/// Why a RabbitMQ operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker could not be reached or the connection broke.
    #[error("RabbitMQ at {url} unavailable: {source}")]
    Unavailable {
        /// The address tried (without credentials).
        url: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// A name (exchange, queue, routing key) is longer than AMQP's 255 bytes
    /// or otherwise unusable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A queue or exchange already exists with other arguments (for example
    /// another `max_attempts` or queue type); the broker refused to redeclare it.
    #[error("topology conflict on {name}: {source}")]
    TopologyConflict {
        /// The queue or exchange.
        name: String,
        /// The broker's refusal.
        #[source]
        source: lapin::Error,
    },
    /// A broker operation did not complete in time; the connection is
    /// treated as broken.
    #[error("RabbitMQ operation {operation} timed out")]
    Timeout {
        /// The operation.
        operation: &'static str,
    },
    /// Any other client or protocol error.
    #[error("RabbitMQ error: {source}")]
    Protocol {
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
}

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn protocol(source: lapin::Error) -> Self {
        Self::Protocol { source }
    }

    /// Whether the broker refused a declaration with PRECONDITION-FAILED.
    pub(crate) fn is_precondition_failed(error: &lapin::Error) -> bool {
        use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
        match error.kind() {
            lapin::ErrorKind::ProtocolError(e) => {
                matches!(
                    e.kind(),
                    AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                )
            }
            _ => false,
        }
    }
}

impl From<Error> for BusError {
    fn from(error: Error) -> Self {
        match error {
            Error::Unavailable { .. } => Self::Unavailable {
                source: Box::new(error),
            },
            Error::InvalidName { ref name, .. } => Self::InvalidSubscription {
                group: name.clone(),
                reason: error.to_string(),
            },
            Error::TopologyConflict { ref name, .. } => Self::InvalidSubscription {
                group: name.clone(),
                reason: error.to_string(),
            },
            Error::Protocol { .. } | Error::Timeout { .. } => Self::Unavailable {
                source: Box::new(error),
            },
        }
    }
}

/// Runs a broker operation with a time limit.
pub(crate) async fn bounded<T, E>(
    limit: std::time::Duration,
    operation: &'static str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Error>
where
    Error: From<E>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result.map_err(Error::from),
        Err(_) => Err(Error::Timeout { operation }),
    }
}

impl From<lapin::Error> for Error {
    fn from(source: lapin::Error) -> Self {
        Self::Protocol { source }
    }
}

pub(crate) use es_core::redact_url as redact;
