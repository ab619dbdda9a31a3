//! The write side: batch encoding and checks, the append statements, group
//! commit and how each outcome is decided.

use std::collections::BTreeSet;

use es_core::{
    AppendResult, ExpectedVersion, NewEvent, Payload, Position, StoreError, StreamAppend, StreamId,
};
use sqlx::PgConnection;
use tracing::Instrument;
use uuid::Uuid;

use super::notify::Carry;
use super::read::{position_of, to_u64};
use super::PgEventStore;
use crate::error::{store_error, Error};
use crate::group_commit::{Answer, GroupCommit, Turn, Waiting};
use crate::sqlstate::{self, is_unique_violation};

pub(super) fn expected_code(expected: ExpectedVersion) -> i64 {
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

/// The version an append expects as one number, when it expects one: 0 for
/// no stream.
fn exact_version(expected: ExpectedVersion) -> Option<i64> {
    match expected {
        ExpectedVersion::NoStream => Some(0),
        ExpectedVersion::Exact(v) => i64::try_from(v).ok().filter(|v| *v < i64::MAX),
        ExpectedVersion::Any | ExpectedVersion::StreamExists => None,
    }
}

/// A batch encoded as the arrays the append statements take.
pub(super) struct Batch<'a> {
    pub(super) events: &'a [NewEvent],
    pub(super) ids: Vec<Uuid>,
    pub(super) types: Vec<&'a str>,
    pub(super) versions: Vec<i32>,
    pub(super) payloads: Vec<&'a str>,
    pub(super) metadata: Vec<String>,
}

impl<'a> Batch<'a> {
    /// Binds the parameters every single-stream append statement starts
    /// with: tenant, stream, expected version, then the batch's ids, types,
    /// schema versions, payloads and metadata (`$1`–`$8`).
    pub(super) fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
        stream: &'q StreamId,
        expected: ExpectedVersion,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind("")
            .bind(stream.as_str())
            .bind(expected_code(expected))
            .bind(&self.ids)
            .bind(&self.types)
            .bind(&self.versions)
            .bind(&self.payloads)
            .bind(&self.metadata)
    }

    pub(super) fn encode(events: &'a [NewEvent], max_batch: usize) -> Result<Self, StoreError> {
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

    pub(super) fn map_error(&self, error: sqlx::Error, guarded: bool) -> AppendError {
        if !guarded && is_unique_violation(&error) {
            AppendError::RaceLost
        } else if is_invalid_json(&error) {
            AppendError::Store(StoreError::InvalidPayload {
                event_id: refused_payload(self.events),
            })
        } else {
            AppendError::Store(store_error(error))
        }
    }
}

pub(super) type OutcomeRow = (i32, Option<i64>, Option<i64>, Option<i64>, Option<Uuid>);

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
/// position of what it wrote (none when nothing was written), the stream's
/// version before, and whether every expectation of the group held.
type FastGroupRow = (i32, Option<i64>, Option<i64>, Option<i64>, i64, bool);

/// The row of the one-append statement: last version, transaction and
/// position of what it wrote (none when nothing was written), the stream's
/// version before, and, when the expectation failed, whether an id of the
/// batch is stored already.
type FastRow = (Option<i64>, Option<i64>, Option<i64>, i64, Option<bool>);

