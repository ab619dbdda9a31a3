//! The snapshot store, checkpoint store and consumer inbox.

use async_trait::async_trait;
use es_core::{
    CheckpointStore, Inbox, Payload, Position, Snapshot, SnapshotStore, StoreError, StreamId,
};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::{PgError, Result};
use crate::schema::quoted;
use crate::store::position_parts;

/// Aggregate snapshots in `<schema>.snapshots`: the latest per stream. Saving
/// an older snapshot than the stored one changes nothing.
#[derive(Clone, Debug)]
pub struct PgSnapshotStore {
    pool: PgPool,
    save_sql: String,
    load_sql: String,
}

impl PgSnapshotStore {
    /// A snapshot store over `pool` in `schema` (create it with
    /// [`crate::migrate`]).
    pub fn new(pool: PgPool, schema: impl AsRef<str>) -> Self {
        let s = quoted(schema.as_ref());
        Self {
            pool,
            save_sql: format!(
                "INSERT INTO {s}.snapshots AS old (tenant, stream_id, version, schema_version, state) \
                 VALUES ('', $1, $2, $3, $4::json) \
                 ON CONFLICT (tenant, stream_id) DO UPDATE \
                 SET version = excluded.version, schema_version = excluded.schema_version, \
                     state = excluded.state, taken_at = now() \
                 WHERE old.version <= excluded.version"
            ),
            load_sql: format!(
                "SELECT version, schema_version, state::text FROM {s}.snapshots \
                 WHERE tenant = '' AND stream_id = $1"
            ),
        }
    }

    /// Stores a snapshot on the caller's connection or transaction.
    pub async fn save_in_tx(&self, conn: &mut PgConnection, snapshot: &Snapshot) -> Result<()> {
        self.save_on(conn, snapshot).await
    }

    async fn save_on<'c, E: sqlx::PgExecutor<'c>>(
        &self,
        executor: E,
        snapshot: &Snapshot,
    ) -> Result<()> {
        let version = i64::try_from(snapshot.version).map_err(|_| PgError::Corrupt {
            reason: format!("snapshot version {} is out of range", snapshot.version),
        })?;
        let schema_version =
            i32::try_from(snapshot.schema_version).map_err(|_| PgError::Corrupt {
                reason: format!(
                    "snapshot schema version {} is out of range",
                    snapshot.schema_version
                ),
            })?;
        sqlx::query(&self.save_sql)
            .bind(snapshot.stream_id.as_str())
            .bind(version)
            .bind(schema_version)
            .bind(snapshot.state.as_str())
            .execute(executor)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(db)
                    if db.code().is_some_and(|c| c == "22P02" || c == "22P05") =>
                {
                    PgError::Store(StoreError::InvalidPayload {
                        event_id: Uuid::nil(),
                    })
                }
                _ => PgError::from(e),
            })?;
        Ok(())
    }
}

#[async_trait]
impl SnapshotStore for PgSnapshotStore {
    async fn save(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        Ok(self.save_on(&self.pool, &snapshot).await?)
    }

    async fn load(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let row: Option<(i64, i32, String)> = sqlx::query_as(&self.load_sql)
            .bind(stream.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(PgError::from)?;
        Ok(row.map(|(version, schema_version, state)| Snapshot {
            stream_id: stream.clone(),
            version: u64::try_from(version).unwrap_or(0),
            schema_version: u32::try_from(schema_version).unwrap_or(0),
            state: Payload::from_trusted_json(state),
        }))
    }
}

/// Named checkpoints in `<schema>.checkpoints`.
///
/// A projection runner stores its checkpoint in the same transaction as its
/// read-model change with [`PgCheckpointStore::save_in_tx`], so both
/// commit or neither does.
#[derive(Clone, Debug)]
pub struct PgCheckpointStore {
    pool: PgPool,
    save_sql: String,
    load_sql: String,
}

impl PgCheckpointStore {
    /// A checkpoint store over `pool` in `schema` (create it with
    /// [`crate::migrate`]).
    pub fn new(pool: PgPool, schema: impl AsRef<str>) -> Self {
        let s = quoted(schema.as_ref());
        Self {
            pool,
            save_sql: format!(
                "INSERT INTO {s}.checkpoints (name, major, minor) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET major = excluded.major, minor = excluded.minor, \
                 updated_at = now()"
            ),
            load_sql: format!("SELECT major, minor FROM {s}.checkpoints WHERE name = $1"),
        }
    }

