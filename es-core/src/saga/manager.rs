//! The saga manager: loads instances, deduplicates inputs and appends each
//! reaction atomically.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Instrument;
use uuid::Uuid;

use super::local::{LocalTarget, LocalWork};
use super::{
    CommandRecord, DeadlineRecord, LocalAggregate, Reaction, Received, Saga, SagaError,
    SagaOutcome, COMMAND_EXECUTED, COMMAND_RECORD, DEADLINE_CANCELLED, DEADLINE_FIRED,
    DEADLINE_SET,
};
use crate::bus::Message;
use crate::state_cache::{Entry, StateCache};
use crate::{
    derived_id, Aggregate, AppendResult, AppendWriter, Clock, EventCodec, EventStore,
    ExpectedVersion, Metadata, NewEvent, Payload, RecordedEvent, StoreError, StreamAppend,
    StreamId, TraceParent,
};

/// The most reactions one write holds: a saga and its local aggregate that
/// keep answering each other are a bug, not a workload.
const MAX_LOCAL_REACTIONS: usize = 64;

/// One reaction waiting to be recorded in a write.
struct Pending<S: Saga> {
    reaction: Reaction<S::Event, S::Command>,
    fired: Option<String>,
    cause: Uuid,
    metadata: Metadata,
}

/// A local aggregate's event that is an input of the saga, taken in the
/// write that appends it.
struct LocalInput<S: Saga> {
    input: S::Input,
    event_id: Uuid,
    metadata: Metadata,
    source: StreamId,
}

/// How a write with local commands ended.
enum LocalWrite {
    /// Written: the saga's outcome and the results of the aggregates'
    /// parts (a seeded aggregate's first).
    Written(SagaOutcome, Vec<AppendResult>),
    /// A part's expectation failed (or its ids are stored otherwise):
    /// nothing was written.
    Refused(StoreError),
}

/// A deadline a saga set and that has neither fired nor been cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingDeadline {
    /// When it is due.
    pub due: DateTime<Utc>,
    /// The id of the record that set it.
    pub set_by: Uuid,
    /// The trace context of the reaction that set it, which its firing
    /// continues: a timeout's compensation belongs to the conversation's
    /// trace.
    pub traceparent: Option<TraceParent>,
}

/// A saga instance as loaded from its stream.
#[derive(Clone, Debug, PartialEq)]
pub struct SagaInstance<S> {
    /// The saga's state.
    pub state: S,
    /// Its stream version.
    pub version: u64,
    /// Pending deadlines, by name.
    pub deadlines: BTreeMap<String, PendingDeadline>,
    /// The commands it has sent so far, in order.
    pub sent: Vec<CommandRecord>,
    handled: HashSet<Uuid, foldhash::fast::RandomState>,
}

impl<S: Default> Default for SagaInstance<S> {
    fn default() -> Self {
        Self {
            state: S::default(),
            version: 0,
            deadlines: BTreeMap::new(),
            sent: Vec::new(),
            handled: HashSet::default(),
        }
    }
}

impl<S> SagaInstance<S> {
    /// Whether the input message `message_id` was already handled.
    pub fn has_handled(&self, message_id: Uuid) -> bool {
        self.handled.contains(&message_id)
    }
}

/// Runs a saga type against an event store: loads instances, deduplicates
/// inputs, and appends each reaction atomically.
pub struct SagaManager<S: Saga> {
    store: Arc<dyn EventStore>,
    clock: Arc<dyn Clock>,
    events: EventCodec<S::Event>,
    inputs: EventCodec<S::Input>,
    commands: EventCodec<S::Command>,
    max_attempts: u32,
    cache: Option<Arc<StateCache<SagaInstance<S>>>>,
    local: Option<Arc<dyn LocalTarget<S>>>,
}

