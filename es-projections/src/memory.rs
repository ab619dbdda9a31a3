//! The in-memory runner, for the embedded deployment and for tests.

use std::sync::Arc;

use es_core::{EventStore, Position, Projection};

use crate::handle::Shared;
use crate::runner::{self, Backend, Runner};
use crate::{Error, ParkedEvent, ProjectionHandle, RunnerOptions};

/// Runs `projection` in a background task, from the start of `store`'s log,
/// with the default [`RunnerOptions`] (stop on the first failing event).
///
/// The projection keeps its read model itself, behind its own lock
/// (`Tx = ()`); the runner keeps its position in memory, so after a restart
/// the model is rebuilt from the start of the log. Must be called inside a
/// Tokio runtime.
///
/// ```
/// # use std::sync::{Arc, Mutex};
/// # use std::time::Duration;
/// # use es_core::{EventStore, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, Payload,
/// #     Projection, ProjectionError, RecordedEvent, StreamId};
/// /// Counts events per stream.
/// #[derive(Default)]
/// struct Counts(Mutex<std::collections::HashMap<String, u64>>);
///
/// impl Projection for Counts {
///     type Tx = ();
///     fn name(&self) -> &str { "counts" }
///     async fn apply(&self, _: &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
///         *self.0.lock().unwrap().entry(event.stream_id.to_string()).or_default() += 1;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
/// let counts = Arc::new(Counts::default());
/// let handle = es_projections::spawn_in_memory(Arc::clone(&store), Arc::clone(&counts));
///
/// let event = NewEvent::new("Noted", 1, Payload::from_json("{}")?, Metadata::new());
/// let written = store.append(&StreamId::new("note-1")?, ExpectedVersion::Any, vec![event]).await?;
/// // Read your own write:
/// handle.wait_for(written.position, Duration::from_secs(5)).await?;
/// assert_eq!(counts.0.lock().unwrap()["note-1"], 1);
/// handle.stop().await?;
/// # Ok(()) }
/// ```
pub fn spawn_in_memory<P>(store: Arc<dyn EventStore>, projection: Arc<P>) -> ProjectionHandle
where
    P: Projection<Tx = ()>,
{
    spawn_in_memory_with(store, projection, RunnerOptions::default())
}

/// [`spawn_in_memory`] with options: batch size, and whether a failing event
/// stops the runner or is set aside as a dead letter
/// ([`ProjectionHandle::dead_letters`]).
pub fn spawn_in_memory_with<P>(
    store: Arc<dyn EventStore>,
    projection: Arc<P>,
    options: RunnerOptions,
) -> ProjectionHandle
where
    P: Projection<Tx = ()>,
{
    let shared = Shared::new(projection.name());
    let runner = Runner {
        projection,
        backend: MemoryBackend {
            shared: Arc::clone(&shared),
        },
        store: Arc::clone(&store),
        options,
        shared: Arc::clone(&shared),
    };
    let task = runner::spawn(runner);
    ProjectionHandle::new(shared, store, task)
}

/// Keeps the checkpoint in the handle's shared state.
struct MemoryBackend {
    shared: Arc<Shared>,
}

impl<P: Projection<Tx = ()>> Backend<P> for MemoryBackend {
    type Unit = ();
    const TRANSACTIONAL: bool = false;

    async fn load_checkpoint(&self) -> Result<Position, Error> {
        Ok(self.shared.progress.borrow().position)
    }

    async fn begin(&self, _expected: Position) -> Result<(), Error> {
        Ok(())
    }

    fn tx(unit: &mut ()) -> &mut () {
        unit
    }

    async fn commit(&self, (): (), _: Position, _: &[ParkedEvent]) -> Result<(), Error> {
        // The runner publishes the position once the batch is accounted for.
        Ok(())
    }
}
