//! A running projection, seen from the outside: position, waiting,
//! lag, dead letters, stop.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use es_core::{CancellationToken, EventStore, Position};
use tokio::sync::watch;

use crate::telemetry::{measure_lag, Lag};
use crate::{Error, ParkedEvent};

/// Where a runner is in its life.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum RunState {
    /// Loading its checkpoint, or waiting for the leadership of its
    /// projection (a standby).
    Starting,
    /// Following the log.
    Running,
    /// Stopped on request.
    Stopped,
    /// Stopped on an error.
    Failed(Arc<Error>),
}

impl RunState {
    fn is_terminal(&self) -> bool {
        matches!(self, Self::Stopped | Self::Failed(_))
    }
}

/// What a runner publishes after each batch.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    pub(crate) position: Position,
    pub(crate) state: RunState,
    /// Whether the runner has ever been [`RunState::Running`] (set up, its
    /// checkpoint loaded).
    pub(crate) ran: bool,
}

impl Progress {
    /// Whether the runner is set up and has handled every event up to
    /// `position`: it is following the log, or it ended after having
    /// followed it that far. A runner still starting (or a standby) has not.
    fn reached(&self, position: Position) -> bool {
        self.position >= position
            && match self.state {
                RunState::Running => true,
                RunState::Stopped | RunState::Failed(_) => self.ran,
                RunState::Starting => false,
            }
    }
}

/// The state a runner task and its handles share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) progress: watch::Sender<Progress>,
    pub(crate) stop: CancellationToken,
    pub(crate) dead_letters: Mutex<Vec<ParkedEvent>>,
}

impl Shared {
    pub(crate) fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            progress: watch::Sender::new(Progress {
                position: Position::START,
                state: RunState::Starting,
                ran: false,
            }),
            stop: CancellationToken::new(),
            dead_letters: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn set_position(&self, position: Position) {
        self.progress.send_modify(|p| p.position = position);
    }

    pub(crate) fn set_state(&self, state: RunState) {
        self.progress.send_modify(|p| {
            p.ran |= matches!(state, RunState::Running);
            p.state = state;
        });
    }

    pub(crate) fn push_dead_letters(&self, letters: &[ParkedEvent]) {
        self.dead_letters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(letters);
    }
}

/// Stops the runner when the last handle goes away.
#[derive(Debug)]
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.cancel();
    }
}

/// A handle on a projection running in a background task (see
/// [`spawn_in_memory`](crate::spawn_in_memory) and
/// `PgProjectionRunner::spawn`).
///
/// Cloning is cheap; the runner stops when [`stop`](Self::stop) is called or
/// the last clone is dropped.
#[derive(Clone)]
pub struct ProjectionHandle {
    shared: Arc<Shared>,
    store: Arc<dyn EventStore>,
    _guard: Arc<StopOnDrop>,
    task: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl fmt::Debug for ProjectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let progress = self.shared.progress.borrow();
        f.debug_struct("ProjectionHandle")
            .field("name", &self.shared.name)
            .field("position", &progress.position)
            .field("state", &progress.state)
            .finish_non_exhaustive()
    }
}

impl ProjectionHandle {
    pub(crate) fn new(
        shared: Arc<Shared>,
        store: Arc<dyn EventStore>,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self {
            _guard: Arc::new(StopOnDrop(Arc::clone(&shared))),
            shared,
            store,
            task: Arc::new(tokio::sync::Mutex::new(Some(task))),
        }
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The position of the last event the projection has handled (applied,
    /// skipped as not accepted, or set aside as a dead letter).
    pub fn position(&self) -> Position {
        self.shared.progress.borrow().position
    }

    /// Where the runner is in its life.
    pub fn state(&self) -> RunState {
        self.shared.progress.borrow().state.clone()
    }

    /// Waits until the runner is set up and following the log
    /// ([`RunState::Running`]) and has handled every event up to `position`
    /// (read-your-writes: pass the position an append returned), or until
    /// `timeout` has passed. `wait_for(Position::START, ..)` waits until the
    /// runner is ready (its read model set up, its checkpoint loaded); a
    /// standby waits until it leads.
    ///
    /// # Errors
    /// [`Error::Timeout`] when the time ran out, [`Error::Failed`] or
    /// [`Error::Stopped`] when the runner has ended before the position.
    pub async fn wait_for(&self, position: Position, timeout: Duration) -> Result<(), Error> {
        let mut rx = self.shared.progress.subscribe();
        let closed = matches!(
            tokio::time::timeout(
                timeout,
                rx.wait_for(|p| p.reached(position) || p.state.is_terminal()),
            )
            .await,
            Ok(Err(_))
        );
        let progress = self.shared.progress.borrow().clone();
        if progress.reached(position) {
            return Ok(());
        }
        match progress.state {
            RunState::Failed(source) => Err(Error::Failed {
                projection: self.shared.name.clone(),
                source,
            }),
            RunState::Stopped => Err(Error::Stopped {
                projection: self.shared.name.clone(),
                position: progress.position,
            }),
            _ if closed => Err(Error::Stopped {
                projection: self.shared.name.clone(),
                position: progress.position,
            }),
            _ => Err(Error::Timeout {
                projection: self.shared.name.clone(),
                wanted: position,
                reached: progress.position,
                timeout,
            }),
        }
    }

    /// Waits until the runner has handled everything the store held when
    /// called (its head then), or until `timeout` has passed: what a reader
    /// that just wrote, or a test, waits for before reading the model.
    ///
    /// # Errors
    /// [`Error::Store`] when the store's head cannot be read; otherwise as
    /// [`wait_for`](Self::wait_for).
    pub async fn catch_up(&self, timeout: Duration) -> Result<(), Error> {
        let head = self
            .store
            .head()
            .await
            .map_err(|e| Error::store(&self.shared.name, e))?;
        self.wait_for(head, timeout).await
    }

    /// How far the projection is behind the head of the store's log, in
    /// events (counting up to 100,000) and in seconds.
    ///
    /// # Errors
    /// [`Error::Store`] when the store cannot be read.
    pub async fn lag(&self) -> Result<Lag, Error> {
        measure_lag(&*self.store, self.position(), 100_000)
            .await
            .map_err(|e| Error::store(&self.shared.name, e))
    }

    /// The events this runner has set aside as dead letters since it started.
    pub fn dead_letters(&self) -> Vec<ParkedEvent> {
        self.shared
            .dead_letters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops the runner and waits for its task to end. The batch in flight is
    /// abandoned (rolled back, for a transactional runner). Returns the
    /// runner's error if it had failed.
    ///
    /// # Errors
    /// [`Error::Failed`] when the runner had stopped on an error.
    pub async fn stop(&self) -> Result<(), Error> {
        self.shared.stop.cancel();
        if let Some(task) = self.task.lock().await.take() {
            // The task catches the projection's panics itself; a join error
            // here can only be a cancelled runtime.
            let _ = task.await;
        }
        match self.state() {
            RunState::Failed(source) => Err(Error::Failed {
                projection: self.shared.name.clone(),
                source,
            }),
            _ => Ok(()),
        }
    }

    /// Waits until the runner has ended by itself (an error, or a stop from
    /// another handle) and returns its final state.
    pub async fn finished(&self) -> RunState {
        let mut rx = self.shared.progress.subscribe();
        let _ = rx.wait_for(|p| p.state.is_terminal()).await;
        self.state()
    }
}
