//! [`PgEventStore`]: the event store on PostgreSQL.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use es_core::subscription::catch_up_then_live;
use es_core::{
    AppendResult, EventStore, ExpectedVersion, Metadata, NewEvent, Payload, Position,
    RecordedEvent, StoreError, StreamId,
};
use futures::stream::BoxStream;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tokio::sync::{watch, Notify};
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{store_error, PgError, Result};
use crate::group::{GroupCommit, Turn, Waiting, DEFAULT_MAX_GROUP, DEFAULT_MAX_IN_FLIGHT};
use crate::schema::{quoted, validate_schema};

/// The shortest time between two `NOTIFY`s of one store under load.
const NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

/// The default largest batch one append takes.
pub const DEFAULT_MAX_BATCH: usize = 10_000;

/// The gap-free event store on PostgreSQL.
///
/// - `append` is one call of a PL/pgSQL function (one round trip whatever the
///   batch size) that checks the expected version inside the database,
///   recognises an idempotent replay by event ids, and inserts the batch with
///   `UNNEST`.
/// - The global log is ordered by `(transaction id, sequence)`; the
///   [`Position`] of an event is that pair. `read_all` and `subscribe_all` read
///   only rows of transactions older than the oldest transaction still running
///   (`pg_snapshot_xmin(pg_current_snapshot())`), so an event committed late by
///   a slow writer is never skipped: it is held back until every older writer
///   has finished. See [`PgEventStore::holdback`] for what that costs when
///   a transaction stays open.
/// - `subscribe_all` is woken by appends of this process at once, by other
///   processes through `LISTEN`/`NOTIFY`, and polls as a fallback.
/// - Concurrent appends are group-committed: at most
///   [`DEFAULT_MAX_IN_FLIGHT`](crate::DEFAULT_MAX_IN_FLIGHT) run at once, and
///   appends arriving meanwhile are written together, in one transaction,
///   each decided on its own (see [`PgEventStore::with_group_commit`]).
///
/// Cloning is cheap and shares the pool and the wake-up machinery.
#[derive(Clone, Debug)]
pub struct PgEventStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    pool: PgPool,
    schema: String,
    channel: String,
    sql: Sql,
    settings: Settings,
    wake: watch::Sender<u64>,
    notify_signal: Arc<Notify>,
    notifier_started: AtomicBool,
    listener_started: AtomicBool,
    group: Option<GroupCommit>,
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    max_batch: usize,
    page_size: usize,
    poll: Duration,
    read_wait: Duration,
    notify: bool,
    /// Appends in flight at once; 0 turns group commit off.
    max_in_flight: usize,
    max_group: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_batch: DEFAULT_MAX_BATCH,
            page_size: 1_000,
            poll: Duration::from_millis(500),
            read_wait: Duration::from_secs(1),
            notify: true,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_group: DEFAULT_MAX_GROUP,
        }
    }
}

#[derive(Debug)]
struct Sql {
    append_fast: String,
    append: String,
    append_group: String,
    append_group_fast: String,
    read_stream: String,
    read_all: String,
    pending: String,
    last_pending: String,
    xmin: String,
    head: String,
    version: String,
    holdback: String,
}

const COLUMNS: &str = "global_position, transaction_id, stream_id, stream_version, event_id, \
                       event_type, schema_version, payload::text, metadata::text, recorded_at";

/// The columns of `read_stream`: the stream id is known, so not sent back.
const STREAM_COLUMNS: &str = "global_position, transaction_id, '', stream_version, event_id, \
                              event_type, schema_version, payload::text, metadata::text, recorded_at";

/// The log's readable horizon: rows of transactions below it are final.
const XMIN: &str = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

