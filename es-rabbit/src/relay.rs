//! The store-to-bus relay on RabbitMQ, with one active instance per relay
//! name.
//!
//! [`RabbitRelay`] is es-core's [`LeaderRelay`] (which runs a relay
//! following the store's global log from a checkpoint only while it holds a
//! [`LeaderLock`], so that a standby takes over when the active instance
//! dies or loses its lock) publishing through a non-mandatory [`RabbitBus`]
//! (an event may have no queue bound yet), except on the topics named with
//! [`RabbitRelay::with_mandatory_topics`] (commands: one that reaches no
//! queue stops the relay at it, retried and logged as an error, until a queue
//! is bound, instead of being passed over).

use std::sync::Arc;

use tokio::sync::watch;

use es_core::relay::{Blocked, Route};
use es_core::{
    CancellationToken, CheckpointStore, EventStore, LeaderLock, LeaderRelay, Position, RelayError,
};

use crate::RabbitBus;

/// Relays a store's log to RabbitMQ while holding the leader lock: one
/// active instance per name, standbys waiting on the lock.
#[derive(Debug)]
pub struct RabbitRelay {
    bus: RabbitBus,
    relay: LeaderRelay,
}

impl RabbitRelay {
    /// A relay named `name` (its checkpoint's name), publishing batches of up
    /// to 256 events with es-core's default route. Its lock on `lock` is
    /// named `es-rabbit-relay:<name>`, apart from other leaders' locks.
    pub fn new(
        name: impl Into<String>,
        store: Arc<dyn EventStore>,
        bus: &RabbitBus,
        checkpoints: Arc<dyn CheckpointStore>,
        lock: Arc<dyn LeaderLock>,
    ) -> Self {
        let name = name.into();
        let bus = bus.with_mandatory(false);
        let lock_name = format!("es-rabbit-relay:{name}");
        let relay = LeaderRelay::new(name, store, Arc::new(bus.clone()), checkpoints, lock)
            .with_lock_name(lock_name);
        Self { bus, relay }
    }

    /// Publishes batches of up to `batch_size` events.
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.relay = self.relay.with_batch_size(batch_size);
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
        self.relay = self.relay.with_bus(Arc::new(self.bus.clone()));
        self
    }

    /// Routes events with `route` instead of es-core's default route.
    #[must_use]
    pub fn with_route(mut self, route: Route) -> Self {
        self.relay = self.relay.with_route(route);
        self
    }

    /// The position this instance has published up to (and checkpointed),
    /// as it changes; [`Position::START`] until it first becomes active.
    pub fn progress(&self) -> watch::Receiver<Position> {
        self.relay.progress()
    }

    /// Whether this instance is the active one, as it changes.
    pub fn active(&self) -> watch::Receiver<bool> {
        self.relay.active()
    }

    /// Whether this instance is held up by a batch the broker keeps
    /// refusing, as it changes: a message of a mandatory topic that no queue
    /// receives holds it until a queue is bound (see
    /// [`Relay::blocked`](es_core::Relay::blocked)).
    pub fn blocked(&self) -> watch::Receiver<Option<Blocked>> {
        self.relay.blocked()
    }

    /// Waits for the lock, relays while holding it, and waits again when it is
    /// lost; returns when `stop` is cancelled (or the store's log ends). See
    /// [`LeaderRelay::run`]. The future is `Send`: spawn it.
    pub async fn run(&self, stop: CancellationToken) -> Result<(), RelayError> {
        self.relay.run(stop).await
    }
}

#[async_trait::async_trait]
impl es_core::RunRelay for RabbitRelay {
    async fn run(&self, stop: CancellationToken) -> Result<(), RelayError> {
        Self::run(self, stop).await
    }
}

#[cfg(test)]
mod tests {
    fn _run_is_send(relay: &super::RabbitRelay, stop: es_core::CancellationToken) {
        fn is_send<T: Send>(_: &T) {}
        is_send(&relay.run(stop));
    }
}
