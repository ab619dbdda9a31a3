//! Sagas (process managers): long-running conversations that react to
//! messages by changing their own event-sourced state, sending commands, and
//! setting deadlines, all in one atomic append.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use crate::bus::{Delivery, Message, MessageHandler, Outcome};
use crate::state_cache::{Entry, StateCache};
use crate::{
    derived_id, Clock, CodecError, DomainEvent, EventCodec, EventStore, ExpectedVersion, Metadata,
    NewEvent, Payload, Position, RecordedEvent, StoreError, StreamId,
};

/// The stored type of a command a saga sent.
pub const COMMAND_RECORD: &str = "$command";
/// The stored type of a deadline a saga set.
pub const DEADLINE_SET: &str = "$deadline";
/// The stored type of a deadline a saga cancelled.
pub const DEADLINE_CANCELLED: &str = "$deadline-cancelled";
/// The stored type of a deadline that fired.
pub const DEADLINE_FIRED: &str = "$deadline-fired";

/// A process manager keyed by a correlation id.
///
/// Like an aggregate, a saga is pure: `apply` folds its own events into its
/// state, and `react` / `on_deadline` decide, from the state, an input and the
/// time, a [`Reaction`]: new state events, commands to send, deadlines to set
/// or cancel. The [`SagaManager`] stores a reaction as one atomic append to the
/// saga's own stream (`<TYPE>-<saga id>`); the relay sends the commands from
/// there, and the [`DeadlineScheduler`] fires deadlines when they are due.
///
/// Inputs are deduplicated by message id, so a redelivered message changes
/// nothing; `react` must still cope with inputs arriving out of order.
pub trait Saga: Default + Send + Sync + 'static {
    /// The saga's own state changes.
    type Event: DomainEvent;
    /// The messages it reacts to.
    type Input: DomainEvent;
    /// The commands it sends.
    type Command: DomainEvent;

    /// The stream category of this saga type.
    const TYPE: &'static str;

    /// Which saga instance an input belongs to; `None` ignores the input. By
    /// default, the message's correlation id.
    fn saga_id(input: &Self::Input, metadata: &Metadata) -> Option<Uuid> {
        let _ = input;
        metadata.correlation_id
    }

    /// Evolves the state by one of its events.
    fn apply(&mut self, event: &Self::Event);

    /// Decides the reaction to an input.
    fn react(
        &self,
        input: &Self::Input,
        now: DateTime<Utc>,
    ) -> Reaction<Self::Event, Self::Command>;

    /// Decides the reaction to a deadline it set, now due.
    fn on_deadline(&self, name: &str, now: DateTime<Utc>) -> Reaction<Self::Event, Self::Command>;
}

/// A command a saga sends, and where to.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing<C> {
    /// The topic (bounded context) that handles it.
    pub topic: String,
    /// The command.
    pub command: C,
}

/// What a saga decided: state events, commands, deadlines set and cancelled.
#[derive(Clone, Debug, PartialEq)]
pub struct Reaction<E, C> {
    /// State events, applied in order.
    pub events: Vec<E>,
    /// Commands to send.
    pub commands: Vec<Outgoing<C>>,
    /// Deadlines to set (name, due time); setting a pending name again moves it.
    pub deadlines: Vec<(String, DateTime<Utc>)>,
    /// Pending deadlines to cancel, by name.
    pub cancelled: Vec<String>,
}

impl<E, C> Default for Reaction<E, C> {
    fn default() -> Self {
        Self {
            events: Vec::new(),
            commands: Vec::new(),
            deadlines: Vec::new(),
            cancelled: Vec::new(),
        }
    }
}

impl<E, C> Reaction<E, C> {
    /// Nothing to do.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds a state event.
    #[must_use]
    pub fn event(mut self, event: E) -> Self {
        self.events.push(event);
        self
    }

    /// Adds a command for `topic`.
    #[must_use]
    pub fn send(mut self, topic: impl Into<String>, command: C) -> Self {
        self.commands.push(Outgoing {
            topic: topic.into(),
            command,
        });
        self
    }

