//! The fixtures es-core's bus conformance suite runs on: the in-memory bus
//! and RabbitMQ.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use es_core::testing::bus_conformance::BusFixture;
use es_core::{DeadLetter, EventBus, InMemoryBus, Subscription};
use es_rabbit::RabbitBus;

use crate::production::{rabbit, rabbit_config};

/// es-core's in-memory bus.
#[derive(Debug, Default)]
pub struct MemoryBusFixture {
    bus: InMemoryBus,
}

#[async_trait]
impl BusFixture for MemoryBusFixture {
    fn bus(&self) -> Arc<dyn EventBus> {
        Arc::new(self.bus.clone())
    }

    async fn dead_letters(&self, group: &str) -> Vec<DeadLetter> {
        self.bus.dead_letters(group)
    }

    async fn cleanup(&self, _: &[Subscription], _: &[String]) {}
}

/// es-rabbit's bus under a unique prefix.
#[derive(Debug)]
pub struct RabbitBusFixture {
    bus: RabbitBus,
    /// The dead letters taken from each group's queue so far.
    taken: Mutex<HashMap<String, Vec<DeadLetter>>>,
}

impl RabbitBusFixture {
    /// Connects.
    ///
    /// # Panics
    /// When RabbitMQ cannot be reached, with the URL tried.
    pub async fn connect() -> Self {
        Self {
            bus: rabbit(rabbit_config("bus")).await,
            taken: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl BusFixture for RabbitBusFixture {
    fn bus(&self) -> Arc<dyn EventBus> {
        Arc::new(self.bus.clone())
    }

    async fn dead_letters(&self, group: &str) -> Vec<DeadLetter> {
        let taken = self
            .bus
            .take_dead_letters(group, 1000)
            .await
            .unwrap_or_else(|e| panic!("dead letters of {group}: {e}"));
        let mut all = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        let letters = all.entry(group.to_owned()).or_default();
        letters.extend(taken);
        letters.clone()
    }

    async fn cleanup(&self, subscriptions: &[Subscription], topics: &[String]) {
        for subscription in subscriptions {
            self.bus
                .delete_group(subscription)
                .await
                .unwrap_or_else(|e| panic!("deleting {}: {e}", subscription.group));
        }
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.bus
            .delete_exchanges(&topics)
            .await
            .unwrap_or_else(|e| panic!("deleting exchanges: {e}"));
    }
}