impl Sql {
    fn new(schema: &str) -> Self {
        let s = quoted(schema);
        Self {
            append_fast: format!(
                "WITH cur AS (SELECT coalesce((SELECT stream_version FROM {s}.events \
                                WHERE tenant = $1 AND stream_id = $2 \
                                ORDER BY stream_version DESC LIMIT 1), 0) AS v), \
                 ok AS (SELECT v FROM cur WHERE $3 = -1 OR ($3 = -2 AND v = 0) OR ($3 = -3 AND v > 0) OR $3 = v), \
                 ins AS (INSERT INTO {s}.events (transaction_id, tenant, stream_id, stream_version, \
                                event_id, event_type, schema_version, payload, metadata) \
                         SELECT pg_current_xact_id()::text::bigint, $1, $2, ok.v + u.i, u.id, u.ty, u.sv, \
                                u.pl::json, u.md::json \
                           FROM ok, unnest($4::uuid[], $5::text[], $6::int4[], $7::text[], $8::text[]) \
                                WITH ORDINALITY AS u(id, ty, sv, pl, md, i) \
                          ORDER BY u.i \
                         RETURNING transaction_id, global_position, stream_version) \
                 SELECT (SELECT max(stream_version) FROM ins), (SELECT max(transaction_id) FROM ins), \
                        (SELECT max(global_position) FROM ins), (SELECT v FROM cur), \
                        CASE WHEN NOT EXISTS (SELECT 1 FROM ok) \
                             THEN EXISTS (SELECT 1 FROM {s}.events WHERE event_id = ANY ($4::uuid[])) END"
            ),
            append: format!("SELECT outcome, out_version, out_tx, out_position, out_event FROM {s}.append_events($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
            append_group: format!("SELECT item, outcome, out_version, out_tx, out_position, out_event FROM {s}.append_group($1, $2, $3, $4, $5, $6, $7, $8)"),
            // A group of appends to distinct streams in one plain statement:
            // every expected version checked, then every event inserted; if
            // any expectation fails nothing is inserted (the rows say which)
            // and the append_group function decides the appends one by one.
            append_group_fast: format!(
                "WITH req AS (SELECT r.stream, r.expected, r.cnt, r.k, \
                                     (sum(r.cnt) OVER (ORDER BY r.k) - r.cnt)::int8 AS off \
                                FROM unnest($1::text[], $2::int8[], $3::int4[]) WITH ORDINALITY AS r(stream, expected, cnt, k)), \
                 cur AS (SELECT req.*, coalesce((SELECT e.stream_version FROM {s}.events e \
                                 WHERE e.tenant = '' AND e.stream_id = req.stream \
                                 ORDER BY e.stream_version DESC LIMIT 1), 0) AS v FROM req), \
                 bad AS (SELECT k FROM cur WHERE NOT (expected = -1 OR (expected = -2 AND v = 0) \
                                 OR (expected = -3 AND v > 0) OR expected = v)), \
                 ins AS (INSERT INTO {s}.events (transaction_id, tenant, stream_id, stream_version, \
                                event_id, event_type, schema_version, payload, metadata) \
                         SELECT pg_current_xact_id()::text::bigint, '', cur.stream, cur.v + (u.i - cur.off), \
                                u.id, u.ty, u.sv, u.pl::json, u.md::json \
                           FROM unnest($4::uuid[], $5::text[], $6::int4[], $7::text[], $8::text[]) \
                                WITH ORDINALITY AS u(id, ty, sv, pl, md, i) \
                           JOIN cur ON u.i > cur.off AND u.i <= cur.off + cur.cnt \
                          WHERE NOT EXISTS (SELECT 1 FROM bad) \
                          ORDER BY u.i \
                         RETURNING stream_id, transaction_id, global_position, stream_version) \
                 SELECT cur.k::int4, max(ins.stream_version), max(ins.transaction_id), max(ins.global_position) \
                   FROM cur LEFT JOIN ins ON ins.stream_id = cur.stream \
                  GROUP BY cur.k ORDER BY cur.k"
            ),
            read_stream: format!(
                "SELECT {STREAM_COLUMNS} FROM {s}.events WHERE tenant = '' AND stream_id = $1 \
                 AND stream_version >= $2 ORDER BY stream_version LIMIT $3"
            ),
            read_all: format!(
                "SELECT {COLUMNS} FROM {s}.events WHERE (transaction_id, global_position) > ($1, $2) \
                 AND transaction_id < {XMIN} ORDER BY transaction_id, global_position LIMIT $3"
            ),
            // Not filtered by the horizon: a row that became readable after
            // the page was read (its older transaction ended in between)
            // must be found too, or the page would come back without it.
            pending: format!(
                "SELECT min(transaction_id) FROM {s}.events \
                 WHERE (transaction_id, global_position) > ($1, $2)"
            ),
            last_pending: format!("SELECT max(transaction_id) FROM {s}.events WHERE transaction_id >= {XMIN}"),
            xmin: format!("SELECT {XMIN}"),
            head: format!(
                "SELECT transaction_id, global_position FROM {s}.events WHERE transaction_id < {XMIN} \
                 ORDER BY transaction_id DESC, global_position DESC LIMIT 1"
            ),
            version: format!(
                "SELECT coalesce(max(stream_version), 0) FROM {s}.events WHERE tenant = '' AND stream_id = $1"
            ),
            holdback: format!(
                "WITH snap AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin, \
                                      pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax), \
                      oldest AS (SELECT pid, datname, extract(epoch FROM now() - xact_start)::float8 AS age \
                                   FROM pg_stat_activity WHERE backend_xid IS NOT NULL \
                                  ORDER BY age(backend_xid) DESC LIMIT 1) \
                 SELECT snap.xmin, snap.xmax, \
                        (SELECT count(*) FROM {s}.events WHERE transaction_id >= snap.xmin), \
                        oldest.pid, oldest.datname::text, oldest.age \
                   FROM snap LEFT JOIN oldest ON true"
            ),
        }
    }
}

/// How far the oldest running transaction holds the readable log back.
///
/// Readers of the global log only see transactions older than the oldest one
/// still running anywhere in the cluster (the snapshot's xmin). A transaction
/// that has written something (and so has a transaction id) and stays open —
/// a stuck migration, an idle-in-transaction session, a forgotten prepared
/// transaction — stalls every subscriber until it ends, while appends carry on.
/// Watch [`Holdback::events_held_back`] and [`Holdback::oldest_writer_age`];
/// read-only transactions never hold the log back.
#[derive(Clone, Debug, PartialEq)]
pub struct Holdback {
    /// The snapshot's xmin: the oldest transaction id still running.
    pub xmin: u64,
    /// The snapshot's xmax: the next transaction id to be assigned.
    pub xmax: u64,
    /// Committed events not readable yet because an older transaction is
    /// still running.
    pub events_held_back: u64,
    /// The backend process of the oldest running transaction with an id, when
    /// visible.
    pub oldest_writer_pid: Option<i32>,
    /// The database that transaction runs in.
    pub oldest_writer_database: Option<String>,
    /// How long that transaction has been open.
    pub oldest_writer_age: Option<Duration>,
}

impl Holdback {
    /// How many transaction ids are in flight between xmin and xmax.
    pub fn xids_in_flight(&self) -> u64 {
        self.xmax.saturating_sub(self.xmin)
    }
}

type EventRow = (
    i64,
    i64,
    String,
    i64,
    Uuid,
    String,
    i32,
    String,
    String,
    DateTime<Utc>,
);

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn position_of(tx: i64, position: i64) -> Position {
    Position::new(to_u64(tx), to_u64(position))
}

pub(crate) fn position_parts(position: Position) -> Result<(i64, i64)> {
    match (
        i64::try_from(position.major()),
        i64::try_from(position.minor()),
    ) {
        (Ok(major), Ok(minor)) => Ok((major, minor)),
        _ => Err(PgError::PositionOutOfRange { position }),
    }
}

fn decode(row: EventRow, stream: Option<&StreamId>) -> Result<RecordedEvent> {
    let (
        global,
        tx,
        stream_id,
        version,
        event_id,
        event_type,
        schema_version,
        payload,
        metadata,
        recorded_at,
    ) = row;
    let stream_id = match stream {
        Some(s) => s.clone(),
        None => StreamId::new(&stream_id).map_err(|e| PgError::Corrupt {
            reason: e.to_string(),
        })?,
    };
    let metadata: Metadata = if metadata == "{}" {
        Metadata::default()
    } else {
        serde_json::from_str(&metadata).map_err(|e| PgError::Corrupt {
            reason: format!("metadata of event {event_id}: {e}"),
        })?
    };
    Ok(RecordedEvent {
        event_id,
        stream_id,
        stream_version: to_u64(version),
        position: position_of(tx, global),
        event_type: event_type.into(),
        schema_version: u32::try_from(schema_version).unwrap_or(0),
        payload: Payload::from_trusted_json(payload),
        metadata,
        recorded_at,
    })
}

fn expected_code(expected: ExpectedVersion) -> i64 {
    match expected {
        ExpectedVersion::Any => -1,
        ExpectedVersion::NoStream => -2,
        ExpectedVersion::StreamExists => -3,
        ExpectedVersion::Exact(v) => i64::try_from(v).unwrap_or(i64::MAX),
    }
}

/// Checks a batch before it goes to the database: nothing is written when this
/// fails.
fn validate(events: &[NewEvent], max_batch: usize) -> Result<(), StoreError> {
    if events.len() > max_batch {
        return Err(StoreError::BatchTooLarge {
            len: events.len(),
            max: max_batch,
        });
    }
    es_core::store::validate_batch(events)?;
    match events
        .iter()
        .find(|e| i32::try_from(e.schema_version).is_err())
    {
        Some(event) => Err(StoreError::InvalidEvent {
            event_id: event.event_id,
            reason: "the schema version is larger than 2^31 - 1".into(),
        }),
        None => Ok(()),
    }
}

/// The event whose payload PostgreSQL refused: the first one that is not
/// JSON, else the first holding a `\u0000` (valid JSON PostgreSQL cannot
/// store), else the first of the batch.
fn refused_payload(events: &[NewEvent]) -> Uuid {
    events
        .iter()
        .find(|e| Payload::from_json(e.payload.as_str()).is_err())
        .or_else(|| {
            events
                .iter()
                .find(|e| e.payload.as_str().contains("\\u0000"))
        })
        .or_else(|| events.first())
        .map_or_else(Uuid::nil, |e| e.event_id)
}

/// A batch encoded as the arrays the append statements take.
struct Batch<'a> {
    events: &'a [NewEvent],
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    versions: Vec<i32>,
    payloads: Vec<&'a str>,
    metadata: Vec<String>,
}

