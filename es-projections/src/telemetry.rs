//! Metric names and the lag probe.
//!
//! The runners report through the [`metrics`] facade; install any recorder
//! (Prometheus exporter, statsd, ...) to collect them. Every metric carries a
//! `projection` label.

use std::time::Duration;

use chrono::Utc;
use es_core::{EventStore, Position, StoreError};

/// Counter: events the projection applied.
pub const EVENTS_APPLIED: &str = "es_projections_events_applied_total";
/// Counter: events the runner passed over because the projection does not
/// accept their type (their positions still advance the checkpoint).
pub const EVENTS_SKIPPED: &str = "es_projections_events_skipped_total";
/// Counter: events set aside as dead letters.
pub const DEAD_LETTERS: &str = "es_projections_dead_letters_total";
/// Counter: batches committed.
pub const BATCHES: &str = "es_projections_batches_total";
/// Histogram: seconds from a batch's first apply to its commit.
pub const BATCH_SECONDS: &str = "es_projections_batch_seconds";
/// Gauge: events in the log after the projection's checkpoint (capped at
/// [`LAG_SCAN_LIMIT`] for the runner's own measurements).
pub const LAG_EVENTS: &str = "es_projections_lag_events";
/// Gauge: seconds since the oldest event the projection has not handled yet
/// was recorded (0 when caught up).
pub const LAG_SECONDS: &str = "es_projections_lag_seconds";
/// Counter: infrastructure failures the runner retried.
pub const RETRIES: &str = "es_projections_retries_total";
/// Gauge: a rebuild's progress, from 0 to 1.
pub const REBUILD_PROGRESS: &str = "es_projections_rebuild_progress_ratio";
/// Gauge: events a rebuild has replayed so far.
pub const REBUILD_EVENTS: &str = "es_projections_rebuild_events";

/// How many events the runner counts, at most, when it measures its lag.
pub const LAG_SCAN_LIMIT: usize = 10_000;

/// How far a projection is behind the head of the log.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Lag {
    /// Events in the log after the projection's position. When
    /// `events_capped` is true there are at least this many.
    pub events: u64,
    /// Whether counting stopped at the limit.
    pub events_capped: bool,
    /// Seconds since the oldest event not yet handled was recorded; 0 when
    /// caught up.
    pub seconds: f64,
}

impl Lag {
    /// Whether the projection has handled everything in the log.
    pub fn is_caught_up(&self) -> bool {
        self.events == 0
    }

    /// The lag in seconds as a `Duration`.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.max(0.0))
    }
}

/// Measures how far `position` is behind the store's head, counting at most
/// `limit` events.
pub async fn measure_lag(
    store: &dyn EventStore,
    position: Position,
    limit: usize,
) -> Result<Lag, StoreError> {
    let head = store.head().await?;
    if head <= position {
        return Ok(Lag::default());
    }
    let mut events = 0u64;
    let mut seconds = 0.0;
    let mut after = position;
    let page = limit.clamp(1, 1_000);
    loop {
        let batch = store.read_all(after, page).await?;
        let Some(last) = batch.last() else { break };
        if events == 0 {
            let waited = Utc::now() - batch[0].recorded_at;
            seconds = waited.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
        }
        after = last.position;
        events += batch.len() as u64;
        if events as usize >= limit || batch.len() < page || after >= head {
            break;
        }
    }
    Ok(Lag {
        events,
        events_capped: events as usize >= limit,
        seconds: seconds.max(0.0),
    })
}

pub(crate) fn record_lag(projection: &str, lag: &Lag) {
    let label = [("projection", projection.to_owned())];
    metrics::gauge!(LAG_EVENTS, &label).set(lag.events as f64);
    metrics::gauge!(LAG_SECONDS, &label).set(lag.seconds);
}
