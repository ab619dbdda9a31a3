//! Dynamic consistency boundaries on PostgreSQL: tagged appends (plain and
//! conditional) and reads by query.
//!
//! A tagged append is one call of the `append_tagged` function at READ
//! COMMITTED: it takes transaction-scoped advisory locks on hashes of the
//! (event type, tag) keys its events carry (shared) and its condition reads
//! (exclusive), in one sorted pass, then checks the condition and inserts,
//! each in a snapshot taken after the locks. So only appends whose keys meet
//! wait for each other, and a condition sees every write that could match
//! it. Tagged appends do not go through group commit: a group's transaction
//! would hold one append's locks for the whole group, and a write waiting
//! on a contended boundary would hold up every append grouped with it.
//!
//! A read by query first tries its query's exclusive keys. Holding them, it
//! reads every matching event its snapshot sees, whatever older transaction
//! still holds the log's horizon back, and its marker is that snapshot's
//! edge: a writer that could match the query takes its locks after the
//! read, and its events land after the marker (migration 0005 says why).
//! When a writer of the boundary is running, the read is the horizon read a
//! subscription makes, waiting for the transactions that hold its rows
//! back.

use async_trait::async_trait;
use es_core::{
    AppendCondition, AppendResult, DcbStore, ExpectedVersion, NewEvent, Position, Query, QueryPage,
    RecordedEvent, StoreError, StreamAppend, StreamId,
};
use futures::stream::BoxStream;
use serde_json::{json, Value};
use tracing::Instrument;

use super::append::{decide, no_row, Batch, OutcomeRow};
use super::read::{decode, held_event, position_parts, HeldRow};
use super::PgEventStore;
use crate::error::store_error;

/// Whether any event of the batch carries a tag.
pub(super) fn has_tags(events: &[NewEvent]) -> bool {
    events.iter().any(|e| !e.tags.is_empty())
}

/// The advisory lock keys of a tagged write or a read by query, as the
/// SQL functions take them: sorted, distinct, each shared or exclusive.
#[derive(Debug, Default)]
struct LockKeys {
    keys: Vec<i64>,
    exclusive: Vec<bool>,
}

impl LockKeys {
    /// The keys of `events`' tags (shared: every (type, tag) and ("",
    /// tag)) and of `condition`'s items (exclusive: (type, first tag) for
    /// each of an item's types, or ("", first tag) when it names none).
    /// Keys are hashes of the schema, the type and the tag: two stores in
    /// one database never share one, and a collision only makes two
    /// boundaries wait for each other.
    fn of(schema: &str, events: &[NewEvent], condition: Option<&Query>) -> Self {
        let mut keys: Vec<(i64, bool)> = Vec::new();
        for event in events {
            for tag in &event.tags {
                keys.push((lock_key(schema, &event.event_type, tag.as_str()), false));
                keys.push((lock_key(schema, "", tag.as_str()), false));
            }
        }
        for item in condition.map(Query::items).unwrap_or_default() {
            let tag = item.first_tag().as_str();
            if item.types().is_empty() {
                keys.push((lock_key(schema, "", tag), true));
            }
            for event_type in item.types() {
                keys.push((lock_key(schema, event_type, tag), true));
            }
        }
        // Exclusive first within a key, so that the key keeps that mode.
        keys.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        keys.dedup_by_key(|k| k.0);
        let (keys, exclusive) = keys.into_iter().unzip();
        Self { keys, exclusive }
    }
}

