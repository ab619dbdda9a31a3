//! Leader election, and the relay that runs only while it leads.
//!
//! A [`LeaderLock`] gives one holder at a time a [`Leadership`] per lock
//! name; the holder acts until the leadership is dropped or
//! [lost](Leadership::lost). [`LocalLeaderLock`] elects among the tasks of one
//! process; a database-backed lock (es-postgres's `PgLeaderLock`) elects
//! among processes.
//!
//! [`LeaderRelay`] runs a [`Relay`] while it holds the lock named for it, so
//! that of several instances (one per process) one publishes the log and the
//! others stand by, taking over when the active one dies or loses its lock.
//! A lock may let two holders overlap briefly (a database lock whose session
//! the server ended before the old holder noticed): the relay bears that, since
//! both publish at least once, consumers deduplicate by message id, and a
//! checkpoint stepping back repeats publishes and loses none.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::relay::{Blocked, Route};
use crate::{
    CancellationToken, CheckpointStore, EventBus, EventStore, Position, Relay, RelayError,
    StoreError,
};

/// Mutual exclusion between instances of one task (in other processes too,
/// for a database-backed implementation).
#[async_trait]
pub trait LeaderLock: Send + Sync + 'static {
    /// Waits until this instance holds the lock `name`. The lock is held until
    /// the returned [`Leadership`] is dropped or lost.
    async fn acquire(&self, name: &str) -> Result<Box<dyn Leadership>, StoreError>;
}

/// A held [`LeaderLock`]. Dropping it releases the lock.
#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Resolves when the lock has been lost (for a database lock: its session
    /// died). Never resolves while the lock is held.
    async fn lost(&mut self);
}

/// A [`LeaderLock`] between tasks of one process, for tests and the
/// embedded setup. Clones share the locks.
#[derive(Clone, Debug, Default)]
pub struct LocalLeaderLock {
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl LocalLeaderLock {
    /// No lock held.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl LeaderLock for LocalLeaderLock {
    async fn acquire(&self, name: &str) -> Result<Box<dyn Leadership>, StoreError> {
        let lock = Arc::clone(
            self.locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(name.to_owned())
                .or_default(),
        );
        let guard = lock.lock_owned().await;
        Ok(Box::new(LocalLeadership { _guard: guard }))
    }
}

struct LocalLeadership {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

#[async_trait]
impl Leadership for LocalLeadership {
    async fn lost(&mut self) {
        std::future::pending::<()>().await;
    }
}

/// Relays a store's log to a bus while holding a leader lock: one active
/// instance per lock name, standbys waiting on the lock.
pub struct LeaderRelay {
    name: String,
    lock_name: String,
    store: Arc<dyn EventStore>,
    bus: Arc<dyn EventBus>,
    checkpoints: Arc<dyn CheckpointStore>,
    lock: Arc<dyn LeaderLock>,
    batch_size: usize,
    route: Option<Route>,
    active: watch::Sender<bool>,
    progress: watch::Sender<Position>,
    blocked: watch::Sender<Option<Blocked>>,
}

impl fmt::Debug for LeaderRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderRelay")
            .field("name", &self.name)
            .field("lock_name", &self.lock_name)
            .field("batch_size", &self.batch_size)
            .field("active", &*self.active.borrow())
            .finish_non_exhaustive()
    }
}

impl LeaderRelay {
    /// A relay named `name` (its checkpoint's and, unless
    /// [`LeaderRelay::with_lock_name`] says otherwise, its lock's name),
    /// publishing batches of up to 256 events with the relay's default route.
    pub fn new(
        name: impl Into<String>,
        store: Arc<dyn EventStore>,
        bus: Arc<dyn EventBus>,
        checkpoints: Arc<dyn CheckpointStore>,
        lock: Arc<dyn LeaderLock>,
    ) -> Self {
        let name = name.into();
        Self {
            lock_name: name.clone(),
            name,
            store,
            bus,
            checkpoints,
            lock,
            batch_size: 256,
            route: None,
            active: watch::Sender::new(false),
            progress: watch::Sender::new(Position::START),
            blocked: watch::Sender::new(None),
        }
    }

