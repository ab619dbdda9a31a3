//! Loading aggregates and executing commands against them.

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use tracing::Instrument;
use uuid::Uuid;

use crate::command::{CommandRefused, COMMAND_REFUSED};
use crate::state_cache::{Entry, StateCache};
use crate::{
    derived_id, Aggregate, AppendWriter, CodecError, EventCodec, EventStore, ExpectedVersion,
    Metadata, NewEvent, Payload, Position, Snapshot, SnapshotPolicy, SnapshotStore, StoreError,
    StreamAppend, StreamId,
};

/// How many events `load` reads per call to the store: an aggregate of up
/// to this many events (past its snapshot) loads in one round trip, and a
/// read holds at most this many events in memory at once (about 1 MB of
/// events of a few hundred bytes).
const PAGE: usize = 4_096;

/// Why a command could not be executed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError<E: std::error::Error + 'static> {
    /// The aggregate refused the command. Nothing was written.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An event could not be encoded or a stored one decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Every attempt lost the race for the stream to another writer.
    #[error("gave up after {attempts} attempts: stream {stream} kept changing")]
    Contention {
        /// The contended stream.
        stream: StreamId,
        /// How many attempts were made.
        attempts: u32,
    },
}

impl<E: std::error::Error + 'static> RepositoryError<E> {
    /// Whether executing the same command again later may succeed: a lost
    /// race ([`RepositoryError::Contention`]) or a store failure that is not
    /// [deterministic](StoreError::is_deterministic). A refusal by the
    /// aggregate, an event that cannot be encoded or decoded, and a write the
    /// store refuses as such fail the same way every time.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Contention { .. } => true,
            Self::Store(e) => !e.is_deterministic(),
            Self::Rejected(_) | Self::Codec(_) => false,
        }
    }
}

/// How often and how patiently to retry a command that lost a concurrency race.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The backoff before the second attempt; it doubles each time.
    pub base_delay: Duration,
    /// The longest backoff.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(100),
        }
    }
}

impl RetryPolicy {
    /// No retry: a conflict is returned to the caller.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The jittered backoff after attempt `attempt` (1-based) failed: a random
    /// duration up to `min(max_delay, base_delay * 2^(attempt-1))` ("full
    /// jitter").
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let cap = exp.min(self.max_delay);
        cap.mul_f64(fastrand::f64())
    }
}

/// An aggregate's state as loaded, with the stream version it reflects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded<A> {
    /// The state.
    pub state: A,
    /// The version of the last event folded into it (0 for a new aggregate).
    pub version: u64,
}

/// The outcome of a command that was executed.
#[derive(Clone, Debug, PartialEq)]
pub struct Committed<E> {
    /// The events the command produced (empty when it produced none, or when it
    /// had already been executed).
    pub events: Vec<E>,
    /// The stream version after the command.
    pub stream_version: u64,
    /// The global position of the last event written ([`Position::START`] when
    /// nothing was written).
    pub position: Position,
    /// True when the command id had already been executed, and nothing new was
    /// decided or written.
    pub duplicate: bool,
}

type EncodeState<A> = fn(&A) -> Result<Payload, CodecError>;
type DecodeState<A> = fn(&Payload) -> Result<A, CodecError>;

struct Snapshots<A> {
    store: Arc<dyn SnapshotStore>,
    policy: SnapshotPolicy,
    schema_version: u32,
    encode: EncodeState<A>,
    decode: DecodeState<A>,
}

/// Loads aggregates of type `A` from an event store and executes commands on
/// them with optimistic concurrency.
///
/// `execute` loads the aggregate (latest snapshot plus the tail of its stream),
/// lets it decide, and appends the events expecting the version it loaded. When
/// another writer got there first it reloads and decides again, up to the
/// [`RetryPolicy`]'s attempts, with jittered backoff. The command's metadata is
/// given to every event it produces, so caused events keep the correlation id.
///
/// With [`Repository::with_state_cache`] it also keeps the states of recently
/// used aggregates in memory, so a command on one of them reads nothing: it is
/// decided on the cached state and appended expecting the cached version.
pub struct Repository<A: Aggregate> {
    store: Arc<dyn EventStore>,
    writer: Option<Arc<dyn AppendWriter>>,
    codec: EventCodec<A::Event>,
    snapshots: Option<Snapshots<A>>,
    cache: Option<Arc<StateCache<A>>>,
    retry: RetryPolicy,
}

