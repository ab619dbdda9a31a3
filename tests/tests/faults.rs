//! Faults across the crates, struck while transfers flow, each followed by
//! the same end checks as the undisturbed pipeline: the relay and the
//! consumers killed mid-batch and restarted, the broker connections dropped,
//! the projection's database connections cut, every delivery handled twice.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use es_tests::embedded::Embedded;
use es_tests::pipeline::{exercise, Pipeline, Summary, Workload};
use es_tests::production::Production;

fn workload() -> Workload {
    let seed = fastrand::u64(..);
    eprintln!("workload seed {seed}");
    Workload::random(seed, 20, 3, 200)
}

fn all_finished(summary: Summary) {
    assert_eq!(
        summary.completed + summary.compensated + summary.refused,
        200,
        "{summary:?}"
    );
}

/// While a wave of transfers is under way, the relay's task aborted where
/// it stands (mid-publish, when it is busy) and started again from its
/// checkpoint.
async fn kill_relay(pipeline: Arc<Pipeline>) {
    pipeline.kill_relay().await;
    pipeline.start_relay();
}

/// While a wave of transfers is under way, the consumers killed: deliveries
/// die before their handler commits or after, unacked; then the consumers
/// start again.
async fn kill_consumers(pipeline: Arc<Pipeline>) {
    let crashed = pipeline.kill_consumers(3, Duration::from_secs(1)).await;
    assert!(crashed > 0, "no consumer died");
    pipeline.start_consumers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_relay_killed_mid_batch() {
    all_finished(exercise(Embedded::new(), &workload(), kill_relay).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_relay_killed_mid_batch() {
    let backend = Production::start("relay").await;
    all_finished(exercise(backend, &workload(), kill_relay).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_consumers_killed_mid_batch() {
    all_finished(exercise(Embedded::new(), &workload(), kill_consumers).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_consumers_killed_mid_batch() {
    let backend = Production::start("consumers").await;
    all_finished(exercise(backend, &workload(), kill_consumers).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_broker_connections_dropped_under_load() {
    let backend = Production::start("drop").await;
    let (relay, consumers) = (backend.bus().clone(), backend.consumers().clone());
    let summary = exercise(backend, &workload(), |pipeline| async move {
        pipeline.backend().drop_publisher_connection().await;
        pipeline.backend().drop_consumer_connection().await;
    })
    .await;
    all_finished(summary);
    for (who, bus) in [("the relay", relay), ("the consumers", consumers)] {
        assert!(
            bus.connections_opened() >= 2,
            "{who} never reconnected: {} connections",
            bus.connections_opened()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_projection_connections_cut() {
    let backend = Production::start("cut").await;
    let summary = exercise(backend, &workload(), |pipeline| async move {
        let cut = pipeline.backend().cut_projection_connections().await;
        assert!(cut > 0, "no connection of the projection was cut");
    })
    .await;
    all_finished(summary);
}

/// The in-memory projection's runner stopped and started again mid-run: it
/// rebuilds its model from the log and ends equal to the fold of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_projection_restarted() {
    let summary = exercise(Embedded::new(), &workload(), |pipeline| async move {
        pipeline.restart_projection().await;
    })
    .await;
    all_finished(summary);
}

/// Every delivery handled twice in a row from the first wave on (the
/// redelivery of a message whose ack was lost): nothing happens twice.
async fn every_delivery_twice(backend: Arc<dyn es_tests::pipeline::Backend>) {
    let rounds = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let summary = exercise(backend, &workload(), |pipeline| {
        let rounds = Arc::clone(&rounds);
        async move {
            let faults = &pipeline.faults;
            faults.duplicate_percent.store(100, Ordering::SeqCst);
            // The waves are requests: their deliveries follow at the bus's
            // pace, so by the third wave some have been handled twice, or
            // soon are.
            if rounds.fetch_add(1, Ordering::SeqCst) == 2 {
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
                while faults.duplicated.load(Ordering::SeqCst) == 0
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                assert!(
                    faults.duplicated.load(Ordering::SeqCst) > 0,
                    "nothing was handled twice"
                );
            }
        }
    })
    .await;
    all_finished(summary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_every_delivery_handled_twice() {
    every_delivery_twice(Embedded::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_every_delivery_handled_twice() {
    every_delivery_twice(Production::start("twice").await).await;
}
