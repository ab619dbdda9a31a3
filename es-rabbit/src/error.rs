//! The crate's error type.

use es_core::BusError;

/// Why a RabbitMQ operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitError {
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
    /// Any other client or protocol error.
    #[error("RabbitMQ error: {source}")]
    Protocol {
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
}

impl RabbitError {
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

impl From<RabbitError> for BusError {
    fn from(error: RabbitError) -> Self {
        match error {
            RabbitError::Unavailable { .. } => Self::Unavailable {
                source: Box::new(error),
            },
            RabbitError::InvalidName { ref name, .. } => Self::InvalidSubscription {
                group: name.clone(),
                reason: error.to_string(),
            },
            RabbitError::TopologyConflict { ref name, .. } => Self::InvalidSubscription {
                group: name.clone(),
                reason: error.to_string(),
            },
            RabbitError::Protocol { .. } => Self::Unavailable {
                source: Box::new(error),
            },
        }
    }
}

/// `url` without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_password() {
        assert_eq!(
            super::redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(super::redact("amqp://host"), "amqp://host");
    }
}