/// FNV-1a, 64 bits, of `es-dcb`, the schema, the type and the tag, with a
/// unit separator between them.
fn lock_key(schema: &str, event_type: &str, tag: &str) -> i64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for part in ["es-dcb", schema, event_type, tag] {
        for byte in part.bytes().chain([0x1f]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// The tags of events as the functions take them: (1-based event index,
/// tag) pairs.
fn tag_arrays(events: &[NewEvent]) -> (Vec<i32>, Vec<&str>) {
    let mut items = Vec::new();
    let mut tags = Vec::new();
    for (i, event) in (1i32..).zip(events) {
        for tag in &event.tags {
            items.push(i);
            tags.push(tag.as_str());
        }
    }
    (items, tags)
}

/// A query as the SQL takes it: `[{"types": [...], "tags": [...]}]`, each
/// item's tags sorted (its first tag is the one looked up and locked).
fn query_json(query: &Query) -> Value {
    Value::Array(
        query
            .items()
            .iter()
            .map(|item| {
                json!({
                    "types": item.types().iter().map(|t| &**t).collect::<Vec<&str>>(),
                    "tags": item.tags().iter().map(es_core::Tag::as_str).collect::<Vec<&str>>(),
                })
            })
            .collect(),
    )
}

impl PgEventStore {
    /// One call of `append_tagged` on `executor`. `locked`: the caller
    /// took the events' locks before its transaction had an id, so the
    /// call takes none.
    pub(super) async fn append_tagged_on<'c, E>(
        &self,
        executor: E,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        condition: Option<&AppendCondition>,
        locked: bool,
    ) -> Result<AppendResult, StoreError>
    where
        E: sqlx::PgExecutor<'c>,
    {
        let batch = Batch::encode(events, self.shared.settings.max_batch)?;
        let (items, tags) = tag_arrays(events);
        let locks = if locked {
            LockKeys::default()
        } else {
            LockKeys::of(
                &self.shared.schema,
                events,
                condition.map(|c| &c.fail_if_events_match),
            )
        };
        let after = match condition.and_then(|c| c.after) {
            Some(after) => Some(position_parts(after)?),
            None => None,
        };
        let row: OutcomeRow = batch
            .bind(
                sqlx::query_as(&self.shared.sql.append_tagged),
                stream,
                expected,
            )
            .bind(&items)
            .bind(&tags)
            .bind(&locks.keys)
            .bind(&locks.exclusive)
            .bind(condition.map(|c| query_json(&c.fail_if_events_match)))
            .bind(after.map(|a| a.0))
            .bind(after.map(|a| a.1))
            .fetch_all(executor)
            .await
            .map_err(|e| StoreError::from(batch.map_error(e, true)))?
            .pop()
            .ok_or_else(no_row)?;
        if row.0 == 3 {
            return Err(StoreError::BoundaryMoved {
                stream: stream.clone(),
                after: condition.and_then(|c| c.after),
            });
        }
        decide(stream, expected, row)
    }

    /// A tagged append on its own connection, committed when it returns.
    pub(super) async fn append_tagged_now(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        condition: Option<&AppendCondition>,
    ) -> Result<AppendResult, StoreError> {
        let result = self
            .append_tagged_on(
                &self.shared.pool,
                stream,
                expected,
                events,
                condition,
                false,
            )
            .await?;
        self.committed(None, result.written);
        Ok(result)
    }

    /// An atomic multi-stream write holding tagged events: one transaction
    /// that takes every part's locks in one sorted pass first, then appends
    /// the parts one by one; rolled back at the first refused part.
    pub(super) async fn write_tagged_parts(
        &self,
        parts: &[StreamAppend],
    ) -> Result<Vec<AppendResult>, StoreError> {
        let all: Vec<NewEvent> = parts.iter().flat_map(|p| p.events.clone()).collect();
        let locks = LockKeys::of(&self.shared.schema, &all, None);
        let mut tx = self.shared.pool.begin().await.map_err(store_error)?;
        sqlx::query(&self.shared.sql.lock_tags)
            .bind(&locks.keys)
            .bind(&locks.exclusive)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        // Streams in one order for every write, as group commit sorts them:
        // two writes inserting into the same streams never wait on each
        // other in a cycle.
        let mut order: Vec<usize> = (0..parts.len()).collect();
        order.sort_by(|&a, &b| parts[a].stream.as_str().cmp(parts[b].stream.as_str()));
        let mut results: Vec<Option<AppendResult>> = vec![None; parts.len()];
        for k in order {
            let part = &parts[k];
            // Dropping the transaction at a refused part rolls back the
            // parts before it.
            results[k] = Some(
                self.append_tagged_on(
                    &mut *tx,
                    &part.stream,
                    part.expected,
                    &part.events,
                    None,
                    true,
                )
                .await?,
            );
        }
        tx.commit().await.map_err(store_error)?;
        let results: Vec<AppendResult> = results.into_iter().flatten().collect();
        self.committed(None, results.iter().any(|r| r.written));
        Ok(results)
    }

    /// A page of the events matching `query` after `after`, and its
    /// marker: read holding the query's keys when no writer of the
    /// boundary is running, else at the horizon.
    async fn read_query(
        &self,
        query: &Query,
        after: Position,
        max: usize,
    ) -> Result<QueryPage, StoreError> {
        match self.read_query_locked(query, after, max).await? {
            Some(page) => Ok(page),
            None => self.read_query_at_horizon(query, after, max).await,
        }
    }

    /// A page read holding the query's exclusive keys, or `None` when
    /// another transaction holds one of them. The page holds every
    /// matching event the read's snapshot sees; a short page's marker is
    /// the snapshot's edge (its xmax less one), or its last event when that
    /// is later: every event a writer commits after the read is after it.
    async fn read_query_locked(
        &self,
        query: &Query,
        after: Position,
        max: usize,
    ) -> Result<Option<QueryPage>, StoreError> {
        let (major, minor) = position_parts(after)?;
        let locks = LockKeys::of(&self.shared.schema, &[], Some(query));
        let rows: Vec<HeldRow> = sqlx::query_as(&self.shared.sql.read_by_query)
            .bind(&locks.keys)
            .bind(query_json(query))
            .bind(major)
            .bind(minor)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&self.shared.pool)
            .await
            .map_err(store_error)?;
        let Some(edge) = rows.first().map(|row| row.0.unwrap_or(0)) else {
            return Ok(None);
        };
        let events = decode_page(rows)?;
        let marker = match events.last() {
            Some(last) if events.len() >= max => last.position,
            last => {
                let edge = Position::new(u64::try_from(edge - 1).unwrap_or(0), 0);
                last.map_or(edge, |e| e.position.max(edge)).max(after)
            }
        };
        Ok(Some(QueryPage { events, marker }))
    }

    /// A page at the horizon, as a subscription reads it. When the page is
    /// short and committed events matching the query are held back by
    /// older transactions still running (usually appends about to commit),
    /// waits for them (each time at most the read wait) and reads again,
    /// until none that committed before the first read is held back: the
    /// page then holds what was committed before the read began (a writer's
    /// own events included), and a decision made on it fails less often.
    /// Later commits are left to the condition.
    async fn read_query_at_horizon(
        &self,
        query: &Query,
        after: Position,
        max: usize,
    ) -> Result<QueryPage, StoreError> {
        let (mut page, mut held, began) = self.read_query_once(query, after, max).await?;
        while let Some(tx) = held {
            if page.events.len() >= max || tx >= began || !self.wait_horizon(tx).await? {
                break;
            }
            (page, held, _) = self.read_query_once(query, after, max).await?;
        }
        Ok(page)
    }

    /// One read of a page by query: the page, the oldest transaction whose
    /// committed rows matching the query the horizon holds back, and the
    /// first transaction id the read's snapshot does not see (every one
    /// before it had begun when the read did).
    async fn read_query_once(
        &self,
        query: &Query,
        after: Position,
        max: usize,
    ) -> Result<(QueryPage, Option<i64>, i64), StoreError> {
        let (major, minor) = position_parts(after)?;
        let rows: Vec<QueryRow> = sqlx::query_as(&self.shared.sql.read_query)
            .bind(major)
            .bind(minor)
            .bind(query_json(query))
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&self.shared.pool)
            .await
            .map_err(store_error)?;
        let horizon = rows.first().and_then(|row| row.0).unwrap_or(0);
        let held = rows.first().and_then(|row| row.1);
        let began = rows.first().and_then(|row| row.2).unwrap_or(i64::MAX);
        let events = decode_page(
            rows.into_iter()
                .map(|(h, _, _, a, b, c, d, e, f, g, i, j, k, l)| {
                    (h, a, b, c, d, e, f, g, i, j, k, l)
                })
                .collect(),
        )?;
        // Every transaction below the horizon has ended, and the page holds
        // every matching row of theirs after `after` (unless it is full):
        // (horizon, 0) is before any row a later transaction writes.
        let marker = match events.last() {
            Some(last) if events.len() >= max => last.position,
            _ => Position::new(u64::try_from(horizon).unwrap_or(0), 0).max(after),
        };
        Ok((QueryPage { events, marker }, held, began))
    }
}

