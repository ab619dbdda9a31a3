//! [`PgCheckpointStore`]: named checkpoints on PostgreSQL.

use async_trait::async_trait;
use es_core::{CheckpointStore, Position, StoreError};
use sqlx::{PgConnection, PgPool};

use crate::error::Result;
use crate::schema::quoted;
use crate::store::position_parts;

/// Named checkpoints in `<schema>.checkpoints`.
///
/// A projection runner stores its checkpoint in the same transaction as its
/// read-model change with [`PgCheckpointStore::save_in_tx`], so both
/// commit or neither does.
#[derive(Clone, Debug)]
pub struct PgCheckpointStore {
    pool: PgPool,
    save_sql: String,
    save_notifying_sql: String,
    load_sql: String,
}

impl PgCheckpointStore {
    /// A checkpoint store over `pool` in `schema` (create it with
    /// [`crate::migrate`]).
    pub fn new(pool: PgPool, schema: impl AsRef<str>) -> Self {
        let s = quoted(schema.as_ref());
        let save_sql = format!(
            "INSERT INTO {s}.checkpoints (name, major, minor) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET major = excluded.major, minor = excluded.minor, \
             updated_at = now()"
        );
        Self {
            pool,
            save_notifying_sql: format!(
                "WITH saved AS ({save_sql} RETURNING 1) SELECT pg_notify($4, $5) FROM saved"
            ),
            save_sql,
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

    /// [`Self::save_in_tx`] and, in the same statement, a `NOTIFY` on
    /// `channel` with `payload`, delivered when the transaction commits.
    pub async fn save_in_tx_notifying(
        &self,
        tx: &mut PgConnection,
        name: &str,
        position: Position,
        channel: &str,
        payload: &str,
    ) -> Result<()> {
        let (major, minor) = position_parts(position)?;
        sqlx::query(&self.save_notifying_sql)
            .bind(name)
            .bind(major)
            .bind(minor)
            .bind(channel)
            .bind(payload)
            .execute(tx)
            .await?;
        Ok(())
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
