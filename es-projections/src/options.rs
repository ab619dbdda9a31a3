//! How a runner batches, and what it does when the projection fails.

use std::time::Duration;

/// What a runner does when the projection refuses an event
/// ([`ProjectionError::InvalidEvent`](es_core::ProjectionError::InvalidEvent):
/// a decode error, data the read model cannot hold, a panic). A failure of
/// the read model's storage ([`ProjectionError::Storage`](es_core::ProjectionError::Storage))
/// is never the event's fault: the runner rolls the batch back and retries
/// it with backoff, whatever this says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnError {
    /// Stop the runner with [`Error::Apply`](crate::Error::Apply), naming the
    /// event and its position. The checkpoint stays before the event, so a
    /// fixed projection restarted later applies it.
    Stop,
    /// Park the event (in memory for the in-memory runner, in the dead-letter
    /// table, in the same transaction as the batch, for the PostgreSQL
    /// runner), leave the read model as if the event had not been there, and
    /// go on: one bad event never stops a reader. The default.
    #[default]
    DeadLetter,
}

/// Settings shared by the runners.
#[derive(Clone, Debug)]
pub struct RunnerOptions {
    /// The most events applied and committed as one batch.
    pub batch_size: usize,
    /// What to do when the projection fails on an event.
    pub on_error: OnError,
    /// How many infrastructure failures in a row (store, database, commit)
    /// the runner retries, from its stored checkpoint, before it stops.
    pub max_consecutive_failures: u32,
    /// The first retry delay; it doubles up to `max_backoff`.
    pub backoff: Duration,
    /// The longest retry delay.
    pub max_backoff: Duration,
    /// How often the runner measures its lag for the metrics: after a
    /// committed batch when the last measurement is older than this, and on a
    /// timer while no batch commits (an idle, stuck or retrying runner).
    pub lag_interval: Duration,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            on_error: OnError::DeadLetter,
            max_consecutive_failures: 20,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            lag_interval: Duration::from_secs(2),
        }
    }
}

impl RunnerOptions {
    /// Batches of up to `batch_size` events (at least 1).
    #[must_use]
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// What to do when the projection fails on an event.
    #[must_use]
    pub fn on_error(mut self, on_error: OnError) -> Self {
        self.on_error = on_error;
        self
    }

    /// How many infrastructure failures in a row are retried before the
    /// runner stops.
    #[must_use]
    pub fn max_consecutive_failures(mut self, n: u32) -> Self {
        self.max_consecutive_failures = n;
        self
    }

    /// The first and the longest retry delay.
    #[must_use]
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// How often the runner measures its lag for the metrics (at least
    /// every millisecond).
    #[must_use]
    pub fn lag_interval(mut self, every: Duration) -> Self {
        self.lag_interval = every.max(Duration::from_millis(1));
        self
    }

    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        self.backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff)
    }
}