impl<'a> Batch<'a> {
    fn encode(events: &'a [NewEvent], max_batch: usize) -> Result<Self, StoreError> {
        validate(events, max_batch)?;
        let n = events.len();
        let mut batch = Batch {
            events,
            ids: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
        };
        for event in events {
            batch.ids.push(event.event_id);
            batch.types.push(&*event.event_type);
            batch
                .versions
                .push(i32::try_from(event.schema_version).unwrap_or(i32::MAX));
            batch.payloads.push(event.payload.as_str());
            batch.metadata.push(if event.metadata.is_empty() {
                "{}".to_owned()
            } else {
                serde_json::to_string(&event.metadata).map_err(|e| StoreError::InvalidEvent {
                    event_id: event.event_id,
                    reason: format!("metadata cannot be serialized: {e}"),
                })?
            });
        }
        Ok(batch)
    }

    fn map_error(&self, error: sqlx::Error, guarded: bool) -> StoreError {
        if !guarded && is_unique_violation(&error) {
            StoreError::Backend {
                source: Box::new(RaceLost),
            }
        } else if is_invalid_json(&error) {
            StoreError::InvalidPayload {
                event_id: refused_payload(self.events),
            }
        } else {
            store_error(error)
        }
    }
}

type OutcomeRow = (i32, Option<i64>, Option<i64>, Option<i64>, Option<Uuid>);

/// An `append_group` row: the append's 1-based index, then its outcome row.
type GroupRow = (
    i32,
    i32,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<Uuid>,
);

/// A row of the one-statement group: index, last version, transaction and
/// position of what it wrote (none when nothing was written).
type FastGroupRow = (i32, Option<i64>, Option<i64>, Option<i64>);

