//! Decisions on several aggregates, appended in one atomic write.

use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use uuid::Uuid;

use crate::{
    derived_id, Aggregate, AppendResult, EventStore, ExpectedVersion, Loaded, Metadata, Repository,
    RepositoryError, StoreError, StreamAppend, StreamId,
};

/// What becomes of a loaded aggregate once the unit is written or dropped.
type Settle = Box<dyn FnOnce(Option<AppendResult>) -> BoxFuture<'static, ()> + Send>;

/// Commands on several aggregates (of any types, through their
/// repositories), decided one by one and appended together with
/// [`EventStore::append_streams`]: every aggregate's events are written, or
/// none are.
///
/// Each aggregate is loaded once per unit ([`UnitOfWork::load`], the
/// repository's state cache first) and given at most one command
/// ([`UnitOfWork::decide`]); the write expects the versions loaded, so a
/// concurrent writer makes [`UnitOfWork::commit`] fail with
/// [`StoreError::WrongExpectedVersion`] and nothing is written: load again
/// in a new unit and decide again. Event ids derive from the command id, so
/// a unit written again after an unknown outcome is recognised.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use es_core::doc_support::counter::{Counter, CounterCommand};
/// use es_core::{InMemoryEventStore, Metadata, Repository, UnitOfWork};
///
/// let store = Arc::new(InMemoryEventStore::new());
/// let counters = Repository::<Counter>::new(store.clone());
/// let mut unit = UnitOfWork::new(store.clone());
/// let command_id = uuid::Uuid::now_v7();
/// for id in ["a", "b"] {
///     let loaded = unit.load(&counters, id).await.unwrap();
///     let command = CounterCommand::Increment { by: 2 };
///     unit.decide(&counters, id, loaded, command, command_id, &Metadata::new())
///         .unwrap()
///         .unwrap();
/// }
/// let written = unit.commit().await.unwrap();
/// assert_eq!(written.len(), 2);
/// assert_eq!(counters.load("b").await.unwrap().state.value, 2);
/// # });
/// ```
pub struct UnitOfWork {
    store: Arc<dyn EventStore>,
    parts: Vec<StreamAppend>,
    /// For each part, what to do with its aggregate after the write.
    written: Vec<Settle>,
}