/// What an `append_events` outcome row means for the caller.
pub(super) fn decide(
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
        other => Err(Error::Corrupt {
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
    /// The appends `heads` (stream and expected version) with their encoded
    /// batches, in the same order.
    fn new(heads: &[(&'a StreamId, ExpectedVersion)], batches: &'a [Batch<'a>]) -> Self {
        let total: usize = batches.iter().map(|b| b.ids.len()).sum();
        let mut arrays = Self {
            streams: Vec::with_capacity(heads.len()),
            expected: Vec::with_capacity(heads.len()),
            counts: Vec::with_capacity(heads.len()),
            ids: Vec::with_capacity(total),
            types: Vec::with_capacity(total),
            versions: Vec::with_capacity(total),
            payloads: Vec::with_capacity(total),
            metadata: Vec::with_capacity(total),
        };
        for (&(stream, expected), batch) in heads.iter().zip(batches) {
            arrays.streams.push(stream.as_str());
            arrays.expected.push(expected_code(expected));
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

pub(super) fn no_row() -> StoreError {
    Error::Corrupt {
        reason: "the append statement returned no row".to_owned(),
    }
    .into()
}

/// How one append statement failed, inside the write path.
#[derive(Debug)]
pub(super) enum AppendError {
    /// The append's answer: a refusal or a failure for the caller.
    Store(StoreError),
    /// A concurrent append won a race on a stream version or an event id
    /// (a unique violation of an append not guarded by the append
    /// function): the append is decided again.
    RaceLost,
}

impl From<StoreError> for AppendError {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

impl From<AppendError> for StoreError {
    /// Guarded appends settle races inside the database and never lose one;
    /// a lost race that reached a caller would be transient.
    fn from(error: AppendError) -> Self {
        match error {
            AppendError::Store(error) => error,
            AppendError::RaceLost => Self::Unavailable {
                source: "a concurrent append won the race".into(),
            },
        }
    }
}

fn is_invalid_json(error: &sqlx::Error) -> bool {
    sqlstate::is_one_of(error, sqlstate::INVALID_JSON)
}

impl PgEventStore {
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
        let result = if super::dcb::has_tags(&events) {
            self.append_tagged_on(&mut *conn, stream, expected, &events, None, false)
                .await?
        } else {
            self.append_on(&mut *conn, stream, expected, &events, true)
                .await?
        };
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
    ) -> Result<AppendResult, AppendError>
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
        carry: Option<Carry>,
    ) -> Result<Option<AppendResult>, AppendError> {
        let rows: Vec<FastRow> = batch
            .bind(
                sqlx::query_as(&self.shared.sql.append_fast),
                stream,
                expected,
            )
            .bind(self.carry_channel(carry.as_ref()))
            .bind(&self.shared.notify_payload)
            // fetch_all, not fetch_one: it returns only after the server
            // reports the statement (and so its autocommit) complete;
            // fetch_one returns at the first row, before the commit.
            .fetch_all(&self.shared.pool)
            .await
            .map_err(|e| batch.map_error(e, false))?;
        self.committed(carry, rows.iter().any(|r| r.0.is_some()));
        let row = rows.into_iter().next().ok_or_else(no_row)?;
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
            }
            .into()),
            // Some ids are stored: the append function decides the replay.
            _ => Ok(None),
        }
    }

    /// One event expecting no stream or an exact version, in a bare
    /// `INSERT` carrying `carry`'s NOTIFY (see `append_one` in `sql`): the
    /// row written, or `None` when the expectation failed or the event id
    /// is stored (nothing was written; the full statement decides).
    async fn append_one(
        &self,
        stream: &StreamId,
        version: i64,
        batch: &Batch<'_>,
        carry: Option<Carry>,
    ) -> Result<Option<AppendResult>, AppendError> {
        let rows: Vec<(i64, i64)> = match sqlx::query_as(&self.shared.sql.append_one)
            .bind("")
            .bind(stream.as_str())
            .bind(version)
            .bind(batch.ids[0])
            .bind(batch.types[0])
            .bind(batch.versions[0])
            .bind(batch.payloads[0])
            .bind(&batch.metadata[0])
            .bind(self.carry_channel(carry.as_ref()))
            .bind(&self.shared.notify_payload)
            // fetch_all, not fetch_optional: it returns only after the
            // server reports the statement (and so its autocommit) complete.
            .fetch_all(&self.shared.pool)
            .await
        {
            Ok(rows) => rows,
            // Nothing was written, nor the NOTIFY sent: the writes it was
            // to cover are left to the notifier.
            Err(e) if is_unique_violation(&e) => return Ok(None),
            Err(e) => return Err(batch.map_error(e, false)),
        };
        // A row written was selected from the NOTIFY's CTE, so the NOTIFY
        // went with it; with no row the planner may have skipped that CTE,
        // and the writes it was to cover are left to the notifier.
        let written = !rows.is_empty();
        self.committed(carry.filter(|_| written), written);
        Ok(rows.first().map(|&(tx, position)| AppendResult {
            stream_version: to_u64(version) + 1,
            position: position_of(tx, position),
            written: true,
        }))
    }

    async fn call_append<'c, E>(
        &self,
        executor: E,
        stream: &StreamId,
        expected: ExpectedVersion,
        batch: &Batch<'_>,
        guarded: bool,
    ) -> Result<AppendResult, AppendError>
    where
        E: sqlx::PgExecutor<'c>,
    {
        let row: OutcomeRow = batch
            .bind(sqlx::query_as(&self.shared.sql.append), stream, expected)
            .bind(guarded)
            .fetch_all(executor)
            .await
            .map_err(|e| batch.map_error(e, guarded))?
            .pop()
            .ok_or_else(no_row)?;
        Ok(decide(stream, expected, row)?)
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
                let mut carry = self.carry();
                // A single event expecting no stream or an exact version: a
                // bare INSERT, as cheap as the row it writes. When it writes
                // nothing, the statement below decides (the NOTIFY, if any,
                // was carried or is left to the notifier).
                if let (1, 1, Some(version)) = (attempt, events.len(), exact_version(expected)) {
                    if let Some(result) = self
                        .append_one(stream, version, &batch, carry.take())
                        .await?
                    {
                        return Ok(result);
                    }
                }
                match self.append_fast(stream, expected, &batch, carry).await {
                    Ok(Some(result)) => return Ok(result),
                    Ok(None) => {}
                    Err(AppendError::RaceLost) => continue,
                    Err(AppendError::Store(e)) => return Err(e),
                }
            }
            match self
                .call_append(&self.shared.pool, stream, expected, &batch, guarded)
                .await
            {
                Ok(result) => {
                    self.committed(None, result.written);
                    return Ok(result);
                }
                Err(AppendError::RaceLost) => continue,
                Err(AppendError::Store(e)) => return Err(e),
            }
        }
    }

    /// One write on its own: an append, or an atomic multi-stream write.
    async fn write_now(&self, parts: &[StreamAppend]) -> Answer {
        match parts {
            [only] => Ok(vec![
                self.append_now(&only.stream, only.expected, &only.events)
                    .await?,
            ]),
            parts => self.write_parts_now(parts).await,
        }
    }

    /// Writes queued writes as one group, answering each.
    async fn commit_group(&self, mut group: Vec<Waiting>) {
        if let [only] = group.as_slice() {
            let result = self.write_now(&only.parts).await;
            if let Some(only) = group.pop() {
                let _ = only.reply.send(result);
            }
            return;
        }
        if group.iter().any(|w| w.parts.len() != 1) {
            return self.commit_units(group).await;
        }
        // One lock order for every group: no two groups deadlock.
        group.sort_by(|a, b| a.parts[0].stream.as_str().cmp(b.parts[0].stream.as_str()));
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
                    let part = &w.parts[0];
                    answers.push(
                        self.append_now(&part.stream, part.expected, &part.events)
                            .await,
                    );
                }
                answers
            }
        };
        for (w, answer) in group.into_iter().zip(answers) {
            let _ = w.reply.send(answer.map(|result| vec![result]));
        }
    }

    /// A group holding multi-stream writes: all of them in one statement
    /// when their streams are distinct and every expectation holds (the
    /// usual case under load). When some writes' expectations fail, the
    /// others are written together once more, and the refused ones each on
    /// its own (so each gets its own answer).
    async fn commit_units(&self, group: Vec<Waiting>) {
        let mut pending = group;
        while !pending.is_empty() {
            // The writes that touch no stream an earlier one touches go
            // together; the others wait for the next statement, in order.
            let mut streams = BTreeSet::new();
            let (now, later): (Vec<Waiting>, Vec<Waiting>) = pending.into_iter().partition(|w| {
                let free = w.parts.iter().all(|p| !streams.contains(p.stream.as_str()));
                if free {
                    streams.extend(w.parts.iter().map(|p| p.stream.as_str().to_owned()));
                }
                free
            });
            if now.len() == 1 {
                self.units_one_by_one(now).await;
            } else {
                self.commit_distinct(now).await;
            }
            pending = later;
        }
    }

    /// [`Self::commit_units`] for writes that touch distinct streams.
    async fn commit_distinct(&self, group: Vec<Waiting>) {
        let parts: Vec<&StreamAppend> = group.iter().flat_map(|w| &w.parts).collect();
        let span = tracing::debug_span!(
            "es_postgres.append_group",
            writes = group.len(),
            streams = parts.len()
        );
        let first = self.fast_write(&parts).instrument(span.clone()).await;
        let (together, alone) = match first {
            Ok(Fast::Written(results)) => return Self::answer_units(group, results),
            Ok(Fast::Refused(failed)) if !failed.is_empty() => {
                // The writes holding a failed part, by their first part's
                // index among all the parts.
                let mut start = 0;
                let mut refused = Vec::new();
                for (w, waiting) in group.iter().enumerate() {
                    let end = start + waiting.parts.len();
                    if failed.iter().any(|&k| (start..end).contains(&k)) {
                        refused.push(w);
                    }
                    start = end;
                }
                let (alone, together): (Vec<_>, Vec<_>) = group
                    .into_iter()
                    .enumerate()
                    .partition(|(w, _)| refused.contains(w));
                (
                    together.into_iter().map(|(_, w)| w).collect::<Vec<_>>(),
                    alone.into_iter().map(|(_, w)| w).collect::<Vec<_>>(),
                )
            }
            // A replayed id, a lost race or a failure: each on its own.
            Ok(Fast::Refused(_)) | Err(_) => return self.units_one_by_one(group).await,
        };
        if together.len() > 1 {
            let parts: Vec<&StreamAppend> = together.iter().flat_map(|w| &w.parts).collect();
            match self.fast_write(&parts).instrument(span).await {
                Ok(Fast::Written(results)) => Self::answer_units(together, results),
                _ => self.units_one_by_one(together).await,
            }
        } else {
            self.units_one_by_one(together).await;
        }
        self.units_one_by_one(alone).await;
    }

    /// Answers each write of a group written together.
    fn answer_units(group: Vec<Waiting>, results: Vec<AppendResult>) {
        let mut results = results.into_iter();
        for w in group {
            let answer: Vec<AppendResult> = results.by_ref().take(w.parts.len()).collect();
            let _ = w.reply.send(Ok(answer));
        }
    }

    /// Each write of a group on its own.
    async fn units_one_by_one(&self, group: Vec<Waiting>) {
        for w in group {
            let answer = self.write_now(&w.parts).await;
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
            match Batch::encode(&w.parts[0].events, self.shared.settings.max_batch) {
                Ok(batch) => {
                    answers.push(None);
                    included.push(i);
                    batches.push(batch);
                }
                Err(e) => answers.push(Some(Err(e))),
            }
        }
        let heads: Vec<(&StreamId, ExpectedVersion)> = included
            .iter()
            .map(|&i| (&group[i].parts[0].stream, group[i].parts[0].expected))
            .collect();
        let arrays = GroupArrays::new(&heads, &batches);
        let distinct: BTreeSet<&str> = arrays.streams.iter().copied().collect();
        let versions: Option<Vec<i64>> = heads.iter().map(|h| exact_version(h.1)).collect();
        if let (true, true, Some(versions)) = (
            distinct.len() == arrays.streams.len(),
            arrays.counts.iter().all(|&c| c == 1),
            versions,
        ) {
            if let Some(written) = self.group_one(&arrays, &versions).await? {
                for (k, result) in written.into_iter().enumerate() {
                    let i = included[k];
                    let part = &group[i].parts[0];
                    answers[i] = Some(match result {
                        Some(result) => Ok(result),
                        // Its expectation failed or its id is stored:
                        // decided on its own.
                        None => {
                            self.append_now(&part.stream, part.expected, &part.events)
                                .await
                        }
                    });
                }
                return Ok(answers
                    .into_iter()
                    .map(|a| a.unwrap_or_else(|| Err(no_part_row())))
                    .collect());
            }
        }
        let mut rows: Vec<GroupRow> = Vec::new();
        if distinct.len() == arrays.streams.len() {
            let carry = self.carry();
            let fast: Result<Vec<FastGroupRow>, sqlx::Error> = arrays
                .query(&self.shared.sql.append_group_fast)
                .bind(self.carry_channel(carry.as_ref()))
                .bind(&self.shared.notify_payload)
                .fetch_all(&self.shared.pool)
                .await;
            if let Ok(fast) = &fast {
                self.committed(carry, fast.iter().any(|r| r.1.is_some()));
            }
            match fast {
                // Every append written (an append the statement did not write
                // shows no version: then none was, and the function decides).
                Ok(fast)
                    if fast.len() == arrays.streams.len() && fast.iter().all(|r| r.1.is_some()) =>
                {
                    rows = fast
                        .into_iter()
                        .map(|(item, version, tx, position, _, _)| {
                            (item, 0, version, tx, position, None)
                        })
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
            self.committed(None, rows.iter().any(|r| r.1 == 0));
        }
        for (item, outcome, version, tx, position, event) in rows {
            let slot = usize::try_from(item)
                .ok()
                .and_then(|k| k.checked_sub(1))
                .and_then(|k| included.get(k).copied());
            if let Some(i) = slot {
                let w = &group[i].parts[0];
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
                    Err(Error::Corrupt {
                        reason: "append_group returned no row for an append".to_owned(),
                    }
                    .into())
                })
            })
            .collect())
    }

    /// A group of single events to distinct streams, each expecting no
    /// stream or the exact version in `versions`, in one bare `INSERT` (see
    /// `append_group_one` in `sql`): per append, in order, its result when
    /// written, `None` when its expectation failed (nothing of it was
    /// written; the others were). `None` as a whole when nothing was written
    /// because an id or a version was taken.
    async fn group_one(
        &self,
        arrays: &GroupArrays<'_>,
        versions: &[i64],
    ) -> Result<Option<Vec<Option<AppendResult>>>, StoreError> {
        let carry = self.carry();
        let rows: Vec<(String, i64, i64)> = match sqlx::query_as(&self.shared.sql.append_group_one)
            .bind(&arrays.streams)
            .bind(versions)
            .bind(&arrays.ids)
            .bind(&arrays.types)
            .bind(&arrays.versions)
            .bind(&arrays.payloads)
            .bind(&arrays.metadata)
            .bind("")
            .bind(self.carry_channel(carry.as_ref()))
            .bind(&self.shared.notify_payload)
            .fetch_all(&self.shared.pool)
            .await
        {
            Ok(rows) => rows,
            Err(e) if is_unique_violation(&e) => return Ok(None),
            Err(e) => return Err(store_error(e)),
        };
        // As for one event: a row written went with the NOTIFY.
        let written = !rows.is_empty();
        self.committed(carry.filter(|_| written), written);
        let mut results = vec![None; versions.len()];
        for (stream, tx, position) in rows {
            let k = arrays
                .streams
                .iter()
                .position(|s| *s == stream)
                .ok_or_else(no_part_row)?;
            results[k] = Some(AppendResult {
                stream_version: to_u64(versions[k]) + 1,
                position: position_of(tx, position),
                written: true,
            });
        }
        Ok(Some(results))
    }

    /// An atomic multi-stream write, through group commit: run now while a
    /// slot is free, else queued and written with others.
    pub(super) async fn write_parts(
        &self,
        mut parts: Vec<StreamAppend>,
    ) -> Result<Vec<AppendResult>, StoreError> {
        es_core::store::validate_parts(&parts)?;
        if parts.len() > 1 && parts.iter().any(|p| super::dcb::has_tags(&p.events)) {
            return self.write_tagged_parts(&parts).await;
        }
        if parts.len() == 1 {
            if let Some(part) = parts.pop() {
                let result = self
                    .append_grouped(&part.stream, part.expected, part.events)
                    .await?;
                return Ok(vec![result]);
            }
        }
        match &self.shared.group {
            Some(group) => match group.enter(parts) {
                Turn::Run(parts) => {
                    let _slot = Slot(self);
                    self.write_parts_now(&parts).await
                }
                Turn::Wait(answer) => answer.await.unwrap_or_else(|_| Err(abandoned())),
            },
            None => self.write_parts_now(&parts).await,
        }
    }

    /// Appends `parts` (distinct streams) in one plain statement when every
    /// expectation holds: their results, in the order given. Otherwise
    /// nothing was written, and the answer says which parts' expectations
    /// failed (none, when an id is stored already or a concurrent append
    /// won a race).
    async fn fast_write(&self, parts: &[&StreamAppend]) -> Result<Fast, StoreError> {
        let (order, heads, batches) = lock_order(parts, self.shared.settings.max_batch)?;
        let arrays = GroupArrays::new(&heads, &batches);
        let carry = self.carry();
        let rows: Vec<FastGroupRow> = match arrays
            .query(&self.shared.sql.append_group_fast)
            .bind(self.carry_channel(carry.as_ref()))
            .bind(&self.shared.notify_payload)
            .fetch_all(&self.shared.pool)
            .await
        {
            Ok(rows) => {
                self.committed(carry, rows.iter().any(|r: &FastGroupRow| r.1.is_some()));
                rows
            }
            Err(e) if is_unique_violation(&e) => return Ok(Fast::Refused(Vec::new())),
            Err(e) if is_invalid_json(&e) => {
                let all: Vec<NewEvent> = parts.iter().flat_map(|p| p.events.clone()).collect();
                return Err(StoreError::InvalidPayload {
                    event_id: refused_payload(&all),
                });
            }
            Err(e) => return Err(store_error(e)),
        };
        if rows.len() != parts.len() {
            return Ok(Fast::Refused(Vec::new()));
        }
        if !rows.iter().all(|r| r.5) {
            let mut failed = Vec::new();
            for &(item, _, _, _, before, _) in &rows {
                let k = slot_of(item, &order)?;
                if !parts[k].expected.is_satisfied_by(to_u64(before)) {
                    failed.push(k);
                }
            }
            return Ok(Fast::Refused(failed));
        }
        let mut answers: Vec<Option<AppendResult>> = vec![None; parts.len()];
        // Every expectation held: each part with events is written; a part
        // without events only checked its version.
        for (item, version, tx, position, before, _) in rows {
            let k = slot_of(item, &order)?;
            answers[k] = Some(if parts[k].events.is_empty() {
                AppendResult {
                    stream_version: to_u64(before),
                    position: Position::START,
                    written: false,
                }
            } else {
                decide(
                    &parts[k].stream,
                    parts[k].expected,
                    (0, version, tx, position, None),
                )?
            });
        }
        answers
            .into_iter()
            .map(|a| a.ok_or_else(no_part_row))
            .collect::<Result<Vec<_>, _>>()
            .map(Fast::Written)
    }

    /// An atomic multi-stream write on its own: one statement when every
    /// expectation holds, else the append function inside one transaction
    /// that is rolled back at the first refused part.
    async fn write_parts_now(
        &self,
        parts: &[StreamAppend],
    ) -> Result<Vec<AppendResult>, StoreError> {
        let refs: Vec<&StreamAppend> = parts.iter().collect();
        if let Fast::Written(results) = self.fast_write(&refs).await? {
            return Ok(results);
        }
        let (order, heads, batches) = lock_order(&refs, self.shared.settings.max_batch)?;
        let arrays = GroupArrays::new(&heads, &batches);
        let mut answers: Vec<Option<AppendResult>> = vec![None; parts.len()];
        let mut tx = self.shared.pool.begin().await.map_err(store_error)?;
        let rows: Vec<GroupRow> = arrays
            .query(&self.shared.sql.append_group)
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
        for (item, outcome, version, txid, position, event) in rows {
            let k = slot_of(item, &order)?;
            // The first refused part ends the write; dropping the
            // transaction rolls back what the others wrote.
            answers[k] = Some(decide(
                &parts[k].stream,
                parts[k].expected,
                (outcome, version, txid, position, event),
            )?);
        }
        tx.commit().await.map_err(store_error)?;
        self.committed(None, answers.iter().flatten().any(|a| a.written));
        answers
            .into_iter()
            .map(|a| a.ok_or_else(no_part_row))
            .collect()
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

    /// One append through group commit: run now while a slot is free, else
    /// queued and written with others.
    pub(super) async fn append_grouped(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        if super::dcb::has_tags(&events) {
            return self
                .append_tagged_now(stream, expected, &events, None)
                .await;
        }
        match &self.shared.group {
            Some(group) if !events.is_empty() => {
                let part = StreamAppend::new(stream.clone(), expected, events);
                match group.enter(vec![part]) {
                    Turn::Run(parts) => {
                        let _slot = Slot(self);
                        self.write_now(&parts).await?.pop().ok_or_else(no_part_row)
                    }
                    Turn::Wait(answer) => answer
                        .await
                        .unwrap_or_else(|_| Err(abandoned()))?
                        .pop()
                        .ok_or_else(no_part_row),
                }
            }
            _ => self.append_now(stream, expected, &events).await,
        }
    }
}

