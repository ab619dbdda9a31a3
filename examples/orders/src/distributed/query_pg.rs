//! The query service on PostgreSQL and Redis.
//!
//! It never reads the order service's store. The order events reach it
//! through RabbitMQ, and an [`es_core::replica::ReplicaHandler`] copies them
//! into a replica log in the query service's own schema: the same events, in
//! each order's own order, whatever the broker's redeliveries. From there:
//!
//! - es-projections' PostgreSQL runner keeps the order read model (batch and
//!   checkpoint in one transaction, one active runner across processes with
//!   takeover);
//! - full-text search runs on PostgreSQL text search;
//! - hot order details are cached in Redis with version-guarded writes;
//! - `min_position` read-your-writes works from any process: each row keeps
//!   the order service's position of the last event it reflects, and a
//!   reader re-checks it each time the checkpoint's `NOTIFY` says the
//!   projection moved;
//! - an order's history is read from the replica, with the order service's
//!   positions and recording times.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use es_core::replica::ReplicaHandler;
use es_core::{
    CancellationToken, EventCodec, EventStore, Position, Projection, ProjectionError, RecordedEvent,
};
use es_postgres::sqlx::postgres::{PgListener, PgRow};
use es_postgres::sqlx::{self, PgConnection, PgPool, Row};
use es_postgres::PgEventStore;
use es_projections::postgres::{CheckpointWatcher, PgProjection, PgProjectionRunner};
use es_projections::{OnError, RedisSink, RunnerOptions};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::order::{Order, OrderEvent, OrderStatus};
use crate::query::{
    history, is_order_event, source_of, HistoryEvent, ListFilter, OrderItemView, OrderPage,
    OrderQueries, OrderView, Stats, StatusStats, MAX_WAIT,
};
use crate::{Error, Money, Result};

/// The projection's name (its checkpoint).
pub(super) const PROJECTION: &str = "orders_read_model";

const COLUMNS: &str = "order_id, customer_email, items, total, status, created_at, completed_at, cancellation_reason, version";

/// A position as the two `bigint` columns that store it.
fn position_columns(position: Position) -> (i64, i64) {
    let part = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    (part(position.major()), part(position.minor()))
}

/// How long an order's details stay in Redis.
const CACHE_TTL: Duration = Duration::from_secs(600);

/// The Redis cache of order details, as this process reaches it.
///
/// Redis may be out of reach at start-up, or fail a write while the read
/// model moves on; then entries in Redis (this process's or another's) may
/// be older than the read model. Such a cache has missed writes: this
/// process reads PostgreSQL instead, and [`keep_cache`] clears the whole
/// cache as soon as Redis answers, after which it is used again.
#[derive(Debug, Default)]
struct OrderCache {
    sink: OnceLock<RedisSink>,
    /// Writes missed since the last clear.
    missed: AtomicU64,
}

impl OrderCache {
    /// The sink, when connected and no write was missed since the last
    /// clear.
    fn usable(&self) -> Option<&RedisSink> {
        if self.missed.load(Ordering::SeqCst) == 0 {
            self.sink.get()
        } else {
            None
        }
    }

    /// Writes an order's details at `version` (version-guarded: an older
    /// write never replaces a newer one), or counts the write as missed.
    async fn put(&self, view: &OrderView, version: u64) {
        let written = match self.sink.get() {
            Some(sink) => sink
                .put_json(&view.order_id.to_string(), version, view)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            None => Err("Redis not connected".to_owned()),
        };
        if let Err(error) = written {
            self.missed.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(%error, order_id = %view.order_id, "order cache write missed; the cache is bypassed until it is cleared");
        }
    }
}

