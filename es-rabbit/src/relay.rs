//! The store-to-bus relay on RabbitMQ, with one active instance per relay
//! name.
//!
//! [`RabbitRelay`] wraps es-core's [`Relay`] (which follows the store's global
//! log from a checkpoint, publishes each batch with confirms, then advances
//! the checkpoint): it publishes through a non-mandatory [`RabbitBus`] (an
//! event may have no queue bound yet), except on the topics named with
//! [`RabbitRelay::with_mandatory_topics`] (commands: one that reaches no
//! queue stops the relay at it, retried and logged as an error, until a queue
//! is bound, instead of being passed over), and runs only while it holds a
//! [`LeaderLock`], so that a standby takes over when the active instance
//! dies or loses its lock.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use es_core::relay::Route;
use es_core::{CheckpointStore, EventStore, Position, Relay, RelayError, StoreError};

use crate::RabbitBus;

/// Mutual exclusion between relay instances (in other processes too, for a
/// database-backed implementation).
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

/// Relays a store's log to RabbitMQ while holding the leader lock: one
/// active instance per name, standbys waiting on the lock.
pub struct RabbitRelay {
    name: String,
    store: Arc<dyn EventStore>,
    bus: RabbitBus,
    checkpoints: Arc<dyn CheckpointStore>,
    lock: Arc<dyn LeaderLock>,
    batch_size: usize,
    route: Option<Route>,
    active: watch::Sender<bool>,
    progress: watch::Sender<Position>,
}

impl fmt::Debug for RabbitRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitRelay")
            .field("name", &self.name)
            .field("batch_size", &self.batch_size)
            .field("active", &*self.active.borrow())
            .finish_non_exhaustive()
    }
}

impl RabbitRelay {
    /// A relay named `name` (its checkpoint's and its lock's name), publishing
    /// batches of up to 256 events with es-core's default route.
    pub fn new(
        name: impl Into<String>,
        store: Arc<dyn EventStore>,
        bus: &RabbitBus,
        checkpoints: Arc<dyn CheckpointStore>,
        lock: Arc<dyn LeaderLock>,
    ) -> Self {
        Self {
            name: name.into(),
            store,
            bus: bus.with_mandatory(false),
            checkpoints,
            lock,
            batch_size: 256,
            route: None,
            active: watch::Sender::new(false),
            progress: watch::Sender::new(Position::START),
        }
    }

    /// Publishes batches of up to `batch_size` events.
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Publishes the messages of `topics` as mandatory: one that no queue
    /// receives fails its batch, which is published again with backoff (and
    /// the relay's lag grows) until a queue is bound, instead of being
    /// confirmed and passed over. Name the topics of commands, which must
    /// reach their handler; events stay non-mandatory, since a new event may
    /// have no consumer yet.
    #[must_use]
    pub fn with_mandatory_topics<I, T>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<Arc<str>>,
    {
        self.bus = self.bus.with_mandatory_topics(topics);
        self
    }

