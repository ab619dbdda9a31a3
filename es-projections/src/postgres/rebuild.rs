//! Rebuilding a read model from position 0 into a fresh schema, then
//! swapping it in while the old model keeps serving reads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use es_core::Position;
use futures::StreamExt;
use sqlx::PgConnection;
use tracing::Instrument;

use super::runner::{PgBackend, PgProjection, PgProjectionRunner};
use super::{ident, migrate};
use crate::handle::Shared;
use crate::runner::{event_span, Runner};
use crate::telemetry::{self, measure_lag};
use crate::{Error, OnError, ParkedEvent, RunnerOptions};
use es_core::CheckpointStore as _;
use es_postgres::PgLeaderLock;

/// How a rebuild runs.
#[derive(Clone, Debug)]
pub struct RebuildOptions {
    /// Events per replay batch (one transaction each).
    pub batch_size: usize,
    /// The number of events in the log, when the caller knows it cheaply
    /// (`SELECT count(*)` on the events table); otherwise the rebuild counts
    /// them by reading the log once before replaying it.
    pub total_events: Option<u64>,
    /// Keep the replaced model as schema `<model>__old` instead of dropping
    /// it after the swap.
    pub keep_old: bool,
    /// What to do when the projection fails on an event during the replay.
    pub on_error: OnError,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            batch_size: 2_000,
            total_events: None,
            keep_old: false,
            on_error: OnError::Stop,
        }
    }
}

