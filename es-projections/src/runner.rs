//! The runner loop both runners share: follow the log from the checkpoint,
//! batch, filter, apply, commit with the checkpoint, retry infrastructure
//! failures from the stored checkpoint.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use es_core::{CancellationToken, EventStore, Position, Projection, RecordedEvent};
use futures::{FutureExt, StreamExt};
use tracing::Instrument;

use crate::handle::{RunState, Shared};
use crate::telemetry::{self, measure_lag, LAG_SCAN_LIMIT};
use crate::{Error, OnError, ParkedEvent, RunnerOptions};

/// Where a runner keeps its checkpoint and how it opens and commits a unit of
/// work.
pub(crate) trait Backend<P: Projection>: Send + Sync + 'static {
    /// An open unit of work (a database transaction).
    type Unit: Send;

    /// Whether dropping a unit undoes what was applied in it. When it does, a
    /// failed batch is rolled back and replayed without its dead letters;
    /// when it does not, the runner goes on from the failing event.
    const TRANSACTIONAL: bool;

    /// The stored checkpoint.
    fn load_checkpoint(&self) -> impl Future<Output = Result<Position, Error>> + Send;

    /// Opens a unit of work, checking that the checkpoint is still `expected`.
    fn begin(&self, expected: Position) -> impl Future<Output = Result<Self::Unit, Error>> + Send;

    /// The projection's view of the unit.
    fn tx(unit: &mut Self::Unit) -> &mut P::Tx;

    /// Commits the unit with the checkpoint `position` and the dead letters.
    fn commit(
        &self,
        unit: Self::Unit,
        position: Position,
        dead_letters: &[ParkedEvent],
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Takes note of a failure before the runner retries from its
    /// checkpoint (a backend that can mend its connections does so here).
    fn failed(&self, error: &Error) {
        let _ = error;
    }

    /// Applies a batch's accepted events in one go, when the projection has a
    /// set-based form. `None`: it has not; the runner applies them one by one.
    fn apply_batch<'a>(
        &'a self,
        projection: &'a P,
        unit: &'a mut Self::Unit,
        events: &'a [&'a RecordedEvent],
    ) -> impl Future<Output = Option<Result<(), es_core::ProjectionError>>> + Send + 'a {
        let _ = (projection, unit, events);
        async { None }
    }
}

/// Everything a running loop needs.
pub(crate) struct Runner<P, B> {
    pub(crate) projection: Arc<P>,
    pub(crate) backend: B,
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) options: RunnerOptions,
    pub(crate) shared: Arc<Shared>,
}

/// When the lag was last measured.
#[derive(Debug, Default)]
pub(crate) struct LagClock(Mutex<Option<Instant>>);

impl LagClock {
    /// Whether the last measurement is older than `every` (or there was
    /// none); if so, the caller measures now.
    fn due(&self, every: std::time::Duration) -> bool {
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|t| t.elapsed() >= every) {
            *last = Some(Instant::now());
            true
        } else {
            false
        }
    }
}

/// What one batch did.
#[derive(Debug, Default)]
pub(crate) struct BatchStats {
    pub(crate) applied: u64,
    pub(crate) skipped: u64,
    pub(crate) dead: u64,
}

impl<P: Projection, B: Backend<P>> Runner<P, B> {
    fn name(&self) -> &str {
        &self.shared.name
    }

    /// Runs until `stop` is cancelled (`Ok`) or a fatal error.
    ///
    /// The lag gauges are measured after a committed batch and, while no
    /// batch commits (an idle, stuck or retrying runner), on a timer; and once
    /// more when the runner ends on an error, so they never keep reporting
    /// the lag of the last good batch.
    pub(crate) async fn run(&self, stop: &CancellationToken) -> Result<(), Error> {
        let clock = LagClock::default();
        let outcome = tokio::select! {
            outcome = self.run_loop(stop, &clock) => outcome,
            never = self.report_lag_on_a_timer(&clock) => match never {},
        };
        if outcome.is_err() {
            self.report_lag().await;
        }
        outcome
    }

