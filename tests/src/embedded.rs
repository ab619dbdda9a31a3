//! The embedded backends: the in-memory store, checkpoint store and bus,
//! es-core's relay, and es-projections' in-memory runner.

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use es_core::relay::route_without_saga_state;
use es_core::{
    CancellationToken, EventBus, EventStore, InMemoryBus, InMemoryCheckpointStore,
    InMemoryEventStore, Relay, Saga, Subscription,
};
use es_projections::ProjectionHandle;
use tokio::task::JoinHandle;

use crate::balances::{Balances, MemoryBalances};
use crate::bank::Transfer;
use crate::pipeline::{Backend, Crash};

/// The pipeline in one process, on the in-memory backends.
#[derive(Debug, Default)]
pub struct Embedded {
    store: Arc<InMemoryEventStore>,
    bus: InMemoryBus,
    checkpoints: Arc<InMemoryCheckpointStore>,
    model: Mutex<Arc<MemoryBalances>>,
}

impl Embedded {
    /// Fresh, empty backends.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The bus.
    pub fn bus(&self) -> &InMemoryBus {
        &self.bus
    }
}

#[async_trait]
impl Backend for Embedded {
    fn name(&self) -> &'static str {
        "the embedded backends"
    }

    fn store(&self) -> Arc<dyn EventStore> {
        Arc::clone(&self.store) as Arc<dyn EventStore>
    }

    fn consumer_bus(&self) -> Arc<dyn EventBus> {
        Arc::new(self.bus.clone())
    }

    fn crash(&self) -> Crash {
        Crash::Redeliver
    }

    fn spawn_relay(&self, stop: CancellationToken) -> JoinHandle<()> {
        let relay = Relay::new(
            "relay",
            self.store(),
            Arc::new(self.bus.clone()),
            Arc::clone(&self.checkpoints) as _,
        )
        .with_batch_size(64)
        .with_route(route_without_saga_state(&[<Transfer as Saga>::TYPE]));
        tokio::spawn(async move {
            relay
                .run(stop)
                .await
                .unwrap_or_else(|e| panic!("relay: {e}"));
        })
    }

    async fn spawn_projection(&self) -> ProjectionHandle {
        // The in-memory runner keeps its position in memory: a new runner
        // rebuilds a new model from the start of the log.
        let model = Arc::new(MemoryBalances::default());
        *self.model.lock().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&model);
        es_projections::spawn_in_memory(self.store(), model)
    }

    async fn read_model(&self) -> Balances {
        self.model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read()
    }

    async fn queue_depth(&self, group: &str) -> u64 {
        self.bus.queue_depth(group) as u64
    }

    async fn dead_letters(&self, group: &str) -> u64 {
        self.bus.dead_letters(group).len() as u64
    }

    async fn drop_consumer_connection(&self) {}

    async fn drop_publisher_connection(&self) {}

    async fn cut_projection_connections(&self) -> u64 {
        0
    }

    async fn cleanup(&self, _: &[Subscription]) {}
}
