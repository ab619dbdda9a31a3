//! Commands a saga executes in its own process: the saga's commands to an
//! aggregate that lives beside it are decided in the saga's write, and the
//! aggregate's events reach the saga in that same write, with no message in
//! between (see [`SagaManager::with_local`](super::SagaManager::with_local)).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use super::{Saga, SagaError};
use crate::repository::Loaded;
use crate::{
    derived_id, Aggregate, AppendResult, ExpectedVersion, Metadata, NewEvent, Repository,
    RepositoryError, StoreError, StreamAppend, StreamId,
};

/// Where a saga command goes when it is executed locally: the aggregate's id
/// and the command it means there.
pub type LocalRoute<S, A> = dyn Fn(&str, &<S as Saga>::Command) -> Option<(String, <A as Aggregate>::Command)>
    + Send
    + Sync;

/// An aggregate of this process whose commands the saga executes in its own
/// write. `route` answers, for a command the saga sends to a topic, the
/// aggregate id and the command it means, or `None` for a command sent
/// through the bus as usual.
///
/// A command the aggregate refuses writes nothing to the aggregate (as a
/// refused command from the bus would); the saga learns only from events.
pub struct LocalAggregate<S: Saga, A: Aggregate> {
    repository: Repository<A>,
    inputs: Vec<&'static str>,
    route: Arc<LocalRoute<S, A>>,
}

impl<S: Saga, A: Aggregate> fmt::Debug for LocalAggregate<S, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalAggregate")
            .field("aggregate", &A::TYPE)
            .field("repository", &self.repository)
            .finish_non_exhaustive()
    }
}

impl<S: Saga, A: Aggregate> LocalAggregate<S, A>
where
    A::Command: Send + Sync,
{
    /// The aggregates of `repository` (its store must be the saga's, and
    /// it must write straight to that store, not through a writer), fed the
    /// saga's commands that `route` names. `inputs` are the aggregate's
    /// event types the saga takes as inputs (the names of its input
    /// variants, as its bus bindings would list them): the saga reacts to
    /// those in the write that appends them.
    pub fn new(
        repository: Repository<A>,
        inputs: &[&'static str],
        route: impl Fn(&str, &S::Command) -> Option<(String, A::Command)> + Send + Sync + 'static,
    ) -> Self {
        Self {
            repository,
            inputs: inputs.to_vec(),
            route: Arc::new(route),
        }
    }
}

/// A local target as the saga manager sees it, whatever the aggregate.
#[async_trait]
pub(crate) trait LocalTarget<S: Saga>: Send + Sync + 'static {
    /// Whether `command` to `topic` is executed here.
    fn accepts(&self, topic: &str, command: &S::Command) -> bool;

    /// Whether the saga takes the aggregate's events of `event_type` as
    /// inputs.
    fn is_input(&self, event_type: &str) -> bool;

    /// A fresh working set for one write.
    fn begin(&self) -> Box<dyn LocalWork<S>>;
}

/// The aggregates one write touches: their states as the write leaves them,
/// and the events it appends to each.
#[async_trait]
pub(crate) trait LocalWork<S: Saga>: Send {
    /// Adds events another party decided for `part.stream` (the
    /// aggregate's own command, written with the saga's reaction).
    fn seed(&mut self, part: StreamAppend);

    /// Executes `command` (sent to `topic`) as `command_id`: the stream it
    /// is for and the events it appends there, each with an id derived from
    /// the command id (none when the aggregate refused it or decided
    /// nothing); `None` when no aggregate here takes it.
    async fn execute(
        &mut self,
        topic: &str,
        command: &S::Command,
        command_id: Uuid,
        metadata: &Metadata,
    ) -> Result<Option<(StreamId, Vec<NewEvent>)>, SagaError>;

    /// The aggregates' parts of the write.
    fn parts(&mut self) -> Vec<StreamAppend>;

    /// After the write: `results` holds the answer for each part of
    /// [`LocalWork::parts`], in order, when it was written; `None` when it
    /// was not (the states are then dropped and read again next time).
    async fn finish(self: Box<Self>, results: Option<&[AppendResult]>);
}

impl<S: Saga, A: Aggregate> LocalTarget<S> for LocalAggregate<S, A>
where
    A::Command: Send + Sync,
{
    fn accepts(&self, topic: &str, command: &S::Command) -> bool {
        (self.route)(topic, command).is_some()
    }

    fn is_input(&self, event_type: &str) -> bool {
        self.inputs.contains(&event_type)
    }

    fn begin(&self) -> Box<dyn LocalWork<S>> {
        Box::new(Work::<S, A> {
            repository: self.repository.clone(),
            route: Arc::clone(&self.route),
            streams: HashMap::new(),
            order: Vec::new(),
        })
    }
}