    /// Measures the lag from the last handled position and records it.
    async fn report_lag(&self) {
        let position = self.shared.progress.borrow().position;
        match measure_lag(&*self.store, position, LAG_SCAN_LIMIT).await {
            Ok(lag) => telemetry::record_lag(self.name(), &lag),
            Err(error) => {
                tracing::debug!(projection = self.name(), %error, "cannot measure the projection's lag");
            }
        }
    }

    /// Every `lag_interval`, measures the lag if nothing else has in that
    /// time, while the runner is following the log (not while it is still
    /// loading its checkpoint: its position is not known yet).
    async fn report_lag_on_a_timer(&self, clock: &LagClock) -> std::convert::Infallible {
        let every = self
            .options
            .lag_interval
            .max(std::time::Duration::from_millis(1));
        loop {
            tokio::time::sleep(every).await;
            let running = matches!(self.shared.progress.borrow().state, RunState::Running);
            if running && clock.due(every) {
                self.report_lag().await;
            }
        }
    }

    async fn run_loop(&self, stop: &CancellationToken, clock: &LagClock) -> Result<(), Error> {
        let mut failures = 0u32;
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            match self.follow(stop, &mut failures, clock).await {
                Ok(()) => return Ok(()),
                Err(error) if error.is_fatal() => return Err(error),
                Err(error @ Error::Fenced { .. }) => {
                    // Another instance moved the checkpoint (a rebuild's swap,
                    // a second writer): not a failure, just start over from it.
                    tracing::info!(projection = self.name(), %error, "projection reloading its checkpoint");
                    tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        () = tokio::time::sleep(self.options.backoff) => {}
                    }
                }
                Err(error) => {
                    failures += 1;
                    self.backend.failed(&error);
                    metrics::counter!(telemetry::RETRIES, "projection" => self.name().to_owned())
                        .increment(1);
                    if failures > self.options.max_consecutive_failures {
                        tracing::error!(projection = self.name(), %error, failures, "projection runner giving up");
                        return Err(error);
                    }
                    let delay = self.options.delay(failures - 1);
                    tracing::warn!(projection = self.name(), %error, ?delay, "projection runner retrying from its checkpoint");
                    tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Loads the checkpoint, subscribes after it, and applies batches until
    /// stopped (`Ok`) or an error.
    async fn follow(
        &self,
        stop: &CancellationToken,
        failures: &mut u32,
        clock: &LagClock,
    ) -> Result<(), Error> {
        let mut position = self.backend.load_checkpoint().await?;
        self.shared.set_position(position);
        self.shared.set_state(RunState::Running);
        tracing::info!(projection = self.name(), %position, "projection following the log");
        let mut log = self
            .store
            .subscribe_all(position)
            .ready_chunks(self.options.batch_size);
        loop {
            let items = tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(()),
                items = log.next() => items,
            };
            let Some(items) = items else {
                return Err(Error::store(
                    self.name(),
                    es_core::StoreError::Backend {
                        source: "the store's subscription ended".into(),
                    },
                ));
            };
            let mut events = Vec::with_capacity(items.len());
            let mut failed = None;
            for item in items {
                match item {
                    Ok(event) if failed.is_none() => events.push(event),
                    Ok(_) => {}
                    Err(error) => {
                        failed.get_or_insert(error);
                    }
                }
            }
            if !events.is_empty() {
                let started = Instant::now();
                let stats = self.batch(position, &events).await?;
                position = events[events.len() - 1].position;
                *failures = 0;
                // Metrics first: whoever waits for the position sees them.
                self.record_batch(&stats, started);
                if clock.due(self.options.lag_interval) {
                    if let Ok(lag) = measure_lag(&*self.store, position, LAG_SCAN_LIMIT).await {
                        telemetry::record_lag(self.name(), &lag);
                    }
                }
                self.shared.set_position(position);
            }
            if let Some(error) = failed {
                return Err(Error::store(self.name(), error));
            }
        }
    }

    fn record_batch(&self, stats: &BatchStats, started: Instant) {
        let name = self.name().to_owned();
        metrics::counter!(telemetry::EVENTS_APPLIED, "projection" => name.clone())
            .increment(stats.applied);
        metrics::counter!(telemetry::EVENTS_SKIPPED, "projection" => name.clone())
            .increment(stats.skipped);
        if stats.dead > 0 {
            metrics::counter!(telemetry::DEAD_LETTERS, "projection" => name.clone())
                .increment(stats.dead);
        }
        metrics::counter!(telemetry::BATCHES, "projection" => name.clone()).increment(1);
        metrics::histogram!(telemetry::BATCH_SECONDS, "projection" => name)
            .record(started.elapsed().as_secs_f64());
    }

    /// Applies one batch and commits it with its checkpoint.
    pub(crate) async fn batch(
        &self,
        checkpoint: Position,
        events: &[RecordedEvent],
    ) -> Result<BatchStats, Error> {
        let last = events[events.len() - 1].position;
        let span = tracing::info_span!(
            "projection.batch",
            projection = self.name(),
            first = %events[0].position,
            last = %last,
            events = events.len(),
        );
        es_core::otel::continue_batch(&span, events.iter().map(|e| e.metadata.traceparent));
        async move {
            let mut dead = vec![false; events.len()];
            let mut letters = Vec::new();
            // A set-based apply of the whole batch first, when the
            // projection has one; one event at a time after it fails, to find
            // (and stop on, or set aside) the failing event.
            let mut whole_batch = B::TRANSACTIONAL;
            'attempt: loop {
                let mut unit = self.backend.begin(checkpoint).await?;
                let mut stats = BatchStats::default();
                if whole_batch {
                    whole_batch = false;
                    let accepted: Vec<&RecordedEvent> = events
                        .iter()
                        .filter(|e| self.projection.accepts(&e.event_type))
                        .collect();
                    let outcome = if accepted.is_empty() {
                        Some(Ok(()))
                    } else {
                        let span = batch_apply_span(self.name(), &accepted);
                        self.backend
                            .apply_batch(&self.projection, &mut unit, &accepted)
                            .instrument(span)
                            .await
                    };
                    match outcome {
                        Some(Ok(())) => {
                            stats.applied = accepted.len() as u64;
                            stats.skipped = (events.len() - accepted.len()) as u64;
                            self.backend.commit(unit, last, &letters).await?;
                            return Ok(stats);
                        }
                        Some(Err(error)) => {
                            tracing::debug!(%error, "set-based apply failed; applying one event at a time");
                            drop(unit);
                            continue 'attempt;
                        }
                        None => {}
                    }
                }
                for (i, event) in events.iter().enumerate() {
                    if dead[i] {
                        stats.dead += 1;
                        continue;
                    }
                    if !self.projection.accepts(&event.event_type) {
                        stats.skipped += 1;
                        continue;
                    }
                    match self.apply(B::tx(&mut unit), event).await {
                        Ok(()) => stats.applied += 1,
                        // The storage failed, not the event: roll back and
                        // let the runner retry the batch with backoff.
                        Err(error @ es_core::ProjectionError::Storage { .. }) => {
                            drop(unit);
                            return Err(Error::ReadModel {
                                projection: self.name().to_owned(),
                                position: event.position,
                                source: Box::new(error),
                            });
                        }
                        Err(error) => {
                            tracing::warn!(%error, event_id = %event.event_id, position = %event.position, "projection failed on an event");
                            if self.options.on_error == OnError::Stop {
                                if !B::TRANSACTIONAL && i > 0 {
                                    // What came before is applied for good:
                                    // record how far the model got.
                                    let before = events[i - 1].position;
                                    self.backend.commit(unit, before, &letters).await?;
                                    self.shared.set_position(before);
                                    self.shared.push_dead_letters(&letters);
                                }
                                return Err(Error::Apply {
                                    projection: self.name().to_owned(),
                                    event_id: event.event_id,
                                    event_type: event.event_type.to_string(),
                                    stream_id: event.stream_id.clone(),
                                    position: event.position,
                                    source: Box::new(error),
                                });
                            }
                            dead[i] = true;
                            stats.dead += 1;
                            letters.push(ParkedEvent::new(self.name(), event, &error));
                            if B::TRANSACTIONAL {
                                // The unit may be unusable (an aborted SQL
                                // transaction): roll it back and replay the
                                // batch without the dead letters.
                                drop(unit);
                                continue 'attempt;
                            }
                        }
                    }
                }
                self.backend.commit(unit, last, &letters).await?;
                self.shared.push_dead_letters(&letters);
                return Ok(stats);
            }
        }
        .instrument(span)
        .await
    }

