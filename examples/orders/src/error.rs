//! The crate's error type.

use es_core::{BoxError, BusError, CodecError, RepositoryError, StoreError};
use uuid::Uuid;

/// Why a service refused or failed a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A field of the request is invalid. Nothing changed.
    #[error("invalid {field}: {message}")]
    Validation {
        /// The field (a JSON path such as `items[0].quantity`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A product named by the request is not in the catalog. Nothing changed.
    #[error("unknown product {product_id}")]
    UnknownProduct {
        /// The product.
        product_id: Uuid,
    },
    /// The thing asked for does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The command is not allowed in the current state (an illegal transition).
    #[error("conflict: {message}")]
    Conflict {
        /// Why the transition is not allowed.
        message: String,
    },
    /// The caller may not do this (another customer's order).
    #[error("forbidden: {message}")]
    Forbidden {
        /// Why the caller may not do it.
        message: String,
    },
    /// An idempotency key was reused with a different request.
    #[error("idempotency key {key:?} was already used with a different request")]
    IdempotencyKeyReused {
        /// The key.
        key: String,
    },
    /// The customer redeemed this promotion code with another order.
    #[error("promotion code {code} was already redeemed by this customer")]
    PromotionRedeemed {
        /// The code.
        code: String,
    },
    /// A read waited its longest for the read model to reach a position,
    /// and it has not yet: try again later.
    #[error("the read model has not reached {what} yet")]
    NotCaughtUp {
        /// What it has not reached.
        what: String,
    },
    /// The event store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An event could not be encoded, or a stored one decoded: the same
    /// request fails the same way every time.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The event schema is inconsistent (found at start-up).
    #[error(transparent)]
    Schema(#[from] es_core::SchemaError),
    /// The database behind a read model, the catalog or a projection failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A projection runner failed.
    #[error("projection: {0}")]
    Projection(#[from] es_projections::Error),
    /// Anything else that went wrong inside: what was being done, and the
    /// error that stopped it, when there is one.
    #[error("{context}")]
    Internal {
        /// What was being done.
        context: String,
        /// What stopped it.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// A validation error.
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// An internal error that no other error caused.
    pub fn internal(context: impl Into<String>) -> Self {
        Self::Internal {
            context: context.into(),
            source: None,
        }
    }

    /// An internal error: `context` says what was being done, `source` what
    /// stopped it.
    pub fn caused(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Internal {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// The error and each of its sources, joined by `: `, for a log line.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            text.push_str(": ");
            text.push_str(&e.to_string());
            next = e.source();
        }
        text
    }

    /// Maps a repository failure that is not the aggregate's own refusal.
    pub(crate) fn from_repository<E: std::error::Error + Send + Sync + 'static>(
        error: RepositoryError<E>,
    ) -> Self {
        match error {
            RepositoryError::Store(e) => Self::Store(e),
            RepositoryError::Codec(e) => Self::Codec(e),
            other => Self::caused("repository", other),
        }
    }

    /// Whether a command that failed so may succeed when its message is
    /// delivered again: a store or bus failure that is not
    /// [deterministic](StoreError::is_deterministic), or an internal one.
    /// What is wrong with the request itself (its fields, its products, its
    /// events' encoding) fails the same way every time.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            Self::Store(e) => !e.is_deterministic(),
            Self::Database(e) => !crate::distributed::is_data_exception(e),
            Self::Bus(_)
            | Self::Projection(_)
            | Self::Internal { .. }
            | Self::NotCaughtUp { .. } => true,
            Self::Validation { .. }
            | Self::UnknownProduct { .. }
            | Self::NotFound { .. }
            | Self::Conflict { .. }
            | Self::IdempotencyKeyReused { .. }
            | Self::PromotionRedeemed { .. }
            | Self::Forbidden { .. }
            | Self::Codec(_)
            | Self::Schema(_) => false,
        }
    }

    /// The bus outcome of a command handled with this error: retried when
    /// it may pass, dead-lettered at once otherwise.
    pub fn outcome(&self) -> es_core::Outcome {
        if self.is_retryable() {
            es_core::Outcome::retry(self)
        } else {
            es_core::Outcome::dead_letter(self)
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use es_core::{ExpectedVersion, Outcome, StreamId};

    use super::*;

    /// A command handler retries what may pass and dead-letters at once what
    /// fails the same way every time.
    #[test]
    fn a_command_failure_is_retried_only_when_it_may_pass() {
        let stream = StreamId::new("product-1").unwrap();
        let retried = [
            Error::Store(StoreError::WrongExpectedVersion {
                stream: stream.clone(),
                expected: ExpectedVersion::Exact(1),
                actual: 2,
            }),
            Error::Store(StoreError::Unavailable {
                source: "connection refused".into(),
            }),
            Error::internal("contention"),
        ];
        for error in retried {
            assert!(matches!(error.outcome(), Outcome::Retry { .. }), "{error}");
        }
        let dead = [
            Error::Store(StoreError::InvalidPayload {
                event_id: Uuid::nil(),
            }),
            Error::Store(StoreError::DuplicateStream { stream }),
            Error::validation("name", "PostgreSQL refuses the product"),
            Error::Codec(CodecError::TagMismatch {
                event_type: "Nope".into(),
                found: "Other".into(),
            }),
        ];
        for error in dead {
            assert!(
                matches!(error.outcome(), Outcome::DeadLetter { .. }),
                "{error}"
            );
        }
    }

    /// An internal error keeps what caused it: a log line shows the whole
    /// chain, and a caller can walk it.
    #[test]
    fn an_internal_error_keeps_its_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use");
        let error = Error::caused("cannot listen on 127.0.0.1:8080", io);
        assert_eq!(error.to_string(), "cannot listen on 127.0.0.1:8080");
        assert_eq!(
            error.chain(),
            "cannot listen on 127.0.0.1:8080: address in use"
        );
        let source = std::error::Error::source(&error).expect("a source");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
        assert!(std::error::Error::source(&Error::internal("no cause")).is_none());
    }
}