    /// Sets a deadline.
    #[must_use]
    pub fn deadline(mut self, name: impl Into<String>, due: DateTime<Utc>) -> Self {
        self.deadlines.push((name.into(), due));
        self
    }

    /// Cancels a deadline.
    #[must_use]
    pub fn cancel(mut self, name: impl Into<String>) -> Self {
        self.cancelled.push(name.into());
        self
    }

    /// Whether the reaction does nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.commands.is_empty()
            && self.deadlines.is_empty()
            && self.cancelled.is_empty()
    }
}

/// The stored form of a command a saga sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// The topic that handles it.
    pub topic: String,
    /// The command's type name.
    pub command_type: String,
    /// The command's schema version.
    pub schema_version: u32,
    /// The command's payload.
    pub payload: Payload,
}

impl CommandRecord {
    /// The record as stored: the JSON its `Serialize` gives, written
    /// directly so the command's payload, already JSON, is not parsed again.
    ///
    /// # Errors
    /// Never, in practice: the strings always serialize.
    pub fn to_payload(&self) -> Result<Payload, CodecError> {
        use std::fmt::Write as _;
        let command = self.payload.as_str();
        let mut json =
            String::with_capacity(72 + self.topic.len() + self.command_type.len() + command.len());
        json.push_str("{\"topic\":");
        push_json_string(&mut json, &self.topic)?;
        json.push_str(",\"command_type\":");
        push_json_string(&mut json, &self.command_type)?;
        // Writing into a String cannot fail.
        let _ = write!(
            json,
            ",\"schema_version\":{},\"payload\":",
            self.schema_version
        );
        json.push_str(command);
        json.push('}');
        Ok(Payload::from_trusted_json(json))
    }

    /// The bus message for a stored command record: the record's event id
    /// becomes the message id, so a resent command is recognised.
    pub fn to_message(&self, recorded: &RecordedEvent) -> Message {
        Message {
            message_id: recorded.event_id,
            topic: self.topic.as_str().into(),
            message_type: self.command_type.as_str().into(),
            schema_version: self.schema_version,
            payload: self.payload.clone(),
            metadata: recorded.metadata.clone(),
        }
    }

    /// The bus message for a stored command record, read straight from the
    /// record's JSON: what [`to_message`](Self::to_message) gives for the
    /// decoded record, without building the record first. The relay does
    /// this for every command a saga sends.
    ///
    /// # Errors
    /// When the payload is not a command record.
    pub fn message_from(recorded: &RecordedEvent) -> Result<Message, serde_json::Error> {
        /// The record's fields, borrowed where the JSON allows it.
        #[derive(Deserialize)]
        struct Borrowed<'a> {
            #[serde(borrow)]
            topic: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            command_type: std::borrow::Cow<'a, str>,
            schema_version: u32,
            #[serde(borrow)]
            payload: &'a serde_json::value::RawValue,
        }
        let record: Borrowed<'_> = serde_json::from_str(recorded.payload.as_str())?;
        Ok(Message {
            message_id: recorded.event_id,
            topic: Arc::from(&*record.topic),
            message_type: Arc::from(&*record.command_type),
            schema_version: record.schema_version,
            payload: Payload::from_trusted_json(record.payload.get()),
            metadata: recorded.metadata.clone(),
        })
    }
}

/// Appends `s` as a JSON string: directly when nothing in it needs escaping
/// (topics and type names), else as `serde_json` writes it.
fn push_json_string(json: &mut String, s: &str) -> Result<(), CodecError> {
    let plain = s
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if plain {
        json.push('"');
        json.push_str(s);
        json.push('"');
    } else {
        let quoted = serde_json::to_string(s).map_err(|source| CodecError::Encode {
            event_type: COMMAND_RECORD.into(),
            source,
        })?;
        json.push_str(&quoted);
    }
    Ok(())
}

/// The stored form of a deadline record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadlineRecord {
    /// The deadline's name.
    pub name: String,
    /// When it is due (set records only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<DateTime<Utc>>,
}