/// What an `append_events` outcome row means for the caller.
fn decide(
    stream: &StreamId,
    expected: ExpectedVersion,
    row: OutcomeRow,
) -> Result<AppendResult, StoreError> {
    let (outcome, version, tx, position, event) = row;
    let conflict = |reason| StoreError::IdempotencyConflict {
        stream: stream.clone(),
        event_id: event.unwrap_or_default(),
        reason,
    };
    match outcome {
        0 | 1 => Ok(AppendResult {
            stream_version: to_u64(version.unwrap_or(0)),
            position: match (tx, position) {
                (Some(tx), Some(p)) => position_of(tx, p),
                _ => Position::START,
            },
            written: outcome == 0,
        }),
        2 => Err(StoreError::WrongExpectedVersion {
            stream: stream.clone(),
            expected,
            actual: to_u64(version.unwrap_or(0)),
        }),
        10 => Err(conflict("only part of the batch is already stored")),
        11 => Err(conflict("the event id is stored in another stream")),
        12 => Err(conflict("the batch is stored at other positions")),
        13 => Err(conflict("the stored event has another type or payload")),
        other => Err(PgError::Corrupt {
            reason: format!("append_events returned unknown outcome {other}"),
        }
        .into()),
    }
}

/// The arrays both group statements take: one entry per append (stream,
/// expected version, event count), then the appends' events one after the
/// other.
struct GroupArrays<'a> {
    streams: Vec<&'a str>,
    expected: Vec<i64>,
    counts: Vec<i32>,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    versions: Vec<i32>,
    payloads: Vec<&'a str>,
    metadata: Vec<&'a str>,
}

impl<'a> GroupArrays<'a> {
    /// The appends `included` (indexes into `group`) with their encoded
    /// batches.
    fn new(group: &'a [Waiting], included: &[usize], batches: &'a [Batch<'a>]) -> Self {
        let total: usize = batches.iter().map(|b| b.ids.len()).sum();
        let mut arrays = Self {
            streams: Vec::with_capacity(included.len()),
            expected: Vec::with_capacity(included.len()),
            counts: Vec::with_capacity(included.len()),
            ids: Vec::with_capacity(total),
            types: Vec::with_capacity(total),
            versions: Vec::with_capacity(total),
            payloads: Vec::with_capacity(total),
            metadata: Vec::with_capacity(total),
        };
        for (&i, batch) in included.iter().zip(batches) {
            arrays.streams.push(group[i].stream.as_str());
            arrays.expected.push(expected_code(group[i].expected));
            arrays
                .counts
                .push(i32::try_from(batch.ids.len()).unwrap_or(i32::MAX));
            arrays.ids.extend_from_slice(&batch.ids);
            arrays.types.extend_from_slice(&batch.types);
            arrays.versions.extend_from_slice(&batch.versions);
            arrays.payloads.extend_from_slice(&batch.payloads);
            arrays
                .metadata
                .extend(batch.metadata.iter().map(String::as_str));
        }
        arrays
    }

    /// `sql` (`$1`..`$8`) with the arrays bound.
    fn query<'q, O>(
        &'q self,
        sql: &'q str,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>
    where
        O: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        sqlx::query_as(sql)
            .bind(&self.streams)
            .bind(&self.expected)
            .bind(&self.counts)
            .bind(&self.ids)
            .bind(&self.types)
            .bind(&self.versions)
            .bind(&self.payloads)
            .bind(&self.metadata)
    }
}

fn no_runtime() -> StoreError {
    StoreError::Unavailable {
        source: "no tokio runtime is left to write the queued appends".into(),
    }
}

/// An append slot, given back (or handed over to the queue) when dropped,
/// also when the append's future is dropped half-way.
struct Slot<'a>(&'a PgEventStore);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.release_slot();
    }
}

fn no_row() -> StoreError {
    PgError::Corrupt {
        reason: "the append statement returned no row".to_owned(),
    }
    .into()
}

/// A concurrent append won a race on a stream version or an event id; the
/// append is decided again.
#[derive(Debug, thiserror::Error)]
#[error("a concurrent append won the race; retrying")]
struct RaceLost;

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "23505"))
}

fn is_race_lost(error: &StoreError) -> bool {
    matches!(error, StoreError::Backend { source } if source.is::<RaceLost>())
}

fn is_invalid_json(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| matches!(&*c, "22P02" | "22P05" | "22025" | "2202E")),
        _ => false,
    }
}

impl PgEventStore {
    /// A store over `pool` whose tables live in `schema` (create them with
    /// [`crate::migrate`]). The schema name is quoted, never spliced raw; use
    /// [`PgEventStore::try_new`] to have it checked up front.
    pub fn new(pool: PgPool, schema: impl Into<String>) -> Self {
        Self::with_parts(pool, schema.into(), Settings::default())
    }

    fn with_parts(pool: PgPool, schema: String, settings: Settings) -> Self {
        let channel = notify_channel(&schema);
        Self {
            shared: Arc::new(Shared {
                sql: Sql::new(&schema),
                pool,
                schema,
                channel,
                group: (settings.max_in_flight > 0)
                    .then(|| GroupCommit::new(settings.max_in_flight, settings.max_group)),
                settings,
                wake: watch::Sender::new(0),
                notify_signal: Arc::new(Notify::new()),
                notifier_started: AtomicBool::new(false),
                listener_started: AtomicBool::new(false),
            }),
        }
    }

