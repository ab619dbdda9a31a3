//! Property tests of the in-memory store over random interleavings of appends.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use es_core::testing::conformance::{event, events, whole_log};
use es_core::{EventStore, ExpectedVersion, InMemoryEventStore, Position, StoreError, StreamId};
use proptest::prelude::*;
use uuid::Uuid;

#[derive(Clone, Debug)]
enum Expect {
    Any,
    NoStream,
    StreamExists,
    /// The model's current version plus this offset (may be stale or ahead).
    Exact(i64),
}

#[derive(Clone, Debug)]
struct Op {
    stream: usize,
    expect: Expect,
    batch: u64,
}

fn op() -> impl Strategy<Value = Op> {
    let expect = prop_oneof![
        Just(Expect::Any),
        Just(Expect::NoStream),
        Just(Expect::StreamExists),
        (-2i64..=1).prop_map(Expect::Exact),
    ];
    (0usize..4, expect, 0u64..4).prop_map(|(stream, expect, batch)| Op {
        stream,
        expect,
        batch,
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// In any interleaving (the generated order), an append conflicts exactly
    /// when its expectation is stale against a model of stream versions, and
    /// the store ends up holding exactly what was acknowledged.
    #[test]
    fn conflicts_exactly_when_the_expectation_is_stale(ops in proptest::collection::vec(op(), 1..60)) {
        runtime().block_on(async {
            let store = InMemoryEventStore::new();
            let streams: Vec<StreamId> = (0..4).map(|i| StreamId::new(format!("p-{i}-{}", Uuid::now_v7().simple())).unwrap()).collect();
            let mut model: HashMap<usize, u64> = HashMap::new();
            let mut acked: HashMap<usize, Vec<Uuid>> = HashMap::new();
            for op in ops {
                let current = *model.get(&op.stream).unwrap_or(&0);
                let expected = match op.expect {
                    Expect::Any => ExpectedVersion::Any,
                    Expect::NoStream => ExpectedVersion::NoStream,
                    Expect::StreamExists => ExpectedVersion::StreamExists,
                    Expect::Exact(offset) => ExpectedVersion::Exact((current as i64 + offset).max(0) as u64),
                };
                let batch = events(0, op.batch);
                let ids: Vec<Uuid> = batch.iter().map(|e| e.event_id).collect();
                let result = store.append(&streams[op.stream], expected, batch).await;
                let should_succeed = expected.is_satisfied_by(current);
                match result {
                    Ok(r) => {
                        prop_assert!(should_succeed, "{expected} succeeded at version {current}");
                        prop_assert_eq!(r.stream_version, current + op.batch);
                        model.insert(op.stream, current + op.batch);
                        acked.entry(op.stream).or_default().extend(ids);
                    }
                    Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                        prop_assert!(!should_succeed, "{expected} conflicted at version {current}");
                        prop_assert_eq!(actual, current);
                    }
                    Err(other) => prop_assert!(false, "unexpected error {other}"),
                }
            }
            for (i, stream) in streams.iter().enumerate() {
                let stored = store.read_stream(stream, 1, usize::MAX).await.unwrap();
                let versions: Vec<u64> = stored.iter().map(|e| e.stream_version).collect();
                prop_assert_eq!(versions, (1..=stored.len() as u64).collect::<Vec<_>>());
                let ids: Vec<Uuid> = stored.iter().map(|e| e.event_id).collect();
                let expected_ids = acked.get(&i).cloned().unwrap_or_default();
                prop_assert_eq!(ids, expected_ids);
            }
            Ok(())
        })?;
    }

    /// Concurrent writers with random batch sizes and expectations: versions
    /// are contiguous from 1, positions strictly increase in read order, every
    /// acknowledged event is stored at the version reported, and an append
    /// acknowledged under `Exact(v)` (or `NoStream`, that is `Exact(0)`) starts
    /// at version v + 1 in the stream as read back.
    #[test]
    fn concurrent_appends_keep_the_invariants(
        writers in proptest::collection::vec(proptest::collection::vec(op(), 1..20), 2..6)
    ) {
        runtime().block_on(async {
            let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
            let streams: Arc<Vec<StreamId>> = Arc::new((0..4).map(|i| StreamId::new(format!("c-{i}-{}", Uuid::now_v7().simple())).unwrap()).collect());
            let mut tasks = Vec::new();
            for ops in writers {
                let store = Arc::clone(&store);
                let streams = Arc::clone(&streams);
                tasks.push(tokio::spawn(async move {
                    let mut acked = Vec::new();
                    for op in ops {
                        let stream = &streams[op.stream];
                        let current = store.stream_version(stream).await.unwrap();
                        tokio::task::yield_now().await;
                        let expected = match op.expect {
                            Expect::Any => ExpectedVersion::Any,
                            Expect::NoStream => ExpectedVersion::NoStream,
                            Expect::StreamExists => ExpectedVersion::StreamExists,
                            Expect::Exact(offset) => ExpectedVersion::Exact((current as i64 + offset).max(0) as u64),
                        };
                        let batch: Vec<_> = (0..op.batch.max(1)).map(event).collect();
                        let ids: Vec<Uuid> = batch.iter().map(|e| e.event_id).collect();
                        match store.append(stream, expected, batch).await {
                            Ok(r) => acked.push((op.stream, expected, r.stream_version, ids)),
                            Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                                assert!(!expected.is_satisfied_by(actual), "conflict although {expected} fits {actual}");
                            }
                            Err(other) => panic!("unexpected error {other}"),
                        }
                    }
                    acked
                }));
            }
            let mut all_acked = HashSet::new();
            let mut by_id = HashMap::new();
            let mut exact = Vec::new();
            for task in tasks {
                for (stream, expected, last_version, ids) in task.await.unwrap() {
                    match expected {
                        ExpectedVersion::Exact(v) => exact.push((stream, v, ids.clone())),
                        ExpectedVersion::NoStream => exact.push((stream, 0, ids.clone())),
                        ExpectedVersion::Any | ExpectedVersion::StreamExists => {}
                    }
                    let first = last_version + 1 - ids.len() as u64;
                    for (offset, id) in ids.into_iter().enumerate() {
                        all_acked.insert(id);
                        by_id.insert(id, (stream, first + offset as u64));
                    }
                }
            }
            let log = whole_log(&*store, Position::START).await;
            prop_assert!(log.windows(2).all(|w| w[0].position < w[1].position));
            prop_assert_eq!(log.len(), all_acked.len(), "the log holds unacknowledged events or lost some");
            for event in &log {
                let (stream, version) = by_id[&event.event_id];
                prop_assert_eq!(&event.stream_id, &streams[stream]);
                prop_assert_eq!(event.stream_version, version);
            }
            for stream in streams.iter() {
                let stored = store.read_stream(stream, 1, usize::MAX).await.unwrap();
                let versions: Vec<u64> = stored.iter().map(|e| e.stream_version).collect();
                prop_assert_eq!(versions, (1..=stored.len() as u64).collect::<Vec<_>>());
            }
            // What the stream holds right after each expected version, read
            // back rather than taken from the store's report.
            for (stream, v, ids) in exact {
                let at = store.read_stream(&streams[stream], v + 1, ids.len()).await.unwrap();
                prop_assert_eq!(
                    at.first().map(|e| (e.event_id, e.stream_version)),
                    Some((ids[0], v + 1)),
                    "an append expecting version {} did not start at {}", v, v + 1
                );
                prop_assert_eq!(at.iter().map(|e| e.event_id).collect::<Vec<_>>(), ids);
            }
            Ok(())
        })?;
    }
}
