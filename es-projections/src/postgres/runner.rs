//! The PostgreSQL runner.

use std::fmt;
use std::future::Future;

use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;

use es_core::{
    CancellationToken, EventStore, Position, Projection, ProjectionError, RecordedEvent,
};
use sqlx::{Connection as _, PgConnection, PgPool, Postgres, Transaction};
use std::sync::atomic::{AtomicBool, Ordering};

use es_core::CheckpointStore as _;
use es_postgres::{PgCheckpointStore, PgLeaderLock};

use super::{ident, migrate, to_i64, NOTIFY_CHANNEL};
use crate::handle::{RunState, Shared};
use crate::runner::{Backend, Runner};
use crate::{Error, ParkedEvent, ProjectionHandle, RunnerOptions};

/// A projection whose read model is a set of PostgreSQL tables.
///
/// `apply` receives the batch's transaction, with `search_path` set to the
/// projection's model schema: write unqualified table names, so the same
/// code builds a fresh copy of the tables during a rebuild.
pub trait PgProjection: Projection<Tx = PgConnection> {
    /// Creates the read model's tables (unqualified names, `IF NOT EXISTS`)
    /// in the current schema. Runs when the runner starts and at the start of
    /// a rebuild, in a transaction.
    fn setup(
        &self,
        conn: &mut PgConnection,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Applies a whole batch of accepted events (in log order) with
    /// set-based SQL, for throughput. Return `None` (the default) when the
    /// projection has no such form: the runner then calls `apply` per event.
    ///
    /// Must have the same effect as applying the events one by one. When it
    /// fails, the runner rolls the batch back and applies it again event by
    /// event, so the failing event is named (or set aside as a dead letter).
    fn apply_batch<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [&'a RecordedEvent],
    ) -> impl Future<Output = Option<Result<(), ProjectionError>>> + Send + 'a {
        let _ = (conn, events);
        async { None }
    }
}

/// Runs a [`PgProjection`] from its checkpoint: batches of events applied
/// and committed with the checkpoint in one transaction, one active instance
/// per projection across processes (the others wait as standbys).
pub struct PgProjectionRunner<P> {
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
    pub(crate) model_schema: String,
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) projection: Arc<P>,
    pub(crate) options: RunnerOptions,
    pub(crate) leader_check: Duration,
    pub(crate) leader_election: bool,
}

