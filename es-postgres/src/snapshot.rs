//! [`PgSnapshotStore`]: aggregate snapshots on PostgreSQL.

use async_trait::async_trait;
use es_core::{Payload, Snapshot, SnapshotStore, StoreError, StreamId};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::schema::quoted;
use crate::sqlstate;

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
        let version = i64::try_from(snapshot.version).map_err(|_| Error::Corrupt {
            reason: format!("snapshot version {} is out of range", snapshot.version),
        })?;
        let schema_version =
            i32::try_from(snapshot.schema_version).map_err(|_| Error::Corrupt {
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
            .map_err(|e| {
                if sqlstate::is_one_of(
                    &e,
                    &[
                        sqlstate::INVALID_TEXT_REPRESENTATION,
                        sqlstate::UNTRANSLATABLE_CHARACTER,
                    ],
                ) {
                    Error::Store(StoreError::InvalidPayload {
                        event_id: Uuid::nil(),
                    })
                } else {
                    Error::from(e)
                }
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
            .map_err(Error::from)?;
        Ok(row.map(|(version, schema_version, state)| Snapshot {
            stream_id: stream.clone(),
            version: u64::try_from(version).unwrap_or(0),
            schema_version: u32::try_from(schema_version).unwrap_or(0),
            state: Payload::from_trusted_json(state),
        }))
    }
}