/// One aggregate inside a write.
struct Touched<A: Aggregate> {
    /// Its state as this write leaves it, with the version it was read at;
    /// `None` until a command needs it.
    loaded: Option<Loaded<A>>,
    /// What the write expects its version to be.
    expected: ExpectedVersion,
    /// What the write appends to it.
    appended: Vec<NewEvent>,
}

struct Work<S: Saga, A: Aggregate> {
    repository: Repository<A>,
    route: Arc<LocalRoute<S, A>>,
    streams: HashMap<StreamId, Touched<A>>,
    order: Vec<StreamId>,
}

fn refused<E: std::error::Error + 'static>(error: RepositoryError<E>) -> SagaError {
    match error {
        RepositoryError::Store(e) => SagaError::Store(e),
        RepositoryError::Codec(e) => SagaError::Codec(e),
        other => SagaError::Store(StoreError::Backend {
            source: other.to_string().into(),
        }),
    }
}

#[async_trait]
impl<S: Saga, A: Aggregate> LocalWork<S> for Work<S, A>
where
    A::Command: Send + Sync,
{
    fn seed(&mut self, part: StreamAppend) {
        if !self.streams.contains_key(&part.stream) {
            self.order.push(part.stream.clone());
        }
        let touched = self.streams.entry(part.stream).or_insert(Touched {
            loaded: None,
            expected: part.expected,
            appended: Vec::new(),
        });
        touched.expected = part.expected;
        touched.appended.extend(part.events);
    }

    async fn execute(
        &mut self,
        topic: &str,
        command: &S::Command,
        command_id: Uuid,
        metadata: &Metadata,
    ) -> Result<Option<(StreamId, Vec<NewEvent>)>, SagaError> {
        let Some((id, command)) = (self.route)(topic, command) else {
            return Ok(None);
        };
        let stream = self.repository.stream_id(&id)?;
        let order = &mut self.order;
        let touched = self.streams.entry(stream.clone()).or_insert_with(|| {
            order.push(stream.clone());
            Touched {
                loaded: None,
                expected: ExpectedVersion::Any,
                appended: Vec::new(),
            }
        });
        if touched.loaded.is_none() {
            let loaded = self
                .repository
                .state_for_write(&stream, false)
                .await
                .map_err(refused)?;
            let mut state = Loaded {
                state: loaded.state,
                version: loaded.version,
            };
            if touched.appended.is_empty() {
                touched.expected = ExpectedVersion::from_loaded(loaded.version);
            } else {
                // Events seeded by the aggregate's own command: the state
                // they were decided on is the one read only if the versions
                // agree; the write's expected version checks that.
                for event in &touched.appended {
                    let recorded = decode_new(&self.repository, event)?;
                    state.state.apply(&recorded);
                }
            }
            touched.loaded = Some(state);
        }
        let Some(loaded) = touched.loaded.as_mut() else {
            return Ok(Some((stream, Vec::new())));
        };
        let events = match loaded.state.handle(command) {
            Ok(events) => events,
            Err(reason) => {
                tracing::info!(stream = %stream, %reason, "local command refused by the domain");
                return Ok(Some((stream, Vec::new())));
            }
        };
        let mut encoded = Vec::with_capacity(events.len());
        for (index, event) in (0u32..).zip(&events) {
            let id = derived_id(command_id, stream.as_str(), index);
            encoded.push(
                self.repository
                    .codec()
                    .encode_with_id(event, metadata.clone(), id)?,
            );
        }
        for event in &events {
            loaded.state.apply(event);
        }
        touched.appended.extend(encoded.iter().cloned());
        Ok(Some((stream, encoded)))
    }

    fn parts(&mut self) -> Vec<StreamAppend> {
        // Every aggregate the write read: one whose command was refused or
        // decided nothing is a part without events, which checks that the
        // state it was decided on is still the stream's.
        self.order
            .iter()
            .filter_map(|stream| {
                let touched = self.streams.get(stream)?;
                Some(StreamAppend::new(
                    stream.clone(),
                    touched.expected,
                    touched.appended.clone(),
                ))
            })
            .collect()
    }

    async fn finish(self: Box<Self>, results: Option<&[AppendResult]>) {
        let Some(results) = results else {
            return;
        };
        let Self {
            repository,
            mut streams,
            order,
            ..
        } = *self;
        for (stream, result) in order.iter().zip(results) {
            let Some(touched) = streams.remove(stream) else {
                continue;
            };
            // The state as the write left it, cached when the write is
            // what it was decided on: right after the version read.
            if let Some(loaded) = touched.loaded {
                let count = u64::try_from(touched.appended.len()).unwrap_or(u64::MAX);
                let unchanged = count == 0 && loaded.version == result.stream_version;
                if unchanged
                    || (result.written
                        && loaded.version.checked_add(count) == Some(result.stream_version))
                {
                    let after = Loaded {
                        state: loaded.state,
                        version: result.stream_version,
                    };
                    repository
                        .written_by_other(stream, after, &[], result.stream_version)
                        .await;
                }
            }
        }
    }
}