impl<P> fmt::Debug for PgProjectionRunner<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgProjectionRunner")
            .field("schema", &self.schema)
            .field("model_schema", &self.model_schema)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<P: PgProjection> PgProjectionRunner<P> {
    /// A runner keeping its checkpoint in runner schema `schema` (see
    /// [`migrate`]) and the read model in `model_schema`.
    ///
    /// # Errors
    /// [`Error::Config`] when a schema name is not a plain identifier (the
    /// model schema's name may have at most 40 bytes, to leave room for the
    /// rebuild's suffixes).
    pub fn new(
        pool: PgPool,
        schema: &str,
        model_schema: &str,
        store: Arc<dyn EventStore>,
        projection: Arc<P>,
    ) -> Result<Self, Error> {
        ident(schema)?;
        ident(model_schema)?;
        if model_schema.len() > 40 {
            return Err(Error::Config {
                reason: format!("model schema name {model_schema:?} is longer than 40 bytes"),
            });
        }
        Ok(Self {
            pool,
            schema: schema.to_owned(),
            model_schema: model_schema.to_owned(),
            store,
            projection,
            options: RunnerOptions::default(),
            leader_check: Duration::from_secs(2),
            leader_election: true,
        })
    }

    /// Batch size, error policy, retries.
    #[must_use]
    pub fn with_options(mut self, options: RunnerOptions) -> Self {
        self.options = options;
        self
    }

    /// How often a leader checks that it still holds its lock, and a standby
    /// tries to take it (default 2 s).
    #[must_use]
    pub fn with_leader_check(mut self, every: Duration) -> Self {
        self.leader_check = every;
        self
    }

    /// Whether the runner takes the projection's advisory lock before it
    /// runs (default true). Without it, several instances may run at once:
    /// each batch's checkpoint compare-and-set still keeps every event
    /// applied exactly once (the losers roll back and retry), at the cost of
    /// wasted work.
    #[must_use]
    pub fn with_leader_election(mut self, on: bool) -> Self {
        self.leader_election = on;
        self
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        self.projection.name()
    }

    /// Runs in a background task; the handle reports position, lag and dead
    /// letters and offers `wait_for` and `stop`. Must be called inside a Tokio
    /// runtime.
    pub fn spawn(self) -> ProjectionHandle {
        let shared = Shared::new(self.projection.name());
        let store = Arc::clone(&self.store);
        let task_shared = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            let stop = task_shared.stop.clone();
            let outcome = std::panic::AssertUnwindSafe(self.run_shared(&task_shared, &stop))
                .catch_unwind()
                .await;
            task_shared.set_state(match outcome {
                Ok(Ok(())) => RunState::Stopped,
                Ok(Err(error)) => {
                    tracing::error!(projection = %task_shared.name, %error, "projection runner stopped");
                    RunState::Failed(Arc::new(error))
                }
                Err(panic) => RunState::Failed(Arc::new(Error::Panicked {
                    projection: task_shared.name.clone(),
                    message: crate::runner::panic_message(&*panic),
                })),
            });
        });
        ProjectionHandle::new(shared, store, task)
    }

    /// Runs in the current task until `stop` is cancelled (`Ok`) or a fatal
    /// error: waits for the projection's leadership, then follows the log;
    /// goes back to waiting if the leadership is lost.
    ///
    /// # Errors
    /// [`Error::Apply`] when the projection fails on an event under
    /// [`OnError::Stop`](crate::OnError::Stop); infrastructure errors once the
    /// retries are used up.
    pub async fn run(&self, stop: CancellationToken) -> Result<(), Error> {
        let shared = Shared::new(self.projection.name());
        self.run_shared(&shared, &stop).await
    }

    async fn run_shared(
        &self,
        shared: &Arc<Shared>,
        stop: &CancellationToken,
    ) -> Result<(), Error> {
        let name = self.projection.name().to_owned();
        migrate(&self.pool, &self.schema).await?;
        // Leadership is per runner schema and projection name.
        let lock_name = format!("es-projections:{}.{name}", self.schema);
        let lock = PgLeaderLock::new(self.pool.clone())
            .retry_interval(self.leader_check)
            .check_interval(self.leader_check, Duration::from_secs(5));
        loop {
            shared.set_state(RunState::Starting);
            if !self.leader_election {
                let runner = Runner {
                    projection: Arc::clone(&self.projection),
                    backend: PgBackend::new(self, &self.model_schema, &name, &name)?,
                    store: Arc::clone(&self.store),
                    options: self.options.clone(),
                    shared: Arc::clone(shared),
                };
                runner.backend.setup(&*self.projection).await?;
                return runner.run(stop).await;
            }
            let guard = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                guard = lock.wait(&lock_name) => guard,
            };
            let guard = match guard {
                Ok(lock) => lock,
                Err(error) => {
                    tracing::warn!(projection = %name, %error, "cannot take the projection's leadership; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        () = tokio::time::sleep(self.leader_check) => continue,
                    }
                }
            };
            tracing::info!(projection = %name, "projection leadership taken");
            let runner = Runner {
                projection: Arc::clone(&self.projection),
                backend: PgBackend::new(self, &self.model_schema, &name, &name)?,
                store: Arc::clone(&self.store),
                options: self.options.clone(),
                shared: Arc::clone(shared),
            };
            let outcome = tokio::select! {
                outcome = async {
                    runner.backend.setup(&*self.projection).await?;
                    runner.run(stop).await
                } => Some(outcome),
                () = guard.lost() => None,
            };
            match outcome {
                Some(outcome) => {
                    if let Err(error) = guard.release().await {
                        tracing::warn!(projection = %name, %error, "releasing the projection's leadership failed; its connection is closed");
                    }
                    return outcome;
                }
                None => {
                    tracing::warn!(projection = %name, "projection leadership lost; back to standby");
                }
            }
        }
    }
}

/// Checkpoints in the runner schema, units of work as transactions with
/// `search_path` set to a model schema.
pub(crate) struct PgBackend {
    pub(crate) pool: PgPool,
    pub(crate) name: String,
    pub(crate) checkpoint_name: String,
    pub(crate) checkpoints: PgCheckpointStore,
    pub(crate) set_path: String,
    create_schema: String,
    fence_key: String,
    dead_sql: String,
    notify_key: String,
    /// A batch failed on a prepared statement whose result type changed
    /// under it (the read model's tables were altered): the statements each
    /// connection keeps are dropped at the start of every batch until one
    /// commits.
    stale_plans: AtomicBool,
}

