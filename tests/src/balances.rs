//! The balances read model: per account, its balance and how many
//! money-moving events made it. One projection in memory, one on PostgreSQL,
//! and the fold of the log both are compared with.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use es_core::{EventCodec, EventStore, Position, Projection, ProjectionError, RecordedEvent};
use es_projections::postgres::PgProjection;
use sqlx::{PgConnection, PgPool};

use crate::bank::AccountEvent;

/// Per account (its stream id): the balance, and the events applied.
pub type Balances = BTreeMap<String, (i64, u64)>;

/// The name both projections run under.
pub const PROJECTION: &str = "balances";

fn balance_change(projection: &str, event: &RecordedEvent) -> Result<i64, ProjectionError> {
    EventCodec::<AccountEvent>::new()
        .decode(event)
        .map(|e| e.balance_change())
        .map_err(|e| ProjectionError::invalid(projection, event, e))
}

fn is_account(event: &RecordedEvent) -> bool {
    event.stream_id.category() == "account"
}

/// The balances read model in memory.
#[derive(Debug, Default)]
pub struct MemoryBalances {
    model: Mutex<Balances>,
}

impl MemoryBalances {
    /// The read model as it stands.
    pub fn read(&self) -> Balances {
        self.model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Projection for MemoryBalances {
    type Tx = ();

    fn name(&self) -> &str {
        PROJECTION
    }

    fn accepts(&self, event_type: &str) -> bool {
        AccountEvent::moves_money(event_type)
    }

    async fn apply(&self, (): &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
        if !is_account(event) {
            return Ok(());
        }
        let change = balance_change(PROJECTION, event)?;
        let mut model = self.model.lock().unwrap_or_else(PoisonError::into_inner);
        let row = model
            .entry(event.stream_id.as_str().to_owned())
            .or_default();
        row.0 += change;
        row.1 += 1;
        Ok(())
    }
}

/// The balances read model in a PostgreSQL table, `balances`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PgBalances;

fn storage(e: sqlx::Error) -> ProjectionError {
    ProjectionError::storage(PROJECTION, e)
}

impl Projection for PgBalances {
    type Tx = PgConnection;

    fn name(&self) -> &str {
        PROJECTION
    }

    fn accepts(&self, event_type: &str) -> bool {
        AccountEvent::moves_money(event_type)
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        if !is_account(event) {
            return Ok(());
        }
        let change = balance_change(PROJECTION, event)?;
        sqlx::query(
            "INSERT INTO balances (account, balance, events) VALUES ($1, $2, 1) \
             ON CONFLICT (account) DO UPDATE SET balance = balances.balance + EXCLUDED.balance, \
             events = balances.events + 1",
        )
        .bind(event.stream_id.as_str())
        .bind(change)
        .execute(tx)
        .await
        .map_err(storage)?;
        Ok(())
    }
}

impl PgProjection for PgBalances {
    async fn setup(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS balances (account text PRIMARY KEY, \
             balance bigint NOT NULL, events bigint NOT NULL)",
        )
        .execute(conn)
        .await
        .map_err(storage)?;
        Ok(())
    }
}

/// Reads the PostgreSQL read model in `model_schema`.
///
/// # Panics
/// When the query fails.
pub async fn read_pg(pool: &PgPool, model_schema: &str) -> Balances {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT account, balance, events FROM {model_schema}.balances"
    ))
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("reading {model_schema}.balances: {e}"));
    rows.into_iter()
        .map(|(account, balance, events)| {
            (
                account,
                (balance, u64::try_from(events).unwrap_or_default()),
            )
        })
        .collect()
}

/// The whole log, read from the start.
///
/// # Panics
/// When the store fails.
pub async fn read_log(store: &Arc<dyn EventStore>) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut after = Position::START;
    loop {
        let page = store
            .read_all(after, 1000)
            .await
            .unwrap_or_else(|e| panic!("reading the log: {e}"));
        let Some(last) = page.last() else {
            return all;
        };
        after = last.position;
        all.extend(page);
    }
}

/// The balances as a fold of `log` gives them.
///
/// # Panics
/// When an account event cannot be decoded.
pub fn fold(log: &[RecordedEvent]) -> Balances {
    let mut model = Balances::new();
    for event in log {
        if is_account(event) && AccountEvent::moves_money(&event.event_type) {
            let change = balance_change(PROJECTION, event).unwrap_or_else(|e| panic!("{e}"));
            let row = model
                .entry(event.stream_id.as_str().to_owned())
                .or_default();
            row.0 += change;
            row.1 += 1;
        }
    }
    model
}
