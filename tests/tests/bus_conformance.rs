//! es-core's bus conformance suite on both buses: the same checks, run
//! against es-core's in-memory bus and es-rabbit's RabbitMQ bus.

use es_core::testing::bus_conformance::run_all;
use es_tests::buses::{MemoryBusFixture, RabbitBusFixture};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_bus_conforms() {
    run_all(&MemoryBusFixture::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_conforms() {
    run_all(&RabbitBusFixture::connect().await).await;
}