impl<S: Saga> fmt::Debug for SagaManager<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaManager")
            .field("saga", &S::TYPE)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl<S: Saga> SagaManager<S> {
    /// A manager over `store`, reading time from `clock`.
    pub fn new(store: Arc<dyn EventStore>, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            clock,
            events: EventCodec::new(),
            inputs: EventCodec::new(),
            commands: EventCodec::new(),
            max_attempts: 16,
            cache: None,
            local: None,
        }
    }

    /// Executes the saga's commands to `aggregate`'s aggregates in the
    /// saga's own write, and feeds their events back to the saga in that
    /// same write, until nothing local is left to do: one atomic
    /// [`EventStore::append_streams`] holds the saga's records and the
    /// aggregates' events, and no message crosses the bus between them.
    /// The executed commands are recorded as
    /// [`COMMAND_EXECUTED`](super::COMMAND_EXECUTED) records, which relays
    /// leave out.
    ///
    /// Commands the aggregate's own service executes reach the saga the
    /// same way when its repository writes through this manager
    /// ([`Repository::with_writer`](crate::Repository::with_writer)).
    #[must_use]
    pub fn with_local<A: Aggregate>(mut self, aggregate: LocalAggregate<S, A>) -> Self
    where
        A::Command: Send + Sync,
    {
        self.local = Some(Arc::new(aggregate));
        self
    }

    /// Keeps up to about `capacity` recently used instances in memory, as
    /// they stand after their last reaction, so the next reaction on one
    /// reads nothing: it decides on the cached instance and appends expecting
    /// its version.
    ///
    /// Safe with other processes writing the same streams: a cached instance
    /// is never wrong, only possibly short of the tail. A reaction decided on
    /// a stale one is refused by the store (wrong expected version) and
    /// decided again after reading the tail; a decision to write nothing
    /// (a duplicate, no change) is only taken after reading the tail. Two
    /// reactions on one instance at the same time never share a cached copy.
    #[must_use]
    pub fn with_instance_cache(mut self, capacity: usize) -> Self {
        self.cache = Some(Arc::new(StateCache::new(capacity)));
        self
    }

    /// Decodes inputs through this codec (and its upcasters).
    #[must_use]
    pub fn with_input_codec(mut self, codec: EventCodec<S::Input>) -> Self {
        self.inputs = codec;
        self
    }

    /// Decodes the saga's own events through this codec.
    #[must_use]
    pub fn with_event_codec(mut self, codec: EventCodec<S::Event>) -> Self {
        self.events = codec;
        self
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The stream of saga instance `saga_id`.
    pub fn stream_id(saga_id: Uuid) -> StreamId {
        // A UUID's string form always makes a valid stream id with any
        // category of valid length, which saga types are.
        StreamId::for_aggregate(S::TYPE, saga_id).unwrap_or_else(|_| {
            StreamId::for_aggregate("saga", saga_id).unwrap_or_else(|e| unreachable!("{e}"))
        })
    }

    /// Loads a saga instance.
    pub async fn load(&self, saga_id: Uuid) -> Result<SagaInstance<S>, SagaError> {
        self.load_after(&Self::stream_id(saga_id), SagaInstance::default())
            .await
    }

    /// Reads the records after `instance`'s version into it.
    async fn load_after(
        &self,
        stream: &StreamId,
        mut instance: SagaInstance<S>,
    ) -> Result<SagaInstance<S>, SagaError> {
        loop {
            let page = self
                .store
                .read_stream(stream, instance.version + 1, 1_000)
                .await?;
            for recorded in &page {
                self.fold(&mut instance, recorded)?;
            }
            if page.len() < 1_000 {
                return Ok(instance);
            }
        }
    }

    fn fold(
        &self,
        instance: &mut SagaInstance<S>,
        recorded: &RecordedEvent,
    ) -> Result<(), SagaError> {
        let malformed = |reason: String| SagaError::Record {
            stream: recorded.stream_id.clone(),
            event_id: recorded.event_id,
            reason,
        };
        if let Some(cause) = recorded.metadata.causation_id {
            instance.handled.insert(cause);
        }
        match &*recorded.event_type {
            COMMAND_RECORD | COMMAND_EXECUTED => {
                let record: CommandRecord = recorded
                    .payload
                    .decode()
                    .map_err(|e| malformed(e.to_string()))?;
                instance.sent.push(record);
            }
            DEADLINE_SET => {
                let record: DeadlineRecord = recorded
                    .payload
                    .decode()
                    .map_err(|e| malformed(e.to_string()))?;
                let due = record
                    .due
                    .ok_or_else(|| malformed("deadline without due time".into()))?;
                let pending = PendingDeadline {
                    due,
                    set_by: recorded.event_id,
                    traceparent: recorded.metadata.traceparent,
                };
                instance.deadlines.insert(record.name, pending);
            }
            DEADLINE_CANCELLED | DEADLINE_FIRED => {
                let record: DeadlineRecord = recorded
                    .payload
                    .decode()
                    .map_err(|e| malformed(e.to_string()))?;
                instance.deadlines.remove(&record.name);
            }
            _ => {
                for event in self.events.decode_all(recorded)? {
                    instance.state.apply(&event);
                }
            }
        }
        instance.version = recorded.stream_version;
        Ok(())
    }

    /// Handles a bus message: decodes it as inputs, finds each one's
    /// instance, and appends the reaction (unless the input was handled
    /// before). A message reads as several inputs when an upcaster split an
    /// older event into several of the saga's input types (its other parts
    /// are not the saga's): each is handled in turn, the first as the
    /// message itself and the others under ids derived from it, so that a
    /// redelivery after a crash between them handles only the rest. The
    /// outcome is the last one that wrote, else the most telling of the
    /// others.
    pub async fn handle(&self, message: &Message) -> Result<SagaOutcome, SagaError> {
        let inputs = self.inputs.decode_declared(
            &message.message_type,
            message.schema_version,
            &message.payload,
        )?;
        let mut outcome = SagaOutcome::Ignored;
        for (index, input) in (0u32..).zip(inputs) {
            let cause = match index {
                0 => message.message_id,
                index => derived_id(message.message_id, "es.saga.split-input", index),
            };
            let handled = self.handle_input(message, cause, &input).await?;
            outcome = SagaOutcome::telling(outcome, handled);
        }
        Ok(outcome)
    }

    /// Handles one input of `message`, as `cause`.
    async fn handle_input(
        &self,
        message: &Message,
        cause: Uuid,
        input: &S::Input,
    ) -> Result<SagaOutcome, SagaError> {
        let Some(saga_id) = S::saga_id(input, &message.metadata) else {
            return Ok(SagaOutcome::Ignored);
        };
        // Debug level: a reaction runs inside its message's span (the bus's
        // `es.bus.handle`, or the consumer's), which already carries the
        // message, correlation and causation ids at info level.
        let span = tracing::debug_span!(
            "es.saga.react",
            saga = S::TYPE,
            %saga_id,
            message_type = %message.message_type,
            message_id = %message.message_id,
            correlation_id = message.metadata.correlation_id.map(tracing::field::display),
            causation_id = %message.message_id,
        );
        crate::otel::continue_trace(&span, message.metadata.traceparent);
        let metadata = message.metadata.caused_by(message.message_id);
        self.react_with(saga_id, cause, &metadata, |instance, now| {
            if instance.has_handled(cause) {
                return None;
            }
            let received = Received {
                now,
                source: message.source.as_ref(),
            };
            Some((instance.state.react(input, received), None))
        })
        .instrument(span)
        .await
    }

    /// Fires the deadline `name` of instance `saga_id` if it is pending and due.
    pub async fn fire_deadline(&self, saga_id: Uuid, name: &str) -> Result<SagaOutcome, SagaError> {
        let span =
            tracing::info_span!("es.saga.deadline", saga = S::TYPE, %saga_id, deadline = name);
        async {
            let instance = self.load(saga_id).await?;
            let Some(&PendingDeadline {
                due,
                set_by,
                traceparent,
            }) = instance.deadlines.get(name)
            else {
                return Ok(SagaOutcome::Ignored);
            };
            if due > self.clock.now() {
                return Ok(SagaOutcome::Ignored);
            }
            // The firing joins the trace of the reaction that set it.
            crate::otel::continue_trace(&tracing::Span::current(), traceparent);
            let mut metadata = Metadata::new()
                .with_correlation_id(saga_id)
                .with_causation_id(set_by);
            metadata.traceparent = traceparent;
            let name = name.to_owned();
            self.react_with(
                saga_id,
                set_by,
                &metadata,
                move |instance, now| match instance.deadlines.get(&name) {
                    Some(pending) if pending.set_by == set_by && pending.due <= now => {
                        let mut reaction = instance.state.on_deadline(&name, now);
                        reaction.cancelled.retain(|n| n != &name);
                        Some((reaction, Some(name.clone())))
                    }
                    _ => None,
                },
            )
            .await
        }
        .instrument(span)
        .await
    }

    /// Loads, decides with `decide`, and appends; retries lost races. `decide`
    /// answers `None` when there is nothing to decide (a duplicate, a deadline
    /// no longer pending), else the reaction and the deadline it fires, if any.
    async fn react_with(
        &self,
        saga_id: Uuid,
        cause: Uuid,
        metadata: &Metadata,
        decide: impl Fn(
            &SagaInstance<S>,
            DateTime<Utc>,
        ) -> Option<(Reaction<S::Event, S::Command>, Option<String>)>,
    ) -> Result<SagaOutcome, SagaError> {
        let stream = Self::stream_id(saga_id);
        for attempt in 1..=self.max_attempts {
            let cached = self.cache.as_ref().and_then(|cache| cache.take(&stream));
            // The first attempt trusts a cached instance without reading: a
            // reaction decided on it is appended expecting its version, so
            // the store refuses it if the stream moved on. After a lost race
            // the tail is read.
            let (mut instance, mut verified) = match cached {
                Some(entry) if attempt == 1 => (entry.state, false),
                cached => {
                    let from = cached.map(|entry| entry.state).unwrap_or_default();
                    (self.load_after(&stream, from).await?, true)
                }
            };
            let (reaction, fired) = loop {
                let decision = decide(&instance, self.clock.now());
                let writes = decision
                    .as_ref()
                    .is_some_and(|(reaction, fired)| !reaction.is_empty() || fired.is_some());
                // A decision to write nothing is not checked by any append:
                // only the stream's tail can confirm it.
                if !writes && !verified {
                    instance = self.load_after(&stream, instance).await?;
                    verified = true;
                    continue;
                }
                match decision {
                    Some(decided) if writes => break decided,
                    Some(_) => {
                        self.keep(&stream, instance);
                        return Ok(SagaOutcome::NoChange);
                    }
                    None => {
                        let outcome = if instance.has_handled(cause) {
                            SagaOutcome::Duplicate
                        } else {
                            SagaOutcome::Ignored
                        };
                        self.keep(&stream, instance);
                        return Ok(outcome);
                    }
                }
            };
            if let Some(local) = self.local_for(&reaction) {
                let first = Pending {
                    reaction,
                    fired,
                    cause,
                    metadata: metadata.clone(),
                };
                let pending = VecDeque::from([first]);
                match self
                    .write_local(local, &stream, instance, saga_id, pending, None)
                    .await?
                {
                    LocalWrite::Written(outcome, _) => return Ok(outcome),
                    // Lost a race on the saga or on an aggregate, or the
                    // input was handled elsewhere: read on and decide again.
                    LocalWrite::Refused(_) => {
                        let backoff = Duration::from_micros(200 * u64::from(attempt.min(20)));
                        tokio::time::sleep(backoff.mul_f64(fastrand::f64())).await;
                        continue;
                    }
                }
            }
            let (records, effects) =
                self.records(&stream, cause, metadata, &reaction, fired.as_deref())?;
            let expected = ExpectedVersion::from_loaded(instance.version);
            let count = records.len() as u64;
            match self.store.append(&stream, expected, records).await {
                Ok(result) => {
                    if !result.written {
                        self.keep(&stream, instance);
                        return Ok(SagaOutcome::Duplicate);
                    }
                    if self.cache.is_some() {
                        effects.advance(&mut instance, &reaction, metadata.causation_id, count);
                        if instance.version == result.stream_version {
                            self.keep(&stream, instance);
                        }
                    }
                    return Ok(SagaOutcome::Reacted {
                        version: result.stream_version,
                        position: result.position,
                    });
                }
                // Lost a race; or another delivery of this input reacted
                // first, its records' ids stored as ours are (they derive
                // from the input) but with other payloads (a clock reading).
                // Either way read on: the next round finds it handled.
                Err(
                    StoreError::WrongExpectedVersion { .. }
                    | StoreError::IdempotencyConflict { .. },
                ) => {
                    // Right up to its version: the retry reads on from there.
                    self.keep(&stream, instance);
                    let backoff = Duration::from_micros(200 * u64::from(attempt.min(20)));
                    tokio::time::sleep(backoff.mul_f64(fastrand::f64())).await;
                }
                Err(other) => {
                    self.keep(&stream, instance);
                    return Err(other.into());
                }
            }
        }
        Err(SagaError::Contention {
            stream,
            attempts: self.max_attempts,
        })
    }

    /// The local target, when `reaction` sends it a command.
    fn local_for(&self, reaction: &Reaction<S::Event, S::Command>) -> Option<&dyn LocalTarget<S>> {
        self.local.as_deref().filter(|local| {
            reaction
                .commands
                .iter()
                .any(|c| local.accepts(&c.topic, &c.command))
        })
    }

    /// The saga inputs among an aggregate's new events, for instance
    /// `saga_id`.
    fn local_inputs(
        &self,
        local: &dyn LocalTarget<S>,
        saga_id: Uuid,
        source: &StreamId,
        events: &[NewEvent],
    ) -> Result<Vec<LocalInput<S>>, SagaError> {
        let mut inputs = Vec::new();
        for event in events {
            if !local.is_input(&event.event_type) {
                continue;
            }
            let Some(input) =
                self.inputs
                    .decode_one(&event.event_type, event.schema_version, &event.payload)?
            else {
                continue;
            };
            if S::saga_id(&input, &event.metadata) == Some(saga_id) {
                inputs.push(LocalInput {
                    input,
                    event_id: event.event_id,
                    metadata: event.metadata.caused_by(event.event_id),
                    source: source.clone(),
                });
            }
        }
        Ok(inputs)
    }

    /// One write of the saga's reactions and its local aggregates' events:
    /// records `pending` (and `seed`, an aggregate's own command, whose
    /// events the saga reacts to), executes the local commands each
    /// reaction sends, lets the saga react to their events, and so on until
    /// nothing is pending; then appends it all atomically.
    async fn write_local(
        &self,
        local: &dyn LocalTarget<S>,
        stream: &StreamId,
        mut instance: SagaInstance<S>,
        saga_id: Uuid,
        mut pending: VecDeque<Pending<S>>,
        seed: Option<StreamAppend>,
    ) -> Result<LocalWrite, SagaError> {
        let mut work: Box<dyn LocalWork<S>> = local.begin();
        let mut fed = Vec::new();
        let seeded = seed.is_some();
        if let Some(seed) = seed {
            fed = self.local_inputs(local, saga_id, &seed.stream, &seed.events)?;
            work.seed(seed);
        }
        let loaded_version = instance.version;
        let mut records = Vec::new();
        let mut reactions = 0;
        loop {
            for fed in fed.drain(..) {
                if instance.has_handled(fed.event_id) {
                    continue;
                }
                let received = Received::at(self.clock.now()).from(&fed.source);
                let reaction = instance.state.react(&fed.input, received);
                if !reaction.is_empty() {
                    pending.push_back(Pending {
                        reaction,
                        fired: None,
                        cause: fed.event_id,
                        metadata: fed.metadata,
                    });
                }
            }
            let Some(next) = pending.pop_front() else {
                break;
            };
            reactions += 1;
            if reactions > MAX_LOCAL_REACTIONS {
                return Err(SagaError::Record {
                    stream: stream.clone(),
                    event_id: next.cause,
                    reason: format!(
                        "the saga and its local aggregate answered each other more than {MAX_LOCAL_REACTIONS} times in one write"
                    ),
                });
            }
            let (made, mut effects) = self.records(
                stream,
                next.cause,
                &next.metadata,
                &next.reaction,
                next.fired.as_deref(),
            )?;
            for (index, record_id) in std::mem::take(&mut effects.executed) {
                let Some(outgoing) = next.reaction.commands.get(index) else {
                    continue;
                };
                let metadata = crate::otel::traced_owned(next.metadata.caused_by(record_id));
                let executed = work
                    .execute(&outgoing.topic, &outgoing.command, record_id, &metadata)
                    .await?;
                if let Some((stream, events)) = executed {
                    fed.extend(self.local_inputs(local, saga_id, &stream, &events)?);
                }
            }
            let count = made.len() as u64;
            effects.advance(
                &mut instance,
                &next.reaction,
                next.metadata.causation_id,
                count,
            );
            records.extend(made);
        }
        // A seeded write checks the saga's version even when the saga wrote
        // nothing: the instance it decided on may have been a guess.
        let saga_part = !records.is_empty() || seeded;
        let mut parts = Vec::new();
        if saga_part {
            parts.push(StreamAppend::new(
                stream.clone(),
                ExpectedVersion::from_loaded(loaded_version),
                records,
            ));
        }
        parts.extend(work.parts());
        if parts.is_empty() {
            work.finish(None).await;
            self.keep(stream, instance);
            return Ok(LocalWrite::Written(SagaOutcome::NoChange, Vec::new()));
        }
        match self.store.append_streams(parts).await {
            Ok(results) => {
                let (outcome, aggregates) = match results.split_first() {
                    Some((saga, rest)) if saga_part => {
                        let outcome = if saga.written && saga.stream_version > loaded_version {
                            if instance.version == saga.stream_version {
                                self.keep(stream, instance);
                            }
                            SagaOutcome::Reacted {
                                version: saga.stream_version,
                                position: saga.position,
                            }
                        } else if saga.stream_version == loaded_version
                            && instance.version == loaded_version
                        {
                            self.keep(stream, instance);
                            SagaOutcome::NoChange
                        } else {
                            SagaOutcome::Duplicate
                        };
                        (outcome, rest)
                    }
                    _ => {
                        self.keep(stream, instance);
                        (SagaOutcome::NoChange, results.as_slice())
                    }
                };
                let aggregates = aggregates.to_vec();
                work.finish(Some(&aggregates)).await;
                Ok(LocalWrite::Written(outcome, aggregates))
            }
            Err(
                error @ (StoreError::WrongExpectedVersion { .. }
                | StoreError::IdempotencyConflict { .. }),
            ) => {
                work.finish(None).await;
                Ok(LocalWrite::Refused(error))
            }
            Err(error) => {
                work.finish(None).await;
                Err(error.into())
            }
        }
    }

    /// The instance to decide on: the cached one on a first attempt (or a
    /// new one when none is cached), else the stream read on from whatever
    /// the cache had.
    async fn instance_for(
        &self,
        stream: &StreamId,
        first: bool,
    ) -> Result<SagaInstance<S>, SagaError> {
        match self.cache.as_ref().and_then(|cache| cache.take(stream)) {
            Some(entry) if first => Ok(entry.state),
            // Not cached: a first attempt assumes a new instance (the write
            // expects the saga's stream not to exist, so a wrong guess only
            // costs the retry that reads it).
            None if first => Ok(SagaInstance::default()),
            cached => {
                let from = cached.map(|entry| entry.state).unwrap_or_default();
                self.load_after(stream, from).await
            }
        }
    }

    /// Puts an instance (right up to its version) in the cache, if any.
    fn keep(&self, stream: &StreamId, instance: SagaInstance<S>) {
        if let Some(cache) = &self.cache {
            let version = instance.version;
            cache.put(
                stream.clone(),
                Entry {
                    state: instance,
                    version,
                },
            );
        }
    }

    fn records(
        &self,
        stream: &StreamId,
        cause: Uuid,
        metadata: &Metadata,
        reaction: &Reaction<S::Event, S::Command>,
        fired: Option<&str>,
    ) -> Result<(Vec<NewEvent>, Effects), SagaError> {
        // The records name the reaction's span as their trace context when
        // it is exported.
        let metadata = &*crate::otel::traced(metadata);
        let mut records = Vec::new();
        let mut effects = Effects::default();
        // Each record's id is derived from the input and its place in the
        // reaction: the same reaction appended again is recognised.
        let next_id = |records: &Vec<NewEvent>| {
            let index = u32::try_from(records.len()).unwrap_or(u32::MAX);
            derived_id(cause, stream.as_str(), index)
        };
        let record = |records: &mut Vec<NewEvent>, event_type: &'static str, payload: Payload| {
            records.push(NewEvent {
                event_id: next_id(records),
                event_type: event_type.into(),
                schema_version: 1,
                payload,
                metadata: metadata.clone(),
                tags: Default::default(),
            });
        };
        let payload = |value: &dyn erased::Json| value.to_payload();
        let ended = fired.map(|name| (DEADLINE_FIRED, name)).into_iter().chain(
            reaction
                .cancelled
                .iter()
                .map(|n| (DEADLINE_CANCELLED, n.as_str())),
        );
        for (event_type, name) in ended {
            let body = DeadlineRecord {
                name: name.to_owned(),
                due: None,
            };
            record(&mut records, event_type, payload(&body)?);
            effects.ended.push(body.name);
        }
        for event in &reaction.events {
            let id = next_id(&records);
            records.push(self.events.encode_with_id(event, metadata.clone(), id)?);
        }
        for (index, outgoing) in reaction.commands.iter().enumerate() {
            let (command_type, schema_version, command) =
                self.commands.encode_parts(&outgoing.command)?;
            let body = CommandRecord {
                topic: outgoing.topic.clone(),
                command_type: command_type.to_owned(),
                schema_version,
                payload: command,
            };
            let local = self
                .local
                .as_ref()
                .is_some_and(|l| l.accepts(&outgoing.topic, &outgoing.command));
            if local {
                effects.executed.push((index, next_id(&records)));
                record(&mut records, COMMAND_EXECUTED, body.to_payload()?);
            } else {
                record(&mut records, COMMAND_RECORD, body.to_payload()?);
            }
            effects.sent.push(body);
        }
        for (name, due) in &reaction.deadlines {
            let body = DeadlineRecord {
                name: name.clone(),
                due: Some(*due),
            };
            record(&mut records, DEADLINE_SET, payload(&body)?);
            let set_by = records.last().map(|r| r.event_id).unwrap_or_default();
            let pending = PendingDeadline {
                due: *due,
                set_by,
                traceparent: metadata.traceparent,
            };
            effects.set.push((body.name, pending));
        }
        Ok((records, effects))
    }
}

