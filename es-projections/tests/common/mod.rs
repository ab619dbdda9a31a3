//! Fixtures shared by the PostgreSQL and Redis tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use es_core::{
    EventStore, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, Payload, Position,
    Projection, ProjectionError, RecordedEvent, StreamId,
};
use es_projections::postgres::PgProjection;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A pool, and a fresh (migrated) runner schema and a model schema name
/// for one test.
pub async fn fresh() -> (PgPool, String, String) {
    let (pool, schema) = es_postgres::testing::fresh_schema_with(8).await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    (pool, schema, format!("esp_m_{}", &id[..12]))
}

/// Drops a test's schemas.
pub async fn cleanup(pool: &PgPool, schemas: &[&str]) {
    for schema in schemas {
        for suffix in ["", "__rebuild", "__old"] {
            let _ = sqlx::query(&format!(
                "DROP SCHEMA IF EXISTS \"{schema}{suffix}\" CASCADE"
            ))
            .execute(pool)
            .await;
        }
    }
}

pub fn deposit(amount: i64) -> NewEvent {
    NewEvent::new(
        "Deposited",
        1,
        Payload::from_value(&serde_json::json!({ "amount": amount })).unwrap(),
        Metadata::new()
            .with_correlation_id(uuid::Uuid::now_v7())
            .with_causation_id(uuid::Uuid::now_v7()),
    )
}

pub fn noise() -> NewEvent {
    NewEvent::new(
        "Noise",
        1,
        Payload::from_json("{}").unwrap(),
        Metadata::new(),
    )
}

pub async fn append(store: &dyn EventStore, stream: &str, events: Vec<NewEvent>) -> Position {
    store
        .append(
            &StreamId::new(stream).unwrap(),
            ExpectedVersion::Any,
            events,
        )
        .await
        .unwrap()
        .position
}

/// Appends `n` deposits of 1..=n spread over `accounts` streams; returns the
/// last position.
pub async fn seed(store: &InMemoryEventStore, n: u64, accounts: u64) -> Position {
    let mut last = Position::START;
    for i in 0..n {
        last = append(
            store,
            &format!("acct-{}", i % accounts),
            vec![deposit(i as i64 + 1)],
        )
        .await;
    }
    last
}

/// A ledger row per applied event (no unique key, so a double apply shows)
/// and a balance per account.
#[derive(Default)]
pub struct Ledger {
    pub name: String,
    /// Applies so far (including rolled-back ones).
    pub applies: AtomicU64,
    /// When `applies` reaches this, the apply hangs forever (a stuck batch
    /// the test then kills) and `reached` is notified.
    pub hang_at: AtomicU64,
    pub reached: Notify,
    /// Accepts negative deposits (refused otherwise): the fix applied before
    /// parked events are replayed.
    pub accept_negative: AtomicBool,
}

impl Ledger {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            hang_at: AtomicU64::new(u64::MAX),
            ..Self::default()
        })
    }
}

impl Projection for Ledger {
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
        let n = self.applies.fetch_add(1, Ordering::SeqCst) + 1;
        let amount = event.payload.to_value().unwrap()["amount"]
            .as_i64()
            .unwrap();
        let storage = |e: sqlx::Error| ProjectionError::storage(&self.name, e);
        sqlx::query("INSERT INTO ledger (event_id, account, amount) VALUES ($1, $2, $3)")
            .bind(event.event_id)
            .bind(event.stream_id.as_str())
            .bind(amount)
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
        if n == self.hang_at.load(Ordering::SeqCst) {
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
        if amount < 0 && !self.accept_negative.load(Ordering::SeqCst) {
            return Err(ProjectionError::invalid(
                &self.name,
                event,
                "negative deposit",
            ));
        }
        sqlx::query(
            "INSERT INTO balances (account, total, events) VALUES ($1, $2, 1) \
             ON CONFLICT (account) DO UPDATE SET total = balances.total + EXCLUDED.total, \
             events = balances.events + 1",
        )
        .bind(event.stream_id.as_str())
        .bind(amount)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        Ok(())
    }
}

impl PgProjection for Ledger {
    async fn setup(&self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        for sql in [
            "CREATE TABLE IF NOT EXISTS ledger (event_id uuid NOT NULL, account text NOT NULL, amount bigint NOT NULL)",
            "CREATE TABLE IF NOT EXISTS balances (account text PRIMARY KEY, total bigint NOT NULL, events bigint NOT NULL)",
        ] {
            sqlx::query(sql)
                .execute(&mut *tx)
                .await
                .map_err(|e| ProjectionError::storage(&self.name, e))?;
        }
        Ok(())
    }
}

/// (rows, distinct event ids) in the model's ledger.
pub async fn ledger_counts(pool: &PgPool, model: &str) -> (i64, i64) {
    sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT event_id) FROM \"{model}\".ledger"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The balances table, sorted.
pub async fn balances(pool: &PgPool, model: &str) -> Vec<(String, i64, i64)> {
    sqlx::query_as(&format!(
        "SELECT account, total, events FROM \"{model}\".balances ORDER BY account"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}