/// Receives a rebuild's progress (a progress bar, a log line).
pub trait RebuildProgress: Send + Sync {
    /// The replay starts; `total` events are expected (the log may grow).
    fn start(&self, total: u64);
    /// `done` events have been replayed.
    fn progress(&self, done: u64, total: u64);
    /// The new model has been swapped in.
    fn finish(&self, report: &RebuildReport);
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl RebuildProgress for NoProgress {
    fn start(&self, _: u64) {}
    fn progress(&self, _: u64, _: u64) {}
    fn finish(&self, _: &RebuildReport) {}
}

/// What a rebuild did.
#[derive(Clone, Debug, PartialEq)]
pub struct RebuildReport {
    /// Events read from the log during the replay.
    pub events: u64,
    /// Events applied after the replay, inside the swap's transaction, to
    /// reach the live runner's checkpoint.
    pub caught_up_in_swap: u64,
    /// The checkpoint the new model was swapped in at.
    pub position: Position,
    /// Events set aside as dead letters.
    pub dead_letters: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Rebuilds `runner`'s read model from position 0.
///
/// 1. Creates schema `<model>__rebuild` (dropping a leftover one), runs the
///    projection's `setup` in it, and replays the whole log into it in
///    batches, each committed with its own checkpoint `<name>#rebuild`
///    (deleted in the swap).
///    Meanwhile the live model keeps serving reads, and a live runner keeps
///    applying new events to it.
/// 2. In one transaction: locks the live checkpoint (a live runner's next
///    batch waits), applies to the new model whatever the live runner
///    committed beyond the replay, renames the live schema to `<model>__old`
///    and the new one to `<model>`, and sets the live checkpoint. Readers see
///    the old model or the new one, never a mix; the live runner goes on into
///    the new model.
/// 3. Drops `<model>__old` unless [`RebuildOptions::keep_old`].
///
/// Only one rebuild of a projection runs at a time (an advisory lock).
/// Progress goes to `progress` and to the
/// [`REBUILD_PROGRESS`](telemetry::REBUILD_PROGRESS) gauge.
///
/// # Errors
/// [`Error::Config`] when another rebuild of the projection is running;
/// [`Error::Apply`] when the projection fails on an event under
/// [`OnError::Stop`]; [`Error::Database`] / [`Error::Store`] on
/// infrastructure failures (the live model is untouched in every case).
pub async fn rebuild<P: PgProjection>(
    runner: &PgProjectionRunner<P>,
    options: &RebuildOptions,
    progress: &dyn RebuildProgress,
) -> Result<RebuildReport, Error> {
    let started = Instant::now();
    let name = runner.projection.name().to_owned();
    migrate(&runner.pool, &runner.schema).await?;
    let Some(guard) = PgLeaderLock::new(runner.pool.clone())
        .try_acquire(&format!("es-projections rebuild {}.{name}", runner.schema))
        .await
        .map_err(|e| Error::pg(&name, e))?
    else {
        return Err(Error::Config {
            reason: format!("a rebuild of projection {name} is already running"),
        });
    };
    let span = tracing::info_span!(
        "projection.rebuild",
        projection = %name,
        model = %runner.model_schema,
    );
    let outcome = replay_and_swap(runner, options, progress, &name, started)
        .instrument(span)
        .await;
    if let Err(error) = guard.release().await {
        tracing::warn!(projection = %name, %error, "releasing the rebuild lock failed; its connection is closed");
    }
    outcome
}

async fn replay_and_swap<P: PgProjection>(
    runner: &PgProjectionRunner<P>,
    options: &RebuildOptions,
    progress: &dyn RebuildProgress,
    name: &str,
    started: Instant,
) -> Result<RebuildReport, Error> {
    let live = runner.model_schema.clone();
    let shadow = format!("{live}__rebuild");
    let old = format!("{live}__old");
    let rebuild_name = format!("{name}#rebuild");
    let db = |e| Error::db(name, e);
    let label = [("projection", name.to_owned())];

    // 1. A fresh schema and checkpoint.
    let shadow_q = ident(&shadow)?;
    for sql in [
        format!("DROP SCHEMA IF EXISTS {shadow_q} CASCADE"),
        format!("CREATE SCHEMA {shadow_q}"),
    ] {
        sqlx::query(&sql).execute(&runner.pool).await.map_err(db)?;
    }
    let backend = PgBackend::new(runner, &shadow, name, &rebuild_name)?;
    backend
        .checkpoints
        .save(&rebuild_name, Position::START)
        .await
        .map_err(|e| Error::store(name, e))?;
    backend.setup(&*runner.projection).await?;

    // 2. Replay up to the head as it is now.
    let target = runner
        .store
        .head()
        .await
        .map_err(|e| Error::store(name, e))?;
    let total = match options.total_events {
        Some(total) => total,
        None => {
            measure_lag(&*runner.store, Position::START, usize::MAX)
                .await
                .map_err(|e| Error::store(name, e))?
                .events
        }
    };
    progress.start(total);
    metrics::gauge!(telemetry::REBUILD_PROGRESS, &label).set(0.0);
    // The replay runs under the projection's own name: its errors and dead
    // letters name the projection, not the rebuild's checkpoint.
    let shared = Shared::new(name);
    let replay = Runner {
        projection: Arc::clone(&runner.projection),
        backend,
        store: Arc::clone(&runner.store),
        options: RunnerOptions::default()
            .batch_size(options.batch_size)
            .on_error(options.on_error),
        shared: Arc::clone(&shared),
    };
    let mut position = Position::START;
    let mut done = 0u64;
    let mut dead = 0u64;
    if target > position {
        let mut log = runner
            .store
            .subscribe_all(position)
            .ready_chunks(options.batch_size.max(1));
        while position < target {
            let Some(items) = log.next().await else {
                return Err(Error::store(
                    name,
                    es_core::StoreError::Backend {
                        source: "the store's subscription ended".into(),
                    },
                ));
            };
            let events = items
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::store(name, e))?;
            if events.is_empty() {
                continue;
            }
            let stats = replay.batch(position, &events).await?;
            dead += stats.dead;
            position = events[events.len() - 1].position;
            done += events.len() as u64;
            progress.progress(done, total.max(done));
            metrics::gauge!(telemetry::REBUILD_EVENTS, &label).set(done as f64);
            metrics::gauge!(telemetry::REBUILD_PROGRESS, &label)
                .set(done as f64 / total.max(done).max(1) as f64);
        }
    }