    /// Applies one event inside its own span, turning a panic into an error.
    async fn apply(
        &self,
        tx: &mut P::Tx,
        event: &RecordedEvent,
    ) -> Result<(), es_core::ProjectionError> {
        let span = event_span(self.name(), event);
        es_core::otel::continue_trace(&span, event.metadata.traceparent);
        match AssertUnwindSafe(self.projection.apply(tx, event).instrument(span))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(panic) => Err(es_core::ProjectionError::invalid(
                self.name(),
                event,
                format!("the projection panicked: {}", panic_message(&*panic)),
            )),
        }
    }
}

/// The span of one projection step: the event, its position, and the
/// correlation and causation ids it carries. The runner's steps continue
/// the event's trace ([`es_core::otel::continue_trace`]); a rebuild's do
/// not.
pub(crate) fn event_span(projection: &str, event: &RecordedEvent) -> tracing::Span {
    tracing::debug_span!(
        "projection.apply",
        projection,
        event_id = %event.event_id,
        event_type = %event.event_type,
        stream_id = %event.stream_id,
        position = %event.position,
        correlation_id = event.metadata.correlation_id.map(tracing::field::display),
        causation_id = event.metadata.causation_id.map(tracing::field::display),
    )
}

/// The span of a set-based apply of `events` (not empty): the first and last
/// positions it covers, with one `projection.apply` child span per event so
/// that each event's correlation and causation ids are on record. The child
/// spans are at debug level and cost next to nothing when that level is off.
fn batch_apply_span(projection: &str, events: &[&RecordedEvent]) -> tracing::Span {
    let (first, last) = (events[0].position, events[events.len() - 1].position);
    let span = tracing::debug_span!(
        "projection.apply_batch",
        projection,
        first = %first,
        last = %last,
        events = events.len(),
    );
    if tracing::enabled!(tracing::Level::DEBUG) {
        span.in_scope(|| {
            for event in events {
                let span = event_span(projection, event);
                es_core::otel::continue_trace(&span, event.metadata.traceparent);
            }
        });
    }
    span
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Spawns `runner` on the current Tokio runtime and returns the task; the
/// task records its outcome in the shared state.
pub(crate) fn spawn<P: Projection, B: Backend<P>>(
    runner: Runner<P, B>,
) -> tokio::task::JoinHandle<()> {
    let shared = Arc::clone(&runner.shared);
    let stop = shared.stop.clone();
    tokio::spawn(async move {
        let outcome = AssertUnwindSafe(runner.run(&stop)).catch_unwind().await;
        let state = match outcome {
            Ok(Ok(())) => RunState::Stopped,
            Ok(Err(error)) => {
                tracing::error!(projection = %shared.name, %error, "projection runner stopped");
                RunState::Failed(Arc::new(error))
            }
            Err(panic) => RunState::Failed(Arc::new(Error::Panicked {
                projection: shared.name.clone(),
                message: panic_message(&*panic),
            })),
        };
        shared.set_state(state);
    })
}