/// Connects the cache when it is not, and clears it after missed writes,
/// every 2 s until `stop` is cancelled.
async fn keep_cache(
    cache: Arc<OrderCache>,
    redis_url: String,
    prefix: String,
    stop: CancellationToken,
) {
    loop {
        if cache.sink.get().is_none() {
            match RedisSink::connect(&redis_url, &prefix).await {
                Ok(sink) => {
                    let _ = cache.sink.set(sink.with_ttl(CACHE_TTL));
                    tracing::info!(redis_url = %es_core::redact_url(&redis_url), "Redis connected");
                }
                Err(error) => {
                    tracing::debug!(%error, redis_url = %es_core::redact_url(&redis_url), "Redis still unavailable")
                }
            }
        }
        let missed = cache.missed.load(Ordering::SeqCst);
        if let (Some(sink), true) = (cache.sink.get(), missed > 0) {
            match sink.clear().await {
                // A write missed during the clear keeps it bypassed.
                Ok(deleted) => {
                    if cache
                        .missed
                        .compare_exchange(missed, 0, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        tracing::info!(
                            missed,
                            deleted,
                            "order cache cleared after missed writes; in use again"
                        );
                    }
                }
                Err(error) => tracing::warn!(%error, "order cache not cleared yet"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// The runner of the orders read model in `schema` (its model in
/// `<schema>_rm`), projecting `replica` decoded through `codec`.
fn order_runner(
    pool: &PgPool,
    replica: &PgEventStore,
    schema: &str,
    codec: EventCodec<OrderEvent>,
    cache: Arc<OrderCache>,
    channel: &str,
) -> Result<PgProjectionRunner<PgOrderProjection>> {
    let projection = Arc::new(PgOrderProjection {
        codec,
        cache,
        channel: channel.to_owned(),
    });
    let store: Arc<dyn EventStore> = Arc::new(replica.clone());
    Ok(PgProjectionRunner::new(
        pool.clone(),
        schema,
        &format!("{schema}_rm"),
        store,
        projection,
    )?
    .with_leader_check(Duration::from_millis(500))
    .with_options(
        RunnerOptions::default()
            .batch_size(500)
            .on_error(OnError::DeadLetter)
            .max_consecutive_failures(u32::MAX),
    ))
}

/// Applies the parked events of the orders read model in `schema` again,
/// without running the query service: what `orders replay-parked` does. The
/// Redis cache is not written; its entries expire.
///
/// # Errors
/// The database or the replica failing: nothing is applied.
pub(crate) async fn replay_parked(
    pool: &PgPool,
    replica: &PgEventStore,
    schema: &str,
    codec: EventCodec<OrderEvent>,
) -> Result<es_projections::postgres::ReplayReport> {
    let runner = order_runner(
        pool,
        replica,
        schema,
        codec,
        Arc::new(OrderCache::default()),
        &format!("{schema}_terminal"),
    )?;
    Ok(runner.replay_parked().await?)
}

/// The projection writing the `orders` table (and the Redis cache).
pub(crate) struct PgOrderProjection {
    codec: EventCodec<OrderEvent>,
    cache: Arc<OrderCache>,
    channel: String,
}

impl std::fmt::Debug for PgOrderProjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOrderProjection")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

fn invalid(event: &RecordedEvent, reason: impl std::fmt::Display) -> ProjectionError {
    ProjectionError::invalid(PROJECTION, event, reason)
}

fn storage(e: sqlx::Error) -> ProjectionError {
    // A database failure is the runner's to retry.
    ProjectionError::storage(PROJECTION, e)
}

/// A failure to write `event`: the event's own when PostgreSQL refused its
/// data (the runner parks it and goes on), the runner's to retry otherwise.
fn failed(event: &RecordedEvent, e: sqlx::Error) -> ProjectionError {
    if super::is_data_exception(&e) {
        invalid(event, e)
    } else {
        storage(e)
    }
}

/// The words PostgreSQL text search indexes for an order: the email, its
/// parts, and the product names.
fn search_text(email: &str, names: &[&str]) -> String {
    let mut text = String::from(email);
    text.push(' ');
    text.extend(
        email
            .chars()
            .map(|c| if c.is_alphanumeric() { c } else { ' ' }),
    );
    for n in names {
        text.push(' ');
        text.push_str(n);
    }
    text
}

/// A `to_tsquery` expression matching every word of `q` as a prefix.
pub(super) fn tsquery(q: &str) -> Option<String> {
    let words: Vec<String> = q
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| format!("{}:*", w.to_lowercase()))
        .collect();
    (!words.is_empty()).then(|| words.join(" & "))
}

/// An order, the status an event moves it to, and the completion time or
/// the reason when the event sets them.
type Move<'a> = (Uuid, OrderStatus, Option<DateTime<Utc>>, Option<&'a str>);

/// Where an order event moves its order; `None` for the creation.
fn moved_to(event: &OrderEvent) -> Option<Move<'_>> {
    Some(match event {
        OrderEvent::OrderCreated(_) => return None,
        OrderEvent::OrderInventoryConfirmed(e) => {
            (e.order_id, OrderStatus::InventoryConfirmed, None, None)
        }
        OrderEvent::OrderPaymentConfirmed(e) => {
            (e.order_id, OrderStatus::PaymentConfirmed, None, None)
        }
        OrderEvent::OrderCompleted(e) => (
            e.order_id,
            OrderStatus::Completed,
            Some(e.completed_at),
            None,
        ),
        OrderEvent::OrderCancelled(e) => (
            e.order_id,
            OrderStatus::Cancelled,
            None,
            Some(e.reason.as_str()),
        ),
    })
}

fn view_of(row: &PgRow) -> std::result::Result<(OrderView, u64), String> {
    let items: serde_json::Value = row.try_get("items").map_err(|e| e.to_string())?;
    let items: Vec<OrderItemView> = serde_json::from_value(items).map_err(|e| e.to_string())?;
    let total: String = row.try_get("total").map_err(|e| e.to_string())?;
    let status: String = row.try_get("status").map_err(|e| e.to_string())?;
    let version: i64 = row.try_get("version").map_err(|e| e.to_string())?;
    Ok((
        OrderView {
            order_id: row.try_get("order_id").map_err(|e| e.to_string())?,
            customer_email: row.try_get("customer_email").map_err(|e| e.to_string())?,
            items,
            total: total.parse::<Money>().map_err(|e| e.to_string())?,
            status: status.parse::<OrderStatus>()?,
            created_at: row.try_get("created_at").map_err(|e| e.to_string())?,
            completed_at: row.try_get("completed_at").map_err(|e| e.to_string())?,
            cancellation_reason: row
                .try_get("cancellation_reason")
                .map_err(|e| e.to_string())?,
        },
        u64::try_from(version).unwrap_or_default(),
    ))
}

impl Projection for PgOrderProjection {
    type Tx = PgConnection;

    fn name(&self) -> &str {
        PROJECTION
    }

    fn accepts(&self, event_type: &str) -> bool {
        is_order_event(event_type)
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
    ) -> std::result::Result<(), ProjectionError> {
        if event.stream_id.category() != <Order as es_core::Aggregate>::TYPE {
            return Ok(());
        }
        let decoded = self.codec.decode(event).map_err(|e| invalid(event, e))?;
        let version = i64::try_from(event.stream_version).map_err(|e| invalid(event, e))?;
        let source = source_of(event);
        let (source_major, source_minor) = position_columns(source.position);
        let row = match &decoded {
            OrderEvent::OrderCreated(e) => {
                let items: Vec<OrderItemView> = e.items.iter().map(OrderItemView::of).collect();
                let names: Vec<&str> = e.items.iter().map(|l| l.product_name.as_str()).collect();
                let items = serde_json::to_value(&items).map_err(|e| invalid(event, e))?;
                sqlx::query(&format!(
                    "INSERT INTO orders (order_id, customer_email, items, total, total_minor, status, created_at, version, search, source_major, source_minor)
                     VALUES ($1, $2, $3, $4, $5, 'Pending', $6, $7, to_tsvector('simple', $8), $9, $10)
                     ON CONFLICT (order_id) DO NOTHING RETURNING {COLUMNS}"
                ))
                .bind(e.order_id)
                .bind(&e.customer_email)
                .bind(items)
                .bind(e.total.to_string())
                .bind(i64::try_from(e.total.minor_units()).unwrap_or(i64::MAX))
                .bind(e.placed_at)
                .bind(version)
                .bind(search_text(&e.customer_email, &names))
                .bind(source_major)
                .bind(source_minor)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| failed(event, e))?
            }
            other => {
                let Some((order_id, status, completed_at, reason)) = moved_to(other) else {
                    return Ok(());
                };
                sqlx::query(&format!(
                    "UPDATE orders SET status = $2, version = $3,
                        completed_at = coalesce($4, completed_at),
                        cancellation_reason = coalesce($5, cancellation_reason),
                        source_major = $6, source_minor = $7
                     WHERE order_id = $1 AND version < $3 RETURNING {COLUMNS}"
                ))
                .bind(order_id)
                .bind(status.as_str())
                .bind(version)
                .bind(completed_at)
                .bind(reason)
                .bind(source_major)
                .bind(source_minor)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| failed(event, e))?
            }
        };
        let Some(row) = row else {
            return Ok(());
        };
        let written = view_of(&row).map_err(|e| invalid(event, e))?;
        if written.0.status.is_terminal() {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(&self.channel)
                .bind(terminal_note(&written.0))
                .execute(&mut *tx)
                .await
                .map_err(|e| failed(event, e))?;
        }
        self.written(written, source.recorded_at).await;
        Ok(())
    }
}