/// Whether `error` is PostgreSQL refusing a cached plan whose result type
/// changed (SQLSTATE 0A000, "cached plan must not change result type"): the
/// connection's prepared statements predate an `ALTER TABLE`, and only
/// preparing them again heals it.
fn is_stale_plan(error: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(sqlx::Error::Database(db)) = e.downcast_ref::<sqlx::Error>() {
            if db.code().as_deref() == Some(FEATURE_NOT_SUPPORTED)
                && db.message().contains("cached plan")
            {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// SQLSTATE 0A000.
const FEATURE_NOT_SUPPORTED: &str = "0A000";

impl PgBackend {
    /// A backend for projection `name` writing to `model_schema`, with its
    /// checkpoint saved as `checkpoint_name` (the projection's name, or a
    /// rebuild's own checkpoint).
    pub(crate) fn new<P>(
        runner: &PgProjectionRunner<P>,
        model_schema: &str,
        name: &str,
        checkpoint_name: &str,
    ) -> Result<Self, Error> {
        let schema = ident(&runner.schema)?;
        Ok(Self {
            pool: runner.pool.clone(),
            name: name.to_owned(),
            checkpoint_name: checkpoint_name.to_owned(),
            checkpoints: PgCheckpointStore::new(runner.pool.clone(), &runner.schema),
            set_path: format!("SET LOCAL search_path TO {}, public", ident(model_schema)?),
            create_schema: format!("CREATE SCHEMA IF NOT EXISTS {}", ident(model_schema)?),
            fence_key: format!("es-projections fence {}.{checkpoint_name}", runner.schema),
            dead_sql: format!(
                "INSERT INTO {schema}.projection_dead_letters \
                 (projection, event_id, event_type, stream_id, major, minor, error, failed_at) \
                 SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], \
                 $5::bigint[], $6::bigint[], $7::text[], $8::timestamptz[]) \
                 ON CONFLICT (projection, event_id) DO NOTHING"
            ),
            notify_key: format!("{}.{checkpoint_name}", runner.schema),
            stale_plans: AtomicBool::new(false),
        })
    }

    /// Creates the model schema and the projection's tables in it. Two
    /// runners doing so at once can collide in the catalog (`IF NOT EXISTS`
    /// is not atomic); the loser retries in a fresh transaction.
    pub(crate) async fn setup<P: PgProjection>(&self, projection: &P) -> Result<(), Error> {
        let mut attempt = 0;
        loop {
            match self.setup_once(projection).await {
                Ok(()) => return Ok(()),
                Err(error) if attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(projection = %self.name, %error, "read model setup collided; retrying");
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn setup_once<'a, P: PgProjection>(
        &'a self,
        projection: &'a P,
    ) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            let mut tx = self.open().await?;
            sqlx::query(&self.create_schema)
                .execute(&mut *tx)
                .await
                .map_err(|e| Error::db(&self.name, e))?;
            projection
                .setup(&mut tx)
                .await
                .map_err(|source| Error::Setup {
                    projection: self.name.clone(),
                    source: Box::new(source),
                })?;
            tx.commit().await.map_err(|e| Error::db(&self.name, e))
        }
        .boxed()
    }

    /// A transaction with `search_path` set to the model schema, opened in
    /// one round trip.
    pub(crate) fn open(&self) -> BoxFuture<'_, Result<Transaction<'static, Postgres>, Error>> {
        async move {
            self.pool
                .begin_with(format!("BEGIN; {}", self.set_path))
                .await
                .map_err(|e| Error::db(&self.name, e))
        }
        .boxed()
    }

    /// Takes the checkpoint's transaction-scoped lock (every batch of this
    /// checkpoint, in any process, waits for the one holding it) and reads the
    /// checkpoint inside `tx`, in a snapshot taken after the lock.
    ///
    /// The lock is a statement of its own, never part of the `BEGIN` that
    /// [`Self::open`] sends: a task cancelled while its `BEGIN` waits would
    /// leave the pooled connection in a transaction sqlx does not know of,
    /// holding the lock once granted, and every later batch waiting for it.
    pub(crate) fn locked_checkpoint<'a>(
        &'a self,
        tx: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<Option<Position>, Error>> {
        async move {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(&self.fence_key)
                .execute(&mut *tx)
                .await
                .map_err(|e| Error::db(&self.name, e))?;
            self.checkpoints
                .load_in_tx(tx, &self.checkpoint_name)
                .await
                .map_err(|e| Error::pg(&self.name, e))
        }
        .boxed()
    }

    /// Writes the dead letters, then the checkpoint and its notification in
    /// one statement, inside `tx`.
    pub(crate) fn write_checkpoint<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        position: Position,
        dead_letters: &'a [ParkedEvent],
    ) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            if !dead_letters.is_empty() {
                let mut majors = Vec::new();
                let mut minors = Vec::new();
                for d in dead_letters {
                    majors.push(to_i64(&self.name, d.position.major())?);
                    minors.push(to_i64(&self.name, d.position.minor())?);
                }
                sqlx::query(&self.dead_sql)
                    .bind(
                        dead_letters
                            .iter()
                            .map(|d| d.projection.clone())
                            .collect::<Vec<_>>(),
                    )
                    .bind(dead_letters.iter().map(|d| d.event_id).collect::<Vec<_>>())
                    .bind(
                        dead_letters
                            .iter()
                            .map(|d| d.event_type.clone())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        dead_letters
                            .iter()
                            .map(|d| d.stream_id.to_string())
                            .collect::<Vec<_>>(),
                    )
                    .bind(majors)
                    .bind(minors)
                    .bind(
                        dead_letters
                            .iter()
                            .map(|d| d.error.clone())
                            .collect::<Vec<_>>(),
                    )
                    .bind(dead_letters.iter().map(|d| d.failed_at).collect::<Vec<_>>())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| Error::db(&self.name, e))?;
            }
            self.checkpoints
                .save_in_tx_notifying(
                    tx,
                    &self.checkpoint_name,
                    position,
                    NOTIFY_CHANNEL,
                    &format!("{} {position}", self.notify_key),
                )
                .await
                .map_err(|e| Error::pg(&self.name, e))?;
            Ok(())
        }
        .boxed()
    }
}