/// A repository that writes through the manager appends its aggregate's
/// events together with the saga's reaction to them (and whatever local
/// commands that reaction executes), in one atomic write. Events of no
/// saga instance are appended as they are.
#[async_trait::async_trait]
impl<S: Saga> AppendWriter for SagaManager<S> {
    async fn write(&self, part: StreamAppend) -> Result<AppendResult, StoreError> {
        let backend = |e: SagaError| match e {
            SagaError::Store(e) => e,
            other => StoreError::Backend {
                source: Box::new(other),
            },
        };
        // The saga instance the first of the events that are inputs belongs
        // to; an input that does not decode is an error (the saga would
        // miss it), not an event to append without the saga.
        let mut saga_id = None;
        if let Some(local) = self.local.as_deref() {
            for event in part.events.iter().filter(|e| local.is_input(&e.event_type)) {
                let input = self
                    .inputs
                    .decode_one(&event.event_type, event.schema_version, &event.payload)
                    .map_err(|e| backend(e.into()))?;
                saga_id = input.and_then(|input| S::saga_id(&input, &event.metadata));
                if saga_id.is_some() {
                    break;
                }
            }
        }
        let (Some(local), Some(saga_id)) = (self.local.as_deref(), saga_id) else {
            return self
                .store
                .append(&part.stream, part.expected, part.events)
                .await;
        };
        let stream = Self::stream_id(saga_id);
        let span = tracing::debug_span!("es.saga.react_local", saga = S::TYPE, %saga_id, aggregate = %part.stream);
        crate::otel::continue_trace(
            &span,
            part.events.iter().find_map(|e| e.metadata.traceparent),
        );
        async {
            for attempt in 1..=self.max_attempts {
                let instance = self
                    .instance_for(&stream, attempt == 1)
                    .await
                    .map_err(backend)?;
                let written = self
                    .write_local(
                        local,
                        &stream,
                        instance,
                        saga_id,
                        VecDeque::new(),
                        Some(part.clone()),
                    )
                    .await
                    .map_err(backend)?;
                match written {
                    LocalWrite::Written(_, aggregates) => {
                        return aggregates
                            .first()
                            .copied()
                            .ok_or_else(|| StoreError::Backend {
                                source: "the write answered nothing for the aggregate".into(),
                            });
                    }
                    // The saga's stream moved on: read on and react again.
                    LocalWrite::Refused(
                        StoreError::WrongExpectedVersion { stream: moved, .. }
                        | StoreError::IdempotencyConflict { stream: moved, .. },
                    ) if moved == stream => {
                        let backoff = Duration::from_micros(200 * u64::from(attempt.min(20)));
                        tokio::time::sleep(backoff.mul_f64(fastrand::f64())).await;
                    }
                    // The aggregate's: the repository decides again.
                    LocalWrite::Refused(error) => return Err(error),
                }
            }
            Err(StoreError::Backend {
                source: Box::new(SagaError::Contention {
                    stream: stream.clone(),
                    attempts: self.max_attempts,
                }),
            })
        }
        .instrument(span)
        .await
    }
}