    /// Stores `name`'s position on the caller's connection or transaction.
    pub async fn save_in_tx(
        &self,
        tx: &mut PgConnection,
        name: &str,
        position: Position,
    ) -> Result<()> {
        self.save_on(tx, name, position).await
    }

    /// Loads `name`'s position on the caller's connection or transaction (for
    /// example after `SELECT ... FOR UPDATE` of the read model).
    pub async fn load_in_tx(&self, tx: &mut PgConnection, name: &str) -> Result<Option<Position>> {
        self.load_on(tx, name).await
    }

    async fn save_on<'c, E: sqlx::PgExecutor<'c>>(
        &self,
        executor: E,
        name: &str,
        position: Position,
    ) -> Result<()> {
        let (major, minor) = position_parts(position)?;
        sqlx::query(&self.save_sql)
            .bind(name)
            .bind(major)
            .bind(minor)
            .execute(executor)
            .await?;
        Ok(())
    }

    async fn load_on<'c, E: sqlx::PgExecutor<'c>>(
        &self,
        executor: E,
        name: &str,
    ) -> Result<Option<Position>> {
        let row: Option<(i64, i64)> = sqlx::query_as(&self.load_sql)
            .bind(name)
            .fetch_optional(executor)
            .await?;
        Ok(row.map(|(major, minor)| {
            Position::new(
                u64::try_from(major).unwrap_or(0),
                u64::try_from(minor).unwrap_or(0),
            )
        }))
    }
}

#[async_trait]
impl CheckpointStore for PgCheckpointStore {
    async fn load(&self, name: &str) -> Result<Option<Position>, StoreError> {
        Ok(self.load_on(&self.pool, name).await?)
    }

    async fn save(&self, name: &str, position: Position) -> Result<(), StoreError> {
        Ok(self.save_on(&self.pool, name, position).await?)
    }
}

/// Processed message ids per consumer in `<schema>.inbox`.
///
/// For exactly-once effects, record the message id in the same transaction as
/// the effect with [`PgInbox::record_in_tx`]: a redelivered message finds
/// its id recorded (`false`) and the handler skips it.
#[derive(Clone, Debug)]
pub struct PgInbox {
    pool: PgPool,
    record_sql: String,
    contains_sql: String,
    forget_sql: String,
}

impl PgInbox {
    /// An inbox over `pool` in `schema` (create it with [`crate::migrate`]).
    pub fn new(pool: PgPool, schema: impl AsRef<str>) -> Self {
        let s = quoted(schema.as_ref());
        Self {
            pool,
            record_sql: format!(
                "INSERT INTO {s}.inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            ),
            contains_sql: format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.inbox WHERE consumer = $1 AND message_id = $2)"
            ),
            forget_sql: format!("DELETE FROM {s}.inbox WHERE consumer = $1 AND message_id = $2"),
        }
    }

    /// Records `message_id` for `consumer` on the caller's connection or
    /// transaction: `true` the first time, `false` when already recorded
    /// (by a committed transaction, or — after waiting for it — a concurrent
    /// one).
    pub async fn record_in_tx(
        &self,
        tx: &mut PgConnection,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool> {
        self.record_on(tx, consumer, message_id).await
    }

    /// Whether `consumer` processed `message_id`, on the caller's connection.
    pub async fn contains_in_tx(
        &self,
        tx: &mut PgConnection,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool> {
        self.contains_on(tx, consumer, message_id).await
    }

    async fn record_on<'c, E: sqlx::PgExecutor<'c>>(
        &self,
        executor: E,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool> {
        let done = sqlx::query(&self.record_sql)
            .bind(consumer)
            .bind(message_id)
            .execute(executor)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn contains_on<'c, E: sqlx::PgExecutor<'c>>(
        &self,
        executor: E,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool> {
        Ok(sqlx::query_scalar(&self.contains_sql)
            .bind(consumer)
            .bind(message_id)
            .fetch_one(executor)
            .await?)
    }
}

#[async_trait]
impl Inbox for PgInbox {
    async fn record(&self, consumer: &str, message_id: Uuid) -> Result<bool, StoreError> {
        Ok(self.record_on(&self.pool, consumer, message_id).await?)
    }

    async fn contains(&self, consumer: &str, message_id: Uuid) -> Result<bool, StoreError> {
        Ok(self.contains_on(&self.pool, consumer, message_id).await?)
    }

    async fn forget(&self, consumer: &str, message_id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.forget_sql)
            .bind(consumer)
            .bind(message_id)
            .execute(&self.pool)
            .await
            .map_err(PgError::from)?;
        Ok(done.rows_affected() == 1)
    }
}