    /// Like [`PgEventStore::new`], rejecting a schema name that
    /// [`crate::migrate`] would reject.
    pub fn try_new(pool: PgPool, schema: impl Into<String>) -> Result<Self> {
        let schema = schema.into();
        validate_schema(&schema)?;
        Ok(Self::new(pool, schema))
    }

    /// Connects to `url` (what it leaves out comes from the `PG*` variables),
    /// migrates the default schema `es` and returns the store. See
    /// [`crate::PgConfig`] for the pool size, timeouts and schema.
    pub async fn connect(url: &str) -> Result<Self> {
        crate::PgConfig::from_url(url)?.event_store().await
    }

    fn with_settings(self, f: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.shared.settings;
        f(&mut settings);
        Self::with_parts(
            self.shared.pool.clone(),
            self.shared.schema.clone(),
            settings,
        )
    }

    /// Group commit (on by default): at most `max_in_flight` appends run at
    /// once, each on its own connection; appends that arrive while all of
    /// them run are queued and written together, up to `max_group` (at most
    /// 60) in one statement and one transaction, each decided on its own.
    /// With one writer every append runs at once, as without grouping.
    /// `max_in_flight = 0` turns grouping off: every append runs at once.
    /// Defaults: [`DEFAULT_MAX_IN_FLIGHT`](crate::DEFAULT_MAX_IN_FLIGHT) and
    /// [`DEFAULT_MAX_GROUP`](crate::DEFAULT_MAX_GROUP).
    #[must_use]
    pub fn with_group_commit(self, max_in_flight: usize, max_group: usize) -> Self {
        self.with_settings(|s| {
            s.max_in_flight = max_in_flight;
            s.max_group = max_group;
        })
    }

    /// The largest batch one append takes (default [`DEFAULT_MAX_BATCH`]).
    #[must_use]
    pub fn with_max_batch(self, max: usize) -> Self {
        self.with_settings(|s| s.max_batch = max.max(1))
    }

    /// How often an idle subscription polls when no wake-up arrives
    /// (default 500 ms).
    #[must_use]
    pub fn with_poll_interval(self, poll: Duration) -> Self {
        self.with_settings(|s| s.poll = poll.max(Duration::from_millis(1)))
    }

    /// How long `read_all`, `head` and subscriptions wait for committed
    /// events held back by an older transaction still running before
    /// answering without them (default 1 s). See [`Holdback`].
    #[must_use]
    pub fn with_read_wait(self, wait: Duration) -> Self {
        self.with_settings(|s| s.read_wait = wait)
    }

    /// How many events a subscription reads per query (default 1,000).
    #[must_use]
    pub fn with_page_size(self, page_size: usize) -> Self {
        self.with_settings(|s| s.page_size = page_size.max(1))
    }

    /// Whether appends wake subscribers of other processes with `NOTIFY`
    /// (default true). Without it they rely on polling.
    #[must_use]
    pub fn with_notify(self, notify: bool) -> Self {
        self.with_settings(|s| s.notify = notify)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// The schema the tables live in.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// The `LISTEN`/`NOTIFY` channel appends are announced on.
    pub fn channel(&self) -> &str {
        &self.shared.channel
    }

    /// Appends inside the caller's transaction (or on any connection), so the
    /// events commit together with the caller's other writes. Subscribers are
    /// woken when the transaction commits (a `NOTIFY` is queued in it).
    pub async fn append_in_tx(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let result = self
            .append_on(&mut *conn, stream, expected, &events, true)
            .await?;
        if result.written && self.shared.settings.notify {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(&self.shared.channel)
                .execute(&mut *conn)
                .await
                .map_err(store_error)?;
        }
        Ok(result)
    }

    async fn append_on<'c, E>(
        &self,
        executor: E,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        guarded: bool,
    ) -> Result<AppendResult, StoreError>
    where
        E: sqlx::PgExecutor<'c>,
    {
        let batch = Batch::encode(events, self.shared.settings.max_batch)?;
        self.call_append(executor, stream, expected, &batch, guarded)
            .await
    }