impl PgOrderProjection {
    /// After a row is written: the finished order's metrics (`at`: when its
    /// last event was recorded), and the cache.
    async fn written(&self, (view, version): (OrderView, u64), at: DateTime<Utc>) {
        if view.status.is_terminal() {
            let outcome = if view.status == OrderStatus::Completed {
                "completed"
            } else {
                "cancelled"
            };
            ::metrics::counter!("orders_finished_total", "outcome" => outcome).increment(1);
            let seconds = (at - view.created_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            ::metrics::histogram!("order_end_to_end_seconds", "outcome" => outcome)
                .record(seconds.max(0.0));
        }
        self.cache.put(&view, version).await;
    }

    /// A batch in three statements: the new orders' rows, each other order's
    /// row moved to the last of its events in the batch (what applying them
    /// one by one leaves: only a terminal event sets the completion time or
    /// the reason), and the terminal orders' notifications.
    async fn apply_all(
        &self,
        tx: &mut PgConnection,
        events: &[&RecordedEvent],
    ) -> std::result::Result<(), ProjectionError> {
        let mut created = Created::default();
        let mut last: BTreeMap<Uuid, Moved> = BTreeMap::new();
        let mut recorded_at: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
        for &event in events {
            if event.stream_id.category() != <Order as es_core::Aggregate>::TYPE {
                continue;
            }
            let decoded = self.codec.decode(event).map_err(|e| invalid(event, e))?;
            let version = i64::try_from(event.stream_version).map_err(|e| invalid(event, e))?;
            let source = source_of(event);
            let (major, minor) = position_columns(source.position);
            let (order_id, status, completed_at, reason) = match &decoded {
                OrderEvent::OrderCreated(e) => {
                    created
                        .add(e, version, (major, minor))
                        .map_err(|r| invalid(event, r))?;
                    recorded_at.insert(e.order_id, source.recorded_at);
                    continue;
                }
                other => moved_to(other).ok_or_else(|| invalid(event, "not an order's move"))?,
            };
            recorded_at.insert(order_id, source.recorded_at);
            let moved = Moved {
                status,
                version,
                completed_at,
                reason: reason.map(str::to_owned),
                source: (major, minor),
            };
            match last.get(&order_id) {
                Some(known) if known.version >= version => {}
                _ => {
                    last.insert(order_id, moved);
                }
            }
        }
        // Whatever fails here, the runner applies the batch again event by
        // event, which names the event at fault.
        let failed_batch = storage;
        let mut rows = Vec::new();
        if !created.ids.is_empty() {
            rows.extend(
                sqlx::query(&format!(
                    "INSERT INTO orders (order_id, customer_email, items, total, total_minor, status, created_at, version, search, source_major, source_minor)
                     SELECT id, email, items, total, minor, 'Pending', at, v, to_tsvector('simple', words), sm, sn
                     FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::text[], $5::int8[], $6::timestamptz[], $7::int8[], $8::text[], $9::int8[], $10::int8[])
                       AS u(id, email, items, total, minor, at, v, words, sm, sn)
                     ON CONFLICT (order_id) DO NOTHING RETURNING {COLUMNS}"
                ))
                .bind(&created.ids)
                .bind(&created.emails)
                .bind(&created.items)
                .bind(&created.totals)
                .bind(&created.minors)
                .bind(&created.at)
                .bind(&created.versions)
                .bind(&created.words)
                .bind(&created.majors)
                .bind(&created.minors_of_source)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed_batch)?,
            );
        }
        if !last.is_empty() {
            let ids: Vec<Uuid> = last.keys().copied().collect();
            let moved: Vec<&Moved> = last.values().collect();
            let statuses: Vec<&str> = moved.iter().map(|m| m.status.as_str()).collect();
            let versions: Vec<i64> = moved.iter().map(|m| m.version).collect();
            let completed: Vec<Option<DateTime<Utc>>> =
                moved.iter().map(|m| m.completed_at).collect();
            let reasons: Vec<Option<&str>> = moved.iter().map(|m| m.reason.as_deref()).collect();
            let majors: Vec<i64> = moved.iter().map(|m| m.source.0).collect();
            let minors: Vec<i64> = moved.iter().map(|m| m.source.1).collect();
            let updated = sqlx::query(&format!(
                "UPDATE orders SET status = u.st, version = u.v,
                    completed_at = coalesce(u.ca, completed_at),
                    cancellation_reason = coalesce(u.r, cancellation_reason),
                    source_major = u.sm, source_minor = u.sn
                 FROM UNNEST($1::uuid[], $2::text[], $3::int8[], $4::timestamptz[], $5::text[], $6::int8[], $7::int8[])
                   AS u(id, st, v, ca, r, sm, sn)
                 WHERE order_id = u.id AND version < u.v RETURNING {COLUMNS}"
            ))
            .bind(&ids)
            .bind(&statuses)
            .bind(&versions)
            .bind(&completed)
            .bind(&reasons)
            .bind(&majors)
            .bind(&minors)
            .fetch_all(&mut *tx)
            .await
            .map_err(failed_batch)?;
            rows.extend(updated);
        }
        // An order both created and moved in the batch has two rows: the
        // later one is what the cache and the metrics take.
        let mut written: BTreeMap<Uuid, (OrderView, u64)> = BTreeMap::new();
        let mut terminal = Vec::new();
        for row in &rows {
            let view = view_of(row)
                .map_err(|e| ProjectionError::storage(PROJECTION, std::io::Error::other(e)))?;
            if view.0.status.is_terminal() {
                terminal.push(terminal_note(&view.0));
            }
            match written.get(&view.0.order_id) {
                Some(known) if known.1 >= view.1 => {}
                _ => {
                    written.insert(view.0.order_id, view);
                }
            }
        }
        if !terminal.is_empty() {
            sqlx::query("SELECT pg_notify($1, id) FROM UNNEST($2::text[]) AS id")
                .bind(&self.channel)
                .bind(&terminal)
                .execute(&mut *tx)
                .await
                .map_err(failed_batch)?;
        }
        for view in written.into_values() {
            let at = recorded_at
                .get(&view.0.order_id)
                .copied()
                .unwrap_or_else(Utc::now);
            self.written(view, at).await;
        }
        Ok(())
    }
}

