//! The deadline scheduler: fires saga deadlines when they are due.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    DeadlineRecord, Saga, SagaError, SagaManager, DEADLINE_CANCELLED, DEADLINE_FIRED, DEADLINE_SET,
};
use crate::{CancellationToken, CheckpointStore, Position, RecordedEvent};

/// How often a scheduler with a checkpoint saves it by default (see
/// [`DeadlineScheduler::with_checkpoint`]).
pub const DEFAULT_DEADLINE_CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Fires saga deadlines when they are due.
///
/// It follows the store's log for the deadline records of one saga type, keeps
/// the pending ones in memory, and asks the [`SagaManager`] to fire each when
/// the manager's clock passes its due time. Firing is idempotent, so several
/// schedulers (or a restart) never fire a deadline twice.
///
/// Without a checkpoint it reads the whole log at every start. With one
/// ([`with_checkpoint`](Self::with_checkpoint)) it saves the position before
/// the oldest deadline still pending (or the last position read, when none
/// is) and starts from there: a restart reads what the pending deadlines
/// span, not the log's history.
pub struct DeadlineScheduler<S: Saga> {
    manager: Arc<SagaManager<S>>,
    tick: Duration,
    checkpoint: Option<(Arc<dyn CheckpointStore>, String)>,
    checkpoint_every: Duration,
}

impl<S: Saga> fmt::Debug for DeadlineScheduler<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineScheduler")
            .field("saga", &S::TYPE)
            .field("tick", &self.tick)
            .field(
                "checkpoint",
                &self.checkpoint.as_ref().map(|(_, name)| name),
            )
            .finish()
    }
}

impl<S: Saga> DeadlineScheduler<S> {
    /// A scheduler for `manager`'s saga type that looks at its clock at least
    /// every `tick` (the clock may be virtual, so it cannot just sleep until
    /// the due time).
    pub fn new(manager: Arc<SagaManager<S>>, tick: Duration) -> Self {
        Self {
            manager,
            tick,
            checkpoint: None,
            checkpoint_every: DEFAULT_DEADLINE_CHECKPOINT_EVERY,
        }
    }

    /// Keeps a checkpoint named `name` in `checkpoints`, saved at most every
    /// [`DEFAULT_DEADLINE_CHECKPOINT_EVERY`] and when the scheduler stops,
    /// and starts from it. The position saved is never past a pending
    /// deadline's record, so no deadline is lost to a restart.
    #[must_use]
    pub fn with_checkpoint(
        mut self,
        checkpoints: Arc<dyn CheckpointStore>,
        name: impl Into<String>,
    ) -> Self {
        self.checkpoint = Some((checkpoints, name.into()));
        self
    }

    /// Saves the checkpoint at most once per `interval` instead.
    #[must_use]
    pub fn with_checkpoint_every(mut self, interval: Duration) -> Self {
        self.checkpoint_every = interval;
        self
    }

    /// Runs until `stop` is cancelled or the store's subscription fails.
    pub async fn run(self, stop: CancellationToken) -> Result<(), SagaError> {
        let start = match &self.checkpoint {
            Some((checkpoints, name)) => checkpoints.load(name).await?.unwrap_or(Position::START),
            None => Position::START,
        };
        let mut deadlines = Deadlines::new(start);
        let mut saved = start;
        let mut log = self.manager.store().subscribe_all(start);
        // One timer for the whole run: a fresh sleep per log event would cost
        // a timer registration for every event of every stream.
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut saved_at = Instant::now();
        let result = loop {
            if stop.is_cancelled() {
                break Ok(());
            }
            self.fire_due(&mut deadlines).await;
            if saved_at.elapsed() >= self.checkpoint_every {
                self.save(&deadlines, &mut saved).await;
                saved_at = Instant::now();
            }
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tick.tick() => {}
                next = log.next() => {
                    let mut next = next;
                    // Everything the log has ready is noted before the due
                    // deadlines are looked at again.
                    let ended = loop {
                        match next {
                            None => break Some(Ok(())),
                            Some(Err(error)) => break Some(Err(error.into())),
                            Some(Ok(recorded)) => deadlines.note::<S>(&recorded),
                        }
                        match log.next().now_or_never() {
                            Some(ready) => next = ready,
                            None => break None,
                        }
                    };
                    if let Some(ended) = ended {
                        break ended;
                    }
                }
            }
        };
        self.save(&deadlines, &mut saved).await;
        result
    }

    /// Saves where a restart must read from, when it moved.
    async fn save(&self, deadlines: &Deadlines, saved: &mut Position) {
        let Some((checkpoints, name)) = &self.checkpoint else {
            return;
        };
        let resume = deadlines.resume_from();
        if resume == *saved {
            return;
        }
        // A checkpoint not saved only means reading more at the next start.
        match checkpoints.save(name, resume).await {
            Ok(()) => *saved = resume,
            Err(error) => {
                tracing::warn!(saga = S::TYPE, checkpoint = %name, %error, "deadline checkpoint not saved");
            }
        }
    }

    async fn fire_due(&self, deadlines: &mut Deadlines) {
        for (due_at, saga_id, name) in deadlines.due(self.manager.clock().now()) {
            match self.manager.fire_deadline(saga_id, &name).await {
                Ok(_) => deadlines.remove(due_at, saga_id, name),
                Err(error) => {
                    tracing::warn!(saga = S::TYPE, %saga_id, deadline = %name, %error, "deadline not fired; will retry");
                }
            }
        }
    }
}

