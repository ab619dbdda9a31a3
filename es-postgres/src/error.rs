//! The crate's error type and its mapping onto [`es_core::StoreError`].

use es_core::{Position, StoreError};

use crate::sqlstate;

/// Why an es-postgres operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database could not be reached: connection refused or dropped, pool
    /// timed out or closed, server shutting down. Retrying later may succeed.
    #[error("PostgreSQL unavailable: {source}")]
    Unavailable {
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The database answered with an error.
    #[error("PostgreSQL error: {source}")]
    Database {
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A schema name is not a plain lower-case SQL identifier.
    #[error("invalid schema name {name:?}: use 1 to 40 characters of a-z, 0-9 and _, starting with a letter or _")]
    InvalidSchemaName {
        /// The rejected name.
        name: String,
    },
    /// A migration failed; it was rolled back with everything after it.
    #[error("migration {version} ({name}) of schema {schema} failed: {source}")]
    Migration {
        /// The schema migrated.
        schema: String,
        /// The failing migration's version.
        version: i32,
        /// The failing migration's name.
        name: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The schema was migrated by a newer version of this crate.
    #[error("schema {schema} is at migration {found}, newer than this build knows ({known})")]
    SchemaTooNew {
        /// The schema.
        schema: String,
        /// The version found in the schema.
        found: i32,
        /// The newest version this build knows.
        known: i32,
    },
    /// The schema's tables do not exist: the schema was never migrated.
    /// [`PgEventStore::new`](crate::PgEventStore::new) and the other stores'
    /// constructors do not create tables; [`crate::migrate`] does (and
    /// [`PgEventStore::connect`](crate::PgEventStore::connect) calls it).
    #[error("the schema's tables do not exist: run es_postgres::migrate(&pool, schema) first ({source})")]
    NotMigrated {
        /// The driver's error (it names the missing table or schema).
        #[source]
        source: sqlx::Error,
    },
    /// A connection URL or setting was rejected.
    #[error("invalid connection settings: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// A position cannot be stored: one of its parts exceeds `i64::MAX`.
    #[error("position {position} is out of the range PostgreSQL stores")]
    PositionOutOfRange {
        /// The position.
        position: Position,
    },
    /// A stored row could not be decoded.
    #[error("corrupt row: {reason}")]
    Corrupt {
        /// What could not be decoded.
        reason: String,
    },
    /// An event-store rule refused the operation.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unavailable { .. } => true,
            Self::Store(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// Whether a driver error means the server could not be reached or the
/// connection was lost, rather than the server refusing the statement.
pub(crate) fn is_connection_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with(sqlstate::CONNECTION_EXCEPTION_CLASS)
                || [
                    sqlstate::ADMIN_SHUTDOWN,
                    sqlstate::CRASH_SHUTDOWN,
                    sqlstate::CANNOT_CONNECT_NOW,
                    sqlstate::TOO_MANY_CONNECTIONS,
                ]
                .contains(&&*code)
        }),
        _ => false,
    }
}

impl From<sqlx::Error> for Error {
    fn from(source: sqlx::Error) -> Self {
        if is_connection_error(&source) {
            Self::Unavailable { source }
        } else if sqlstate::is_one_of(&source, sqlstate::NOT_MIGRATED) {
            Self::NotMigrated { source }
        } else {
            Self::Database { source }
        }
    }
}

impl From<Error> for StoreError {
    fn from(error: Error) -> Self {
        match error {
            Error::Store(e) => e,
            Error::Unavailable { source } => Self::Unavailable {
                source: Box::new(source),
            },
            other => Self::Backend {
                source: Box::new(other),
            },
        }
    }
}

/// Maps a driver error straight to a [`StoreError`].
pub(crate) fn store_error(error: sqlx::Error) -> StoreError {
    Error::from(error).into()
}