/// The new orders of a batch, as the columns of their rows.
#[derive(Default)]
struct Created {
    ids: Vec<Uuid>,
    emails: Vec<String>,
    items: Vec<serde_json::Value>,
    totals: Vec<String>,
    minors: Vec<i64>,
    at: Vec<DateTime<Utc>>,
    versions: Vec<i64>,
    words: Vec<String>,
    majors: Vec<i64>,
    minors_of_source: Vec<i64>,
}

impl Created {
    fn add(
        &mut self,
        e: &crate::messages::OrderCreated,
        version: i64,
        (major, minor): (i64, i64),
    ) -> std::result::Result<(), serde_json::Error> {
        if self.ids.contains(&e.order_id) {
            return Ok(());
        }
        let items: Vec<OrderItemView> = e.items.iter().map(OrderItemView::of).collect();
        let names: Vec<&str> = e.items.iter().map(|l| l.product_name.as_str()).collect();
        self.items.push(serde_json::to_value(&items)?);
        self.ids.push(e.order_id);
        self.emails.push(e.customer_email.clone());
        self.totals.push(e.total.to_string());
        self.minors
            .push(i64::try_from(e.total.minor_units()).unwrap_or(i64::MAX));
        self.at.push(e.placed_at);
        self.versions.push(version);
        self.words.push(search_text(&e.customer_email, &names));
        self.majors.push(major);
        self.minors_of_source.push(minor);
        Ok(())
    }
}

/// An order's row moved to one of its events.
struct Moved {
    status: OrderStatus,
    version: i64,
    completed_at: Option<DateTime<Utc>>,
    reason: Option<String>,
    source: (i64, i64),
}

impl PgProjection for PgOrderProjection {
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[&RecordedEvent],
    ) -> Option<std::result::Result<(), ProjectionError>> {
        Some(self.apply_all(conn, events).await)
    }

    async fn setup(&self, conn: &mut PgConnection) -> std::result::Result<(), ProjectionError> {
        for sql in [
            "CREATE TABLE IF NOT EXISTS orders (
                order_id uuid PRIMARY KEY,
                customer_email text NOT NULL,
                items jsonb NOT NULL,
                total text NOT NULL,
                total_minor bigint NOT NULL,
                status text NOT NULL,
                created_at timestamptz NOT NULL,
                completed_at timestamptz,
                cancellation_reason text,
                version bigint NOT NULL,
                search tsvector NOT NULL,
                source_major bigint NOT NULL DEFAULT 0,
                source_minor bigint NOT NULL DEFAULT 0
            )",
            // Tables made before rows kept their source position.
            "ALTER TABLE orders ADD COLUMN IF NOT EXISTS source_major bigint NOT NULL DEFAULT 0",
            "ALTER TABLE orders ADD COLUMN IF NOT EXISTS source_minor bigint NOT NULL DEFAULT 0",
            "CREATE INDEX IF NOT EXISTS orders_by_created ON orders (created_at DESC, order_id DESC)",
            "CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_email, created_at DESC, order_id DESC)",
            "CREATE INDEX IF NOT EXISTS orders_by_status ON orders (status)",
            "CREATE INDEX IF NOT EXISTS orders_search ON orders USING gin (search)",
        ] {
            sqlx::query(sql).execute(&mut *conn).await.map_err(storage)?;
        }
        Ok(())
    }
}

/// The clients waiting for an order to end, each woken with the order's
/// view when its notification carries it (`None`: read it again).
type Waiters = Arc<Mutex<HashMap<Uuid, Vec<oneshot::Sender<Option<OrderView>>>>>>;

/// The longest terminal-order notification: PostgreSQL refuses a payload of
/// 8,000 bytes or more.
const NOTE_LIMIT: usize = 7_900;

/// What a terminal order's notification says: its view as JSON, so that a
/// waiting client needs no read, or only its id when the view is too long.
fn terminal_note(view: &OrderView) -> String {
    match serde_json::to_string(view) {
        Ok(json) if json.len() <= NOTE_LIMIT => json,
        _ => view.order_id.to_string(),
    }
}