/// What a reaction's records do to its instance, noted as they are made:
/// after the append, a cached instance is brought up to the new version
/// with them, exactly as folding the records would, without decoding the
/// records again.
#[derive(Default)]
struct Effects {
    /// Deadlines fired or cancelled.
    ended: Vec<String>,
    /// Commands sent.
    sent: Vec<CommandRecord>,
    /// The local commands among them: their index in the reaction and the
    /// id of their record (the id they are executed as).
    executed: Vec<(usize, Uuid)>,
    /// Deadlines set, by name.
    set: Vec<(String, PendingDeadline)>,
}

impl Effects {
    /// Applies the reaction to `instance` in the order of its records (see
    /// [`SagaManager::fold`]): `count` records caused by `cause`.
    fn advance<S: Saga>(
        self,
        instance: &mut SagaInstance<S>,
        reaction: &Reaction<S::Event, S::Command>,
        cause: Option<Uuid>,
        count: u64,
    ) {
        if let Some(cause) = cause.filter(|_| count > 0) {
            instance.handled.insert(cause);
        }
        for name in &self.ended {
            instance.deadlines.remove(name);
        }
        for event in &reaction.events {
            instance.state.apply(event);
        }
        instance.sent.extend(self.sent);
        for (name, pending) in self.set {
            instance.deadlines.insert(name, pending);
        }
        instance.version += count;
    }
}

