//! The PostgreSQL runner: each batch of events and its checkpoint commit in
//! one transaction, one active instance per projection across processes,
//! rebuilds into a fresh schema swapped in atomically, and read-model table
//! helpers.
//!
//! # Tables
//!
//! The runner schema is an `es-postgres` schema (the one holding the events,
//! or another): [`migrate`] runs `es_postgres::migrate` on it and adds
//! `projection_dead_letters`, where events set aside under
//! [`OnError::DeadLetter`](crate::OnError::DeadLetter) are written in the
//! batch's transaction.
//!
//! Checkpoints live in `es-postgres`'s checkpoint table
//! ([`es_postgres::PgCheckpointStore`], so any `CheckpointStore` reader
//! sees them). Every batch takes a transaction-scoped advisory lock for its
//! projection, re-reads the checkpoint in its transaction and checks it still
//! holds the position the runner started the batch from, applies the events
//! and saves the new checkpoint with `save_in_tx`. That compare-and-set is
//! the fence that makes a stale leader or a swapped-in rebuild roll a batch
//! back instead of applying it twice.
//!
//! Each projection's read model lives in its own *model schema*. The runner
//! sets `search_path` to it at the start of every transaction, so a
//! projection writes unqualified table names, and a rebuild can build the same
//! tables in a fresh schema and swap the two by renaming them.

mod checkpoints;
mod rebuild;
mod replay;
mod runner;
pub mod sink;

pub use checkpoints::{load_checkpoint, projection_lag, wait_for_checkpoint, CheckpointWatcher};
pub use rebuild::{rebuild, NoProgress, RebuildOptions, RebuildProgress, RebuildReport};
pub use replay::ReplayReport;
pub use runner::{PgProjection, PgProjectionRunner};

use sqlx::PgPool;

use crate::Error;

/// The channel each batch commit notifies, with payload
/// `"<runner schema>.<projection name>"`.
pub const NOTIFY_CHANNEL: &str = "es_projections_checkpoint";

/// Migrates `schema` with `es_postgres::migrate` (events, checkpoints, ...)
/// and creates the dead-letter table. Idempotent; safe to run from several
/// processes at once.
///
/// # Errors
/// [`Error::Config`] for a bad schema name, [`Error::Database`] when
/// PostgreSQL fails.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), Error> {
    let q = ident(schema)?;
    es_postgres::migrate(pool, schema)
        .await
        .map_err(|e| Error::pg("migrate", e))?;
    let statements = [
        "SELECT pg_advisory_xact_lock(hashtextextended('es_projections:migrate', 0))".to_owned(),
        format!(
            "CREATE TABLE IF NOT EXISTS {q}.projection_dead_letters (
                projection text NOT NULL,
                event_id uuid NOT NULL,
                event_type text NOT NULL,
                stream_id text NOT NULL,
                major bigint NOT NULL,
                minor bigint NOT NULL,
                error text NOT NULL,
                failed_at timestamptz NOT NULL,
                PRIMARY KEY (projection, event_id)
            )"
        ),
    ];
    let mut tx = pool.begin().await.map_err(|e| Error::db("migrate", e))?;
    for sql in &statements {
        sqlx::query(sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::db("migrate", e))?;
    }
    tx.commit().await.map_err(|e| Error::db("migrate", e))
}

/// Checks that `name` is a plain SQL identifier (letters, digits,
/// underscores; not starting with a digit; at most 63 bytes) and returns it
/// double-quoted.
pub(crate) fn ident(name: &str) -> Result<String, Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(format!("\"{name}\""))
    } else {
        Err(Error::Config {
            reason: format!(
                "{name:?} is not a plain SQL identifier (letters, digits and '_', \
                 not starting with a digit, at most 63 bytes)"
            ),
        })
    }
}

pub(crate) fn to_i64(projection: &str, value: u64) -> Result<i64, Error> {
    i64::try_from(value).map_err(|_| Error::Config {
        reason: format!("projection {projection}: position part {value} does not fit a bigint"),
    })
}

/// How many events `projection` has parked in `schema` (its dead-letter
/// table), for health checks and alerts.
///
/// # Errors
/// [`Error::Database`] when the query fails.
pub async fn parked_count(pool: &PgPool, schema: &str, projection: &str) -> Result<u64, Error> {
    let q = ident(schema)?;
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {q}.projection_dead_letters WHERE projection = $1"
    ))
    .bind(projection)
    .fetch_one(pool)
    .await
    .map_err(|e| Error::db(projection, e))?;
    Ok(u64::try_from(n).unwrap_or_default())
}

/// The events `projection` has parked in `schema`, oldest first (at most
/// `limit`): what an operator reads before fixing the projection and
/// replaying them with
/// [`PgProjectionRunner::replay_parked`](PgProjectionRunner::replay_parked).
///
/// # Errors
/// [`Error::Database`] when the query fails.
pub async fn parked_events(
    pool: &PgPool,
    schema: &str,
    projection: &str,
    limit: u32,
) -> Result<Vec<crate::ParkedEvent>, Error> {
    let q = ident(schema)?;
    type Row = (
        uuid::Uuid,
        String,
        String,
        i64,
        i64,
        String,
        chrono::DateTime<chrono::Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT event_id, event_type, stream_id, major, minor, error, failed_at \
         FROM {q}.projection_dead_letters WHERE projection = $1 \
         ORDER BY major, minor LIMIT $2"
    ))
    .bind(projection)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await
    .map_err(|e| Error::db(projection, e))?;
    rows.into_iter()
        .map(
            |(event_id, event_type, stream_id, major, minor, error, failed_at)| {
                let stream_id = es_core::StreamId::new(stream_id).map_err(|e| Error::Config {
                    reason: format!("parked event {event_id}: {e}"),
                })?;
                Ok(crate::ParkedEvent {
                    projection: projection.to_owned(),
                    event_id,
                    event_type,
                    stream_id,
                    position: es_core::Position::new(
                        u64::try_from(major).unwrap_or_default(),
                        u64::try_from(minor).unwrap_or_default(),
                    ),
                    error,
                    failed_at,
                })
            },
        )
        .collect()
}