/// How a one-statement write ended.
enum Fast {
    /// Written: a result per part, in the order given.
    Written(Vec<AppendResult>),
    /// Nothing written: the indexes of the parts whose expectations failed
    /// (none when an id is stored already or a concurrent append won a
    /// race).
    Refused(Vec<usize>),
}

fn abandoned() -> StoreError {
    StoreError::Unavailable {
        source: "the write's group was abandoned".into(),
    }
}

fn no_part_row() -> StoreError {
    Error::Corrupt {
        reason: "the append statement answered nothing for a part".to_owned(),
    }
    .into()
}

/// The heads and encoded batches of `parts` sorted by stream (one lock order
/// for every write, so no two writes deadlock), with each one's index in
/// `parts`.
#[allow(clippy::type_complexity)]
fn lock_order<'a>(
    parts: &[&'a StreamAppend],
    max_batch: usize,
) -> Result<
    (
        Vec<usize>,
        Vec<(&'a StreamId, ExpectedVersion)>,
        Vec<Batch<'a>>,
    ),
    StoreError,
> {
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|&a, &b| parts[a].stream.as_str().cmp(parts[b].stream.as_str()));
    let batches = order
        .iter()
        .map(|&i| Batch::encode(&parts[i].events, max_batch))
        .collect::<Result<Vec<_>, _>>()?;
    let heads = order
        .iter()
        .map(|&i| (&parts[i].stream, parts[i].expected))
        .collect();
    Ok((order, heads, batches))
}

/// The index into the caller's parts of the append statement's 1-based
/// `item`, given the order the parts were sent in.
fn slot_of(item: i32, order: &[usize]) -> Result<usize, StoreError> {
    usize::try_from(item)
        .ok()
        .and_then(|k| k.checked_sub(1))
        .and_then(|k| order.get(k).copied())
        .ok_or_else(|| {
            Error::Corrupt {
                reason: format!("the append statement answered for an unknown part {item}"),
            }
            .into()
        })
}