/// A saga instance as loaded from its stream.
#[derive(Clone, Debug, PartialEq)]
pub struct SagaInstance<S> {
    /// The saga's state.
    pub state: S,
    /// Its stream version.
    pub version: u64,
    /// Pending deadlines: name -> (due, id of the record that set it).
    pub deadlines: BTreeMap<String, (DateTime<Utc>, Uuid)>,
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

/// Why a saga could not handle an input or a deadline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An input, event or record could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A stored saga record is malformed.
    #[error("malformed saga record {event_id} in {stream}: {reason}")]
    Record {
        /// The stream.
        stream: StreamId,
        /// The record.
        event_id: Uuid,
        /// What is wrong.
        reason: String,
    },
    /// Every attempt lost the race for the saga's stream.
    #[error("gave up after {attempts} attempts: saga stream {stream} kept changing")]
    Contention {
        /// The stream.
        stream: StreamId,
        /// Attempts made.
        attempts: u32,
    },
}

impl SagaError {
    /// Whether handling the same input again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store(e) => e.is_transient(),
            Self::Contention { .. } => true,
            Self::Codec(_) | Self::Record { .. } => false,
        }
    }
}

/// What handling an input or deadline did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SagaOutcome {
    /// The reaction was appended at this stream version and position.
    Reacted {
        /// The saga's stream version after it.
        version: u64,
        /// Its position in the log.
        position: Position,
    },
    /// The reaction was empty: nothing written.
    NoChange,
    /// The message was already handled: nothing written.
    Duplicate,
    /// The input belongs to no saga instance, or the deadline is not pending
    /// or not due yet.
    Ignored,
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
        }
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
            COMMAND_RECORD => {
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
                instance
                    .deadlines
                    .insert(record.name, (due, recorded.event_id));
            }
            DEADLINE_CANCELLED | DEADLINE_FIRED => {
                let record: DeadlineRecord = recorded
                    .payload
                    .decode()
                    .map_err(|e| malformed(e.to_string()))?;
                instance.deadlines.remove(&record.name);
            }
            _ => {
                let event = self.events.decode(recorded)?;
                instance.state.apply(&event);
            }
        }
        instance.version = recorded.stream_version;
        Ok(())
    }

    /// Handles a bus message: decodes it as an input, finds its instance, and
    /// appends the reaction (unless the message was handled before).
    pub async fn handle(&self, message: &Message) -> Result<SagaOutcome, SagaError> {
        let input = self.inputs.decode_parts(
            &message.message_type,
            message.schema_version,
            &message.payload,
        )?;
        let Some(saga_id) = S::saga_id(&input, &message.metadata) else {
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
        let metadata = message.metadata.caused_by(message.message_id);
        self.react_with(saga_id, message.message_id, &metadata, |instance, now| {
            if instance.has_handled(message.message_id) {
                return None;
            }
            Some((instance.state.react(&input, now), None))
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
            let Some(&(due, set_by)) = instance.deadlines.get(name) else {
                return Ok(SagaOutcome::Ignored);
            };
            if due > self.clock.now() {
                return Ok(SagaOutcome::Ignored);
            }
            let metadata = Metadata::new()
                .with_correlation_id(saga_id)
                .with_causation_id(set_by);
            let name = name.to_owned();
            self.react_with(
                saga_id,
                set_by,
                &metadata,
                move |instance, now| match instance.deadlines.get(&name) {
                    Some(&(due, id)) if id == set_by && due <= now => {
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
        for outgoing in &reaction.commands {
            let (command_type, schema_version, command) =
                self.commands.encode_parts(&outgoing.command)?;
            let body = CommandRecord {
                topic: outgoing.topic.clone(),
                command_type: command_type.to_owned(),
                schema_version,
                payload: command,
            };
            record(&mut records, COMMAND_RECORD, body.to_payload()?);
            effects.sent.push(body);
        }
        for (name, due) in &reaction.deadlines {
            let body = DeadlineRecord {
                name: name.clone(),
                due: Some(*due),
            };
            record(&mut records, DEADLINE_SET, payload(&body)?);
            let set_by = records.last().map(|r| r.event_id).unwrap_or_default();
            effects.set.push((body.name, *due, set_by));
        }
        Ok((records, effects))
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
    /// Deadlines set: name, due time, the id of the record that sets it.
    set: Vec<(String, DateTime<Utc>, Uuid)>,
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
        for (name, due, set_by) in self.set {
            instance.deadlines.insert(name, (due, set_by));
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

/// A [`MessageHandler`] that feeds a saga: ack when handled (or a duplicate),
/// retry on transient failures, dead-letter what cannot be decoded.
pub struct SagaHandler<S: Saga>(pub Arc<SagaManager<S>>);

impl<S: Saga> fmt::Debug for SagaHandler<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SagaHandler").field(&self.0).finish()
    }
}

#[async_trait]
impl<S: Saga> MessageHandler for SagaHandler<S> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        match self.0.handle(&delivery.message).await {
            Ok(_) => Outcome::Ack,
            Err(error) if error.is_transient() => Outcome::retry(error),
            Err(error @ SagaError::Store(_)) => Outcome::retry(error),
            Err(error) => Outcome::dead_letter(error),
        }
    }
}

/// Fires saga deadlines when they are due.
///
/// It follows the store's log for the deadline records of one saga type, keeps
/// the pending ones in memory, and asks the [`SagaManager`] to fire each when
/// the manager's clock passes its due time. Firing is idempotent, so several
/// schedulers (or a restart) never fire a deadline twice.
pub struct DeadlineScheduler<S: Saga> {
    manager: Arc<SagaManager<S>>,
    tick: Duration,
}

impl<S: Saga> fmt::Debug for DeadlineScheduler<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineScheduler")
            .field("saga", &S::TYPE)
            .field("tick", &self.tick)
            .finish()
    }
}

impl<S: Saga> DeadlineScheduler<S> {
    /// A scheduler for `manager`'s saga type that looks at its clock at least
    /// every `tick` (the clock may be virtual, so it cannot just sleep until
    /// the due time).
    pub fn new(manager: Arc<SagaManager<S>>, tick: Duration) -> Self {
        Self { manager, tick }
    }

    /// Runs until `stop` turns true or the store's subscription fails.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), SagaError> {
        let mut deadlines = Deadlines::default();
        let mut log = self.manager.store.subscribe_all(Position::START);
        // One timer for the whole run: a fresh sleep per log event would cost
        // a timer registration for every event of every stream.
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if crate::stop::is_requested(&stop) {
                return Ok(());
            }
            self.fire_due(&mut deadlines).await;
            tokio::select! {
                () = crate::stop::requested(&mut stop) => {}
                _ = tick.tick() => {}
                next = log.next() => {
                    let mut next = next;
                    // Everything the log has ready is noted before the due
                    // deadlines are looked at again.
                    loop {
                        match next {
                            None => return Ok(()),
                            Some(Err(error)) => return Err(error.into()),
                            Some(Ok(recorded)) => deadlines.note::<S>(&recorded),
                        }
                        match log.next().now_or_never() {
                            Some(ready) => next = ready,
                            None => break,
                        }
                    }
                }
            }
        }
    }

    async fn fire_due(&self, deadlines: &mut Deadlines) {
        for (due_at, saga_id, name) in deadlines.due(self.manager.clock.now()) {
            match self.manager.fire_deadline(saga_id, &name).await {
                Ok(_) => deadlines.remove(due_at, saga_id, name),
                Err(error) => {
                    tracing::warn!(saga = S::TYPE, %saga_id, deadline = %name, %error, "deadline not fired; will retry");
                }
            }
        }
    }
}

