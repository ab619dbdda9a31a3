//! Group commit: appends queued behind a busy store are written together, in
//! one transaction, and each is still decided on its own.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

use std::collections::{BTreeSet, HashMap};

use es_core::testing::conformance::{events, unique_stream, whole_log};
use es_core::{
    AppendResult, EventStore, ExpectedVersion, NewEvent, Payload, Position, StoreError, StreamId,
};
use es_postgres::PgEventStore;
use futures::future::join_all;

/// Runs every `(stream, expected, events, _)` append at once, each on a task
/// of its own, and answers their results in order.
async fn append_concurrently<T>(
    store: &PgEventStore,
    calls: &[(StreamId, ExpectedVersion, Vec<NewEvent>, T)],
) -> Vec<Result<AppendResult, StoreError>> {
    join_all(calls.iter().map(|(stream, expected, events, _)| {
        let store = store.clone();
        let (stream, expected, events) = (stream.clone(), *expected, events.clone());
        async move {
            tokio::spawn(async move { store.append(&stream, expected, events).await })
                .await
                .unwrap()
        }
    }))
    .await
}

/// One append slot: every append that arrives while one runs is queued and
/// grouped.
async fn store() -> PgEventStore {
    es_postgres::testing::fresh_store()
        .await
        .with_group_commit(1, 16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_appends_share_a_transaction_and_are_decided_one_by_one() {
    let store = store().await;
    let taken = unique_stream("taken");
    store
        .append(&taken, ExpectedVersion::NoStream, events(0, 1))
        .await
        .unwrap();
    let replayed = unique_stream("replayed");
    let batch = events(10, 2);
    store
        .append(&replayed, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    let shared = unique_stream("shared");

    enum Expect {
        Written(u64),
        Shared,
        Replay,
        Conflict,
        BadPayload(uuid::Uuid),
    }
    let mut calls = Vec::new();
    for i in 0..80u64 {
        let stream = unique_stream("own");
        let n = 1 + i % 3;
        calls.push((
            stream,
            ExpectedVersion::NoStream,
            events(100 + i * 10, n),
            Expect::Written(n),
        ));
    }
    for i in 0..6 {
        calls.push((
            shared.clone(),
            ExpectedVersion::Any,
            events(2000 + i, 1),
            Expect::Shared,
        ));
    }
    calls.push((
        replayed.clone(),
        ExpectedVersion::NoStream,
        batch,
        Expect::Replay,
    ));
    calls.push((
        taken.clone(),
        ExpectedVersion::Exact(0),
        events(3000, 1),
        Expect::Conflict,
    ));
    let mut bad = events(4000, 2);
    bad[1].payload = Payload::from_trusted_json("{not json");
    let bad_id = bad[1].event_id;
    let bad_stream = unique_stream("bad");
    calls.push((
        bad_stream.clone(),
        ExpectedVersion::Any,
        bad,
        Expect::BadPayload(bad_id),
    ));

    let results = append_concurrently(&store, &calls).await;

    let mut shared_versions = BTreeSet::new();
    let mut transactions: HashMap<u64, usize> = HashMap::new();
    for ((stream, _, _, expect), result) in calls.iter().zip(&results) {
        match (expect, result) {
            (Expect::Written(n), Ok(r)) => {
                assert!(r.written, "{stream}");
                assert_eq!(r.stream_version, *n, "{stream}");
                *transactions.entry(r.position.major()).or_default() += 1;
            }
            (Expect::Shared, Ok(r)) => {
                assert!(r.written);
                shared_versions.insert(r.stream_version);
                *transactions.entry(r.position.major()).or_default() += 1;
            }
            (Expect::Replay, Ok(r)) => {
                assert!(!r.written, "a replay writes nothing");
                assert_eq!(r.stream_version, 2);
            }
            (Expect::Conflict, Err(StoreError::WrongExpectedVersion { actual, .. })) => {
                assert_eq!(*actual, 1);
            }
            (Expect::BadPayload(id), Err(StoreError::InvalidPayload { event_id })) => {
                assert_eq!(event_id, id);
            }
            (_, other) => panic!("{stream}: unexpected {other:?}"),
        }
    }
    assert_eq!(shared_versions, (1..=6).collect::<BTreeSet<u64>>());
    // Grouped: far fewer transactions than appends.
    let written = 86;
    assert!(
        transactions.len() < written / 2,
        "{} transactions for {written} appends: nothing was grouped",
        transactions.len()
    );
    assert!(transactions.values().any(|n| *n > 1));

    // The log holds exactly what was written, once, in increasing positions.
    let log = whole_log(&store, Position::START).await;
    let expected_events: usize = 1 + 2 + (0..80u64).map(|i| 1 + i % 3).sum::<u64>() as usize + 6;
    assert_eq!(log.len(), expected_events);
    assert!(log.windows(2).all(|w| w[0].position < w[1].position));
    assert!(log.iter().all(|e| e.stream_id != bad_stream));
    assert_eq!(store.stream_version(&taken).await.unwrap(), 1);
    // Each answer names the position of its own last event.
    for ((stream, _, _, expect), result) in calls.iter().zip(&results) {
        if let (Expect::Written(n), Ok(r)) = (expect, result) {
            let own: Vec<_> = log.iter().filter(|e| &e.stream_id == stream).collect();
            assert_eq!(own.len() as u64, *n);
            assert_eq!(own.last().unwrap().position, r.position, "{stream}");
            assert!(own.iter().all(|e| e.position.major() == r.position.major()));
        }
    }
}

/// A group whose statement fails as a whole (here: a payload PostgreSQL
/// refuses) writes nothing; its appends are then written one by one, so only
/// the faulty one fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_group_falls_back_to_one_append_at_a_time() {
    let store = store().await;
    for round in 0..5u64 {
        let mut calls = Vec::new();
        for i in 0..12u64 {
            let mut batch = events(round * 100 + i * 2, 2);
            if i == 7 {
                batch[0].payload = Payload::from_trusted_json("[1,]");
            }
            calls.push((unique_stream("fallback"), batch));
        }
        let results = join_all(calls.iter().map(|(stream, batch)| {
            let store = store.clone();
            let (stream, batch) = (stream.clone(), batch.clone());
            async move {
                tokio::spawn(async move {
                    store
                        .append(&stream, ExpectedVersion::NoStream, batch)
                        .await
                })
                .await
                .unwrap()
            }
        }))
        .await;
        for (i, result) in results.iter().enumerate() {
            if i == 7 {
                assert!(
                    matches!(result, Err(StoreError::InvalidPayload { .. })),
                    "{result:?}"
                );
            } else {
                assert_eq!(result.as_ref().unwrap().stream_version, 2);
            }
        }
        for (i, (stream, _)) in calls.iter().enumerate() {
            let version = store.stream_version(stream).await.unwrap();
            assert_eq!(version, if i == 7 { 0 } else { 2 });
        }
    }
}

/// Without grouping every append is its own transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_can_be_turned_off() {
    let store = es_postgres::testing::fresh_store()
        .await
        .with_group_commit(0, 16);
    let results = join_all((0..20u64).map(|i| {
        let store = store.clone();
        async move {
            tokio::spawn(async move {
                store
                    .append(
                        &unique_stream("solo"),
                        ExpectedVersion::NoStream,
                        events(i, 1),
                    )
                    .await
            })
            .await
            .unwrap()
            .unwrap()
        }
    }))
    .await;
    let transactions: BTreeSet<u64> = results.iter().map(|r| r.position.major()).collect();
    assert_eq!(transactions.len(), 20);
}

/// Multi-stream writes queued behind a busy store are written together with
/// the appends queued beside them; each is still all-or-nothing, and one
/// whose expectation fails writes nothing and gets its own error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_multi_stream_writes_stay_atomic_each() {
    use es_core::StreamAppend;
    let store = store().await;
    let taken = unique_stream("taken");
    store
        .append(&taken, ExpectedVersion::NoStream, events(0, 1))
        .await
        .unwrap();
    let mut writes = Vec::new();
    for i in 0..40u64 {
        let (a, b) = (unique_stream("unit"), unique_stream("unit"));
        let mut parts = vec![
            StreamAppend::new(a, ExpectedVersion::NoStream, events(100 + i * 10, 2)),
            StreamAppend::new(b, ExpectedVersion::NoStream, events(105 + i * 10, 1)),
        ];
        // Every fourth write also checks a version that has moved on.
        let stale = i % 4 == 3;
        if stale {
            parts.push(StreamAppend::new(
                taken.clone(),
                ExpectedVersion::NoStream,
                Vec::new(),
            ));
        }
        writes.push((parts, stale));
    }
    let singles: Vec<_> = (0..20u64)
        .map(|i| (unique_stream("single"), events(5000 + i, 1)))
        .collect();
    let (answers, single_answers) = tokio::join!(
        join_all(
            writes
                .iter()
                .map(|(parts, _)| store.append_streams(parts.clone()))
        ),
        join_all(singles.iter().map(|(s, e)| store.append(
            s,
            ExpectedVersion::NoStream,
            e.clone()
        )))
    );
    let mut transactions = BTreeSet::new();
    let mut ok = 0;
    for ((parts, stale), answer) in writes.iter().zip(answers) {
        let written: usize = {
            let mut n = 0;
            for part in &parts[..2] {
                n += store.read_stream(&part.stream, 1, 10).await.unwrap().len();
            }
            n
        };
        if *stale {
            assert!(
                matches!(answer, Err(StoreError::WrongExpectedVersion { .. })),
                "{answer:?}"
            );
            assert_eq!(written, 0, "a failed write wrote part of itself");
        } else {
            let results = answer.unwrap();
            assert_eq!(results.len(), 2);
            transactions.insert(results[0].position.major());
            ok += 1;
            assert!(results.iter().all(|r| r.written));
            assert_eq!(written, 3);
        }
    }
    for answer in single_answers {
        assert!(answer.unwrap().written);
    }
    assert!(
        transactions.len() < ok,
        "{ok} writes in {} transactions: none was grouped",
        transactions.len()
    );
}

