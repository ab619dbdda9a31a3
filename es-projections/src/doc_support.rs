//! Fixtures for the crate docs, the example CLI and the benchmark: a small
//! PostgreSQL projection and a fast bulk seeder. Not part of the API.

use es_core::{Projection, ProjectionError, RecordedEvent};
use sqlx::{PgConnection, PgPool};

use crate::postgres::PgProjection;
use crate::Error;

/// Sums `{"amount": n}` of `Deposited` events per stream into
/// `balances(account, total, events)`.
#[derive(Clone, Debug)]
pub struct Balances {
    /// The projection's name.
    pub name: String,
    /// Whether to apply whole batches with one set-based statement.
    pub batched: bool,
}

impl Default for Balances {
    fn default() -> Self {
        Self {
            name: "balances".to_owned(),
            batched: true,
        }
    }
}

impl Balances {
    fn amount(&self, event: &RecordedEvent) -> Result<i64, ProjectionError> {
        event
            .payload
            .to_value()
            .ok()
            .and_then(|v| v["amount"].as_i64())
            .ok_or_else(|| ProjectionError::invalid(&self.name, event, "no integer amount"))
    }

    async fn apply_all(
        &self,
        tx: &mut PgConnection,
        events: &[&RecordedEvent],
    ) -> Result<(), ProjectionError> {
        // One row per account: ON CONFLICT cannot touch a row twice.
        let mut sums = std::collections::BTreeMap::<&str, (i64, i64)>::new();
        for event in events {
            let sum = sums.entry(event.stream_id.as_str()).or_default();
            sum.0 += self.amount(event)?;
            sum.1 += 1;
        }
        let accounts: Vec<&str> = sums.keys().copied().collect();
        let totals: Vec<i64> = sums.values().map(|s| s.0).collect();
        let counts: Vec<i64> = sums.values().map(|s| s.1).collect();
        sqlx::query(
            "INSERT INTO balances (account, total, events) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) \
             ON CONFLICT (account) DO UPDATE SET total = balances.total + EXCLUDED.total, \
             events = balances.events + EXCLUDED.events",
        )
        .bind(accounts)
        .bind(totals)
        .bind(counts)
        .execute(tx)
        .await
        .map_err(|e| storage(&self.name, e))?;
        Ok(())
    }
}

fn storage(name: &str, e: sqlx::Error) -> ProjectionError {
    ProjectionError::storage(name, e)
}

impl Projection for Balances {
    type Tx = PgConnection;

    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, event_type: &str) -> bool {
        event_type == "Deposited"
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        let amount = self.amount(event)?;
        sqlx::query(
            "INSERT INTO balances (account, total, events) VALUES ($1, $2, 1) \
             ON CONFLICT (account) DO UPDATE SET total = balances.total + EXCLUDED.total, \
             events = balances.events + 1",
        )
        .bind(event.stream_id.as_str())
        .bind(amount)
        .execute(tx)
        .await
        .map_err(|e| storage(&self.name, e))?;
        Ok(())
    }
}

impl PgProjection for Balances {
    async fn setup(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS balances (account text PRIMARY KEY, \
             total bigint NOT NULL, events bigint NOT NULL)",
        )
        .execute(tx)
        .await
        .map_err(|e| storage(&self.name, e))?;
        Ok(())
    }

    async fn apply_batch<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [&'a RecordedEvent],
    ) -> Option<Result<(), ProjectionError>> {
        if self.batched {
            Some(self.apply_all(conn, events).await)
        } else {
            None
        }
    }
}

/// Inserts `count` `Deposited` events spread over `accounts` streams
/// (`acct-<n>`) straight into `<schema>.events` (an es-postgres schema), in
/// transactions of up to 100,000 rows. Returns how many events the schema
/// holds now.
///
/// # Errors
/// [`Error::Database`] when PostgreSQL fails.
pub async fn bulk_seed(
    pool: &PgPool,
    schema: &str,
    count: u64,
    accounts: u64,
) -> Result<u64, Error> {
    let q = crate::postgres::ident(schema)?;
    let db = |e| Error::db("bulk_seed", e);
    let (mut have,): (i64,) = sqlx::query_as(&format!(
        "SELECT count(*) FROM {q}.events WHERE event_type = 'Deposited' AND stream_id LIKE 'acct-%'"
    ))
    .fetch_one(pool)
    .await
    .map_err(db)?;
    let accounts = i64::try_from(accounts.max(1)).unwrap_or(1);
    let sql = format!(
        "INSERT INTO {q}.events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) \
         SELECT 'acct-' || (g % $2), g / $2 + 1, gen_random_uuid(), 'Deposited', 1, \
                jsonb_build_object('amount', g % 97 + 1), '{{}}'::jsonb \
           FROM generate_series($1::bigint, $1::bigint + $3::bigint - 1) AS g"
    );
    let mut left = i64::try_from(count).unwrap_or(i64::MAX);
    while left > 0 {
        let chunk = left.min(100_000);
        sqlx::query(&sql)
            .bind(have)
            .bind(accounts)
            .bind(chunk)
            .execute(pool)
            .await
            .map_err(db)?;
        have += chunk;
        left -= chunk;
    }
    let (total,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {q}.events"))
        .fetch_one(pool)
        .await
        .map_err(db)?;
    Ok(u64::try_from(total).unwrap_or(0))
}