/// The events of a page's rows (an empty page is one row of none).
fn decode_page(rows: Vec<HeldRow>) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut events = Vec::with_capacity(rows.len());
    for row in rows.into_iter().filter_map(held_event) {
        events.push(decode(row, None)?);
    }
    Ok(events)
}

/// A row of the read by query: the horizon, the oldest held-back
/// transaction, the snapshot's first unseen transaction id, then a
/// [`HeldRow`]'s event columns.
type QueryRow = (
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<uuid::Uuid>,
    Option<String>,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<Vec<String>>,
);

#[async_trait]
impl DcbStore for PgEventStore {
    async fn read(
        &self,
        query: &Query,
        after: Position,
        max_count: usize,
    ) -> Result<QueryPage, StoreError> {
        self.read_query(query, after, max_count).await
    }

    async fn append_if(
        &self,
        stream: &StreamId,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<AppendResult, StoreError> {
        let span = tracing::debug_span!(
            "es_postgres.append_if",
            stream = %stream,
            events = events.len(),
            after = condition.after.map(tracing::field::display),
        );
        let result = self
            .append_tagged_now(stream, ExpectedVersion::Any, &events, Some(&condition))
            .instrument(span)
            .await?;
        if result.written {
            self.wake_subscribers();
        }
        Ok(result)
    }

    fn subscribe(
        &self,
        query: Query,
        after: Position,
    ) -> BoxStream<'static, Result<RecordedEvent, StoreError>> {
        self.follow(after, move |store, after, max| {
            let query = query.clone();
            async move { Ok(store.read_query_once(&query, after, max).await?.0.events) }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use es_core::testing::dcb_conformance::tagged_event;
    use es_core::{QueryItem, Tag};

    use super::*;

    /// A write's tags lock shared and a condition's items exclusive, one
    /// key each, sorted; a key both take is exclusive; another schema locks
    /// other keys.
    #[test]
    fn lock_keys_are_sorted_distinct_and_exclusive_where_a_condition_reads() {
        let course = Tag::of("course", "c1").unwrap();
        let student = Tag::of("student", "s1").unwrap();
        let events = [tagged_event(1, "Joined", &[&course, &student])];
        let shared = LockKeys::of("es", &events, None);
        assert_eq!(shared.keys.len(), 4);
        assert!(shared.keys.windows(2).all(|w| w[0] < w[1]));
        assert!(shared.exclusive.iter().all(|e| !e));

        let query = Query::from(QueryItem::tagged(course.clone()).of_types(["Joined", "Left"]))
            .or(QueryItem::tagged(student.clone()));
        let both = LockKeys::of("es", &events, Some(&query));
        let mode = |key: i64| both.exclusive[both.keys.binary_search(&key).unwrap()];
        assert!(mode(lock_key("es", "Joined", course.as_str())));
        assert!(mode(lock_key("es", "Left", course.as_str())));
        assert!(mode(lock_key("es", "", student.as_str())));
        assert!(!mode(lock_key("es", "", course.as_str())));
        assert!(!mode(lock_key("es", "Joined", student.as_str())));
        assert_eq!(both.keys.len(), 5);
        assert!(both.keys.windows(2).all(|w| w[0] < w[1]));

        let elsewhere = LockKeys::of("other", &events, None);
        assert!(elsewhere.keys.iter().all(|k| !shared.keys.contains(k)));
    }
}