/// The pending deadlines of one saga type, as the log's records set them.
#[derive(Default)]
struct Deadlines {
    pending: BTreeMap<(DateTime<Utc>, Uuid, String), ()>,
    by_name: std::collections::HashMap<(Uuid, String), DateTime<Utc>, foldhash::fast::RandomState>,
}

impl Deadlines {
    /// Takes note of a log event: a deadline record of saga type `S` sets or
    /// clears its deadline; anything else is ignored.
    fn note<S: Saga>(&mut self, recorded: &RecordedEvent) {
        let is_deadline = matches!(
            &*recorded.event_type,
            DEADLINE_SET | DEADLINE_CANCELLED | DEADLINE_FIRED
        );
        if !is_deadline || recorded.stream_id.category() != S::TYPE {
            return;
        }
        let Ok(saga_id) = recorded.stream_id.entity_id().parse::<Uuid>() else {
            return;
        };
        let Ok(record) = recorded.payload.decode::<DeadlineRecord>() else {
            return;
        };
        let key = (saga_id, record.name.clone());
        if let Some(old) = self.by_name.remove(&key) {
            self.pending.remove(&(old, saga_id, record.name.clone()));
        }
        if &*recorded.event_type == DEADLINE_SET {
            if let Some(due) = record.due {
                self.pending.insert((due, saga_id, record.name), ());
                self.by_name.insert(key, due);
            }
        }
    }

