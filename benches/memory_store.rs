//! The in-memory event store: appends of 1 and 100 events per call, and
//! loading a 1,000-event aggregate through the repository.
//!
//!     cargo bench --bench memory_store

#![allow(missing_docs)] // criterion_group! generates undocumented public functions

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use es::doc_support::counter::{Counter, CounterEvent};
use es::{
    EventCodec, EventStore, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, Repository,
    StreamId,
};

fn new_events(codec: &EventCodec<CounterEvent>, n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| {
            codec
                .encode(
                    &CounterEvent::Incremented { by: i as u32 + 1 },
                    Metadata::new(),
                )
                .expect("encodes")
        })
        .collect()
}

fn appends(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let codec = EventCodec::<CounterEvent>::new();
    let streams: Vec<StreamId> = (0..1_000)
        .map(|i| StreamId::new(format!("counter-{i}")).expect("id"))
        .collect();
    let mut group = c.benchmark_group("memory_store/append");
    for batch in [1usize, 100] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    // A fresh store per sample keeps memory bounded; events are
                    // built outside the timed region.
                    let store = InMemoryEventStore::new();
                    let batches: Vec<Vec<NewEvent>> =
                        (0..iters).map(|_| new_events(&codec, batch)).collect();
                    let start = Instant::now();
                    for (i, events) in batches.into_iter().enumerate() {
                        store
                            .append(&streams[i % streams.len()], ExpectedVersion::Any, events)
                            .await
                            .expect("append");
                    }
                    start.elapsed()
                })
            });
        });
    }
    group.finish();
}

fn load(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let codec = EventCodec::<CounterEvent>::new();
    let stream = StreamId::new("counter-big").expect("id");
    rt.block_on(store.append(
        &stream,
        ExpectedVersion::NoStream,
        new_events(&codec, 1_000),
    ))
    .expect("seed");
    let repo = Repository::<Counter>::new(store);
    let mut group = c.benchmark_group("memory_store/load");
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("1000_events", |b| {
        b.iter(|| rt.block_on(repo.load("big")).expect("load"));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = appends, load
}
criterion_main!(benches);