impl<A: Aggregate> fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("aggregate", &A::TYPE)
            .field("snapshots", &self.snapshots.as_ref().map(|s| s.policy))
            .field("cached_states", &self.cache.as_ref().map(|c| c.len()))
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            writer: self.writer.clone(),
            codec: self.codec.clone(),
            snapshots: self.snapshots.as_ref().map(|s| Snapshots {
                store: Arc::clone(&s.store),
                policy: s.policy,
                schema_version: s.schema_version,
                encode: s.encode,
                decode: s.decode,
            }),
            cache: self.cache.clone(),
            retry: self.retry,
        }
    }
}

fn encode_state<A: Serialize>(state: &A) -> Result<Payload, CodecError> {
    Payload::from_value(state).map_err(|e| CodecError::Encode {
        event_type: "snapshot".into(),
        source: e.source,
    })
}

fn decode_state<A: DeserializeOwned>(payload: &Payload) -> Result<A, CodecError> {
    payload.decode().map_err(|source| CodecError::Decode {
        event_type: "snapshot".into(),
        schema_version: 0,
        source,
    })
}

/// How a command's first attempt finds the aggregate's state.
#[derive(Clone, Copy)]
enum Start {
    /// Take the cached state, else load it (snapshot, stream).
    Load,
    /// Take the cached state, else assume the stream does not exist yet.
    AssumeNew,
}

impl Start {
    /// How `execute` starts `command`: unread when it creates the aggregate.
    fn for_command<A: Aggregate>(command: &A::Command) -> Self {
        if A::creates(command) {
            Self::AssumeNew
        } else {
            Self::Load
        }
    }
}

/// A state a command is decided on without reading the stream first. The
/// append's expected version checks the guess; a refusal or a decision to
/// write nothing made on it is checked by nothing, so it is decided again on
/// the stream as read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Guess {
    /// The empty state of a stream assumed not to exist.
    New,
    /// The state cached after this process's last command on the stream.
    Cached,
}

/// Whether an append failed because some of its event ids are stored
/// already: an idempotency conflict, or (the KurrentDB rule for ids stored at
/// positions that do not fit) a wrong expected version while the stream is
/// still at the version expected.
fn ids_stored_elsewhere(error: &StoreError, loaded_version: u64) -> bool {
    match error {
        StoreError::IdempotencyConflict { .. } => true,
        StoreError::WrongExpectedVersion { actual, .. } => *actual == loaded_version,
        _ => false,
    }
}