    /// The common case in one plain statement: read the version, check the
    /// expectation and insert the batch, or report the conflict. `None` when
    /// the expectation failed and ids of the batch are already stored (the
    /// append function then decides the replay).
    async fn append_fast(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        batch: &Batch<'_>,
    ) -> Result<Option<AppendResult>, StoreError> {
        let row: (Option<i64>, Option<i64>, Option<i64>, i64, Option<bool>) =
            sqlx::query_as(&self.shared.sql.append_fast)
                .bind("")
                .bind(stream.as_str())
                .bind(expected_code(expected))
                .bind(&batch.ids)
                .bind(&batch.types)
                .bind(&batch.versions)
                .bind(&batch.payloads)
                .bind(&batch.metadata)
                // fetch_all, not fetch_one: it returns only after the server
                // reports the statement (and so its autocommit) complete;
                // fetch_one returns at the first row, before the commit.
                .fetch_all(&self.shared.pool)
                .await
                .map_err(|e| batch.map_error(e, false))?
                .pop()
                .ok_or_else(no_row)?;
        match row {
            (Some(version), Some(tx), Some(position), _, _) => Ok(Some(AppendResult {
                stream_version: to_u64(version),
                position: position_of(tx, position),
                written: true,
            })),
            // The expectation failed and no event of the batch is stored: a
            // plain conflict, decided in this one round trip.
            (_, _, _, actual, Some(false)) => Err(StoreError::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: to_u64(actual),
            }),
            // Some ids are stored: the append function decides the replay.
            _ => Ok(None),
        }
    }

    async fn call_append<'c, E>(
        &self,
        executor: E,
        stream: &StreamId,
        expected: ExpectedVersion,
        batch: &Batch<'_>,
        guarded: bool,
    ) -> Result<AppendResult, StoreError>
    where
        E: sqlx::PgExecutor<'c>,
    {
        let row: OutcomeRow = sqlx::query_as(&self.shared.sql.append)
            .bind("")
            .bind(stream.as_str())
            .bind(expected_code(expected))
            .bind(&batch.ids)
            .bind(&batch.types)
            .bind(&batch.versions)
            .bind(&batch.payloads)
            .bind(&batch.metadata)
            .bind(guarded)
            .fetch_all(executor)
            .await
            .map_err(|e| batch.map_error(e, guarded))?
            .pop()
            .ok_or_else(no_row)?;
        decide(stream, expected, row)
    }

    /// One append on its own: the one-statement fast path, the append
    /// function when ids may be replayed, and a few retries of a lost race.
    async fn append_now(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult, StoreError> {
        let batch = Batch::encode(events, self.shared.settings.max_batch)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // After a few lost races, let the function settle them inside.
            let guarded = attempt > 3;
            if !events.is_empty() && !guarded {
                match self.append_fast(stream, expected, &batch).await {
                    Ok(Some(result)) => return Ok(result),
                    Ok(None) => {}
                    Err(e) if is_race_lost(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
            match self
                .call_append(&self.shared.pool, stream, expected, &batch, guarded)
                .await
            {
                Err(e) if is_race_lost(&e) => continue,
                other => return other,
            }
        }
    }

    /// Writes queued appends as one group, answering each.
    async fn commit_group(&self, mut group: Vec<Waiting>) {
        if let [only] = group.as_slice() {
            let result = self
                .append_now(&only.stream, only.expected, &only.events)
                .await;
            if let Some(only) = group.pop() {
                let _ = only.reply.send(result);
            }
            return;
        }
        // One lock order for every group: no two groups deadlock.
        group.sort_by(|a, b| a.stream.as_str().cmp(b.stream.as_str()));
        let span = tracing::debug_span!("es_postgres.append_group", appends = group.len());
        let answers = self.write_group(&group).instrument(span).await;

        let answers = match answers {
            Ok(answers) => answers,
            Err(error) => {
                // Nothing of the group was written: each append on its own,
                // so each caller gets its own answer.
                tracing::debug!(%error, appends = group.len(), "group append failed; appending one by one");
                let mut answers = Vec::with_capacity(group.len());
                for w in &group {
                    answers.push(self.append_now(&w.stream, w.expected, &w.events).await);
                }
                answers
            }
        };
        for (w, answer) in group.into_iter().zip(answers) {
            let _ = w.reply.send(answer);
        }
    }

    /// One call of `append_group` for the appends that pass the client-side
    /// checks; an answer per append, in order.
    async fn write_group(
        &self,
        group: &[Waiting],
    ) -> Result<Vec<Result<AppendResult, StoreError>>, StoreError> {
        let mut answers: Vec<Option<Result<AppendResult, StoreError>>> =
            Vec::with_capacity(group.len());
        let mut batches = Vec::with_capacity(group.len());
        let mut included = Vec::with_capacity(group.len());
        for (i, w) in group.iter().enumerate() {
            match Batch::encode(&w.events, self.shared.settings.max_batch) {
                Ok(batch) => {
                    answers.push(None);
                    included.push(i);
                    batches.push(batch);
                }
                Err(e) => answers.push(Some(Err(e))),
            }
        }
        let arrays = GroupArrays::new(group, &included, &batches);
        let distinct: BTreeSet<&str> = arrays.streams.iter().copied().collect();
        let mut rows: Vec<GroupRow> = Vec::new();
        if distinct.len() == arrays.streams.len() {
            let fast: Result<Vec<FastGroupRow>, sqlx::Error> = arrays
                .query(&self.shared.sql.append_group_fast)
                .fetch_all(&self.shared.pool)
                .await;
            match fast {
                // Every append written (an append the statement did not write
                // shows no version: then none was, and the function decides).
                Ok(fast)
                    if fast.len() == arrays.streams.len() && fast.iter().all(|r| r.1.is_some()) =>
                {
                    rows = fast
                        .into_iter()
                        .map(|(item, version, tx, position)| (item, 0, version, tx, position, None))
                        .collect();
                }
                Ok(_) => {}
                // A race with a concurrent append, or a replayed id: the
                // function settles it.
                Err(e) if is_unique_violation(&e) => {}
                Err(e) => return Err(store_error(e)),
            }
        }
        if rows.is_empty() {
            rows = arrays
                .query(&self.shared.sql.append_group)
                .fetch_all(&self.shared.pool)
                .await
                .map_err(store_error)?;
        }
        for (item, outcome, version, tx, position, event) in rows {
            let slot = usize::try_from(item)
                .ok()
                .and_then(|k| k.checked_sub(1))
                .and_then(|k| included.get(k).copied());
            if let Some(i) = slot {
                let w = &group[i];
                answers[i] = Some(decide(
                    &w.stream,
                    w.expected,
                    (outcome, version, tx, position, event),
                ));
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    Err(PgError::Corrupt {
                        reason: "append_group returned no row for an append".to_owned(),
                    }
                    .into())
                })
            })
            .collect())
    }

    /// Gives the append slot back, or hands the queue to a task that writes
    /// it group by group.
    fn release_slot(&self) {
        let Some(group) = &self.shared.group else {
            return;
        };
        let Some(first) = group.next_group() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let store = self.clone();
                handle.spawn(async move {
                    let mut next = Some(first);
                    while let Some(waiting) = next {
                        store.commit_group(waiting).await;
                        next = store
                            .shared
                            .group
                            .as_ref()
                            .and_then(GroupCommit::next_group);
                    }
                });
            }
            Err(_) => {
                for w in first {
                    let _ = w.reply.send(Err(no_runtime()));
                }
                group.abandon(no_runtime);
            }
        }
    }

    /// Reads up to `max` events after `after` in log order, only below the
    /// readable horizon. Usable on any connection.
    pub async fn read_all_on<'c, E>(
        &self,
        executor: E,
        after: Position,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>
    where
        E: sqlx::PgExecutor<'c>,
    {
        let (major, minor) = position_parts(after)?;
        let rows: Vec<EventRow> = sqlx::query_as(&self.shared.sql.read_all)
            .bind(major)
            .bind(minor)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(executor)
            .await
            .map_err(store_error)?;
        rows.into_iter()
            .map(|row| decode(row, None).map_err(StoreError::from))
            .collect()
    }

    /// The oldest transaction with committed events after `after`: called
    /// after a short page, so they were not readable when the page was read
    /// (an older transaction was still running), though they may be now.
    async fn first_pending(&self, after: Position) -> Result<Option<i64>, StoreError> {
        let (major, minor) = position_parts(after)?;
        sqlx::query_scalar(&self.shared.sql.pending)
            .bind(major)
            .bind(minor)
            .fetch_one(&self.shared.pool)
            .await
            .map_err(store_error)
    }

    /// Waits (bounded by the read wait) until every transaction older than
    /// `tx` has finished, so rows of `tx` are readable. Returns whether it got
    /// there in time.
    async fn wait_horizon(&self, tx: i64) -> Result<bool, StoreError> {
        let deadline = tokio::time::Instant::now() + self.shared.settings.read_wait;
        let mut delay = Duration::from_millis(1);
        loop {
            let xmin: i64 = sqlx::query_scalar(&self.shared.sql.xmin)
                .fetch_one(&self.shared.pool)
                .await
                .map_err(store_error)?;
            if xmin > tx {
                return Ok(true);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// `read_all` on the pool: when the page is short and committed events
    /// after it are held back by older transactions still running (usually
    /// appends about to commit), waits for them a moment (the read wait) so a
    /// reader sees what was committed before it asked.
    async fn read_all_waiting(
        &self,
        after: Position,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut page = self.read_all_on(&self.shared.pool, after, max).await?;
        if page.len() >= max {
            return Ok(page);
        }
        let from = page.last().map_or(after, |e| e.position);
        let Some(pending) = self.first_pending(from).await? else {
            return Ok(page);
        };
        if !self.wait_horizon(pending).await? {
            tracing::debug!(
                target: "es_postgres::holdback",
                pending_tx = pending,
                "read held back by an older running transaction"
            );
            return Ok(page);
        }
        let more = self
            .read_all_on(&self.shared.pool, from, max - page.len())
            .await?;
        page.extend(more);
        Ok(page)
    }

    /// How far the oldest running transaction holds the readable log back
    /// right now. Export it as a metric (the `tracing` event
    /// `es_postgres::holdback` logs it when a subscription is held back).
    pub async fn holdback(&self) -> Result<Holdback, PgError> {
        let row: (i64, i64, i64, Option<i32>, Option<String>, Option<f64>) =
            sqlx::query_as(&self.shared.sql.holdback)
                .fetch_one(&self.shared.pool)
                .await?;
        Ok(Holdback {
            xmin: to_u64(row.0),
            xmax: to_u64(row.1),
            events_held_back: to_u64(row.2),
            oldest_writer_pid: row.3,
            oldest_writer_database: row.4,
            oldest_writer_age: row
                .5
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64),
        })
    }

    /// Wakes this process's subscribers now (for example after committing a
    /// transaction that used [`PgEventStore::append_in_tx`]).
    pub fn wake_subscribers(&self) {
        self.shared.wake.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn announce(&self) {
        self.wake_subscribers();
        if !self.shared.settings.notify {
            return;
        }
        if !self.shared.notifier_started.swap(true, Ordering::AcqRel) {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(notifier(
                    Arc::downgrade(&self.shared),
                    self.shared.notify_signal.clone(),
                    self.shared.pool.clone(),
                    self.shared.channel.clone(),
                ));
            } else {
                self.shared.notifier_started.store(false, Ordering::Release);
                return;
            }
        }
        self.shared.notify_signal.notify_one();
    }

    fn ensure_listener(&self) {
        if self.shared.listener_started.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let options = (*self.shared.pool.connect_options()).clone();
                let pool = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_lazy_with(options);
                handle.spawn(listener(
                    Arc::downgrade(&self.shared),
                    pool,
                    self.shared.channel.clone(),
                    self.shared.settings.poll,
                ));
            }
            Err(_) => self.shared.listener_started.store(false, Ordering::Release),
        }
    }
}

