//! [`PgInbox`]: processed message ids per consumer on PostgreSQL.

use async_trait::async_trait;
use es_core::{Inbox, StoreError};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::schema::quoted;

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
            .map_err(Error::from)?;
        Ok(done.rows_affected() == 1)
    }
}