/// The order a terminal notification is about, and its view when the
/// notification carries one. What does not parse is ignored: a waiter
/// re-reads within a second anyway.
fn parse_note(payload: &str) -> Option<(Uuid, Option<OrderView>)> {
    if payload.starts_with('{') {
        let view: OrderView = serde_json::from_str(payload).ok()?;
        return Some((view.order_id, Some(view)));
    }
    payload.parse().ok().map(|id| (id, None))
}

/// The query service over PostgreSQL and Redis.
pub struct PgQueryService {
    pool: PgPool,
    model: String,
    schema: String,
    replica: PgEventStore,
    cache: Arc<OrderCache>,
    watcher: CheckpointWatcher,
    waiters: Waiters,
    runner: Arc<PgProjectionRunner<PgOrderProjection>>,
}

impl std::fmt::Debug for PgQueryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgQueryService")
            .field("schema", &self.schema)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl PgQueryService {
    /// Migrates `schema` (the replica log and the runner's checkpoints),
    /// starts the runner over `replica`, a store on `schema` (it waits as a
    /// standby while another process holds the projection), connects the
    /// Redis cache (keys prefixed `prefix`) and follows terminal-order
    /// notifications, until `stop` is cancelled; events are decoded through
    /// `codec`. Feed the replica with `PgQueryService::replica_handler`.
    ///
    /// # Errors
    /// When PostgreSQL cannot be reached or the schema names are invalid.
    pub async fn start(
        pool: PgPool,
        replica: PgEventStore,
        schema: &str,
        redis_url: &str,
        prefix: &str,
        codec: EventCodec<OrderEvent>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>> {
        es_projections::postgres::migrate(&pool, schema)
            .await
            .map_err(|e| Error::caused(format!("migrating {schema}"), e))?;
        let model = format!("{schema}_rm");
        let channel = format!("{schema}_terminal");
        let cache = Arc::new(OrderCache::default());
        let cache_prefix = format!("{prefix}order:");
        match RedisSink::connect(redis_url, &cache_prefix).await {
            Ok(sink) => {
                let _ = cache.sink.set(sink.with_ttl(CACHE_TTL));
            }
            Err(error) => {
                tracing::warn!(%error, redis_url = %es_core::redact_url(redis_url), "Redis unavailable: order details are served from PostgreSQL until it answers");
            }
        }
        tokio::spawn(keep_cache(
            Arc::clone(&cache),
            redis_url.to_owned(),
            cache_prefix,
            stop.clone(),
        ));
        let runner = Arc::new(order_runner(
            &pool,
            &replica,
            schema,
            codec,
            Arc::clone(&cache),
            &channel,
        )?);
        {
            let runner = Arc::clone(&runner);
            // The runner stops when the database fails mid-batch: start it
            // again from its checkpoint (it waits as a standby while another
            // process holds the projection).
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    match runner.run(stop.clone()).await {
                        Ok(()) => return,
                        Err(error) => {
                            tracing::warn!(%error, "projection runner failed; restarting")
                        }
                    }
                    if stop.is_cancelled() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
        let watcher = CheckpointWatcher::start(pool.clone(), schema).await?;
        let waiters: Waiters = Arc::default();
        {
            let waiters = Arc::clone(&waiters);
            let pool = pool.clone();
            tokio::spawn(async move {
                loop {
                    let mut listener = match PgListener::connect_with(&pool).await {
                        Ok(l) => l,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    if listener.listen(&channel).await.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            note = listener.try_recv() => match note {
                                Ok(Some(note)) => {
                                    if let Some((id, view)) = parse_note(note.payload()) {
                                        let ready = waiters.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
                                        for tx in ready.into_iter().flatten() {
                                            let _ = tx.send(view.clone());
                                        }
                                    }
                                }
                                // Reconnected (notifications may be lost): wake everyone to re-check.
                                Ok(None) => wake_all(&waiters),
                                Err(_) => {
                                    wake_all(&waiters);
                                    break;
                                }
                            }
                        }
                    }
                }
            });
        }
        Ok(Arc::new(Self {
            pool,
            model,
            schema: schema.to_owned(),
            replica,
            cache,
            watcher,
            waiters,
            runner,
        }))
    }

    /// The bus handler copying the order service's events into the replica
    /// log the read model is projected from.
    pub(crate) fn replica_handler(&self) -> ReplicaHandler {
        ReplicaHandler::new(Arc::new(self.replica.clone()))
    }

    /// The order service's position of the last event the order's row
    /// reflects.
    async fn source_position(&self, order_id: Uuid) -> Result<Option<Position>> {
        let row: Option<(i64, i64)> = sqlx::query_as(&format!(
            "SELECT source_major, source_minor FROM \"{}\".orders WHERE order_id = $1",
            self.model
        ))
        .bind(order_id)
        .fetch_optional(&self.pool)
        .await?;
        let part = |v: i64| u64::try_from(v).unwrap_or_default();
        Ok(row.map(|(major, minor)| Position::new(part(major), part(minor))))
    }

    async fn load_row(&self, order_id: Uuid) -> Result<Option<(OrderView, u64)>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM \"{}\".orders WHERE order_id = $1",
            self.model
        ))
        .bind(order_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| view_of(&r).map_err(Error::internal))
            .transpose()
    }
}

#[async_trait]
impl OrderQueries for PgQueryService {
    async fn lag(&self) -> Result<es_projections::Lag> {
        let at = es_projections::postgres::load_checkpoint(&self.pool, &self.schema, PROJECTION)
            .await?
            .unwrap_or(Position::START);
        es_projections::telemetry::measure_lag(&self.replica, at, 10_000)
            .await
            .map_err(Error::from)
    }