/// Queued single events expecting no stream or an exact version are written
/// by one bare INSERT per group; those whose expectation fails, or whose id
/// is stored, are decided on their own and get their own answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_single_events_are_inserted_together_and_refusals_decided_alone() {
    let store = store().await;
    let taken = unique_stream("taken");
    let first = events(0, 1);
    store
        .append(&taken, ExpectedVersion::NoStream, first.clone())
        .await
        .unwrap();
    let mut existing = Vec::new();
    for i in 0..10u64 {
        let stream = unique_stream("existing");
        store
            .append(&stream, ExpectedVersion::NoStream, events(10 + i, 1))
            .await
            .unwrap();
        existing.push(stream);
    }

    enum Expect {
        Written(u64),
        Replay,
        Conflict,
        IdTaken,
    }
    let mut calls = Vec::new();
    for i in 0..40u64 {
        calls.push((
            unique_stream("fresh"),
            ExpectedVersion::NoStream,
            events(100 + i, 1),
            Expect::Written(1),
        ));
        // Early in the queue, so that groups of fresh streams hold them: the
        // others of such a group are written, these are refused alone.
        if i % 8 == 4 {
            calls.push((
                unique_stream("ahead"),
                ExpectedVersion::Exact(4),
                events(400 + i, 1),
                Expect::Conflict,
            ));
        }
    }
    for (i, stream) in existing.iter().enumerate() {
        calls.push((
            stream.clone(),
            ExpectedVersion::Exact(1),
            events(200 + i as u64, 1),
            Expect::Written(2),
        ));
    }
    calls.push((
        taken.clone(),
        ExpectedVersion::NoStream,
        first.clone(),
        Expect::Replay,
    ));
    calls.push((
        taken.clone(),
        ExpectedVersion::Exact(0),
        events(300, 1),
        Expect::Conflict,
    ));
    calls.push((
        unique_stream("ahead"),
        ExpectedVersion::Exact(4),
        events(301, 1),
        Expect::Conflict,
    ));
    calls.push((
        unique_stream("elsewhere"),
        ExpectedVersion::NoStream,
        first,
        Expect::IdTaken,
    ));

    let results = append_concurrently(&store, &calls).await;

    let mut transactions: HashMap<u64, usize> = HashMap::new();
    for ((stream, _, _, expect), result) in calls.iter().zip(&results) {
        match (expect, result) {
            (Expect::Written(v), Ok(r)) => {
                assert!(r.written, "{stream}");
                assert_eq!(r.stream_version, *v, "{stream}");
                *transactions.entry(r.position.major()).or_default() += 1;
            }
            (Expect::Replay, Ok(r)) => {
                assert!(!r.written, "a replay writes nothing");
                assert_eq!(r.stream_version, 1);
            }
            (Expect::Conflict, Err(StoreError::WrongExpectedVersion { .. }))
            | (Expect::IdTaken, Err(StoreError::IdempotencyConflict { .. })) => {}
            (_, other) => panic!("{stream}: unexpected {other:?}"),
        }
    }
    assert!(
        transactions.len() < 25,
        "{} transactions for 50 appends: nothing was grouped",
        transactions.len()
    );
    let log = whole_log(&store, Position::START).await;
    assert_eq!(log.len(), 1 + 10 + 50);
    assert!(log.windows(2).all(|w| w[0].position < w[1].position));
    // Each answer names the position of its own event.
    for ((stream, _, _, expect), result) in calls.iter().zip(&results) {
        if let (Expect::Written(v), Ok(r)) = (expect, result) {
            let own = log
                .iter()
                .find(|e| &e.stream_id == stream && e.stream_version == *v)
                .unwrap();
            assert_eq!(own.position, r.position, "{stream}");
        }
    }
}
