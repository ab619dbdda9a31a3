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

use async_trait::async_trait;
use es_core::{
    AppendCondition, AppendResult, DcbStore, ExpectedVersion, NewEvent, Position, Query, QueryPage,
    RecordedEvent, StoreError, StreamAppend, StreamId,
};
use futures::stream::BoxStream;
use serde_json::{json, Value};
use tracing::Instrument;

use super::append::{decide, no_row, Batch, OutcomeRow};
use super::read::{decode, held_event, position_parts};
use super::PgEventStore;
use crate::error::store_error;

/// Whether any event of the batch carries a tag.
pub(super) fn has_tags(events: &[NewEvent]) -> bool {
    events.iter().any(|e| !e.tags.is_empty())
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
    /// One call of `append_tagged` on `executor`.
    pub(super) async fn append_tagged_on<'c, E>(
        &self,
        executor: E,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        condition: Option<&AppendCondition>,
    ) -> Result<AppendResult, StoreError>
    where
        E: sqlx::PgExecutor<'c>,
    {
        let batch = Batch::encode(events, self.shared.settings.max_batch)?;
        let (items, tags) = tag_arrays(events);
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
            .append_tagged_on(&self.shared.pool, stream, expected, events, condition)
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
        let types: Vec<&str> = all.iter().map(|e| &*e.event_type).collect();
        let (items, tags) = tag_arrays(&all);
        let mut tx = self.shared.pool.begin().await.map_err(store_error)?;
        sqlx::query(&self.shared.sql.lock_tags)
            .bind(&types)
            .bind(&items)
            .bind(&tags)
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
                self.append_tagged_on(&mut *tx, &part.stream, part.expected, &part.events, None)
                    .await?,
            );
        }
        tx.commit().await.map_err(store_error)?;
        let results: Vec<AppendResult> = results.into_iter().flatten().collect();
        self.committed(None, results.iter().any(|r| r.written));
        Ok(results)
    }

    /// A page of the events matching `query` after `after`, and its
    /// marker. When the page is short and committed events matching the
    /// query are held back by older transactions still running (usually
    /// appends about to commit), waits for them (each time at most the read
    /// wait) and reads again, until none that committed before the first
    /// read is held back: the page then holds what was committed before the
    /// read began (a writer's own events included), and a decision made on
    /// it fails less often. Later commits are left to the condition.
    async fn read_query(
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
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let (horizon, _, _, a, b, c, d, e, f, g, h, i, j, k) = row;
            if let Some(event) = held_event((horizon, a, b, c, d, e, f, g, h, i, j, k)) {
                events.push(decode(event, None)?);
            }
        }
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