/// A seeded event as the aggregate's event type.
fn decode_new<A: Aggregate>(
    repository: &Repository<A>,
    event: &NewEvent,
) -> Result<A::Event, SagaError> {
    Ok(repository
        .codec()
        .decode_parts(&event.event_type, event.schema_version, &event.payload)?)
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::doc_support::counter::{Counter, CounterCommand, CounterEvent};
    use crate::saga::COMMAND_RECORD;
    use crate::{
        DomainEvent, EventStore, InMemoryEventStore, ManualClock, Message, Reaction, SagaManager,
        SagaOutcome,
    };

    /// Climbs a counter by 3 until it reaches 10, then reports each input;
    /// remembers the stream each input came from.
    #[derive(Debug, Default)]
    pub(super) struct Ladder {
        pub(super) total: u64,
        pub(super) sources: Vec<Option<String>>,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub(super) enum LadderEvent {
        Climbed { total: u64, from: Option<String> },
    }

    impl DomainEvent for LadderEvent {
        fn event_type(&self) -> &'static str {
            "Climbed"
        }
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub(super) enum LadderCommand {
        Increment { by: u32 },
        Reached { total: u64 },
    }

    impl DomainEvent for LadderCommand {
        fn event_type(&self) -> &'static str {
            match self {
                Self::Increment { .. } => "Increment",
                Self::Reached { .. } => "Reached",
            }
        }
    }

    impl Saga for Ladder {
        type Event = LadderEvent;
        type Input = CounterEvent;
        type Command = LadderCommand;
        const TYPE: &'static str = "ladder";

        fn apply(&mut self, event: &LadderEvent) {
            let LadderEvent::Climbed { total, from } = event;
            self.total = *total;
            self.sources.push(from.clone());
        }

        fn react(
            &self,
            input: &CounterEvent,
            received: crate::Received<'_>,
        ) -> Reaction<LadderEvent, LadderCommand> {
            let CounterEvent::Incremented { by } = input;
            let total = self.total + u64::from(*by);
            let from = received.source.map(ToString::to_string);
            let climbed = Reaction::none().event(LadderEvent::Climbed { total, from });
            if total < 10 {
                climbed.send("counters", LadderCommand::Increment { by: 3 })
            } else {
                climbed.send("reports", LadderCommand::Reached { total })
            }
        }

        fn on_deadline(&self, _: &str, _: DateTime<Utc>) -> Reaction<LadderEvent, LadderCommand> {
            Reaction::none()
        }
    }

    pub(super) fn setup() -> (
        Arc<InMemoryEventStore>,
        Arc<SagaManager<Ladder>>,
        Repository<Counter>,
    ) {
        let store = Arc::new(InMemoryEventStore::new());
        let counters = Repository::<Counter>::new(store.clone()).with_state_cache(16);
        let local =
            LocalAggregate::new(counters.clone(), &["Incremented"], |topic, command| match (
                topic, command,
            ) {
                ("counters", LadderCommand::Increment { by }) => {
                    Some(("c".to_owned(), CounterCommand::Increment { by: *by }))
                }
                _ => None,
            });
        let manager = Arc::new(
            SagaManager::<Ladder>::new(store.clone(), Arc::new(ManualClock::default()))
                .with_instance_cache(16)
                .with_local(local),
        );
        let writing = counters.with_writer(manager.clone());
        (store, manager, writing)
    }

    fn saga_id() -> Uuid {
        Uuid::from_u128(7)
    }

    /// The types written, in log order.
    async fn log(store: &InMemoryEventStore) -> Vec<(String, String)> {
        store
            .read_all(crate::Position::START, 1_000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.stream_id.category().to_owned(), e.event_type.to_string()))
            .collect()
    }

    /// A command of the aggregate's own service, written through the
    /// manager: the saga reacts, its commands to the counter run in the same
    /// write, and so on until it reports; one write holds it all, and only
    /// the report is a relayed command record.
    #[tokio::test]
    async fn the_aggregate_and_its_saga_answer_each_other_in_one_write() {
        let (store, manager, counters) = setup();
        let metadata = Metadata::new().with_correlation_id(saga_id());
        let command_id = Uuid::now_v7();
        let committed = counters
            .execute_once(
                "c",
                command_id,
                CounterCommand::Increment { by: 1 },
                &metadata,
            )
            .await
            .unwrap();
        assert_eq!(committed.events.len(), 1);
        let counter = Repository::<Counter>::new(store.clone())
            .load("c")
            .await
            .unwrap();
        assert_eq!((counter.state.value, counter.version), (10, 4));
        let instance = manager.load(saga_id()).await.unwrap();
        assert_eq!(instance.state.total, 10);
        assert_eq!(instance.sent.len(), 4);
        // Every input was the counter's event, taken in the write.
        let counter_stream = Some("counter-c".to_owned());
        assert_eq!(instance.state.sources, vec![counter_stream; 4]);
        let written = log(&store).await;
        let relayed: Vec<_> = written
            .iter()
            .filter(|(_, t)| t == COMMAND_RECORD)
            .collect();
        assert_eq!(relayed.len(), 1, "{written:?}");
        assert_eq!(
            written.iter().filter(|(c, _)| c == "counter").count(),
            4,
            "{written:?}"
        );
        // The same command again is a duplicate: nothing more is written.
        let again = counters
            .execute_once(
                "c",
                command_id,
                CounterCommand::Increment { by: 1 },
                &metadata,
            )
            .await
            .unwrap();
        assert!(again.duplicate);
        assert_eq!(log(&store).await.len(), written.len());
    }

    /// An input from the bus: the saga's local commands and its reactions
    /// to their events are one write; the same message again changes
    /// nothing.
    #[tokio::test]
    async fn a_bus_input_runs_the_local_commands_in_the_reactions_write() {
        let (store, manager, _) = setup();
        let message = Message::encode(
            "counters",
            &CounterEvent::Incremented { by: 4 },
            Metadata::new().with_correlation_id(saga_id()),
        )
        .unwrap();
        let outcome = manager.handle(&message).await.unwrap();
        assert!(
            matches!(outcome, SagaOutcome::Reacted { .. }),
            "{outcome:?}"
        );
        let counter = Repository::<Counter>::new(store.clone())
            .load("c")
            .await
            .unwrap();
        assert_eq!(counter.state.value, 6, "two local increments of 3");
        let instance = manager.load(saga_id()).await.unwrap();
        assert_eq!(instance.state.total, 10);
        // The bus message named no source; the counter's events did.
        let counter_stream = Some("counter-c".to_owned());
        assert_eq!(
            instance.state.sources,
            vec![None, counter_stream.clone(), counter_stream]
        );
        let before = log(&store).await.len();
        let again = manager.handle(&message).await.unwrap();
        assert!(matches!(again, SagaOutcome::Duplicate), "{again:?}");
        assert_eq!(log(&store).await.len(), before);
    }

    /// A relayed event names its stream, and the saga sees it.
    #[tokio::test]
    async fn a_relayed_input_comes_with_its_source_stream() {
        let (_, manager, _) = setup();
        let elsewhere = InMemoryEventStore::new();
        elsewhere
            .append(
                &StreamId::new("counter-far").unwrap(),
                ExpectedVersion::NoStream,
                vec![crate::EventCodec::<CounterEvent>::new()
                    .encode(
                        &CounterEvent::Incremented { by: 9 },
                        Metadata::new().with_correlation_id(saga_id()),
                    )
                    .unwrap()],
            )
            .await
            .unwrap();
        let recorded = elsewhere
            .read_all(crate::Position::START, 10)
            .await
            .unwrap();
        let message = Message::from_event("counters", &recorded[0]);
        assert_eq!(message.source, Some(StreamId::new("counter-far").unwrap()));
        manager.handle(&message).await.unwrap();
        let instance = manager.load(saga_id()).await.unwrap();
        assert_eq!(instance.state.sources[0].as_deref(), Some("counter-far"));
    }

    /// A write whose aggregate moved on under it is decided again on the
    /// aggregate as it is: nothing is lost and nothing is written twice.
    #[tokio::test]
    async fn a_local_aggregate_that_moved_on_is_read_again() {
        let (store, manager, _) = setup();
        let start = |by| {
            Message::encode(
                "counters",
                &CounterEvent::Incremented { by },
                Metadata::new().with_correlation_id(saga_id()),
            )
            .unwrap()
        };
        manager.handle(&start(1)).await.unwrap();
        // Another writer moves the counter on behind the cached state.
        Repository::<Counter>::new(store.clone())
            .execute("c", CounterCommand::Increment { by: 100 }, &Metadata::new())
            .await
            .unwrap();
        let counter = Repository::<Counter>::new(store.clone())
            .load("c")
            .await
            .unwrap();
        assert_eq!(counter.state.value, 109);
        // The saga is at 10 and reports; a new input below 10 would climb:
        // reset by a fresh saga instance that climbs the same counter.
        let other = Uuid::from_u128(8);
        let message = Message::encode(
            "counters",
            &CounterEvent::Incremented { by: 5 },
            Metadata::new().with_correlation_id(other),
        )
        .unwrap();
        manager.handle(&message).await.unwrap();
        let counter = Repository::<Counter>::new(store.clone())
            .load("c")
            .await
            .unwrap();
        assert_eq!(counter.state.value, 109 + 3 + 3);
        assert_eq!(manager.load(other).await.unwrap().state.total, 5 + 3 + 3);
    }
}