/// The `NOTIFY` channel of a schema.
pub(crate) fn notify_channel(schema: &str) -> String {
    let mut channel = format!("es_events_{schema}");
    channel.truncate(63);
    channel
}

/// Sends one `NOTIFY` per burst of appends, outside the appends' own
/// transactions (a `NOTIFY` inside them would serialize every commit on the
/// server's notification lock).
async fn notifier(shared: Weak<Shared>, signal: Arc<Notify>, pool: PgPool, channel: String) {
    loop {
        tokio::select! {
            () = signal.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(10)) => {
                if shared.strong_count() == 0 { return; }
                continue;
            }
        }
        if let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
            .bind(&channel)
            .execute(&pool)
            .await
        {
            tracing::debug!(%error, channel, "NOTIFY failed; subscribers elsewhere fall back to polling");
        }
        // At most one NOTIFY per interval under load: appends meanwhile are
        // announced by the next one.
        tokio::time::sleep(NOTIFY_INTERVAL).await;
    }
}

fn bump(shared: &Weak<Shared>) -> bool {
    match shared.upgrade() {
        Some(shared) => {
            shared.wake.send_modify(|v| *v = v.wrapping_add(1));
            true
        }
        None => false,
    }
}

/// Listens on the schema's channel and bumps the wake-up signal; reconnects
/// after a lost connection (and bumps, since a notification may have been
/// missed meanwhile).
async fn listener(shared: Weak<Shared>, pool: PgPool, channel: String, retry: Duration) {
    loop {
        if shared.strong_count() == 0 {
            return;
        }
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, channel, "LISTEN connection failed; polling meanwhile");
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(&channel).await {
            tracing::warn!(%error, channel, "LISTEN failed; polling meanwhile");
            tokio::time::sleep(retry).await;
            continue;
        }
        if !bump(&shared) {
            return;
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(5), listener.try_recv()).await {
                Err(_) => {
                    if shared.strong_count() == 0 {
                        return;
                    }
                }
                Ok(Ok(Some(_))) => {
                    while listener.next_buffered().is_some() {}
                    if !bump(&shared) {
                        return;
                    }
                }
                Ok(Ok(None)) => {
                    tracing::info!(channel, "LISTEN connection lost; reconnecting");
                    if !bump(&shared) {
                        return;
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, channel, "LISTEN connection failed; reconnecting");
                    if !bump(&shared) {
                        return;
                    }
                    tokio::time::sleep(retry.min(Duration::from_secs(1))).await;
                    break;
                }
            }
        }
    }
}