    /// Routes events with `route` instead of es-core's default route.
    #[must_use]
    pub fn with_route(mut self, route: Route) -> Self {
        self.route = Some(route);
        self
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

    /// Waits for the lock, relays while holding it, and waits again when it is
    /// lost; returns when `stop` turns true (or the store's log ends). A
    /// failure to take the lock or read the checkpoint is logged and retried
    /// with backoff, not returned. The future is `Send`: spawn it.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) -> Result<(), RelayError> {
        let mut delay = Duration::from_millis(100);
        loop {
            if es_core::stop::is_requested(&stop) {
                return Ok(());
            }
            let acquired = tokio::select! {
                () = es_core::stop::requested(&mut stop) => continue,
                acquired = self.lock.acquire(&self.name) => acquired,
            };
            let mut leadership = match acquired {
                Ok(leadership) => leadership,
                Err(error) => {
                    tracing::warn!(relay = %self.name, %error, "cannot take the relay lock; retrying");
                    tokio::select! {
                        () = es_core::stop::requested(&mut stop) => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            tracing::info!(relay = %self.name, "relay active");
            self.active.send_replace(true);
            let mut relay = Relay::new(
                self.name.clone(),
                Arc::clone(&self.store),
                Arc::new(self.bus.clone()),
                Arc::clone(&self.checkpoints),
            )
            .with_batch_size(self.batch_size);
            if let Some(route) = &self.route {
                relay = relay.with_route(Arc::clone(route));
            }
            let (halt, halted) = watch::channel(false);
            let mut published = relay.progress();
            let forward = async {
                while published.changed().await.is_ok() {
                    self.progress.send_replace(*published.borrow_and_update());
                }
                std::future::pending::<()>().await;
            };
            let running = relay.run(halted);
            tokio::pin!(running, forward);
            let outcome = tokio::select! {
                result = &mut running => Term::Ended(result),
                // Never completes: forwards the relay's progress meanwhile.
                () = &mut forward => Term::Stopped,
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    halt.send_replace(true);
                    let _ = (&mut running).await;
                    Term::Stopped
                }
                () = leadership.lost() => {
                    tracing::warn!(relay = %self.name, "relay lock lost; standing by");
                    halt.send_replace(true);
                    let _ = (&mut running).await;
                    Term::Lost
                }
            };
            drop(leadership);
            self.active.send_replace(false);
            match outcome {
                Term::Stopped | Term::Ended(Ok(())) => return Ok(()),
                Term::Lost => {}
                Term::Ended(Err(error)) => {
                    // The checkpoint could not be read: stand down, retry later.
                    tracing::warn!(relay = %self.name, %error, retry_in = ?delay, "relay failed; retrying");
                    tokio::select! {
                        () = es_core::stop::requested(&mut stop) => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
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

/// The relay on PostgreSQL (feature `postgres`): es-postgres's advisory lock
/// as the [`LeaderLock`], and its checkpoint store.
#[cfg(feature = "postgres")]
pub mod postgres {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use es_core::StoreError;
    use es_postgres::sqlx::PgPool;
    use es_postgres::{LeaderGuard, PgCheckpointStore, PgEventStore};

    use super::{LeaderLock, Leadership, RabbitRelay};
    use crate::RabbitBus;

    /// es-postgres's session advisory lock (on a dedicated connection, so a
    /// dead leader's lock frees itself) as a relay's [`LeaderLock`].
    #[derive(Clone, Debug)]
    pub struct PgLeaderLock {
        pool: PgPool,
        retry: Duration,
        check: Duration,
        check_timeout: Duration,
    }

    impl PgLeaderLock {
        /// A lock on `pool`'s database; a standby retries every 500 ms and the
        /// holder checks its connection every second (5 s timeout).
        pub fn new(pool: PgPool) -> Self {
            Self {
                pool,
                retry: Duration::from_millis(500),
                check: Duration::from_secs(1),
                check_timeout: Duration::from_secs(5),
            }
        }

        /// Sets how often a standby retries and how often (with what
        /// timeout) the holder checks its connection.
        #[must_use]
        pub fn with_intervals(
            mut self,
            retry: Duration,
            check: Duration,
            timeout: Duration,
        ) -> Self {
            self.retry = retry;
            self.check = check;
            self.check_timeout = timeout;
            self
        }
    }

    #[async_trait]
    impl LeaderLock for PgLeaderLock {
        async fn acquire(&self, name: &str) -> Result<Box<dyn Leadership>, StoreError> {
            let guard = es_postgres::LeaderLock::new(format!("es-rabbit-relay:{name}"))
                .retry_interval(self.retry)
                .check_interval(self.check, self.check_timeout)
                .wait(&self.pool)
                .await?;
            Ok(Box::new(PgLeadership(guard)))
        }
    }

    struct PgLeadership(LeaderGuard);

    #[async_trait]
    impl Leadership for PgLeadership {
        async fn lost(&mut self) {
            self.0.lost().await;
        }
    }

    impl RabbitRelay {
        /// A relay of `store`'s log, with its checkpoint in the store's
        /// schema and a PostgreSQL advisory lock for single-active failover.
        pub fn postgres(name: impl Into<String>, store: &PgEventStore, bus: &RabbitBus) -> Self {
            let pool = store.pool().clone();
            let checkpoints = PgCheckpointStore::new(pool.clone(), store.schema());
            Self::new(
                name,
                Arc::new(store.clone()),
                bus,
                Arc::new(checkpoints),
                Arc::new(PgLeaderLock::new(pool)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    fn _run_is_send(relay: &super::RabbitRelay, stop: tokio::sync::watch::Receiver<bool>) {
        fn is_send<T: Send>(_: &T) {}
        is_send(&relay.run(stop));
    }
}