    /// Publishes batches of up to `batch_size` events.
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Routes events with `route` instead of the relay's default route.
    #[must_use]
    pub fn with_route(mut self, route: Route) -> Self {
        self.route = Some(route);
        self
    }

    /// Takes the lock `lock_name` instead of the relay's name, to keep it
    /// apart from other leaders' locks on the same [`LeaderLock`].
    #[must_use]
    pub fn with_lock_name(mut self, lock_name: impl Into<String>) -> Self {
        self.lock_name = lock_name.into();
        self
    }

    /// Publishes to `bus` instead of the bus given to [`LeaderRelay::new`].
    #[must_use]
    pub fn with_bus(mut self, bus: Arc<dyn EventBus>) -> Self {
        self.bus = bus;
        self
    }

    /// The relay's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The position this instance has published up to (and checkpointed),
    /// as it changes; [`Position::START`] until it first becomes active.
    pub fn progress(&self) -> watch::Receiver<Position> {
        self.progress.subscribe()
    }

    /// Whether this instance is the active one, as it changes.
    pub fn active(&self) -> watch::Receiver<bool> {
        self.active.subscribe()
    }

    /// Whether this instance, while active, is held up by a batch the bus
    /// keeps refusing (see [`Relay::blocked`]).
    pub fn blocked(&self) -> watch::Receiver<Option<Blocked>> {
        self.blocked.subscribe()
    }