#[async_trait]
impl EventStore for PgEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let first = events.first().map(|e| &e.metadata);
        let span = tracing::debug_span!(
            "es_postgres.append",
            stream = %stream,
            %expected,
            events = events.len(),
            correlation_id = first.and_then(|m| m.correlation_id).map(tracing::field::display),
            causation_id = first.and_then(|m| m.causation_id).map(tracing::field::display),
        );
        let result = async {
            match &self.shared.group {
                Some(group) if !events.is_empty() => {
                    match group.enter(stream.clone(), expected, events) {
                        Turn::Run(stream, expected, events) => {
                            let _slot = Slot(self);
                            self.append_now(&stream, expected, &events).await
                        }
                        Turn::Wait(answer) => answer.await.unwrap_or_else(|_| {
                            Err(StoreError::Unavailable {
                                source: "the append's group was abandoned".into(),
                            })
                        }),
                    }
                }
                _ => self.append_now(stream, expected, &events).await,
            }
        }
        .instrument(span)
        .await?;
        if result.written {
            self.announce();
        }
        Ok(result)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(&self.shared.sql.read_stream)
            .bind(stream.as_str())
            .bind(i64::try_from(from_version).unwrap_or(i64::MAX))
            .bind(i64::try_from(max_count).unwrap_or(i64::MAX))
            .fetch_all(&self.shared.pool)
            .await
            .map_err(store_error)?;
        rows.into_iter()
            .map(|row| decode(row, Some(stream)).map_err(StoreError::from))
            .collect()
    }

    async fn read_all(
        &self,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_all_waiting(after, max_count).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
        let version: i64 = sqlx::query_scalar(&self.shared.sql.version)
            .bind(stream.as_str())
            .fetch_one(&self.shared.pool)
            .await
            .map_err(store_error)?;
        Ok(to_u64(version))
    }

    async fn head(&self) -> Result<Position, StoreError> {
        let pending: Option<i64> = sqlx::query_scalar(&self.shared.sql.last_pending)
            .fetch_one(&self.shared.pool)
            .await
            .map_err(store_error)?;
        if let Some(tx) = pending {
            self.wait_horizon(tx).await?;
        }
        let row: Option<(i64, i64)> = sqlx::query_as(&self.shared.sql.head)
            .fetch_optional(&self.shared.pool)
            .await
            .map_err(store_error)?;
        Ok(row.map_or(Position::START, |(tx, p)| position_of(tx, p)))
    }

    fn subscribe_all(
        &self,
        after: Position,
    ) -> BoxStream<'static, Result<RecordedEvent, StoreError>> {
        self.ensure_listener();
        let store = self.clone();
        catch_up_then_live(
            after,
            self.shared.settings.page_size,
            self.shared.settings.poll,
            self.shared.wake.subscribe(),
            move |after, max| {
                let store = store.clone();
                async move { store.read_all_waiting(after, max).await }
            },
        )
    }
}
