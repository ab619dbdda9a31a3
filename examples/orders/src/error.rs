//! The crate's error type.

use es_core::{BusError, RepositoryError, StoreError};
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
        /// Why.
        message: String,
    },
    /// The caller may not do this (another customer's order).
    #[error("forbidden: {message}")]
    Forbidden {
        /// Why.
        message: String,
    },
    /// An idempotency key was reused with a different request.
    #[error("idempotency key {key:?} was already used with a different request")]
    IdempotencyKeyReused {
        /// The key.
        key: String,
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
    /// Anything else that went wrong inside.
    #[error("internal error: {message}")]
    Internal {
        /// What.
        message: String,
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

    /// An internal error.
    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::Internal {
            message: message.to_string(),
        }
    }

    /// Maps a repository failure that is not the aggregate's own refusal.
    pub fn from_repository<E: std::error::Error + 'static>(error: RepositoryError<E>) -> Self {
        match error {
            RepositoryError::Store(e) => Self::Store(e),
            other => Self::internal(other),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