    /// The deadlines due at `now`, earliest first.
    fn due(&self, now: DateTime<Utc>) -> Vec<(DateTime<Utc>, Uuid, String)> {
        self.pending
            .range(..=(now, Uuid::max(), String::new()))
            .map(|(key, ())| key.clone())
            .collect()
    }

    /// Forgets a deadline that fired.
    fn remove(&mut self, due_at: DateTime<Utc>, saga_id: Uuid, name: String) {
        self.pending.remove(&(due_at, saga_id, name.clone()));
        self.by_name.remove(&(saga_id, name));
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

    #[test]
    fn a_command_record_is_stored_as_its_serialize_writes_it() {
        let cases = [
            ("payment \"commands\"", "ChargeCard", 3),
            ("payment_commands", "ChargeCard", 0),
            ("back\\slash\ttab", "Caf\u{e9}", u32::MAX),
            ("", "\u{7f}", 10),
        ];
        for (topic, command_type, schema_version) in cases {
            let record = CommandRecord {
                topic: topic.into(),
                command_type: command_type.into(),
                schema_version,
                payload: Payload::from_json(r#"{"amount": "12.50", "card": ["tok_ok"]}"#).unwrap(),
            };
            let direct = record.to_payload().unwrap();
            assert_eq!(
                direct.as_str(),
                Payload::from_value(&record).unwrap().as_str()
            );
            assert_eq!(direct.decode::<CommandRecord>().unwrap(), record);
            // The relay's reading gives the message the record gives.
            let recorded = recorded_record(direct);
            assert_eq!(
                CommandRecord::message_from(&recorded).unwrap(),
                record.to_message(&recorded)
            );
        }
        let mut malformed = recorded_record(Payload::from_json(r#"{"topic": 1}"#).unwrap());
        assert!(CommandRecord::message_from(&malformed).is_err());
        malformed.payload = Payload::from_json(r#"{"topic": "t", "command_type": "C"}"#).unwrap();
        assert!(CommandRecord::message_from(&malformed).is_err());
    }

    fn recorded_record(payload: Payload) -> RecordedEvent {
        RecordedEvent {
            event_id: Uuid::now_v7(),
            stream_id: StreamId::new("order_saga-1").unwrap(),
            stream_version: 2,
            position: Position::new(7, 0),
            event_type: COMMAND_RECORD.into(),
            schema_version: 1,
            payload,
            metadata: Metadata::new().with_correlation_id(Uuid::now_v7()),
            recorded_at: Utc::now(),
        }
    }

    /// A scheduler whose stop signal lost its sender stops, rather than
    /// waking at once forever.
    #[tokio::test]
    async fn a_scheduler_stops_when_its_stop_sender_is_gone() {
        let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        let manager = Arc::new(SagaManager::<Reminder>::new(
            store,
            Arc::new(ManualClock::default()),
        ));
        let (tx, rx) = watch::channel(false);
        let running =
            tokio::spawn(DeadlineScheduler::new(manager, Duration::from_millis(10)).run(rx));
        drop(tx);
        let ended = tokio::time::timeout(Duration::from_secs(2), running).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
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
