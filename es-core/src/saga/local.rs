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

    /// Executes `command` (sent to `topic`) as `command_id`: the events it
    /// appends, each with an id derived from the command id, or none when
    /// the aggregate refused it or decided nothing.
    async fn execute(
        &mut self,
        topic: &str,
        command: &S::Command,
        command_id: Uuid,
        metadata: &Metadata,
    ) -> Result<Vec<NewEvent>, SagaError>;

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
        self.inputs.iter().any(|t| *t == event_type)
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
    ) -> Result<Vec<NewEvent>, SagaError> {
        let Some((id, command)) = (self.route)(topic, command) else {
            return Ok(Vec::new());
        };
        let stream = self.repository.stream_id(&id)?;
        if !self.streams.contains_key(&stream) {
            self.order.push(stream.clone());
            self.streams.insert(
                stream.clone(),
                Touched {
                    loaded: None,
                    expected: ExpectedVersion::Any,
                    appended: Vec::new(),
                },
            );
        }
        let Some(touched) = self.streams.get_mut(&stream) else {
            return Ok(Vec::new());
        };
        if touched.loaded.is_none() {
            let loaded = self
                .repository
                .state_for_write(&stream)
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
            return Ok(Vec::new());
        };
        let events = match loaded.state.handle(command) {
            Ok(events) => events,
            Err(reason) => {
                tracing::info!(stream = %stream, %reason, "local command refused by the domain");
                return Ok(Vec::new());
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
        Ok(encoded)
    }

    fn parts(&mut self) -> Vec<StreamAppend> {
        self.order
            .iter()
            .filter_map(|stream| {
                let touched = self.streams.get(stream)?;
                (!touched.appended.is_empty()).then(|| {
                    StreamAppend::new(stream.clone(), touched.expected, touched.appended.clone())
                })
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
        let written: Vec<&StreamId> = order
            .iter()
            .filter(|s| streams.get(*s).is_some_and(|t| !t.appended.is_empty()))
            .collect();
        for (stream, result) in written.into_iter().zip(results) {
            let Some(touched) = streams.remove(stream) else {
                continue;
            };
            // The state as the write left it, cached when the write is
            // what it was decided on: right after the version read.
            if let Some(loaded) = touched.loaded {
                let count = u64::try_from(touched.appended.len()).unwrap_or(u64::MAX);
                if result.written
                    && loaded.version.checked_add(count) == Some(result.stream_version)
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
