//! Reading checkpoints, and waiting for one to reach a position from any
//! process (read-your-writes over PostgreSQL).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use es_core::Position;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;

use es_core::CheckpointStore as _;

use super::{ident, NOTIFY_CHANNEL};
use crate::Error;

/// The stored checkpoint of projection `name` in the runner schema `schema`.
///
/// # Errors
/// [`Error::Database`] when PostgreSQL fails.
pub async fn load_checkpoint(
    pool: &PgPool,
    schema: &str,
    name: &str,
) -> Result<Option<Position>, Error> {
    ident(schema)?;
    es_postgres::PgCheckpointStore::new(pool.clone(), schema)
        .load(name)
        .await
        .map_err(|e| Error::store(name, e))
}

/// How far projection `name` (run by any process against `schema`) is
/// behind the head of `store`'s log, counting up to `limit` events.
///
/// # Errors
/// [`Error::Database`] / [`Error::Store`] when PostgreSQL or the store fails.
pub async fn projection_lag(
    pool: &PgPool,
    schema: &str,
    name: &str,
    store: &dyn es_core::EventStore,
    limit: usize,
) -> Result<crate::Lag, Error> {
    let at = load_checkpoint(pool, schema, name)
        .await?
        .unwrap_or(Position::START);
    crate::telemetry::measure_lag(store, at, limit)
        .await
        .map_err(|e| Error::store(name, e))
}

/// Waits until projection `name` (run by any process against `schema`) has
/// committed a checkpoint at or after `position`, or `timeout` has passed.
///
/// Opens a `LISTEN` connection for the call; a service that waits often
/// should keep one [`CheckpointWatcher`] instead.
///
/// # Errors
/// [`Error::Timeout`] when the time ran out; [`Error::Database`] when
/// PostgreSQL fails.
pub async fn wait_for_checkpoint(
    pool: &PgPool,
    schema: &str,
    name: &str,
    position: Position,
    timeout: Duration,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut listener = PgListener::connect_with(pool)
        .await
        .map_err(|e| Error::db(name, e))?;
    listener
        .listen(NOTIFY_CHANNEL)
        .await
        .map_err(|e| Error::db(name, e))?;
    loop {
        // Read after LISTEN, so a commit between the two is not missed.
        let reached = load_checkpoint(pool, schema, name)
            .await?
            .unwrap_or(Position::START);
        if reached >= position {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(Error::Timeout {
                projection: name.to_owned(),
                wanted: position,
                reached,
                timeout,
            });
        }
        // Any notification, or a second without one, means: read again.
        let wait = (deadline - now).min(Duration::from_secs(1));
        let _ = tokio::time::timeout(wait, listener.try_recv()).await;
    }
}

/// One `LISTEN` connection shared by every wait on the checkpoints of a
/// runner schema: cheap read-your-writes for an API in another process than
/// the runner.
///
/// It follows the notifications each batch commit sends, and re-reads the
/// checkpoints someone is waiting for every second in case a notification was
/// lost (a reconnect). Dropping the last clone stops its task.
#[derive(Clone)]
pub struct CheckpointWatcher {
    inner: Arc<WatcherInner>,
}

struct WatcherInner {
    pool: PgPool,
    schema: String,
    positions: Mutex<HashMap<String, watch::Sender<Position>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for WatcherInner {
    fn drop(&mut self) {
        if let Some(task) = self
            .task
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

impl fmt::Debug for CheckpointWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointWatcher")
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

impl CheckpointWatcher {
    /// Starts watching the checkpoints in runner schema `schema`.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad schema name, [`Error::Database`] when the
    /// listener cannot connect.
    pub async fn start(pool: PgPool, schema: &str) -> Result<Self, Error> {
        ident(schema)?;
        let mut listener = PgListener::connect_with(&pool)
            .await
            .map_err(|e| Error::db(schema, e))?;
        listener
            .listen(NOTIFY_CHANNEL)
            .await
            .map_err(|e| Error::db(schema, e))?;
        let inner = Arc::new(WatcherInner {
            pool,
            schema: schema.to_owned(),
            positions: Mutex::new(HashMap::new()),
            task: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let note = tokio::select! {
                    note = listener.try_recv() => Some(note),
                    _ = tick.tick() => None,
                };
                let Some(inner) = weak.upgrade() else { return };
                match note {
                    Some(Ok(Some(note))) => inner.on_notification(note.payload()),
                    Some(Ok(None)) => {} // reconnected: the tick re-reads
                    Some(Err(error)) => {
                        tracing::warn!(%error, "checkpoint watcher lost its listener");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    None => inner.refresh().await,
                }
            }
        });
        *inner.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(Self { inner })
    }

    /// Waits until projection `name` has committed a checkpoint at or after
    /// `position`, or `timeout` has passed.
    ///
    /// # Errors
    /// [`Error::Timeout`] when the time ran out; [`Error::Database`] when the
    /// first read of the checkpoint fails.
    pub async fn wait_for(
        &self,
        name: &str,
        position: Position,
        timeout: Duration,
    ) -> Result<(), Error> {
        self.wait_until(name, position, timeout, |p| p >= position)
            .await
    }

    /// Waits until projection `name` has committed a checkpoint strictly
    /// after `seen`, or `timeout` has passed: "wake me when the projection
    /// next moves", for a reader re-checking a row it found not yet written.
    ///
    /// # Errors
    /// As [`CheckpointWatcher::wait_for`].
    pub async fn wait_past(
        &self,
        name: &str,
        seen: Position,
        timeout: Duration,
    ) -> Result<(), Error> {
        self.wait_until(name, seen, timeout, |p| p > seen).await
    }

    async fn wait_until(
        &self,
        name: &str,
        wanted: Position,
        timeout: Duration,
        reached: impl Fn(Position) -> bool,
    ) -> Result<(), Error> {
        let mut rx = {
            let mut positions = self
                .inner
                .positions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            positions
                .entry(name.to_owned())
                .or_insert_with(|| watch::Sender::new(Position::START))
                .subscribe()
        };
        // Read once after subscribing: notifications from now on are seen.
        let stored = load_checkpoint(&self.inner.pool, &self.inner.schema, name)
            .await?
            .unwrap_or(Position::START);
        self.inner.advance(name, stored);
        let done = tokio::time::timeout(timeout, rx.wait_for(|p| reached(*p)))
            .await
            .is_ok();
        let at = *rx.borrow();
        if done || reached(at) {
            Ok(())
        } else {
            Err(Error::Timeout {
                projection: name.to_owned(),
                wanted,
                reached: at,
                timeout,
            })
        }
    }
}

impl WatcherInner {
    fn advance(&self, name: &str, position: Position) {
        if let Some(tx) = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
        {
            tx.send_if_modified(|p| {
                // A rebuild may move a checkpoint backwards only by swapping
                // in a model that is ahead; never report going back.
                let newer = position > *p;
                if newer {
                    *p = position;
                }
                newer
            });
        }
    }

    fn on_notification(&self, payload: &str) {
        // "<schema>.<name> <major>.<minor>"
        let Some((key, position)) = payload.rsplit_once(' ') else {
            return;
        };
        let Some(name) = key
            .strip_prefix(self.schema.as_str())
            .and_then(|k| k.strip_prefix('.'))
        else {
            return;
        };
        if let Ok(position) = position.parse() {
            self.advance(name, position);
        }
    }

    async fn refresh(&self) {
        let names: Vec<String> = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, tx)| tx.receiver_count() > 0)
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            if let Ok(Some(position)) = load_checkpoint(&self.pool, &self.schema, &name).await {
                self.advance(&name, position);
            }
        }
    }
}