impl fmt::Debug for UnitOfWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnitOfWork")
            .field(
                "streams",
                &self.parts.iter().map(|p| &p.stream).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl UnitOfWork {
    /// An empty unit writing to `store` (the store of every repository it
    /// is used with).
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            parts: Vec::new(),
            written: Vec::new(),
        }
    }

    /// The aggregate `id`: the repository's cached state, read no further
    /// (the write checks its version), else its snapshot and stream as read.
    pub async fn load<A: Aggregate>(
        &mut self,
        repository: &Repository<A>,
        id: impl fmt::Display,
    ) -> Result<Loaded<A>, RepositoryError<A::Error>> {
        let stream = repository.stream_id(id)?;
        repository.state_for_write(&stream, false).await
    }

    /// [`UnitOfWork::load`] for an aggregate that almost never exists yet
    /// (a fresh id): when it is not cached, its empty state, without a read.
    /// The write expects the stream not to exist, so a wrong guess fails
    /// the commit with [`StoreError::WrongExpectedVersion`] and writes
    /// nothing.
    pub async fn load_or_new<A: Aggregate>(
        &mut self,
        repository: &Repository<A>,
        id: impl fmt::Display,
    ) -> Result<Loaded<A>, RepositoryError<A::Error>> {
        let stream = repository.stream_id(id)?;
        repository.state_for_write(&stream, true).await
    }

    /// Decides `command` on `loaded` (from [`UnitOfWork::load`]): the events
    /// it appends in this unit, or the aggregate's refusal (which appends
    /// nothing). The events get ids derived from `command_id` and carry
    /// `metadata`.
    ///
    /// # Errors
    /// An event that cannot be encoded, or an id that is not a valid stream
    /// id.
    #[allow(clippy::type_complexity)]
    pub fn decide<A: Aggregate>(
        &mut self,
        repository: &Repository<A>,
        id: impl fmt::Display,
        loaded: Loaded<A>,
        command: A::Command,
        command_id: Uuid,
        metadata: &Metadata,
    ) -> Result<Result<Vec<A::Event>, A::Error>, RepositoryError<A::Error>>
    where
        A::Event: Clone,
    {
        let stream = repository.stream_id(id)?;
        let events = match loaded.state.handle(command) {
            Ok(events) if !events.is_empty() => events,
            decided => {
                self.check(repository, stream, loaded);
                return Ok(decided);
            }
        };
        let mut encoded = Vec::with_capacity(events.len());
        for (index, event) in (0u32..).zip(&events) {
            let id = derived_id(command_id, stream.as_str(), index);
            encoded.push(
                repository
                    .codec()
                    .encode_with_id(event, metadata.clone(), id)?,
            );
        }
        self.parts.push(StreamAppend::new(
            stream.clone(),
            ExpectedVersion::from_loaded(loaded.version),
            encoded,
        ));
        self.written
            .push(settle(repository.clone(), stream, loaded, events.clone()));
        Ok(Ok(events))
    }

    /// Leaves `loaded` unchanged in this unit: the write checks that its
    /// version is still the one loaded, and it goes back to the
    /// repository's cache when the unit is committed.
    ///
    /// # Errors
    /// An id that is not a valid stream id.
    pub fn keep<A: Aggregate>(
        &mut self,
        repository: &Repository<A>,
        id: impl fmt::Display,
        loaded: Loaded<A>,
    ) -> Result<(), RepositoryError<A::Error>> {
        let stream = repository.stream_id(id)?;
        self.check(repository, stream, loaded);
        Ok(())
    }

    /// An aggregate the unit's decisions read and leave unchanged: the write
    /// checks that its version is still the one read (a part without
    /// events), so nothing is decided on a state that moved on.
    fn check<A: Aggregate>(
        &mut self,
        repository: &Repository<A>,
        stream: StreamId,
        loaded: Loaded<A>,
    ) {
        self.parts.push(StreamAppend::new(
            stream.clone(),
            ExpectedVersion::from_loaded(loaded.version),
            Vec::new(),
        ));
        self.written
            .push(settle(repository.clone(), stream, loaded, Vec::new()));
    }

    /// Whether nothing was decided that writes.
    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(|p| p.events.is_empty())
    }

    /// Appends every decision in one atomic write: one result per aggregate
    /// decided or kept, in that order (a kept one's is not `written`). The aggregates' new states go
    /// to their repositories' caches.
    ///
    /// # Errors
    /// As [`EventStore::append_streams`]: nothing was written.
    pub async fn commit(self) -> Result<Vec<AppendResult>, StoreError> {
        let Self {
            store,
            parts,
            written,
        } = self;
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        match store.append_streams(parts).await {
            Ok(results) => {
                for (settle, result) in written.into_iter().zip(&results) {
                    settle(Some(*result)).await;
                }
                Ok(results)
            }
            Err(error) => Err(error),
        }
    }
}

/// Puts `loaded` back in the repository's cache after the write: advanced
/// by `events` when the write appended them right after its version; as it
/// was when it had none to append. A state whose write failed is dropped.
fn settle<A: Aggregate>(
    repository: Repository<A>,
    stream: StreamId,
    loaded: Loaded<A>,
    events: Vec<A::Event>,
) -> Settle {
    Box::new(move |result: Option<AppendResult>| {
        Box::pin(async move {
            match result {
                Some(result) if events.is_empty() => {
                    let version = result.stream_version;
                    if version == loaded.version {
                        repository
                            .written_by_other(&stream, loaded, &[], version)
                            .await;
                    }
                }
                Some(result) if result.written => {
                    repository
                        .written_by_other(&stream, loaded, &events, result.stream_version)
                        .await;
                }
                _ => {}
            }
        })
    })
}