    // 3. Swap, in one transaction.
    let live_backend = PgBackend::new(runner, &shadow, name, name)?;
    let mut tx = replay.backend.open().await?;
    let live_at = live_backend
        .locked_checkpoint(&mut tx)
        .await?
        .unwrap_or(Position::START);
    let mut caught_up = 0u64;
    let mut letters = Vec::new();
    if live_at > position {
        let span = tracing::info_span!(
            "projection.rebuild.catch_up",
            projection = name,
            from = %position,
            to = %live_at,
        );
        caught_up = catch_up(runner, options, &mut tx, position, live_at, &mut letters)
            .instrument(span)
            .await?;
        dead += letters.len() as u64;
    }
    let final_at = live_at.max(position);
    let (live_q, old_q) = (ident(&live)?, ident(&old)?);
    let (exists,): (bool,) =
        sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&live)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
    let mut ddl = vec![format!("DROP SCHEMA IF EXISTS {old_q} CASCADE")];
    if exists {
        ddl.push(format!("ALTER SCHEMA {live_q} RENAME TO {old_q}"));
    }
    ddl.push(format!("ALTER SCHEMA {shadow_q} RENAME TO {live_q}"));
    for sql in &ddl {
        sqlx::query(sql).execute(&mut *tx).await.map_err(db)?;
    }
    live_backend
        .write_checkpoint(&mut tx, final_at, &letters)
        .await?;
    // The rebuild's own checkpoint has served its purpose.
    sqlx::query(&format!(
        "DELETE FROM {}.checkpoints WHERE name = $1",
        ident(&runner.schema)?
    ))
    .bind(&rebuild_name)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    if exists && !options.keep_old {
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {old_q} CASCADE"))
            .execute(&runner.pool)
            .await
            .map_err(db)?;
    }
    metrics::gauge!(telemetry::REBUILD_PROGRESS, &label).set(1.0);
    let report = RebuildReport {
        events: done,
        caught_up_in_swap: caught_up,
        position: final_at,
        dead_letters: dead,
        elapsed: started.elapsed(),
    };
    tracing::info!(projection = name, events = done, caught_up, position = %final_at, elapsed = ?report.elapsed, "projection rebuilt and swapped in");
    progress.finish(&report);
    Ok(report)
}

/// Applies the events in `(from, to]` inside the swap's transaction, each
/// under a savepoint so a dead letter does not abort the transaction.
async fn catch_up<P: PgProjection>(
    runner: &PgProjectionRunner<P>,
    options: &RebuildOptions,
    tx: &mut PgConnection,
    from: Position,
    to: Position,
    letters: &mut Vec<ParkedEvent>,
) -> Result<u64, Error> {
    let name = runner.projection.name();
    let db = |e| Error::db(name, e);
    let mut after = from;
    let mut applied = 0u64;
    while after < to {
        let page = runner
            .store
            .read_all(after, 1_000)
            .await
            .map_err(|e| Error::store(name, e))?;
        if page.is_empty() {
            break;
        }
        for event in page.iter().filter(|e| e.position <= to) {
            if !runner.projection.accepts(&event.event_type) {
                continue;
            }
            sqlx::query("SAVEPOINT es_catch_up")
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            let step = runner
                .projection
                .apply(tx, event)
                .instrument(event_span(name, event));
            match step.await {
                Ok(()) => {
                    sqlx::query("RELEASE SAVEPOINT es_catch_up")
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    applied += 1;
                }
                Err(source) if options.on_error == OnError::Stop => {
                    return Err(Error::Apply {
                        projection: name.to_owned(),
                        event_id: event.event_id,
                        event_type: event.event_type.to_string(),
                        stream_id: event.stream_id.clone(),
                        position: event.position,
                        source: Box::new(source),
                    });
                }
                Err(source) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT es_catch_up")
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    letters.push(ParkedEvent::new(name, event, &source));
                }
            }
        }
        after = page[page.len() - 1].position;
    }
    Ok(applied)
}