#[cfg(test)]
mod properties {
    use std::collections::HashMap;

    use futures::future::join_all;
    use proptest::prelude::*;

    use super::tests::{setup as ladder, Ladder};
    use super::*;
    use crate::doc_support::counter::{Counter, CounterEvent};
    use crate::saga::{COMMAND_EXECUTED, COMMAND_RECORD};
    use crate::{EventStore, Message, Position};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Inputs to a few sagas, some delivered twice, handled concurrently
        /// (every saga climbs the same counter, so their writes race): each
        /// saga's total is its distinct inputs plus its own climbs, the
        /// counter holds exactly the climbs executed, each executed once, and
        /// each saga reports at most once, exactly when it reached 10.
        #[test]
        fn concurrent_and_redelivered_inputs_execute_each_local_command_once(
            inputs in proptest::collection::vec((0u128..3, 1u32..6, any::<bool>()), 1..12),
        ) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (store, manager, _) = ladder();
                let mut messages = Vec::new();
                for (saga, by, twice) in &inputs {
                    let message = Message::encode(
                        "counters",
                        &CounterEvent::Incremented { by: *by },
                        Metadata::new().with_correlation_id(Uuid::from_u128(100 + saga)),
                    )
                    .unwrap();
                    if *twice {
                        messages.push(message.clone());
                    }
                    messages.push(message);
                }
                for chunk in messages.chunks(4) {
                    let handled = join_all(chunk.iter().map(|m| manager.handle(m))).await;
                    for outcome in handled {
                        outcome.unwrap();
                    }
                }
                let log = store.read_all(Position::START, 10_000).await.unwrap();
                let climbs = log.iter().filter(|e| e.stream_id.category() == "counter").count();
                let executed = log.iter().filter(|e| &*e.event_type == COMMAND_EXECUTED).count();
                prop_assert_eq!(climbs, executed, "a local command executed twice or not at all");
                let counter = Repository::<Counter>::new(store.clone()).load("c").await.unwrap();
                prop_assert_eq!(counter.state.value, 3 * climbs as u64);
                let mut per_saga: HashMap<u128, (u64, usize)> = HashMap::new();
                for (saga, by, _) in &inputs {
                    per_saga.entry(*saga).or_default().0 += u64::from(*by);
                }
                let mut all_reports = 0;
                for (saga, (sum, _)) in &per_saga {
                    let instance = manager.load(Uuid::from_u128(100 + saga)).await.unwrap();
                    let state: &Ladder = &instance.state;
                    let climbed = instance
                        .sent
                        .iter()
                        .filter(|c| c.command_type == "Increment")
                        .count() as u64;
                    prop_assert_eq!(state.total, sum + 3 * climbed);
                    let reports = instance
                        .sent
                        .iter()
                        .filter(|c| c.command_type == "Reached")
                        .count();
                    prop_assert_eq!(reports >= 1, state.total >= 10);
                    all_reports += reports;
                }
                // The reports, and nothing else, left through the relay.
                let relayed = log.iter().filter(|e| &*e.event_type == COMMAND_RECORD).count();
                prop_assert_eq!(relayed, all_reports);
                Ok(())
            })?;
        }
    }
}