    async fn wait_for(&self, order_id: Uuid, position: Position) -> Result<()> {
        let deadline = tokio::time::Instant::now() + MAX_WAIT;
        loop {
            // The checkpoint first: a batch committed after this read wakes
            // the wait below, so no write is missed between the two reads.
            let seen =
                es_projections::postgres::load_checkpoint(&self.pool, &self.schema, PROJECTION)
                    .await?
                    .unwrap_or(Position::START);
            if self.source_position(order_id).await? >= Some(position) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.watcher.wait_past(PROJECTION, seen, left).await {
                Ok(()) => {}
                Err(es_projections::Error::Timeout { .. }) => {
                    return Err(Error::NotCaughtUp {
                        what: format!(
                            "order {order_id} at position {position} within {MAX_WAIT:?}"
                        ),
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn order(&self, order_id: Uuid, min_position: Option<Position>) -> Result<OrderView> {
        let key = order_id.to_string();
        if let Some(position) = min_position {
            self.wait_for(order_id, position).await?;
        } else if let Some(cache) = self.cache.usable() {
            if let Ok(Some(hit)) = cache.get_json::<OrderView>(&key).await {
                ::metrics::counter!("query_cache_total", "result" => "hit").increment(1);
                return Ok(hit.value);
            }
            ::metrics::counter!("query_cache_total", "result" => "miss").increment(1);
        }
        let (view, version) = self
            .load_row(order_id)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: format!("order {order_id}"),
            })?;
        if let Some(cache) = self.cache.usable() {
            let _ = cache.put_json(&key, version, &view).await;
        }
        Ok(view)
    }

    async fn fresh(&self, order_id: Uuid) -> Result<OrderView> {
        self.load_row(order_id)
            .await?
            .map(|v| v.0)
            .ok_or_else(|| Error::NotFound {
                what: format!("order {order_id}"),
            })
    }

    async fn wait_terminal(&self, order_id: Uuid, timeout: Duration) -> Option<OrderView> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut first = true;
        loop {
            let (tx, rx) = oneshot::channel();
            self.waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(order_id)
                .or_default()
                .push(tx);
            // The first look may be the cache: the projection writes it
            // before it commits, so an order that ended before this waiter
            // was registered shows there as ended (a failed cache write
            // makes the cache unusable here), and one that ends after
            // wakes the waiter. Later looks read the row.
            let cached = match (first, self.cache.usable()) {
                (true, Some(cache)) => cache
                    .get_json::<OrderView>(&order_id.to_string())
                    .await
                    .ok()
                    .flatten()
                    .map(|hit| hit.value),
                _ => None,
            };
            first = false;
            let view = match cached {
                Some(view) => Some(view),
                None => self.load_row(order_id).await.ok().flatten().map(|(v, _)| v),
            };
            if let Some(view) = view.filter(|v| v.status.is_terminal()) {
                return Some(view);
            }
            // Woken by the notification (which usually carries the view),
            // or re-check every second.
            let wake = tokio::time::Instant::now() + Duration::from_secs(1);
            match tokio::time::timeout_at(wake.min(deadline), rx).await {
                Ok(Ok(Some(view))) if view.status.is_terminal() => return Some(view),
                Ok(_) => continue,
                Err(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                self.waiters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&order_id);
                return None;
            }
        }
    }

    async fn list(&self, filter: ListFilter) -> Result<OrderPage> {
        let ListFilter {
            customer_email: email,
            status,
            limit,
            cursor,
        } = filter;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM \"{}\".orders
             WHERE ($1::text IS NULL OR customer_email = $1)
               AND ($2::text IS NULL OR status = $2)
               AND ($3::timestamptz IS NULL OR (created_at, order_id) < ($3, $4))
             ORDER BY created_at DESC, order_id DESC LIMIT $5",
            self.model
        ))
        .bind(email.as_deref())
        .bind(status.map(OrderStatus::as_str))
        .bind(cursor.map(|c| c.0))
        .bind(cursor.map(|c| c.1))
        .bind(i64::try_from(limit + 1).unwrap_or(101))
        .fetch_all(&self.pool)
        .await?;
        let mut orders = Vec::new();
        for row in &rows {
            orders.push(view_of(row).map_err(Error::internal)?.0);
        }
        let more = orders.len() > limit;
        orders.truncate(limit);
        let next_cursor = if more {
            orders.last().map(|o| {
                format!(
                    "{}_{}",
                    o.created_at.timestamp_micros(),
                    o.order_id.simple()
                )
            })
        } else {
            None
        };
        Ok(OrderPage {
            orders,
            next_cursor,
        })
    }

    async fn search(&self, q: &str, limit: usize) -> Result<Vec<OrderView>> {
        let Some(query) = tsquery(q) else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM \"{}\".orders WHERE search @@ to_tsquery('simple', $1)
             ORDER BY created_at DESC, order_id DESC LIMIT $2",
            self.model
        ))
        .bind(query)
        .bind(i64::try_from(limit).unwrap_or(100))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| view_of(r).map(|v| v.0).map_err(Error::internal))
            .collect()
    }

    async fn stats(&self) -> Result<Stats> {
        let rows: Vec<(String, i64, Option<i64>)> = sqlx::query_as(&format!(
            "SELECT status, count(*), sum(total_minor)::bigint FROM \"{}\".orders GROUP BY status",
            self.model
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut stats = Stats {
            total_orders: 0,
            by_status: BTreeMap::new(),
        };
        for status in OrderStatus::ALL {
            stats
                .by_status
                .insert(status.as_str().to_owned(), StatusStats::default());
        }
        for (status, count, revenue) in rows {
            let count = u64::try_from(count).unwrap_or_default();
            stats.total_orders += count;
            stats.by_status.insert(
                status,
                StatusStats {
                    count,
                    revenue: Money::from_minor(
                        u64::try_from(revenue.unwrap_or(0)).unwrap_or_default(),
                    ),
                },
            );
        }
        Ok(stats)
    }

    async fn history(&self, order_id: Uuid) -> Result<Vec<HistoryEvent>> {
        history(&self.replica, order_id).await
    }

    async fn parked(&self) -> Result<u64> {
        Ok(es_projections::postgres::parked_count(&self.pool, &self.schema, PROJECTION).await?)
    }

    async fn parked_events(&self, limit: u32) -> Result<Vec<es_projections::ParkedEvent>> {
        Ok(
            es_projections::postgres::parked_events(&self.pool, &self.schema, PROJECTION, limit)
                .await?,
        )
    }

    async fn replay_parked(&self) -> Result<es_projections::postgres::ReplayReport> {
        Ok(self.runner.replay_parked().await?)
    }

    async fn position(&self) -> Result<Position> {
        Ok(
            es_projections::postgres::load_checkpoint(&self.pool, &self.schema, PROJECTION)
                .await?
                .unwrap_or(Position::START),
        )
    }
}

fn wake_all(waiters: &Waiters) {
    let all: Vec<_> = waiters
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain()
        .collect();
    for (_, txs) in all {
        for tx in txs {
            let _ = tx.send(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A terminal notification carries the order's view, or its id alone
    /// when the view would not fit; what does not parse is no order.
    #[test]
    fn a_terminal_note_carries_the_view_when_it_fits() {
        let mut view = OrderView {
            order_id: Uuid::now_v7(),
            customer_email: "ada@example.com".into(),
            items: Vec::new(),
            total: Money::from_minor(500),
            status: OrderStatus::Completed,
            created_at: Utc::now(),
            completed_at: Some(Utc::now()),
            cancellation_reason: None,
        };
        let note = terminal_note(&view);
        assert_eq!(parse_note(&note), Some((view.order_id, Some(view.clone()))));
        view.cancellation_reason = Some("x".repeat(NOTE_LIMIT));
        let note = terminal_note(&view);
        assert_eq!(note, view.order_id.to_string());
        assert_eq!(parse_note(&note), Some((view.order_id, None)));
        assert_eq!(parse_note("{\"order_id\": 1}"), None);
        assert_eq!(parse_note("not an id"), None);
    }

    #[test]
    fn search_queries() {
        assert_eq!(tsquery("gus@").as_deref(), Some("gus:*"));
        assert_eq!(tsquery("Blue Widget").as_deref(), Some("blue:* & widget:*"));
        assert_eq!(tsquery("@@"), None);
        assert!(search_text("ada@example.com", &["Widget"]).contains("ada example com"));
    }

    /// One order's events as the replica holds them, versions from 1.
    fn recorded(order_id: Uuid, events: &[OrderEvent], first_position: u64) -> Vec<RecordedEvent> {
        let codec = EventCodec::<OrderEvent>::new();
        let stream = es_core::StreamId::for_aggregate("order", order_id).unwrap();
        (1u64..)
            .zip(events)
            .map(|(version, event)| {
                let new = codec.encode(event, es_core::Metadata::new()).unwrap();
                RecordedEvent {
                    event_id: new.event_id,
                    stream_id: stream.clone(),
                    stream_version: version,
                    position: Position::new(first_position + version, 0),
                    event_type: new.event_type,
                    schema_version: new.schema_version,
                    payload: new.payload,
                    metadata: new.metadata,
                    recorded_at: Utc::now(),
                    tags: Default::default(),
                }
            })
            .collect()
    }

    /// The rows of `schema`'s `orders`, in order id order.
    async fn rows(conn: &mut PgConnection, schema: &str) -> Vec<(OrderView, u64)> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM \"{schema}\".orders ORDER BY order_id"
        ))
        .fetch_all(&mut *conn)
        .await
        .unwrap()
        .iter()
        .map(|row| view_of(row).unwrap())
        .collect()
    }

    /// A batch in three statements leaves the rows that applying its events
    /// one by one leaves, late and repeated events included. Needs
    /// PostgreSQL (DATABASE_URL).
    #[tokio::test]
    async fn a_batch_writes_what_its_events_one_by_one_write() {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let pool = PgPool::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL is not reachable at {url}: {e}"));
        let projection = PgOrderProjection {
            codec: EventCodec::new(),
            cache: Arc::new(OrderCache::default()),
            channel: "orders_batch_test".into(),
        };
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let line = crate::messages::OrderLine {
            product_id: Uuid::now_v7(),
            product_name: "Blue Widget".into(),
            unit_price: Money::from_minor(250),
            quantity: 2,
        };
        let created = |order_id| {
            OrderEvent::OrderCreated(crate::messages::OrderCreated {
                order_id,
                customer_email: "ada@example.com".into(),
                items: vec![line.clone()],
                total: Money::from_minor(500),
                card_token: "tok_ok".into(),
                payment_timeout_ms: 30_000,
                placed_at: Utc::now(),
            })
        };
        let completed_at = Utc::now();
        let a_events = recorded(
            a,
            &[
                created(a),
                OrderEvent::OrderInventoryConfirmed(crate::messages::OrderInventoryConfirmed {
                    order_id: a,
                }),
                OrderEvent::OrderPaymentConfirmed(crate::messages::OrderPaymentConfirmed {
                    order_id: a,
                    transaction_id: "txn".into(),
                }),
                OrderEvent::OrderCompleted(crate::messages::OrderCompleted {
                    order_id: a,
                    customer_email: "ada@example.com".into(),
                    completed_at,
                }),
            ],
            0,
        );
        let b_events = recorded(
            b,
            &[
                created(b),
                OrderEvent::OrderCancelled(crate::messages::OrderCancelled {
                    order_id: b,
                    customer_email: "ada@example.com".into(),
                    reason: "payment declined".into(),
                    by_customer: false,
                    cancelled_at: Utc::now(),
                }),
            ],
            10,
        );
        // Interleaved, with a repeated creation and, later, a late event.
        let batch: Vec<&RecordedEvent> = vec![
            &a_events[0],
            &b_events[0],
            &a_events[1],
            &a_events[0],
            &b_events[1],
            &a_events[2],
            &a_events[3],
        ];
        let late = [&a_events[1]];
        let mut results = Vec::new();
        for batched in [true, false] {
            let schema = format!("orders_batch_{}", Uuid::now_v7().simple());
            let mut conn = pool.acquire().await.unwrap();
            sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
                .execute(&mut *conn)
                .await
                .unwrap();
            sqlx::query(&format!("SET search_path TO \"{schema}\""))
                .execute(&mut *conn)
                .await
                .unwrap();
            projection.setup(&mut conn).await.unwrap();
            for events in [&batch[..], &late[..]] {
                if batched {
                    projection.apply_all(&mut conn, events).await.unwrap();
                } else {
                    for event in events {
                        projection.apply(&mut conn, event).await.unwrap();
                    }
                }
            }
            results.push(rows(&mut conn, &schema).await);
            sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        assert_eq!(results[0], results[1]);
        let by_id: HashMap<Uuid, &(OrderView, u64)> =
            results[0].iter().map(|r| (r.0.order_id, r)).collect();
        assert_eq!(by_id[&a].0.status, OrderStatus::Completed);
        assert_eq!(by_id[&a].1, 4);
        assert!(by_id[&a].0.completed_at.is_some());
        assert_eq!(by_id[&b].0.status, OrderStatus::Cancelled);
        assert_eq!(
            by_id[&b].0.cancellation_reason.as_deref(),
            Some("payment declined")
        );
        assert_eq!(by_id[&a].0.items, vec![OrderItemView::of(&line)]);
    }

    /// An `OrderCreated` as the previous release stored it (schema version
    /// 1, its time named `created_at`) is read by this code on PostgreSQL
    /// through the event schema: the aggregate decides on it, and the read
    /// model, fed from the store's log, shows when the order was placed.
    /// Needs PostgreSQL (DATABASE_URL).
    #[tokio::test]
    async fn an_order_created_in_its_first_shape_is_read_on_postgres() {
        use es_core::{EventStore, ExpectedVersion, Metadata, NewEvent, Payload};

        let (pool, schema) = es_postgres::testing::fresh_schema_with(4).await;
        let store: Arc<dyn EventStore> = Arc::new(PgEventStore::new(pool.clone(), schema.clone()));
        let order_id = Uuid::now_v7();
        let placed_at = "2025-03-04T05:06:07Z";
        let v1 = Payload::from_json(format!(
            r#"{{"order_id":"{order_id}","customer_email":"ada@example.com","items":[],"total":"5.00","card_token":"tok_ok","payment_timeout_ms":30000,"created_at":"{placed_at}"}}"#
        ))
        .unwrap();
        let stream = es_core::StreamId::for_aggregate("order", order_id).unwrap();
        store
            .append(
                &stream,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("OrderCreated", 1, v1, Metadata::new())],
            )
            .await
            .unwrap();

        let events = crate::schema::build().unwrap();
        let orders = crate::repository::<crate::order::Order>(Arc::clone(&store), &events);
        let committed = orders
            .execute(
                order_id,
                crate::order::OrderCommand::ConfirmInventory,
                &Metadata::new(),
            )
            .await
            .unwrap();
        assert_eq!(committed.stream_version, 2);

        let projection = PgOrderProjection {
            codec: events.codec(),
            cache: Arc::new(OrderCache::default()),
            channel: "orders_evolution_test".into(),
        };
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query(&format!("SET search_path TO \"{schema}\""))
            .execute(&mut *conn)
            .await
            .unwrap();
        projection.setup(&mut conn).await.unwrap();
        let log = store.read_all(Position::START, 100).await.unwrap();
        assert_eq!(log.len(), 2);
        projection
            .apply_all(&mut conn, &log.iter().collect::<Vec<_>>())
            .await
            .unwrap();
        let rows = rows(&mut conn, &schema).await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0.status, OrderStatus::InventoryConfirmed);
        assert_eq!(
            rows[0].0.created_at.to_rfc3339(),
            "2025-03-04T05:06:07+00:00"
        );
        // Without the schema's upcaster, the first shape does not decode.
        let plain = EventCodec::<OrderEvent>::new();
        assert!(plain.decode(&log[0]).is_err());
    }

    /// A write missed while Redis was out of reach makes this process read
    /// PostgreSQL, and makes `keep_cache` clear what others cached, once
    /// Redis answers; then the cache is used again. Needs Redis (REDIS_URL).
    #[tokio::test]
    async fn a_missed_write_bypasses_the_cache_until_it_is_cleared() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("orders-test:{}:order:", Uuid::new_v4().simple());
        let other = RedisSink::connect(&url, &prefix)
            .await
            .unwrap_or_else(|e| panic!("Redis is not reachable at {url}: {e}"));
        let mut view = OrderView {
            order_id: Uuid::now_v7(),
            customer_email: "ada@example.com".into(),
            items: Vec::new(),
            total: Money::ZERO,
            status: OrderStatus::Pending,
            created_at: Utc::now(),
            completed_at: None,
            cancellation_reason: None,
        };
        let key = view.order_id.to_string();
        // Another process cached the order as it was.
        other.put_json(&key, 1, &view).await.unwrap();

        // This one projects its next version without reaching Redis.
        let cache = Arc::new(OrderCache::default());
        view.status = OrderStatus::Cancelled;
        cache.put(&view, 2).await;
        assert!(cache.usable().is_none());

        let stop = CancellationToken::new();
        let keeper = tokio::spawn(keep_cache(
            Arc::clone(&cache),
            url.clone(),
            prefix.clone(),
            stop.clone(),
        ));
        let started = std::time::Instant::now();
        while cache.usable().is_none() {
            assert!(started.elapsed() < Duration::from_secs(20), "never cleared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            other.get(&key).await.unwrap(),
            None,
            "the stale entry is gone"
        );
        cache.put(&view, 2).await;
        let cached = other.get_json::<OrderView>(&key).await.unwrap().unwrap();
        assert_eq!(
            (cached.version, cached.value.status),
            (2, OrderStatus::Cancelled)
        );
        stop.cancel();
        keeper.await.unwrap();
        other.clear().await.unwrap();
    }
}
