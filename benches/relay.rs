//! The store-to-bus relay on the production backends: 1,000 events relayed
//! from a PostgreSQL store to RabbitMQ (batches of 256, confirmed, the
//! checkpoint saved in PostgreSQL per batch; each run takes the advisory
//! lock and loads the checkpoint). Needs PostgreSQL at `DATABASE_URL` and
//! RabbitMQ at `AMQP_URL`. Run: `cargo bench -p es-tests --bench relay`.
//!
//! es-rabbit's own bench (`cargo bench -p es-rabbit --bench rabbit`) measures
//! publishing and consuming; this one sits in the cross-crate package so that
//! es-rabbit needs no store backend to build.

// A bench is a test harness: a panic is the failure report.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use es_core::{
    CancellationToken, CheckpointStore, EventBus, EventStore, ExpectedVersion, Metadata, NewEvent,
    Payload, StreamId, Subscription,
};
use es_postgres::{PgCheckpointStore, PgLeaderLock};
use es_rabbit::RabbitRelay;
use es_tests::production::{rabbit, rabbit_config};
use tokio::runtime::Runtime;
use uuid::Uuid;

const N: usize = 1_000;

fn relay(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let bus = rt.block_on(rabbit(
        rabbit_config("relay-bench").with_confirm_window(256),
    ));
    let sub = Subscription::new("g", ["bench.*"]);
    rt.block_on(bus.declare(&sub)).unwrap();
    let store = rt.block_on(es_postgres::testing::fresh_store());
    rt.block_on(async {
        for chunk in 0..N / 10 {
            let events = (0..10)
                .map(|n| {
                    NewEvent::new(
                        "Placed",
                        1,
                        Payload::from_json(format!(r#"{{"n":{n}}}"#)).unwrap(),
                        Metadata::new(),
                    )
                })
                .collect();
            let stream = StreamId::for_aggregate("bench", chunk).unwrap();
            store
                .append(&stream, ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
    });
    let head = rt.block_on(store.head()).unwrap();
    let checkpoints = PgCheckpointStore::new(store.pool().clone(), store.schema());
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    group.bench_function("postgres", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (bus, sub, store, checkpoints) = (&bus, &sub, &store, &checkpoints);
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // A new relay name starts from the beginning of the log.
                    let name = format!("bench-{}", Uuid::new_v4().simple());
                    let relay = Arc::new(RabbitRelay::new(
                        name.clone(),
                        Arc::new(store.clone()),
                        bus,
                        Arc::new(checkpoints.clone()),
                        Arc::new(PgLeaderLock::new(store.pool().clone())),
                    ));
                    let stop = CancellationToken::new();
                    let start = Instant::now();
                    let running = tokio::spawn({
                        let (relay, stop) = (Arc::clone(&relay), stop.clone());
                        async move { relay.run(stop).await }
                    });
                    while checkpoints.load(&name).await.unwrap() != Some(head) {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    total += start.elapsed();
                    stop.cancel();
                    running.await.unwrap().unwrap();
                    // An empty queue for the next run.
                    bus.delete_group(sub).await.unwrap();
                    bus.declare(sub).await.unwrap();
                }
                total
            }
        });
    });
    group.finish();
    rt.block_on(async {
        bus.delete_group(&sub).await.unwrap();
        bus.delete_exchanges(&["bench"]).await.unwrap();
    });
}

criterion_group!(benches, relay);
criterion_main!(benches);
