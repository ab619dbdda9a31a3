//! The read side: row decoding, stream and log reads, and the read horizon
//! ([`Holdback`]).

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use es_core::{Metadata, Payload, Position, RecordedEvent, StoreError, StreamEvent, StreamId, Tag};
use futures::future::{BoxFuture, FutureExt, Shared, WeakShared};
use futures::TryStreamExt;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::rows::Page;
use super::PgEventStore;
use crate::error::{store_error, Error, Result};

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

pub(super) type EventRow = (
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
    Option<Vec<String>>,
);

/// A row of the page-and-held-back statement: the oldest held-back
/// transaction, then an event's columns (all NULL for an empty page).
pub(super) type HeldRow = (
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<Uuid>,
    Option<String>,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<Vec<String>>,
);

/// The event of a [`HeldRow`], if it has one.
pub(super) fn held_event(row: HeldRow) -> Option<EventRow> {
    let (_, global, tx, stream, version, id, event_type, schema, payload, metadata, at, tags) = row;
    Some((
        global?,
        tx?,
        stream?,
        version?,
        id?,
        event_type?,
        schema?,
        payload?,
        metadata?,
        at?,
        tags,
    ))
}

pub(super) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(super) fn position_of(tx: i64, position: i64) -> Position {
    Position::new(to_u64(tx), to_u64(position))
}

pub(crate) fn position_parts(position: Position) -> Result<(i64, i64)> {
    match (
        i64::try_from(position.major()),
        i64::try_from(position.minor()),
    ) {
        (Ok(major), Ok(minor)) => Ok((major, minor)),
        _ => Err(Error::PositionOutOfRange { position }),
    }
}

pub(super) fn decode(row: EventRow, stream: Option<&StreamId>) -> Result<RecordedEvent> {
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
        tags,
    ) = row;
    let stream_id = match stream {
        Some(s) => s.clone(),
        None => StreamId::new(&stream_id).map_err(|e| Error::Corrupt {
            reason: e.to_string(),
        })?,
    };
    Ok(RecordedEvent {
        event_id,
        stream_id,
        stream_version: to_u64(version),
        position: position_of(tx, global),
        event_type: event_type.into(),
        schema_version: u32::try_from(schema_version).unwrap_or(0),
        payload: Payload::from_trusted_json(payload),
        metadata: metadata_of(&metadata, event_id)?,
        recorded_at,
        tags: tags_of(tags, event_id)?,
    })
}

/// An event's stored metadata (`{}`, the common case, without parsing).
pub(super) fn metadata_of(text: &str, event_id: Uuid) -> Result<Metadata> {
    if text == "{}" {
        return Ok(Metadata::default());
    }
    serde_json::from_str(text).map_err(|e| Error::Corrupt {
        reason: format!("metadata of event {event_id}: {e}"),
    })
}

/// An event's stored tags.
pub(super) fn tags_of(tags: Option<Vec<String>>, event_id: Uuid) -> Result<BTreeSet<Tag>> {
    tags.unwrap_or_default()
        .into_iter()
        .map(|tag| {
            Tag::new(tag).map_err(|e| Error::Corrupt {
                reason: format!("a tag of event {event_id}: {e}"),
            })
        })
        .collect()
}

impl PgEventStore {
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

