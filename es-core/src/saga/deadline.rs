//! The deadline scheduler: fires saga deadlines when they are due.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use uuid::Uuid;

use super::{
    DeadlineRecord, Saga, SagaError, SagaManager, DEADLINE_CANCELLED, DEADLINE_FIRED, DEADLINE_SET,
};
use crate::{CancellationToken, Position, RecordedEvent};

/// Fires saga deadlines when they are due.
///
/// It follows the store's log for the deadline records of one saga type, keeps
/// the pending ones in memory, and asks the [`SagaManager`] to fire each when
/// the manager's clock passes its due time. Firing is idempotent, so several
/// schedulers (or a restart) never fire a deadline twice.
pub struct DeadlineScheduler<S: Saga> {
    manager: Arc<SagaManager<S>>,
    tick: Duration,
}

impl<S: Saga> fmt::Debug for DeadlineScheduler<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineScheduler")
            .field("saga", &S::TYPE)
            .field("tick", &self.tick)
            .finish()
    }
}

impl<S: Saga> DeadlineScheduler<S> {
    /// A scheduler for `manager`'s saga type that looks at its clock at least
    /// every `tick` (the clock may be virtual, so it cannot just sleep until
    /// the due time).
    pub fn new(manager: Arc<SagaManager<S>>, tick: Duration) -> Self {
        Self { manager, tick }
    }

    /// Runs until `stop` is cancelled or the store's subscription fails.
    pub async fn run(self, stop: CancellationToken) -> Result<(), SagaError> {
        let mut deadlines = Deadlines::default();
        let mut log = self.manager.store().subscribe_all(Position::START);
        // One timer for the whole run: a fresh sleep per log event would cost
        // a timer registration for every event of every stream.
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            self.fire_due(&mut deadlines).await;
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tick.tick() => {}
                next = log.next() => {
                    let mut next = next;
                    // Everything the log has ready is noted before the due
                    // deadlines are looked at again.
                    loop {
                        match next {
                            None => return Ok(()),
                            Some(Err(error)) => return Err(error.into()),
                            Some(Ok(recorded)) => deadlines.note::<S>(&recorded),
                        }
                        match log.next().now_or_never() {
                            Some(ready) => next = ready,
                            None => break,
                        }
                    }
                }
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
#[derive(Default)]
struct Deadlines {
    pending: BTreeMap<(DateTime<Utc>, Uuid, String), ()>,
    by_name: std::collections::HashMap<(Uuid, String), DateTime<Utc>, foldhash::fast::RandomState>,
}

impl Deadlines {
    /// Takes note of a log event: a deadline record of saga type `S` sets or
    /// clears its deadline; anything else is ignored.
    fn note<S: Saga>(&mut self, recorded: &RecordedEvent) {
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
        if let Some(old) = self.by_name.remove(&key) {
            self.pending.remove(&(old, saga_id, record.name.clone()));
        }
        if &*recorded.event_type == DEADLINE_SET {
            if let Some(due) = record.due {
                self.pending.insert((due, saga_id, record.name), ());
                self.by_name.insert(key, due);
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