/// The pending deadlines of one saga type, as the log's records set them.
struct Deadlines {
    pending: BTreeMap<(DateTime<Utc>, Uuid, String), ()>,
    /// Each pending deadline's due time, and the log position just before
    /// the record that set it.
    by_name: HashMap<(Uuid, String), (DateTime<Utc>, Position), foldhash::fast::RandomState>,
    /// The last position noted.
    last: Position,
}

impl Deadlines {
    fn new(start: Position) -> Self {
        Self {
            pending: BTreeMap::new(),
            by_name: HashMap::default(),
            last: start,
        }
    }

    /// Takes note of a log event: a deadline record of saga type `S` sets or
    /// clears its deadline; anything else is ignored.
    fn note<S: Saga>(&mut self, recorded: &RecordedEvent) {
        let before = std::mem::replace(&mut self.last, recorded.position);
        let is_deadline = matches!(
            &*recorded.event_type,
            DEADLINE_SET | DEADLINE_CANCELLED | DEADLINE_FIRED
        );
        if !is_deadline || recorded.stream_id.category() != S::TYPE {
            return;
        }
        let Ok(saga_id) = recorded.stream_id.entity_id().parse::<Uuid>() else {
            return;
        };
        let Ok(record) = recorded.payload.decode::<DeadlineRecord>() else {
            return;
        };
        let key = (saga_id, record.name.clone());
        if let Some((old, _)) = self.by_name.remove(&key) {
            self.pending.remove(&(old, saga_id, record.name.clone()));
        }
        if &*recorded.event_type == DEADLINE_SET {
            if let Some(due) = record.due {
                self.pending.insert((due, saga_id, record.name), ());
                self.by_name.insert(key, (due, before));
            }
        }
    }

    /// The deadlines due at `now`, earliest first.
    fn due(&self, now: DateTime<Utc>) -> Vec<(DateTime<Utc>, Uuid, String)> {
        self.pending
            .range(..=(now, Uuid::max(), String::new()))
            .map(|(key, ())| key.clone())
            .collect()
    }

    /// Forgets a deadline that fired.
    fn remove(&mut self, due_at: DateTime<Utc>, saga_id: Uuid, name: String) {
        self.pending.remove(&(due_at, saga_id, name.clone()));
        self.by_name.remove(&(saga_id, name));
    }

    /// Where a restart must read from to see every pending deadline again:
    /// just before the oldest record still pending, or the last position
    /// noted when none is.
    fn resume_from(&self) -> Position {
        self.by_name
            .values()
            .map(|&(_, before)| before)
            .min()
            .unwrap_or(self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc_support::reminder::Reminder;
    use crate::{EventStore, InMemoryEventStore, ManualClock};

    /// A scheduler runs until its token is cancelled, then returns.
    #[tokio::test]
    async fn a_scheduler_stops_when_its_token_is_cancelled() {
        let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        let manager = Arc::new(SagaManager::<Reminder>::new(
            store,
            Arc::new(ManualClock::default()),
        ));
        let stop = CancellationToken::new();
        let running = tokio::spawn(
            DeadlineScheduler::new(manager, Duration::from_millis(10)).run(stop.clone()),
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!running.is_finished(), "it runs until cancelled");
        stop.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(2), running).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }
}