mod erased {
    use crate::{CodecError, Payload};

    /// A serializable record body.
    pub(super) trait Json {
        fn to_payload(&self) -> Result<Payload, CodecError>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_payload(&self) -> Result<Payload, CodecError> {
            Payload::from_value(self).map_err(|e| CodecError::Encode {
                event_type: "saga record".into(),
                source: e.source,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc_support::reminder::{Reminder, ReminderInput};
    use crate::{InMemoryEventStore, ManualClock};

    fn input(saga: Uuid, input: &ReminderInput) -> Message {
        input.to(saga)
    }

    /// Two managers (two processes) handle one input, each on its own
    /// reading of the clock: the one that comes second, deciding on a cached
    /// instance from before the first one's reaction, writes record ids
    /// that are stored already with other payloads. That is a duplicate,
    /// not an error.
    #[tokio::test]
    async fn an_input_handled_elsewhere_at_another_time_is_a_duplicate() {
        let clock = Arc::new(ManualClock::default());
        let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        let cached =
            SagaManager::<Reminder>::new(Arc::clone(&store), clock.clone()).with_instance_cache(16);
        let other = SagaManager::<Reminder>::new(Arc::clone(&store), clock.clone());
        let saga = Uuid::now_v7();
        // Caches the saga's empty instance.
        let nothing = cached
            .handle(&input(saga, &ReminderInput::Stopped))
            .await
            .unwrap();
        assert!(matches!(nothing, SagaOutcome::NoChange), "{nothing:?}");
        let started = input(saga, &ReminderInput::Started);
        let first = other.handle(&started).await.unwrap();
        assert!(matches!(first, SagaOutcome::Reacted { .. }), "{first:?}");
        clock.advance(Duration::from_secs(1));

        let second = cached.handle(&started).await.unwrap();
        assert!(matches!(second, SagaOutcome::Duplicate), "{second:?}");
        let loaded = cached.load(saga).await.unwrap();
        assert_eq!(loaded.deadlines.len(), 1);
        assert!(loaded.state.waiting);
    }

    /// A deadline fires in the trace of the reaction that set it: the
    /// records of its firing carry that trace context.
    #[tokio::test]
    async fn a_deadline_fires_in_the_trace_that_set_it() {
        let clock = Arc::new(ManualClock::default());
        let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        let manager = SagaManager::<Reminder>::new(Arc::clone(&store), clock.clone());
        let saga = Uuid::now_v7();
        let trace = TraceParent::new_root();
        let mut started = input(saga, &ReminderInput::Started);
        started.metadata.traceparent = Some(trace);
        manager.handle(&started).await.unwrap();
        let pending = manager.load(saga).await.unwrap().deadlines["nudge"];
        assert_eq!(
            pending.traceparent.map(|t| t.trace_id()),
            Some(trace.trace_id())
        );

        clock.advance(Duration::from_secs(31));
        let fired = manager.fire_deadline(saga, "nudge").await.unwrap();
        assert!(matches!(fired, SagaOutcome::Reacted { .. }), "{fired:?}");
        let stream = SagaManager::<Reminder>::stream_id(saga);
        let records = store.read_stream(&stream, 0, usize::MAX).await.unwrap();
        let firing: Vec<_> = records
            .iter()
            .filter(|r| r.metadata.causation_id == Some(pending.set_by))
            .collect();
        assert!(!firing.is_empty(), "the firing wrote nothing");
        for record in firing {
            assert_eq!(
                record.metadata.traceparent.map(|t| t.trace_id()),
                Some(trace.trace_id()),
                "{} is outside the trace",
                record.event_type
            );
        }
    }

    /// The instance the cache holds after each reaction is the one a fresh
    /// load folds from the stream: deadlines set, fired and cancelled,
    /// commands sent, inputs handled and the state.
    #[tokio::test]
    async fn a_cached_instance_is_what_loading_the_stream_gives() {
        let clock = Arc::new(ManualClock::default());
        let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        let manager =
            SagaManager::<Reminder>::new(Arc::clone(&store), clock.clone()).with_instance_cache(16);
        let cached = |saga: Uuid| {
            let stream = SagaManager::<Reminder>::stream_id(saga);
            let cache = manager.cache.as_ref().unwrap();
            let entry = cache.take(&stream).unwrap();
            let state = entry.state.clone();
            cache.put(stream, entry);
            state
        };
        let (nudged, stopped) = (Uuid::now_v7(), Uuid::now_v7());
        for saga in [nudged, stopped] {
            manager
                .handle(&input(saga, &ReminderInput::Started))
                .await
                .unwrap();
            let loaded = manager.load(saga).await.unwrap();
            assert_eq!(loaded.deadlines.len(), 1);
            assert_eq!(cached(saga), loaded);
        }
        manager
            .handle(&input(stopped, &ReminderInput::Stopped))
            .await
            .unwrap();
        let loaded = manager.load(stopped).await.unwrap();
        assert!(loaded.state.done && loaded.deadlines.is_empty());
        assert_eq!(cached(stopped), loaded);
        clock.advance(Duration::from_secs(31));
        let fired = manager.fire_deadline(nudged, "nudge").await.unwrap();
        assert!(matches!(fired, SagaOutcome::Reacted { .. }), "{fired:?}");
        let loaded = manager.load(nudged).await.unwrap();
        assert_eq!(loaded.sent.len(), 1);
        assert_eq!(cached(nudged), loaded);
    }
}