impl<P: PgProjection> Backend<P> for PgBackend {
    type Unit = Transaction<'static, Postgres>;
    const TRANSACTIONAL: bool = true;

    async fn load_checkpoint(&self) -> Result<Position, Error> {
        Ok(self
            .checkpoints
            .load(&self.checkpoint_name)
            .await
            .map_err(|e| Error::store(&self.name, e))?
            .unwrap_or(Position::START))
    }

    fn failed(&self, error: &Error) {
        if is_stale_plan(error) {
            tracing::info!(projection = %self.name, "the read model's tables changed; preparing statements again");
            self.stale_plans.store(true, Ordering::Relaxed);
        }
    }

    async fn begin(&self, expected: Position) -> Result<Self::Unit, Error> {
        let mut tx = self.open().await?;
        if self.stale_plans.load(Ordering::Relaxed) {
            tx.clear_cached_statements()
                .await
                .map_err(|e| Error::db(&self.name, e))?;
        }
        let found = self.locked_checkpoint(&mut tx).await?;
        if found.unwrap_or(Position::START) != expected {
            return Err(Error::Fenced {
                projection: self.name.clone(),
                expected,
                found,
            });
        }
        Ok(tx)
    }

    fn tx(unit: &mut Self::Unit) -> &mut PgConnection {
        unit
    }

    fn apply_batch<'a>(
        &'a self,
        projection: &'a P,
        unit: &'a mut Self::Unit,
        events: &'a [&'a RecordedEvent],
    ) -> impl Future<Output = Option<Result<(), ProjectionError>>> + Send + 'a {
        projection.apply_batch(unit, events)
    }

    async fn commit(
        &self,
        mut unit: Self::Unit,
        position: Position,
        dead_letters: &[ParkedEvent],
    ) -> Result<(), Error> {
        self.write_checkpoint(&mut unit, position, dead_letters)
            .await?;
        unit.commit().await.map_err(|e| Error::db(&self.name, e))?;
        self.stale_plans.store(false, Ordering::Relaxed);
        Ok(())
    }
}