    /// Waits for the lock, relays while holding it, and waits again when it is
    /// lost; returns when `stop` is cancelled (or the store's log ends). A
    /// failure to take the lock or read the checkpoint is logged and retried
    /// with backoff, not returned. The future is `Send`: spawn it.
    pub async fn run(&self, stop: CancellationToken) -> Result<(), RelayError> {
        let mut delay = Duration::from_millis(100);
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let acquired = tokio::select! {
                () = stop.cancelled() => continue,
                acquired = self.lock.acquire(&self.lock_name) => acquired,
            };
            let mut leadership = match acquired {
                Ok(leadership) => leadership,
                Err(error) => {
                    tracing::warn!(relay = %self.name, %error, "cannot take the relay lock; retrying");
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            tracing::info!(relay = %self.name, "relay active");
            self.active.send_replace(true);
            let outcome = self.lead(leadership.as_mut(), &stop).await;
            drop(leadership);
            self.active.send_replace(false);
            self.blocked.send_replace(None);
            match outcome {
                Term::Stopped | Term::Ended(Ok(())) => return Ok(()),
                Term::Lost => {}
                Term::Ended(Err(error)) => {
                    // The checkpoint could not be read: stand down, retry later.
                    tracing::warn!(relay = %self.name, %error, retry_in = ?delay, "relay failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One term as the active relay: runs a [`Relay`] until it ends, `stop`
    /// is cancelled or `leadership` is lost.
    async fn lead(&self, leadership: &mut dyn Leadership, stop: &CancellationToken) -> Term {
        let mut relay = Relay::new(
            self.name.clone(),
            Arc::clone(&self.store),
            Arc::clone(&self.bus),
            Arc::clone(&self.checkpoints),
        )
        .with_batch_size(self.batch_size);
        if let Some(route) = &self.route {
            relay = relay.with_route(Arc::clone(route));
        }
        // A child of `stop`: cancelled with it, or alone when the lock is lost.
        let halt = stop.child_token();
        let mut published = relay.progress();
        let mut blocked = relay.blocked();
        let forward = async {
            loop {
                tokio::select! {
                    changed = published.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        self.progress.send_replace(*published.borrow_and_update());
                    }
                    changed = blocked.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        self.blocked.send_replace(blocked.borrow_and_update().clone());
                    }
                }
            }
            std::future::pending::<()>().await;
        };
        let running = relay.run(halt.clone());
        tokio::pin!(running, forward);
        tokio::select! {
            result = &mut running => Term::Ended(result),
            // Never completes: forwards the relay's progress meanwhile.
            () = &mut forward => Term::Stopped,
            () = stop.cancelled() => {
                let _ = (&mut running).await;
                Term::Stopped
            }
            () = leadership.lost() => {
                tracing::warn!(relay = %self.name, "relay lock lost; standing by");
                halt.cancel();
                let _ = (&mut running).await;
                Term::Lost
            }
        }
    }
}

/// How one term as the active relay ended.
enum Term {
    Stopped,
    Lost,
    Ended(Result<(), RelayError>),
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicU32, Ordering};

    use uuid::Uuid;

    use super::*;
    use crate::bus::{Delivery, Outcome, Subscription};
    use crate::{
        ExpectedVersion, InMemoryBus, InMemoryCheckpointStore, InMemoryEventStore, Metadata,
        NewEvent, Payload, StreamId,
    };

    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_local_lock_has_one_holder_per_name_until_it_is_dropped() {
        let lock = LocalLeaderLock::new();
        let first = lock.acquire("relay").await.unwrap();
        let waiting = tokio::spawn({
            let lock = lock.clone();
            async move { lock.acquire("relay").await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the lock has one holder");
        // Another name is another lock.
        let other = tokio::time::timeout(LIMIT, lock.acquire("other")).await;
        assert!(other.is_ok());
        drop(first);
        tokio::time::timeout(LIMIT, waiting)
            .await
            .expect("the waiter gets the lock once it is dropped")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_local_leadership_is_never_lost() {
        let lock = LocalLeaderLock::new();
        let mut held = lock.acquire("relay").await.unwrap();
        let lost = tokio::time::timeout(Duration::from_millis(50), held.lost()).await;
        assert!(lost.is_err());
    }

    async fn append(store: &dyn EventStore, count: usize, offset: usize) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for n in offset..offset + count {
            let event = NewEvent::new(
                "OrderPlaced",
                1,
                Payload::from_json(format!(r#"{{"n":{n}}}"#)).unwrap(),
                Metadata::new(),
            );
            ids.push(event.event_id);
            let stream = StreamId::for_aggregate("order", n % 7).unwrap();
            store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .unwrap();
        }
        ids
    }

    /// Message ids delivered to a group bound to `order.*` on `bus`.
    async fn collect(bus: &InMemoryBus) -> (Arc<Mutex<HashSet<Uuid>>>, impl Sized) {
        let seen: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
        let sink = Arc::clone(&seen);
        let handle = bus
            .subscribe(
                Subscription::new("g", ["order.*"]),
                Arc::new(move |d: Delivery| {
                    let sink = Arc::clone(&sink);
                    async move {
                        sink.lock().unwrap().insert(d.message.message_id);
                        Outcome::Ack
                    }
                }),
            )
            .await
            .unwrap();
        (seen, handle)
    }

    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_standby_relay_takes_over_when_the_active_one_dies() {
        let store = Arc::new(InMemoryEventStore::new());
        let bus = Arc::new(InMemoryBus::new());
        let (seen, _handle) = collect(&bus).await;
        let checkpoints = Arc::new(InMemoryCheckpointStore::new());
        let lock = Arc::new(LocalLeaderLock::new());
        let make = || {
            Arc::new(
                LeaderRelay::new(
                    "orders-relay",
                    Arc::clone(&store) as Arc<dyn EventStore>,
                    Arc::clone(&bus) as Arc<dyn EventBus>,
                    Arc::clone(&checkpoints) as Arc<dyn CheckpointStore>,
                    Arc::clone(&lock) as Arc<dyn LeaderLock>,
                )
                .with_batch_size(16),
            )
        };
        let (first, second) = (make(), make());
        let stop = CancellationToken::new();
        let mut first_active = first.active();
        let mut second_active = second.active();
        let first_task = tokio::spawn({
            let (relay, stop) = (Arc::clone(&first), stop.clone());
            async move { relay.run(stop).await }
        });
        first_active.wait_for(|a| *a).await.unwrap();
        let second_task = tokio::spawn({
            let (relay, stop) = (Arc::clone(&second), stop.clone());
            async move { relay.run(stop).await }
        });

        let mut ids = append(store.as_ref(), 100, 0).await;
        eventually("100 relayed", || seen.lock().unwrap().len() == 100).await;
        assert!(!*second_active.borrow(), "one active relay at a time");

        // The active relay dies: its task, and with it its leadership, go away.
        first_task.abort();
        let _ = first_task.await;
        tokio::time::timeout(LIMIT, second_active.wait_for(|a| *a))
            .await
            .expect("the standby takes over")
            .unwrap();
        ids.extend(append(store.as_ref(), 100, 100).await);
        eventually("200 relayed", || seen.lock().unwrap().len() == 200).await;
        stop.cancel();
        second_task.await.unwrap().unwrap();
        assert!(!*second_active.borrow());
        assert_eq!(*seen.lock().unwrap(), ids.into_iter().collect());
        assert_eq!(*second.progress().borrow(), store.head().await.unwrap());
    }

    /// A checkpoint store whose first loads fail, then delegates.
    struct FailingFirst {
        failures: AtomicU32,
        inner: InMemoryCheckpointStore,
    }

    #[async_trait]
    impl CheckpointStore for FailingFirst {
        async fn load(&self, name: &str) -> Result<Option<Position>, StoreError> {
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(StoreError::Unavailable {
                    source: "database down".into(),
                });
            }
            self.inner.load(name).await
        }
        async fn save(&self, name: &str, position: Position) -> Result<(), StoreError> {
            self.inner.save(name, position).await
        }
    }

    /// A lock that is always free; each leadership is lost when `revoke`
    /// fires.
    #[derive(Clone)]
    struct RevocableLock {
        revoke: watch::Sender<u32>,
        acquired: Arc<AtomicU32>,
    }

    struct Revocable(watch::Receiver<u32>);

    #[async_trait]
    impl Leadership for Revocable {
        async fn lost(&mut self) {
            let _ = self.0.changed().await;
        }
    }

    #[async_trait]
    impl LeaderLock for RevocableLock {
        async fn acquire(&self, _name: &str) -> Result<Box<dyn Leadership>, StoreError> {
            self.acquired.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(Revocable(self.revoke.subscribe())))
        }
    }

    #[tokio::test]
    async fn the_relay_survives_checkpoint_failures_and_lost_leadership() {
        let store = Arc::new(InMemoryEventStore::new());
        let bus = Arc::new(InMemoryBus::new());
        let (seen, _handle) = collect(&bus).await;
        let lock = RevocableLock {
            revoke: watch::Sender::new(0),
            acquired: Arc::default(),
        };
        let relay = Arc::new(LeaderRelay::new(
            "flaky",
            Arc::clone(&store) as Arc<dyn EventStore>,
            bus,
            Arc::new(FailingFirst {
                failures: 2.into(),
                inner: InMemoryCheckpointStore::new(),
            }),
            Arc::new(lock.clone()),
        ));
        let mut active = relay.active();
        let stop = CancellationToken::new();
        let running = tokio::spawn({
            let (relay, stop) = (Arc::clone(&relay), stop.clone());
            async move { relay.run(stop).await }
        });
        let mut ids = append(store.as_ref(), 20, 0).await;
        eventually("relayed despite two failed checkpoint loads", || {
            seen.lock().unwrap().len() == 20
        })
        .await;
        // Leadership lost: the relay stands down, takes the lock again, goes on.
        active.wait_for(|a| *a).await.unwrap();
        let before = lock.acquired.load(Ordering::SeqCst);
        lock.revoke.send_modify(|n| *n += 1);
        eventually("re-acquired", || {
            lock.acquired.load(Ordering::SeqCst) > before
        })
        .await;
        ids.extend(append(store.as_ref(), 20, 20).await);
        eventually("relayed after re-acquiring", || {
            seen.lock().unwrap().len() == 40
        })
        .await;
        stop.cancel();
        running.await.unwrap().unwrap();
        assert_eq!(*seen.lock().unwrap(), ids.into_iter().collect());
        assert!(
            lock.acquired.load(Ordering::SeqCst) >= 4,
            "two failed terms, one lost, one final"
        );
    }

    #[test]
    fn run_is_send() {
        fn is_send<T: Send>(_: &T) {}
        fn check(relay: &LeaderRelay, stop: CancellationToken) {
            is_send(&relay.run(stop));
        }
        let _ = check;
    }
}
