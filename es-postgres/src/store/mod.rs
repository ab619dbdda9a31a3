//! [`PgEventStore`]: the event store on PostgreSQL.
//!
//! This module holds the type, its settings and the [`EventStore`] impl; the
//! SQL text lives in `sql`, the write path in `append`, the read path and
//! the read horizon in `read`, event rows decoded in place in `rows`,
//! tagged appends and reads by query in `dcb`, and the wake-ups in
//! `notify`.

mod append;
mod dcb;
mod notify;
mod read;
mod rows;
mod sql;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use es_core::catch_up::catch_up_then_live;
use es_core::{
    AppendResult, EventStore, ExpectedVersion, NewEvent, Position, RecordedEvent, StoreError,
    StreamAppend, StreamEvent, StreamId,
};
use futures::stream::BoxStream;
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::Instrument;

use crate::error::Result;
use crate::group_commit::{GroupCommit, DEFAULT_MAX_GROUP, DEFAULT_MAX_IN_FLIGHT};
use crate::schema::validate_schema;
pub use notify::NotifyStats;
use notify::{notify_channel, Notices};
pub(crate) use read::position_parts;
pub use read::Holdback;
use sql::Sql;

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
///   processes through `LISTEN`/`NOTIFY`, and polls as a fallback. A store
///   starts at most one `NOTIFY` per 5 ms, usually carried by an append
///   statement rather than sent in a transaction of its own (see
///   [`PgEventStore::notify_stats`]).
/// - Concurrent appends are group-committed: at most
///   [`DEFAULT_MAX_IN_FLIGHT`](crate::DEFAULT_MAX_IN_FLIGHT) run at once, and
///   appends arriving meanwhile are written together, in one transaction,
///   each decided on its own (see [`PgEventStore::with_group_commit`]).
/// - It is a [`DcbStore`](es_core::DcbStore): appends of tagged events, and
///   conditional appends, are one call each that takes advisory locks on
///   their (event type, tag) keys at READ COMMITTED, so only appends whose
///   boundaries meet wait for each other; they are not grouped. Reads by
///   query follow the log's order and horizon, as `read_all` does.
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
    notices: Arc<Notices>,
    /// The payload of this instance's `NOTIFY`s, which its own listener
    /// passes over.
    notify_payload: String,
    listener_started: AtomicBool,
    group: Option<GroupCommit>,
    /// Log reads of subscriptions in flight, shared by subscribers that ask
    /// for the same page after the same wake-up.
    reads: read::SharedReads,
    /// Pages of the log read from the database for subscriptions.
    log_reads: AtomicU64,
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
                notices: Arc::new(Notices::new()),
                notify_payload: uuid::Uuid::new_v4().simple().to_string(),
                listener_started: AtomicBool::new(false),
                reads: read::SharedReads::default(),
                log_reads: AtomicU64::new(0),
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
        let result = self
            .append_grouped(stream, expected, events)
            .instrument(span)
            .await?;
        if result.written {
            self.wake_subscribers();
        }
        Ok(result)
    }

    async fn append_streams(
        &self,
        parts: Vec<StreamAppend>,
    ) -> Result<Vec<AppendResult>, StoreError> {
        let first = parts
            .first()
            .and_then(|p| p.events.first())
            .map(|e| &e.metadata);
        let span = tracing::debug_span!(
            "es_postgres.append_streams",
            streams = parts.len(),
            events = parts.iter().map(|p| p.events.len()).sum::<usize>(),
            correlation_id = first
                .and_then(|m| m.correlation_id)
                .map(tracing::field::display),
            causation_id = first
                .and_then(|m| m.causation_id)
                .map(tracing::field::display),
        );
        let results = self.write_parts(parts).instrument(span).await?;
        if results.iter().any(|r| r.written) {
            self.wake_subscribers();
        }
        Ok(results)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_stream_page(stream, from_version, max_count).await
    }

    async fn read_stream_events(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<StreamEvent>, StoreError> {
        self.read_stream_replay(stream, from_version, max_count)
            .await
    }

    async fn visit_stream_events(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
        each: &mut (dyn FnMut(StreamEvent) -> ControlFlow<()> + Send),
    ) -> Result<usize, StoreError> {
        self.visit_stream_replay(stream, from_version, max_count, each)
            .await
    }

    async fn read_all(
        &self,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_all_waiting(after, max_count).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
        self.version_of(stream).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.readable_head().await
    }

    fn subscribe_all(
        &self,
        after: Position,
    ) -> BoxStream<'static, Result<RecordedEvent, StoreError>> {
        self.follow(after, |store, after, max| async move {
            store.read_all_shared(after, max).await
        })
    }
}

impl PgEventStore {
    /// Follows the log from `after` with `read` (a page after a position):
    /// caught up page by page, then woken by this store's appends and
    /// notifications, polling as a fallback.
    pub(super) fn follow<R, Fut>(
        &self,
        after: Position,
        read: R,
    ) -> BoxStream<'static, Result<RecordedEvent, StoreError>>
    where
        R: Fn(Self, Position, usize) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send + 'static,
    {
        self.ensure_listener();
        let store = self.clone();
        catch_up_then_live(
            after,
            self.shared.settings.page_size,
            self.shared.settings.poll,
            self.shared.wake.subscribe(),
            move |after, max| read(store.clone(), after, max),
        )
    }
}