impl<A: Aggregate> Repository<A> {
    /// A repository over `store` with no snapshots and the default retry policy.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            writer: None,
            codec: EventCodec::new(),
            snapshots: None,
            cache: None,
            retry: RetryPolicy::default(),
        }
    }

    /// Keeps the states of up to about `capacity` recently used aggregates in
    /// memory (shared by the clones of this repository). A command on a cached
    /// aggregate is decided on the cached state without reading, and appended
    /// expecting the cached version: one round trip to the store, whatever the
    /// stream's length.
    ///
    /// Writers elsewhere (other processes, an uncached repository) are no
    /// problem: their events make that append fail, and the command is
    /// decided again on the tail read after the cached version (no backoff, no
    /// attempt spent). A refusal or a decision to write nothing, made on the
    /// cached state, is checked by no append, so it is only returned after
    /// reading the tail and deciding again. For [`Repository::execute_once`]
    /// the store's event ids catch a command id executed before: its derived
    /// ids are stored already, and the append is refused. Memory grows with
    /// `capacity` times the size of a state; `load` does not use the cache.
    #[must_use]
    pub fn with_state_cache(mut self, capacity: usize) -> Self {
        self.cache = Some(Arc::new(StateCache::new(capacity)));
        self
    }

    /// Decodes through this codec (and its upcasters).
    #[must_use]
    pub fn with_codec(mut self, codec: EventCodec<A::Event>) -> Self {
        self.codec = codec;
        self
    }

    /// Writes every append through `writer` instead of the store's
    /// [`EventStore::append`]: for example a [`SagaManager`](crate::SagaManager)
    /// whose saga reacts to this aggregate's events in the same atomic write
    /// ([`SagaManager::with_local`](crate::SagaManager::with_local)). The
    /// writer answers as `append` would; the repository's retries, caching
    /// and idempotency are unchanged.
    #[must_use]
    pub fn with_writer(mut self, writer: Arc<dyn AppendWriter>) -> Self {
        self.writer = Some(writer);
        self
    }

    /// Retries conflicts by this policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Takes snapshots into `store` by `policy`, tagged with the state's
    /// `schema_version` (bump it when the state's shape changes: older snapshots
    /// are then ignored).
    #[must_use]
    pub fn with_snapshots(
        mut self,
        store: Arc<dyn SnapshotStore>,
        policy: SnapshotPolicy,
        schema_version: u32,
    ) -> Self
    where
        A: Serialize + DeserializeOwned,
    {
        self.snapshots = Some(Snapshots {
            store,
            policy,
            schema_version,
            encode: encode_state::<A>,
            decode: decode_state::<A>,
        });
        self
    }

    /// The store this repository writes to.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The codec this repository decodes with.
    pub fn codec(&self) -> &EventCodec<A::Event> {
        &self.codec
    }

    /// The stream of the aggregate `id`.
    pub fn stream_id(&self, id: impl fmt::Display) -> Result<StreamId, StoreError> {
        Ok(StreamId::for_aggregate(A::TYPE, id)?)
    }

    /// Loads the aggregate `id`: its latest snapshot, then the events after it.
    pub async fn load(
        &self,
        id: impl fmt::Display,
    ) -> Result<Loaded<A>, RepositoryError<A::Error>> {
        let stream = self.stream_id(id)?;
        self.load_stream(&stream, None, false)
            .await
            .map(|(loaded, _)| loaded)
    }

    /// Loads a stream; when `seen` is given, also reports whether an event with
    /// that id was among the events read.
    async fn load_stream(
        &self,
        stream: &StreamId,
        seen: Option<Uuid>,
        from_cache: bool,
    ) -> Result<(Loaded<A>, bool), RepositoryError<A::Error>> {
        let mut loaded = Loaded {
            state: A::default(),
            version: 0,
        };
        // A command id is looked for among the events read, so those loads
        // read from the snapshot on; `load` leaves the cache alone.
        let cached = match (from_cache, &self.cache) {
            (true, Some(cache)) if seen.is_none() => cache.take(stream),
            _ => None,
        };
        if let Some(entry) = cached {
            loaded = Loaded {
                state: entry.state,
                version: entry.version,
            };
        } else if let Some(snapshots) = &self.snapshots {
            match snapshots.store.load(stream).await {
                Ok(Some(snapshot)) if snapshot.schema_version == snapshots.schema_version => {
                    match (snapshots.decode)(&snapshot.state) {
                        Ok(state) => {
                            loaded = Loaded {
                                state,
                                version: snapshot.version,
                            };
                        }
                        Err(error) => {
                            tracing::warn!(%stream, %error, "ignoring undecodable snapshot");
                        }
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%stream, %error, "snapshot store failed; replaying"),
            }
        }
        let mut found = false;
        let mut failed = None;
        loop {
            // Each event is folded as the store reads it, while the next
            // ones are still on the way.
            let read = self
                .store
                .visit_stream_events(stream, loaded.version + 1, PAGE, &mut |recorded| {
                    found |= seen == Some(recorded.event_id);
                    // A refusal record changes nothing in the state.
                    if &*recorded.event_type != COMMAND_REFUSED {
                        match self.codec.decode_parts_all(
                            &recorded.event_type,
                            recorded.schema_version,
                            &recorded.payload,
                        ) {
                            Ok(events) => {
                                for event in events {
                                    loaded.state.apply(&event);
                                }
                            }
                            Err(error) => {
                                failed = Some(error);
                                return ControlFlow::Break(());
                            }
                        }
                    }
                    // The version is the stored one, whatever the upcasters
                    // made of the event.
                    loaded.version = recorded.stream_version;
                    ControlFlow::Continue(())
                })
                .await?;
            if let Some(error) = failed {
                return Err(error.into());
            }
            if read < PAGE {
                return Ok((loaded, found));
            }
        }
    }

    /// Executes a command on the aggregate `id`. The command is decided again
    /// after each lost race, so it must be `Clone`. A command that
    /// [creates](Aggregate::creates) the aggregate is decided unread, as by
    /// [`Repository::create`].
    pub async fn execute(
        &self,
        id: impl fmt::Display,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Committed<A::Event>, RepositoryError<A::Error>>
    where
        A::Command: Clone,
    {
        let start = Start::for_command::<A>(&command);
        self.decide_command(id, metadata, None, start, command)
            .await
    }

    /// Executes a command at most once per `command_id`.
    ///
    /// The events' ids are derived from the command id, so an append whose
    /// outcome was unknown (a connection dropped during commit) is recognised
    /// when retried, and a command id whose events are already in the stream's
    /// tail is answered as a duplicate without deciding again.
    pub async fn execute_once(
        &self,
        id: impl fmt::Display,
        command_id: Uuid,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Committed<A::Event>, RepositoryError<A::Error>>
    where
        A::Command: Clone,
    {
        let start = Start::for_command::<A>(&command);
        self.decide_command(id, metadata, Some(command_id), start, command)
            .await
    }

    /// Records that the aggregate `id` refused the command `command_id`: a
    /// [`CommandRefused`] record appended to its stream (skipped when the
    /// aggregate is loaded; published by the relay for the command's sender),
    /// with the id the command's first event would have had. So the command
    /// has one outcome: [`Repository::execute_once`] answers it again as a
    /// duplicate, and when its events were written after all (a concurrent
    /// delivery decided on a later state), nothing is recorded.
    ///
    /// Answers whether the refusal is recorded now or was before at the
    /// stream's tail; `false` when that id is stored otherwise (the
    /// command's events, written after all, or a refusal further back).
    ///
    /// # Errors
    /// When the store fails.
    pub async fn record_refusal(
        &self,
        id: impl fmt::Display,
        command_id: Uuid,
        refused: &CommandRefused,
        metadata: &Metadata,
    ) -> Result<bool, StoreError> {
        let stream = self.stream_id(id)?;
        let payload = Payload::from_value(refused).map_err(|e| StoreError::InvalidEvent {
            event_id: command_id,
            reason: e.to_string(),
        })?;
        // The record names the span it is written in as its trace context
        // when that is exported.
        let metadata = crate::otel::traced(metadata).into_owned();
        let record = NewEvent::new(COMMAND_REFUSED, 1, payload, metadata).with_id(derived_id(
            command_id,
            stream.as_str(),
            0,
        ));
        // The cached state is one version short of the stream from now on.
        if let Some(cache) = &self.cache {
            drop(cache.take(&stream));
        }
        match self
            .store
            .append(&stream, ExpectedVersion::Any, vec![record])
            .await
        {
            Ok(_) => Ok(true),
            Err(
                StoreError::IdempotencyConflict { .. } | StoreError::WrongExpectedVersion { .. },
            ) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Executes a command that starts a new aggregate, without reading first.
    ///
    /// The command is decided against the empty state and appended expecting
    /// no stream: one round trip to the store instead of two. When the stream
    /// exists after all, nothing is written and the command is executed as by
    /// [`Repository::execute`] (load, decide again, append), so the outcome is
    /// the same as `execute`'s; only the cost of a wrong guess differs. A
    /// refusal, or a decision to write nothing, is never taken on the guess
    /// alone (no append would check it): the stream is read and the command
    /// decided again. Use it where the id is fresh (a new UUID) and the stream
    /// almost never exists.
    pub async fn create(
        &self,
        id: impl fmt::Display,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Committed<A::Event>, RepositoryError<A::Error>>
    where
        A::Command: Clone,
    {
        self.decide_command(id, metadata, None, Start::AssumeNew, command)
            .await
    }

    /// [`Repository::create`] at most once per `command_id`, as
    /// [`Repository::execute_once`]: a command id executed before is answered
    /// as a duplicate, whether its events are what the stream holds (the
    /// store's idempotent re-append) or lie further in the stream (found by
    /// the load that follows the wrong guess).
    pub async fn create_once(
        &self,
        id: impl fmt::Display,
        command_id: Uuid,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Committed<A::Event>, RepositoryError<A::Error>>
    where
        A::Command: Clone,
    {
        self.decide_command(id, metadata, Some(command_id), Start::AssumeNew, command)
            .await
    }

    /// Executes a decision given as a closure over the current state; the
    /// closure runs again after each lost race.
    pub async fn execute_with(
        &self,
        id: impl fmt::Display,
        metadata: &Metadata,
        command_id: Option<Uuid>,
        decide: impl FnMut(&A) -> Result<Vec<A::Event>, A::Error> + Send,
    ) -> Result<Committed<A::Event>, RepositoryError<A::Error>> {
        self.run(id, metadata, command_id, Start::Load, decide)
            .await
    }

    /// Runs a command through the aggregate's `handle`, decided again after
    /// each lost race.
    async fn decide_command(
        &self,
        id: impl fmt::Display,
        metadata: &Metadata,
        command_id: Option<Uuid>,
        start: Start,
        command: A::Command,
    ) -> Result<Committed<A::Event>, RepositoryError<A::Error>>
    where
        A::Command: Clone,
    {
        self.run(id, metadata, command_id, start, move |state| {
            state.handle(command.clone())
        })
        .await
    }

    async fn run(
        &self,
        id: impl fmt::Display,
        metadata: &Metadata,
        command_id: Option<Uuid>,
        start: Start,
        mut decide: impl FnMut(&A) -> Result<Vec<A::Event>, A::Error> + Send,
    ) -> Result<Committed<A::Event>, RepositoryError<A::Error>> {
        let stream = self.stream_id(id)?;
        // Debug level: a command runs inside the span of whatever sent it (a
        // message's `es.bus.handle`, an HTTP request's), which carries the
        // correlation and causation ids at info level; at info, a span per
        // command would double the cost of formatting spans for every log.
        let span = tracing::debug_span!(
            "es.command",
            aggregate = A::TYPE,
            stream = %stream,
            correlation_id = metadata.correlation_id.map(tracing::field::display),
            causation_id = metadata.causation_id.map(tracing::field::display),
            attempts = tracing::field::Empty,
        );
        crate::otel::continue_trace(&span, metadata.traceparent);
        async {
            // The events name the command's span as their trace context
            // when it is exported.
            let metadata = &*crate::otel::traced(metadata);
            let marker = command_id.map(|c| derived_id(c, stream.as_str(), 0));
            let mut attempt = 1;
            let mut guess = self.first_guess(&stream, start);
            loop {
                // Whether the state about to be decided on was read from the
                // store (`None`), or only guessed.
                let guessed = guess.as_ref().map(|(kind, _)| *kind);
                let (loaded, duplicate) = match guess.take() {
                    Some((_, loaded)) => (loaded, false),
                    None => self.load_stream(&stream, marker, true).await?,
                };
                if duplicate {
                    let version = loaded.version;
                    self.keep(&stream, loaded);
                    return Ok(Committed {
                        events: Vec::new(),
                        stream_version: version,
                        position: Position::START,
                        duplicate: true,
                    });
                }
                let events = match decide(&loaded.state) {
                    // A refusal or a decision to write nothing, made on a
                    // guessed state, is checked by no append: decide again on
                    // the stream as it is.
                    Ok(events) if guessed.is_some() && events.is_empty() => {
                        self.drop_guess(&stream, guessed, loaded);
                        continue;
                    }
                    Err(_) if guessed.is_some() => {
                        self.drop_guess(&stream, guessed, loaded);
                        continue;
                    }
                    Ok(events) => events,
                    Err(refused) => {
                        self.keep(&stream, loaded);
                        return Err(RepositoryError::Rejected(refused));
                    }
                };
                if events.is_empty() {
                    let version = loaded.version;
                    self.keep(&stream, loaded);
                    return Ok(Committed {
                        events,
                        stream_version: version,
                        position: Position::START,
                        duplicate: false,
                    });
                }
                let mut batch = Vec::with_capacity(events.len());
                for (index, event) in (0u32..).zip(&events) {
                    let metadata = metadata.clone();
                    batch.push(match command_id {
                        Some(command_id) => self.codec.encode_with_id(
                            event,
                            metadata,
                            derived_id(command_id, stream.as_str(), index),
                        )?,
                        None => self.codec.encode(event, metadata)?,
                    });
                }
                let expected = ExpectedVersion::from_loaded(loaded.version);
                let appended = match &self.writer {
                    Some(writer) => {
                        writer
                            .write(StreamAppend::new(stream.clone(), expected, batch))
                            .await
                    }
                    None => self.store.append(&stream, expected, batch).await,
                };
                match appended {
                    Ok(result) => {
                        tracing::Span::current().record("attempts", attempt);
                        self.committed(&stream, loaded, &events, result.stream_version)
                            .await;
                        // Stored before at these positions: a duplicate decides
                        // nothing new.
                        return Ok(Committed {
                            events: if result.written { events } else { Vec::new() },
                            stream_version: result.stream_version,
                            position: result.position,
                            duplicate: !result.written,
                        });
                    }
                    // Ids derived from this command id are stored already: it
                    // was executed before (its events are hidden from the load
                    // by a snapshot) or concurrently, with another decision (a
                    // clock reading, a fresh id). Either way it is a duplicate.
                    Err(error)
                        if command_id.is_some() && ids_stored_elsewhere(&error, loaded.version) =>
                    {
                        self.keep(&stream, loaded);
                        let version = self.store.stream_version(&stream).await?;
                        return Ok(Committed {
                            events: Vec::new(),
                            stream_version: version,
                            position: Position::START,
                            duplicate: true,
                        });
                    }
                    // The guessed state was not the stream's (it is not new,
                    // or others wrote since the state was cached): not a race
                    // lost, so no backoff and no attempt spent; load and decide.
                    Err(StoreError::WrongExpectedVersion { .. }) if guessed.is_some() => {
                        self.drop_guess(&stream, guessed, loaded);
                    }
                    Err(StoreError::WrongExpectedVersion { .. })
                        if attempt < self.retry.max_attempts =>
                    {
                        // Still right up to its version: the next load reads on
                        // from there.
                        self.keep(&stream, loaded);
                        tokio::time::sleep(self.retry.backoff(attempt)).await;
                        attempt += 1;
                    }
                    Err(StoreError::WrongExpectedVersion { .. }) => {
                        self.keep(&stream, loaded);
                        return Err(RepositoryError::Contention {
                            stream,
                            attempts: attempt,
                        });
                    }
                    Err(other) => {
                        // Whether the append committed is unknown; the state
                        // is right up to its version either way.
                        self.keep(&stream, loaded);
                        return Err(other.into());
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The state to decide a command on inside another write: the cached
    /// one, taken out of the cache and not read on (the write's expected
    /// version checks it), else, with `assume_new`, the empty state of a
    /// stream assumed not to exist (checked the same way), else the stream
    /// as read.
    pub(crate) async fn state_for_write(
        &self,
        stream: &StreamId,
        assume_new: bool,
    ) -> Result<Loaded<A>, RepositoryError<A::Error>> {
        let start = if assume_new {
            Start::AssumeNew
        } else {
            Start::Load
        };
        if let Some((_, loaded)) = self.first_guess(stream, start) {
            return Ok(loaded);
        }
        self.load_stream(stream, None, false)
            .await
            .map(|(loaded, _)| loaded)
    }

    /// After another write appended `events` to `stream` right after
    /// `loaded`: the new state to the cache (and a snapshot, by the policy).
    pub(crate) async fn written_by_other(
        &self,
        stream: &StreamId,
        loaded: Loaded<A>,
        events: &[A::Event],
        version: u64,
    ) {
        self.committed(stream, loaded, events, version).await;
    }

    /// The state a command's first attempt decides on unread, if any: the
    /// cached one (which proves the stream exists), else for a create the
    /// empty one.
    fn first_guess(&self, stream: &StreamId, start: Start) -> Option<(Guess, Loaded<A>)> {
        if let Some(entry) = self.cache.as_ref().and_then(|cache| cache.take(stream)) {
            let loaded = Loaded {
                state: entry.state,
                version: entry.version,
            };
            return Some((Guess::Cached, loaded));
        }
        matches!(start, Start::AssumeNew).then(|| {
            let empty = Loaded {
                state: A::default(),
                version: 0,
            };
            (Guess::New, empty)
        })
    }

    /// A guess that did not hold: a cached state goes back to the cache
    /// (it is still right up to its version, so the load reads on from
    /// there); the empty state of a stream that exists is dropped.
    fn drop_guess(&self, stream: &StreamId, guessed: Option<Guess>, loaded: Loaded<A>) {
        if guessed == Some(Guess::Cached) {
            self.keep(stream, loaded);
        }
    }

    /// Puts a loaded state (still right up to its version) back in the cache.
    fn keep(&self, stream: &StreamId, loaded: Loaded<A>) {
        if let Some(cache) = &self.cache {
            cache.put(
                stream.clone(),
                Entry {
                    state: loaded.state,
                    version: loaded.version,
                },
            );
        }
    }

    /// After an append: the new state to the cache and, by the policy, to
    /// the snapshot store.
    async fn committed(
        &self,
        stream: &StreamId,
        mut loaded: Loaded<A>,
        events: &[A::Event],
        version: u64,
    ) {
        // The events sit right after the loaded version (the append expected
        // it); anything else (a replay reported elsewhere) is left alone.
        let count = u64::try_from(events.len()).unwrap_or(u64::MAX);
        if loaded.version.checked_add(count) != Some(version) {
            return;
        }
        let snapshot_due = self
            .snapshots
            .as_ref()
            .is_some_and(|s| s.policy.should_snapshot(loaded.version, version));
        if !snapshot_due && self.cache.is_none() {
            return;
        }
        for event in events {
            loaded.state.apply(event);
        }
        loaded.version = version;
        if snapshot_due {
            self.save_snapshot(stream, &loaded.state, version).await;
        }
        self.keep(stream, loaded);
    }

    async fn save_snapshot(&self, stream: &StreamId, state: &A, version: u64) {
        let Some(snapshots) = &self.snapshots else {
            return;
        };
        let state = match (snapshots.encode)(state) {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(%stream, %error, "cannot encode snapshot");
                return;
            }
        };
        let snapshot = Snapshot {
            stream_id: stream.clone(),
            version,
            schema_version: snapshots.schema_version,
            state,
        };
        if let Err(error) = snapshots.store.save(snapshot).await {
            tracing::warn!(%stream, %error, "cannot save snapshot");
        }
    }
}