    /// Waits (bounded by the read wait) until every transaction older than
    /// `tx` has finished, so rows of `tx` are readable. Returns whether it got
    /// there in time.
    ///
    /// The read that found `tx` held back saw the horizon a moment ago, and a
    /// transaction in flight rarely commits within a millisecond: the first
    /// look at the horizon is after one, each later one after twice the wait
    /// before it.
    pub(super) async fn wait_horizon(&self, tx: i64) -> Result<bool, StoreError> {
        let deadline = tokio::time::Instant::now() + self.shared.settings.read_wait;
        let mut delay = Duration::from_millis(1);
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(Duration::from_millis(50));
            let xmin: i64 = sqlx::query_scalar(&self.shared.sql.xmin)
                .fetch_one(&self.shared.pool)
                .await
                .map_err(store_error)?;
            if xmin > tx {
                return Ok(true);
            }
        }
    }

    /// A page of the log after `after` and, read in the same snapshot, the
    /// oldest transaction whose committed rows are held back by the horizon
    /// (none when nothing is held back).
    async fn read_all_held(
        &self,
        after: Position,
        max: usize,
    ) -> Result<(Vec<RecordedEvent>, Option<i64>), StoreError> {
        let (major, minor) = position_parts(after)?;
        let rows: Vec<HeldRow> = sqlx::query_as(&self.shared.sql.read_all_held)
            .bind(major)
            .bind(minor)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&self.shared.pool)
            .await
            .map_err(store_error)?;
        let held = rows.first().and_then(|row| row.0);
        let mut page = Vec::with_capacity(rows.len());
        for row in rows {
            if let Some(event) = held_event(row) {
                page.push(decode(event, None).map_err(StoreError::from)?);
            }
        }
        Ok((page, held))
    }

    /// `read_all` on the pool: when the page is short and committed events
    /// after it are held back by older transactions still running (usually
    /// appends about to commit), waits for them a moment (the read wait) so a
    /// reader sees what was committed before it asked. The page and the check
    /// for held-back rows are one statement.
    pub(super) async fn read_all_waiting(
        &self,
        after: Position,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let (mut page, held) = self.read_all_held(after, max).await?;
        if page.len() >= max {
            return Ok(page);
        }
        let from = page.last().map_or(after, |e| e.position);
        let Some(pending) = held else {
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

    /// [`read_all_waiting`](Self::read_all_waiting) for a subscription,
    /// shared: subscribers of this store (a relay and a deadline scheduler
    /// of one process, say) woken by the same wake-up ask for the same page,
    /// and one query answers them all. A read is shared only among callers
    /// that saw the same wake-up count when they asked, so it started after
    /// every append that any of them was woken for had committed.
    pub(super) async fn read_all_shared(
        &self,
        after: Position,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let key = (after, max, *self.shared.wake.borrow());
        let (read, id) = {
            let mut reads = self.shared.reads.lock();
            let joined = reads.map.get(&key).and_then(|entry| match &entry.done {
                Some((at, result)) if at.elapsed() < SHARE_WINDOW => {
                    Some(Joined::Done(result.clone()))
                }
                Some(_) => None,
                None => entry
                    .read
                    .upgrade()
                    .map(|read| Joined::Running(read, entry.id)),
            });
            match joined {
                Some(Joined::Done(result)) => return owned(result),
                Some(Joined::Running(read, id)) => (read, id),
                None => {
                    // Reads of earlier wake-ups are no longer joined.
                    reads.map.retain(|k, _| k.2 == key.2);
                    reads.next_id += 1;
                    let id = reads.next_id;
                    let store = self.clone();
                    let read = async move {
                        store.shared.log_reads.fetch_add(1, Ordering::Relaxed);
                        store
                            .read_all_waiting(after, max)
                            .await
                            .map(Arc::new)
                            .map_err(Arc::new)
                    }
                    .boxed()
                    .shared();
                    // The map holds the read weakly: a read every caller has
                    // given up on is dropped, and the store with it.
                    if let Some(weak) = read.downgrade() {
                        reads.map.insert(
                            key,
                            ReadEntry {
                                id,
                                read: weak,
                                done: None,
                            },
                        );
                    }
                    (read, id)
                }
            }
        };
        let result = read.await;
        if let Some(entry) = self.shared.reads.lock().map.get_mut(&key) {
            if entry.id == id && entry.done.is_none() {
                entry.done = Some((Instant::now(), result.clone()));
            }
        }
        owned(result)
    }

    /// Pages of the log this store has read from the database for its
    /// subscriptions (a page shared by several subscribers counts once).
    pub fn log_reads(&self) -> u64 {
        self.shared.log_reads.load(Ordering::Relaxed)
    }

    /// How far the oldest running transaction holds the readable log back
    /// right now. Export it as a metric (the `tracing` event
    /// `es_postgres::holdback` logs it when a subscription is held back).
    pub async fn holdback(&self) -> Result<Holdback, Error> {
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

    /// Up to `max_count` events of `stream` from `from_version` on.
    pub(super) async fn read_stream_page(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = &self.shared.sql.read_stream;
        self.stream_page(sql, stream, from_version, max_count, |page, row| {
            page.recorded_event(row, stream)
        })
        .await
    }

    /// [`Self::read_stream_page`] with only what a replay needs: five columns
    /// instead of ten.
    pub(super) async fn read_stream_replay(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<StreamEvent>, StoreError> {
        let sql = &self.shared.sql.read_stream_replay;
        self.stream_page(sql, stream, from_version, max_count, Page::stream_event)
            .await
    }

    /// [`Self::read_stream_replay`], each event handed to `each` as its row
    /// arrives; the rows after a break are not read.
    pub(super) async fn visit_stream_replay(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
        each: &mut (dyn FnMut(StreamEvent) -> ControlFlow<()> + Send),
    ) -> Result<usize, StoreError> {
        let sql = &self.shared.sql.read_stream_replay;
        self.stream_rows(sql, stream, from_version, max_count, |page, row| {
            Ok(each(page.stream_event(row)?))
        })
        .await
    }

    /// The rows of a stream read `sql` (`$1` the stream, `$2` the first
    /// version, `$3` the most rows), each decoded by `decode`.
    async fn stream_page<T>(
        &self,
        sql: &str,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
        mut decode: impl FnMut(&mut Page, &PgRow) -> crate::error::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let mut decoded = Vec::with_capacity(max_count.min(1_000));
        self.stream_rows(sql, stream, from_version, max_count, |page, row| {
            decoded.push(decode(page, row)?);
            Ok(ControlFlow::Continue(()))
        })
        .await?;
        Ok(decoded)
    }

    /// Hands the rows of a stream read `sql` (`$1` the stream, `$2` the
    /// first version, `$3` the most rows) to `each` in one [`Page`] as they
    /// arrive, while the server still sends the rest, until `each` breaks;
    /// returns how many were handed over.
    async fn stream_rows(
        &self,
        sql: &str,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
        mut each: impl FnMut(&mut Page, &PgRow) -> crate::error::Result<ControlFlow<()>>,
    ) -> Result<usize, StoreError> {
        let mut rows = sqlx::query(sql)
            .bind(stream.as_str())
            .bind(i64::try_from(from_version).unwrap_or(i64::MAX))
            .bind(i64::try_from(max_count).unwrap_or(i64::MAX))
            .fetch(&self.shared.pool);
        let mut page = Page::default();
        let mut handed = 0;
        while let Some(row) = rows.try_next().await.map_err(store_error)? {
            handed += 1;
            if each(&mut page, &row)?.is_break() {
                break;
            }
        }
        Ok(handed)
    }

    /// The version of `stream` (0 when it has no events).
    pub(super) async fn version_of(&self, stream: &StreamId) -> Result<u64, StoreError> {
        let version: i64 = sqlx::query_scalar(&self.shared.sql.version)
            .bind(stream.as_str())
            .fetch_one(&self.shared.pool)
            .await
            .map_err(store_error)?;
        Ok(to_u64(version))
    }

    /// The position of the last readable event, after waiting (bounded by
    /// the read wait) for transactions that hold committed events back.
    pub(super) async fn readable_head(&self) -> Result<Position, StoreError> {
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
}

/// What a shared read answers.
type ReadResult = Result<Arc<Vec<RecordedEvent>>, Arc<StoreError>>;

/// A subscription's read of the log, shared by every caller that joins it.
type SharedRead = Shared<BoxFuture<'static, ReadResult>>;

/// How long a finished read still answers callers that saw the same wake-up:
/// the subscribers woken by one append do not all ask at the same instant,
/// and far less than the poll interval, so a subscriber that polls again
/// without a wake-up reads afresh.
const SHARE_WINDOW: Duration = Duration::from_millis(20);

/// A read found in the map: still running, or finished with its answer.
enum Joined {
    Running(SharedRead, u64),
    Done(ReadResult),
}

struct ReadEntry {
    /// Which read this is.
    id: u64,
    /// The read while it runs, held by its callers only.
    read: WeakShared<BoxFuture<'static, ReadResult>>,
    /// When it finished, and its answer.
    done: Option<(Instant, ReadResult)>,
}

/// The shared reads, by (after, page size, wake-up count).
#[derive(Default)]
pub(super) struct SharedReads(Mutex<ReadMap>);

#[derive(Default)]
struct ReadMap {
    map: HashMap<(Position, usize, u64), ReadEntry>,
    next_id: u64,
}

impl SharedReads {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadMap> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for SharedReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedReads")
            .field("entries", &self.lock().map.len())
            .finish()
    }
}

/// A shared read's answer, as the caller's own.
fn owned(result: ReadResult) -> Result<Vec<RecordedEvent>, StoreError> {
    match result {
        Ok(page) => Ok(Arc::unwrap_or_clone(page)),
        Err(error) => Err(Arc::try_unwrap(error).unwrap_or_else(|shared| {
            let source: es_core::BoxError = shared.to_string().into();
            if shared.is_transient() {
                StoreError::Unavailable { source }
            } else {
                StoreError::Backend { source }
            }
        })),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use es_core::Position;

    use crate::PgEventStore;

    /// A shared read that every caller gave up on does not keep its store
    /// alive: the map holds reads weakly.
    #[tokio::test]
    async fn an_abandoned_shared_read_holds_no_store() {
        // Nothing listens on port 1: the read waits for a connection.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(30))
            .connect_lazy("postgres://postgres@127.0.0.1:1/none")
            .unwrap();
        let store = PgEventStore::new(pool, "es");
        let gave_up = tokio::time::timeout(
            Duration::from_millis(50),
            store.read_all_shared(Position::START, 10),
        )
        .await;
        assert!(gave_up.is_err(), "the read cannot finish");
        assert_eq!(Arc::strong_count(&store.shared), 1);
    }
}
