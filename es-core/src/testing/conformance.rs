//! The backend conformance suite: every guarantee of
//! [`EventStore`], as functions any implementation calls
//! from its own tests.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use es_core::{EventStore, InMemoryEventStore};
//! es_core::testing::conformance::run_all(|| async {
//!     Arc::new(InMemoryEventStore::new()) as Arc<dyn EventStore>
//! })
//! .await;
//! # });
//! ```
//!
//! Each check uses fresh, unique stream ids, so one store may serve them all;
//! the checks that count the whole log (`read_all_*`, `subscribe_*`) only look
//! at the events they wrote. A failed check panics with what it saw.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use uuid::Uuid;

use crate::{
    EventStore, ExpectedVersion, Metadata, NewEvent, Payload, Position, RecordedEvent, StoreError,
    StreamAppend, StreamEvent, StreamId,
};

/// Runs every check, each on a store from `new_store`.
pub async fn run_all<F, Fut>(mut new_store: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<dyn EventStore>>,
{
    append_and_read_stream(new_store().await).await;
    read_stream_events_match_read_stream(new_store().await).await;
    expected_version_rules(new_store().await).await;
    conflict_writes_nothing(new_store().await).await;
    invalid_batch_writes_nothing(new_store().await).await;
    empty_append_checks_the_version(new_store().await).await;
    idempotent_reappend(new_store().await).await;
    idempotency_conflicts(new_store().await).await;
    event_ids_are_unique_across_streams(new_store().await).await;
    envelope_round_trips(new_store().await).await;
    read_all_in_order(new_store().await).await;
    subscribe_catches_up_then_goes_live(new_store().await).await;
    concurrent_appenders_race_on_one_stream(new_store().await).await;
    subscriber_sees_concurrent_writers_in_order(new_store().await).await;
    multi_stream_writes_are_atomic(new_store().await).await;
}

/// A unique stream id in `category`.
pub fn unique_stream(category: &str) -> StreamId {
    StreamId::for_aggregate(category, Uuid::now_v7().simple())
        .unwrap_or_else(|e| panic!("test stream id: {e}"))
}

/// A test event `Tested` whose payload is `{"n": n}`.
pub fn event(n: u64) -> NewEvent {
    NewEvent::new(
        "Tested",
        1,
        Payload::from_trusted_json(format!(r#"{{"n":{n}}}"#)),
        Metadata::new(),
    )
}

/// `count` test events numbered from `first`.
pub fn events(first: u64, count: u64) -> Vec<NewEvent> {
    (first..first + count).map(event).collect()
}

fn n_of(event: &RecordedEvent) -> u64 {
    event
        .payload
        .to_value()
        .ok()
        .and_then(|v| v.get("n").and_then(serde_json::Value::as_u64))
        .unwrap_or_else(|| panic!("not a test event: {event:?}"))
}

async fn whole_stream(store: &dyn EventStore, stream: &StreamId) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, 1, usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("read_stream failed: {e}"))
}

/// The next event of a subscription, waiting at most 10 s; panics when it
/// stalls, ends or fails.
pub async fn next_event(
    subscription: &mut futures::stream::BoxStream<'static, Result<RecordedEvent, StoreError>>,
) -> RecordedEvent {
    tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .unwrap_or_else(|_| panic!("subscription stalled"))
        .unwrap_or_else(|| panic!("subscription ended"))
        .unwrap_or_else(|e| panic!("subscription failed: {e}"))
}

/// Reads the log from `after` to its head.
pub async fn whole_log(store: &dyn EventStore, after: Position) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut position = after;
    loop {
        let page = store
            .read_all(position, 500)
            .await
            .unwrap_or_else(|e| panic!("read_all failed: {e}"));
        let Some(last) = page.last() else { return all };
        position = last.position;
        all.extend(page);
    }
}

/// Versions count from 1; `read_stream` honours `from_version` and
/// `max_count`; a missing stream reads as empty with version 0.
pub async fn append_and_read_stream(store: Arc<dyn EventStore>) {
    let stream = unique_stream("conf");
    assert_eq!(store.stream_version(&stream).await.ok(), Some(0));
    assert!(whole_stream(&*store, &stream).await.is_empty());
    let first = store
        .append(&stream, ExpectedVersion::NoStream, events(1, 3))
        .await
        .unwrap_or_else(|e| panic!("first append failed: {e}"));
    assert_eq!(first.stream_version, 3);
    assert!(first.written);
    let second = store
        .append(&stream, ExpectedVersion::Exact(3), events(4, 2))
        .await
        .unwrap_or_else(|e| panic!("second append failed: {e}"));
    assert_eq!(second.stream_version, 5);
    assert!(second.position > first.position);
    let all = whole_stream(&*store, &stream).await;
    let versions: Vec<u64> = all.iter().map(|e| e.stream_version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        all.iter().map(n_of).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(all[4].position, second.position);
    let middle = store.read_stream(&stream, 2, 2).await.unwrap_or_default();
    assert_eq!(
        middle.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert!(store
        .read_stream(&stream, 6, 10)
        .await
        .unwrap_or_default()
        .is_empty());
    assert_eq!(store.stream_version(&stream).await.ok(), Some(5));
}

/// `read_stream_events` and `visit_stream_events` read what `read_stream`
/// reads, field for field, with `from_version` and `max_count` honoured
/// alike, over events of several types and schema versions; a visit stops
/// at the event it breaks on.
pub async fn read_stream_events_match_read_stream(store: Arc<dyn EventStore>) {
    let stream = unique_stream("conf");
    assert!(store
        .read_stream_events(&stream, 1, 10)
        .await
        .unwrap_or_else(|e| panic!("reading a missing stream failed: {e}"))
        .is_empty());
    let batch: Vec<NewEvent> = (1..=7u64)
        .map(|n| {
            let (ty, version) = match n % 3 {
                0 => ("Tested", 1),
                1 => ("Other", 2),
                _ => ("Third", 3),
            };
            NewEvent::new(
                ty,
                version,
                Payload::from_trusted_json(format!(r#"{{"n":{n},"s":"é\"x"}}"#)),
                Metadata::new().with_correlation_id(Uuid::now_v7()),
            )
        })
        .collect();
    store
        .append(&stream, ExpectedVersion::NoStream, batch)
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    for (from, max) in [(1, usize::MAX), (1, 7), (3, 2), (7, 5), (8, 5), (2, 0)] {
        let full: Vec<StreamEvent> = store
            .read_stream(&stream, from, max)
            .await
            .unwrap_or_else(|e| panic!("read_stream failed: {e}"))
            .into_iter()
            .map(StreamEvent::from)
            .collect();
        let replay = store
            .read_stream_events(&stream, from, max)
            .await
            .unwrap_or_else(|e| panic!("read_stream_events failed: {e}"));
        assert_eq!(replay, full, "from {from}, at most {max}");
        let mut visited = Vec::new();
        let handed = store
            .visit_stream_events(&stream, from, max, &mut |event| {
                visited.push(event);
                ControlFlow::Continue(())
            })
            .await
            .unwrap_or_else(|e| panic!("visit_stream_events failed: {e}"));
        assert_eq!(
            (handed, &visited),
            (full.len(), &full),
            "visited from {from}, at most {max}"
        );
    }
    // A visit that breaks is handed nothing after the event it broke on.
    let mut visited = Vec::new();
    let handed = store
        .visit_stream_events(&stream, 2, usize::MAX, &mut |event| {
            let version = event.stream_version;
            visited.push(version);
            if version == 4 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("visit_stream_events failed: {e}"));
    assert_eq!(
        (handed, visited),
        (3, vec![2, 3, 4]),
        "a visit went on after its break"
    );
}

fn assert_conflict(
    result: Result<crate::AppendResult, StoreError>,
    expected: ExpectedVersion,
    actual: u64,
) {
    match result {
        Err(StoreError::WrongExpectedVersion {
            expected: e,
            actual: a,
            ..
        }) => {
            assert_eq!(
                (e, a),
                (expected, actual),
                "conflict carries the wrong versions"
            );
        }
        other => panic!("expected a version conflict ({expected} vs {actual}), got {other:?}"),
    }
}

/// `Any`, `NoStream`, `StreamExists` and `Exact` succeed and fail exactly
/// when they should, and a conflict carries expected and actual versions.
pub async fn expected_version_rules(store: Arc<dyn EventStore>) {
    let stream = unique_stream("conf");
    use ExpectedVersion::*;
    assert_conflict(
        store.append(&stream, StreamExists, events(1, 1)).await,
        StreamExists,
        0,
    );
    assert_conflict(
        store.append(&stream, Exact(1), events(1, 1)).await,
        Exact(1),
        0,
    );
    assert!(
        store.append(&stream, Exact(0), events(1, 1)).await.is_ok(),
        "Exact(0) on a new stream"
    );
    assert_conflict(
        store.append(&stream, NoStream, events(2, 1)).await,
        NoStream,
        1,
    );
    assert_conflict(
        store.append(&stream, Exact(0), events(2, 1)).await,
        Exact(0),
        1,
    );
    assert_conflict(
        store.append(&stream, Exact(2), events(2, 1)).await,
        Exact(2),
        1,
    );
    assert!(store
        .append(&stream, StreamExists, events(2, 1))
        .await
        .is_ok());
    assert!(store.append(&stream, Any, events(3, 1)).await.is_ok());
    assert!(store.append(&stream, Exact(3), events(4, 1)).await.is_ok());
    let other = unique_stream("conf");
    assert!(
        store.append(&other, Any, events(1, 1)).await.is_ok(),
        "Any on a new stream"
    );
    assert!(store
        .append(&unique_stream("conf"), NoStream, events(1, 1))
        .await
        .is_ok());
    assert_eq!(store.stream_version(&stream).await.ok(), Some(4));
}

/// A rejected append writes nothing: not to the stream, not to the log.
pub async fn conflict_writes_nothing(store: Arc<dyn EventStore>) {
    let stream = unique_stream("conf");
    let ok = store
        .append(&stream, ExpectedVersion::NoStream, events(1, 2))
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let rejected = events(3, 5);
    let ids: HashSet<Uuid> = rejected.iter().map(|e| e.event_id).collect();
    assert!(store
        .append(&stream, ExpectedVersion::Exact(1), rejected)
        .await
        .is_err());
    assert_eq!(whole_stream(&*store, &stream).await.len(), 2);
    let log = whole_log(&*store, ok.position).await;
    assert!(
        log.iter().all(|e| !ids.contains(&e.event_id)),
        "a rejected event reached the log"
    );
}

/// `append_streams` writes every part or none: a part with a wrong expected
/// version, an id repeated across parts or a stream named twice fails the
/// whole write; a successful one is contiguous in the log, and a replay of
/// it writes nothing.
pub async fn multi_stream_writes_are_atomic(store: Arc<dyn EventStore>) {
    let (a, b, c) = (
        unique_stream("conf"),
        unique_stream("conf"),
        unique_stream("conf"),
    );
    let first = store
        .append(&a, ExpectedVersion::NoStream, events(1, 2))
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let (a_events, b_events, c_events) = (events(10, 2), events(20, 1), events(30, 3));
    let parts = |a_expected| {
        vec![
            StreamAppend::new(a.clone(), a_expected, a_events.clone()),
            StreamAppend::new(b.clone(), ExpectedVersion::NoStream, b_events.clone()),
            StreamAppend::new(c.clone(), ExpectedVersion::Any, c_events.clone()),
        ]
    };
    match store.append_streams(parts(ExpectedVersion::Exact(1))).await {
        Err(StoreError::WrongExpectedVersion { stream, actual, .. }) => {
            assert_eq!((stream, actual), (a.clone(), 2));
        }
        other => panic!("a stale part must fail the write, got {other:?}"),
    }
    for s in [&b, &c] {
        assert!(
            whole_stream(&*store, s).await.is_empty(),
            "a failed multi-stream write wrote {s}"
        );
    }
    let results = store
        .append_streams(parts(ExpectedVersion::Exact(2)))
        .await
        .unwrap_or_else(|e| panic!("multi-stream write failed: {e}"));
    let versions: Vec<(u64, bool)> = results
        .iter()
        .map(|r| (r.stream_version, r.written))
        .collect();
    assert_eq!(versions, [(4, true), (1, true), (3, true)]);
    // Committed, but a backend with a read horizon may hold the rows back
    // while an older transaction (another test's) still runs: read until
    // the write is readable, for a bounded time.
    let mut log = whole_log(&*store, first.position).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log.len() < 6 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        log = whole_log(&*store, first.position).await;
    }
    let mut order: Vec<(&str, u64)> = log
        .iter()
        .map(|e| (e.stream_id.as_str(), e.stream_version))
        .collect();
    assert_eq!(order.len(), 6, "{order:?}");
    assert!(
        log.windows(2)
            .filter(|w| w[0].stream_id == w[1].stream_id)
            .all(|w| w[1].stream_version == w[0].stream_version + 1),
        "each part's events are in order: {order:?}"
    );
    order.sort_unstable();
    let mut expected = vec![
        (a.as_str(), 3),
        (a.as_str(), 4),
        (b.as_str(), 1),
        (c.as_str(), 1),
        (c.as_str(), 2),
        (c.as_str(), 3),
    ];
    expected.sort_unstable();
    assert_eq!(
        order, expected,
        "a multi-stream write is contiguous in the log"
    );
    let last_of_c = log
        .iter()
        .filter(|e| e.stream_id == c)
        .map(|e| e.position)
        .max();
    assert_eq!(Some(results[2].position), last_of_c);
    let replayed = store
        .append_streams(parts(ExpectedVersion::Exact(2)))
        .await
        .unwrap_or_else(|e| panic!("replaying a multi-stream write failed: {e}"));
    assert!(replayed.iter().all(|r| !r.written), "{replayed:?}");
    assert_eq!(whole_log(&*store, first.position).await.len(), 6);

    // A part without events only checks its stream's version.
    let x = unique_stream("conf");
    let checked = |expected| {
        vec![
            StreamAppend::new(a.clone(), expected, Vec::new()),
            StreamAppend::new(x.clone(), ExpectedVersion::Any, events(60, 1)),
        ]
    };
    match store
        .append_streams(checked(ExpectedVersion::Exact(3)))
        .await
    {
        Err(StoreError::WrongExpectedVersion { stream, actual, .. }) => {
            assert_eq!((stream, actual), (a.clone(), 4));
        }
        other => panic!("a stale check must fail the write, got {other:?}"),
    }
    assert!(whole_stream(&*store, &x).await.is_empty());
    let checked = store
        .append_streams(checked(ExpectedVersion::Exact(4)))
        .await
        .unwrap_or_else(|e| panic!("a write with a version check failed: {e}"));
    assert_eq!(
        checked
            .iter()
            .map(|r| (r.stream_version, r.written))
            .collect::<Vec<_>>(),
        [(4, false), (1, true)]
    );

    let d = unique_stream("conf");
    let twice = vec![
        StreamAppend::new(d.clone(), ExpectedVersion::Any, events(40, 1)),
        StreamAppend::new(d.clone(), ExpectedVersion::Any, events(41, 1)),
    ];
    match store.append_streams(twice).await {
        Err(StoreError::DuplicateStream { stream }) => assert_eq!(stream, d),
        other => panic!("a stream named twice must be DuplicateStream, got {other:?}"),
    }
    let one = events(50, 1);
    let shared_id = vec![
        StreamAppend::new(d.clone(), ExpectedVersion::Any, one.clone()),
        StreamAppend::new(unique_stream("conf"), ExpectedVersion::Any, one),
    ];
    match store.append_streams(shared_id).await {
        Err(StoreError::InvalidEvent { .. }) => {}
        other => panic!("an id in two parts must be InvalidEvent, got {other:?}"),
    }
    assert!(whole_stream(&*store, &d).await.is_empty());
}

/// A batch with a malformed event (an id twice, an empty type) is refused as a
/// whole with a typed error.
pub async fn invalid_batch_writes_nothing(store: Arc<dyn EventStore>) {
    let stream = unique_stream("conf");
    let mut twice = events(1, 3);
    twice[2].event_id = twice[0].event_id;
    match store.append(&stream, ExpectedVersion::Any, twice).await {
        Err(StoreError::InvalidEvent { .. }) => {}
        other => panic!("a batch with an id twice must be InvalidEvent, got {other:?}"),
    }
    let mut untyped = events(1, 2);
    untyped[1].event_type = "".into();
    match store.append(&stream, ExpectedVersion::Any, untyped).await {
        Err(StoreError::InvalidEvent { .. }) => {}
        other => panic!("an empty event type must be InvalidEvent, got {other:?}"),
    }
    assert!(whole_stream(&*store, &stream).await.is_empty());
}

/// An empty append checks the expected version and writes nothing.
pub async fn empty_append_checks_the_version(store: Arc<dyn EventStore>) {
    let stream = unique_stream("conf");
    let empty = store
        .append(&stream, ExpectedVersion::NoStream, Vec::new())
        .await
        .unwrap_or_else(|e| panic!("empty append failed: {e}"));
    assert!(!empty.written);
    assert_eq!(empty.stream_version, 0);
    assert_conflict(
        store
            .append(&stream, ExpectedVersion::Exact(4), Vec::new())
            .await,
        ExpectedVersion::Exact(4),
        0,
    );
    assert_eq!(store.stream_version(&stream).await.ok(), Some(0));
}

/// Appending the same events again at the same positions succeeds, writes
/// nothing, and reports the original positions — whatever the expectation
/// used, as long as it fits those positions.
pub async fn idempotent_reappend(store: Arc<dyn EventStore>) {
    let stream = unique_stream("conf");
    let batch = events(1, 3);
    let first = store
        .append(&stream, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(0),
        ExpectedVersion::Any,
    ] {
        let again = store
            .append(&stream, expected, batch.clone())
            .await
            .unwrap_or_else(|e| panic!("re-append with {expected} must succeed: {e}"));
        assert!(!again.written, "a re-append wrote events");
        assert_eq!(
            (again.stream_version, again.position),
            (first.stream_version, first.position)
        );
    }
    let next = events(4, 2);
    store
        .append(&stream, ExpectedVersion::Exact(3), next.clone())
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let again = store
        .append(&stream, ExpectedVersion::Exact(3), next)
        .await
        .unwrap_or_else(|e| panic!("re-append of the second batch failed: {e}"));
    assert!(!again.written);
    assert_eq!(again.stream_version, 5);
    // The first batch again, expecting a version that does not fit its positions.
    assert_conflict(
        store
            .append(&stream, ExpectedVersion::Exact(5), batch)
            .await,
        ExpectedVersion::Exact(5),
        5,
    );
    assert_eq!(whole_stream(&*store, &stream).await.len(), 5);

    // Single events, which a store may append by a shorter path.
    let single = unique_stream("conf");
    let one = events(1, 1);
    let first = store
        .append(&single, ExpectedVersion::NoStream, one.clone())
        .await
        .unwrap_or_else(|e| panic!("single append failed: {e}"));
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Exact(0)] {
        let again = store
            .append(&single, expected, one.clone())
            .await
            .unwrap_or_else(|e| panic!("single re-append with {expected} must succeed: {e}"));
        assert!(!again.written, "a single re-append wrote an event");
        assert_eq!(again.position, first.position);
    }
    let two = events(2, 1);
    store
        .append(&single, ExpectedVersion::Exact(1), two.clone())
        .await
        .unwrap_or_else(|e| panic!("single append at 1 failed: {e}"));
    let again = store
        .append(&single, ExpectedVersion::Exact(1), two)
        .await
        .unwrap_or_else(|e| panic!("single re-append at 1 failed: {e}"));
    assert!(!again.written);
    assert_eq!(again.stream_version, 2);
    assert_conflict(
        store
            .append(&single, ExpectedVersion::Exact(2), one.clone())
            .await,
        ExpectedVersion::Exact(2),
        2,
    );
    assert_conflict(
        store
            .append(&single, ExpectedVersion::Exact(7), events(9, 1))
            .await,
        ExpectedVersion::Exact(7),
        2,
    );
    assert!(matches!(
        store
            .append(&unique_stream("conf"), ExpectedVersion::NoStream, one)
            .await,
        Err(StoreError::IdempotencyConflict { .. })
    ));
    assert_eq!(whole_stream(&*store, &single).await.len(), 2);
}

/// A partial overlap, or a stored id with another payload or type, is an
/// idempotency conflict and writes nothing.
pub async fn idempotency_conflicts(store: Arc<dyn EventStore>) {
    let stream = unique_stream("conf");
    let batch = events(1, 3);
    store
        .append(&stream, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let mut partial = batch[1..].to_vec();
    partial.push(event(9));
    let fresh_id = partial[2].event_id;
    match store.append(&stream, ExpectedVersion::Any, partial).await {
        Err(StoreError::IdempotencyConflict { .. }) => {}
        other => panic!("a partial overlap must be IdempotencyConflict, got {other:?}"),
    }
    let mut changed = batch.clone();
    changed[1].payload = Payload::from_trusted_json(r#"{"n":99}"#);
    match store
        .append(&stream, ExpectedVersion::NoStream, changed)
        .await
    {
        Err(StoreError::IdempotencyConflict { .. }) => {}
        other => panic!("a changed payload must be IdempotencyConflict, got {other:?}"),
    }
    let mut retyped = batch.clone();
    retyped[0].event_type = "Other".into();
    match store
        .append(&stream, ExpectedVersion::NoStream, retyped)
        .await
    {
        Err(StoreError::IdempotencyConflict { .. }) => {}
        other => panic!("a changed type must be IdempotencyConflict, got {other:?}"),
    }
    // Same ids but not at the same positions (a subset starting later).
    match store
        .append(
            &stream,
            ExpectedVersion::Any,
            batch[..1].iter().chain(&batch[2..]).cloned().collect(),
        )
        .await
    {
        Err(StoreError::IdempotencyConflict { .. }) => {}
        other => panic!("ids at other positions must be IdempotencyConflict, got {other:?}"),
    }
    let stored = whole_stream(&*store, &stream).await;
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|e| e.event_id != fresh_id));
    assert_eq!(stored.iter().map(n_of).collect::<Vec<_>>(), vec![1, 2, 3]);
}

/// An event id is unique across the store: reusing it on another stream is an
/// idempotency conflict.
pub async fn event_ids_are_unique_across_streams(store: Arc<dyn EventStore>) {
    let (a, b) = (unique_stream("conf"), unique_stream("conf"));
    let batch = events(1, 1);
    store
        .append(&a, ExpectedVersion::Any, batch.clone())
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    match store.append(&b, ExpectedVersion::Any, batch).await {
        Err(StoreError::IdempotencyConflict { .. }) => {}
        other => {
            panic!("an id reused on another stream must be IdempotencyConflict, got {other:?}")
        }
    }
    assert!(whole_stream(&*store, &b).await.is_empty());
}

/// Ids, types, schema versions, payloads and metadata come back as written;
/// the store stamps the stream, version, position and time.
pub async fn envelope_round_trips(store: Arc<dyn EventStore>) {
    let stream = unique_stream("conf");
    let correlation = Uuid::now_v7();
    let metadata = Metadata::new()
        .with_correlation_id(correlation)
        .with_causation_id(Uuid::now_v7())
        .with_traceparent(
            crate::TraceParent::from_parts(
                0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
                0xb7ad_6b71_6920_3331,
                1,
            )
            .unwrap_or_else(crate::TraceParent::new_root),
        )
        .with_header("tenant", "acme");
    let payload = Payload::from_json(r#"{"name":"Ada \"Lovelace\"","lines":[{"sku":"é-1","qty":2}],"total":"12.50","nested":{"x":null}}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    let written = NewEvent::new("OrderPlaced", 3, payload.clone(), metadata.clone());
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    store
        .append(&stream, ExpectedVersion::NoStream, vec![written.clone()])
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let read = whole_stream(&*store, &stream).await;
    let [event] = read.as_slice() else {
        panic!("expected one event, got {read:?}")
    };
    assert_eq!(event.event_id, written.event_id);
    assert_eq!(event.stream_id, stream);
    assert_eq!(event.stream_version, 1);
    assert_eq!(&*event.event_type, "OrderPlaced");
    assert_eq!(event.schema_version, 3);
    assert!(
        event.payload.json_eq(&payload),
        "payload changed: {}",
        event.payload
    );
    assert_eq!(event.metadata, metadata);
    assert!(
        event.recorded_at >= before,
        "recorded_at {} is in the past",
        event.recorded_at
    );
    let via_log = whole_log(&*store, Position::START).await;
    let logged = via_log
        .iter()
        .find(|e| e.event_id == written.event_id)
        .unwrap_or_else(|| panic!("event missing from read_all"));
    assert_eq!(logged, event);
}

/// `read_all` returns the log in strictly increasing position order, from any
/// position, page by page.
pub async fn read_all_in_order(store: Arc<dyn EventStore>) {
    let start = store
        .head()
        .await
        .unwrap_or_else(|e| panic!("head failed: {e}"));
    let (a, b) = (unique_stream("conf"), unique_stream("conf"));
    let mut ids = Vec::new();
    for round in 0..5 {
        for stream in [&a, &b] {
            let batch = events(round * 2, 2);
            ids.extend(batch.iter().map(|e| e.event_id));
            store
                .append(stream, ExpectedVersion::Any, batch)
                .await
                .unwrap_or_else(|e| panic!("append failed: {e}"));
        }
    }
    let head = store
        .head()
        .await
        .unwrap_or_else(|e| panic!("head failed: {e}"));
    assert!(head > start, "head did not move");
    let log = whole_log(&*store, start).await;
    let mine: Vec<Uuid> = log
        .iter()
        .map(|e| e.event_id)
        .filter(|id| ids.contains(id))
        .collect();
    assert_eq!(mine, ids, "read_all lost or reordered events");
    assert!(
        log.windows(2).all(|w| w[0].position < w[1].position),
        "positions not increasing"
    );
    assert_eq!(log.last().map(|e| e.position), Some(head));
    // Paging from the middle returns exactly the tail.
    let middle = log[log.len() / 2].position;
    let tail = whole_log(&*store, middle).await;
    assert_eq!(tail.as_slice(), &log[log.len() / 2 + 1..]);
    let two = store.read_all(start, 2).await.unwrap_or_default();
    assert_eq!(two.len(), 2);
    // A position's string form resumes reading at the same place.
    let resumed: Position = middle.to_string().parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(whole_log(&*store, resumed).await, tail);
}

type Subscription = futures::stream::BoxStream<'static, Result<RecordedEvent, StoreError>>;

/// Takes `n` events from a subscription, failing if it stalls or fails.
async fn take(n: usize, sub: &mut Subscription) -> Vec<RecordedEvent> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(Ok(e))) => got.push(e),
            Ok(Some(Err(e))) => panic!("subscription failed: {e}"),
            Ok(None) => panic!("subscription ended after {} events", got.len()),
            Err(_) => panic!("subscription stalled after {} events", got.len()),
        }
    }
    got
}

/// `subscribe_all` delivers history, then live events, in order, once each,
/// from `START` or from any position.
pub async fn subscribe_catches_up_then_goes_live(store: Arc<dyn EventStore>) {
    let start = store
        .head()
        .await
        .unwrap_or_else(|e| panic!("head failed: {e}"));
    let stream = unique_stream("conf");
    store
        .append(&stream, ExpectedVersion::NoStream, events(1, 5))
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let mut from_start = store.subscribe_all(start);
    let history = whole_log(&*store, start).await;
    let third = history[2].position;
    let mut from_third = store.subscribe_all(third);
    let writer = {
        let store = Arc::clone(&store);
        let stream = stream.clone();
        tokio::spawn(async move {
            for n in 6..=10 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                store
                    .append(&stream, ExpectedVersion::Exact(n - 1), vec![event(n)])
                    .await
                    .unwrap_or_else(|e| panic!("live append failed: {e}"));
            }
        })
    };
    let all = take(10, &mut from_start).await;
    let mine: Vec<u64> = all
        .iter()
        .filter(|e| e.stream_id == stream)
        .map(n_of)
        .collect();
    assert_eq!(
        mine,
        (1..=10).collect::<Vec<_>>(),
        "subscription from start"
    );
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    let tail = take(7, &mut from_third).await;
    let mine: Vec<u64> = tail
        .iter()
        .filter(|e| e.stream_id == stream)
        .map(n_of)
        .collect();
    assert_eq!(
        mine,
        (4..=10).collect::<Vec<_>>(),
        "subscription from the third event"
    );
    writer
        .await
        .unwrap_or_else(|e| panic!("writer panicked: {e}"));
    // Nothing more arrives (no repeats).
    let extra = tokio::time::timeout(Duration::from_millis(200), from_start.next()).await;
    assert!(extra.is_err(), "unexpected extra event {extra:?}");
}

/// Many tasks race to append to one stream, each expecting the version it
/// read: each version is won by exactly one, the rest get conflicts, and the
/// stream holds exactly the winners, contiguous from 1.
pub async fn concurrent_appenders_race_on_one_stream(store: Arc<dyn EventStore>) {
    const WRITERS: u64 = 8;
    const ROUNDS: u64 = 25;
    let stream = unique_stream("race");
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(&store);
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            let (mut won, mut lost) = (Vec::new(), 0u64);
            for round in 0..ROUNDS {
                let version = store
                    .stream_version(&stream)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let e = event(writer * 1_000 + round);
                let id = e.event_id;
                match store
                    .append(&stream, ExpectedVersion::Exact(version), vec![e])
                    .await
                {
                    Ok(r) => {
                        assert_eq!(r.stream_version, version + 1);
                        won.push(id);
                    }
                    Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                        assert!(actual > version, "conflict reported a stale actual version");
                        lost += 1;
                    }
                    Err(other) => panic!("unexpected error: {other}"),
                }
                tokio::task::yield_now().await;
            }
            (won, lost)
        }));
    }
    let mut won = HashSet::new();
    let mut lost = 0;
    for task in tasks {
        let (w, l) = task
            .await
            .unwrap_or_else(|e| panic!("writer panicked: {e}"));
        won.extend(w);
        lost += l;
    }
    let stored = whole_stream(&*store, &stream).await;
    assert_eq!(stored.len() + lost as usize, (WRITERS * ROUNDS) as usize);
    assert_eq!(
        stored.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        (1..=stored.len() as u64).collect::<Vec<_>>()
    );
    let stored_ids: HashSet<Uuid> = stored.iter().map(|e| e.event_id).collect();
    assert_eq!(
        stored_ids, won,
        "the stream does not hold exactly the acknowledged appends"
    );
}

/// What the live subscriber of [`subscriber_sees_concurrent_writers_in_order`]
/// saw.
struct LiveDrain {
    /// The check's events, in delivery order.
    delivered: Vec<RecordedEvent>,
    /// How many of them arrived before the last writer finished.
    while_writing: usize,
}

/// Drains `subscription` until it has delivered every id in `expected`,
/// asserting as it goes that positions strictly increase, that no event comes
/// twice and that each stream's versions follow on from 1; then listens a
/// little longer for repeats. Publishes how many expected events it has seen
/// on `seen`.
async fn drain_live(
    mut subscription: Subscription,
    after: Position,
    expected: HashSet<Uuid>,
    seen: tokio::sync::watch::Sender<usize>,
    writers_done: Arc<std::sync::atomic::AtomicBool>,
) -> LiveDrain {
    use std::sync::atomic::Ordering;
    let mut delivered = Vec::new();
    let mut ids = HashSet::new();
    let mut last = after;
    let mut versions: HashMap<StreamId, u64> = HashMap::new();
    let mut while_writing = 0;
    let mut check = |event: RecordedEvent, delivered: &mut Vec<RecordedEvent>| {
        assert!(
            event.position > last,
            "position {} not after {}",
            event.position,
            last
        );
        last = event.position;
        if !expected.contains(&event.event_id) {
            return;
        }
        assert!(
            ids.insert(event.event_id),
            "event {} delivered twice",
            event.event_id
        );
        let v = versions.entry(event.stream_id.clone()).or_insert(0);
        assert_eq!(
            event.stream_version,
            *v + 1,
            "stream {} out of order",
            event.stream_id
        );
        *v = event.stream_version;
        delivered.push(event);
    };
    while delivered.len() < expected.len() {
        let next = tokio::time::timeout(Duration::from_secs(20), subscription.next()).await;
        let event = match next {
            Ok(Some(Ok(e))) => e,
            Ok(Some(Err(e))) => panic!("subscription failed: {e}"),
            Ok(None) => panic!("subscription ended"),
            Err(_) => panic!(
                "subscription stalled: saw {} of {} events",
                delivered.len(),
                expected.len()
            ),
        };
        let writing = !writers_done.load(Ordering::Acquire);
        let before = delivered.len();
        check(event, &mut delivered);
        if delivered.len() > before {
            while_writing += usize::from(writing);
            seen.send_replace(delivered.len());
        }
    }
    // Anything more of ours would be a repeat (`check` panics on it).
    while let Ok(next) = tokio::time::timeout(Duration::from_millis(200), subscription.next()).await
    {
        match next {
            Some(Ok(e)) => check(e, &mut delivered),
            Some(Err(e)) => panic!("subscription failed: {e}"),
            None => panic!("subscription ended"),
        }
    }
    LiveDrain {
        delivered,
        while_writing,
    }
}

/// A subscriber draining the log live, in its own task, while many writers
/// append to many streams, sees every committed event exactly once, in
/// strictly increasing positions, each stream's versions contiguous from 1.
///
/// Half-way through its streams each writer waits until the subscriber has
/// delivered at least as many of the check's events as that writer has
/// committed, so the subscriber provably keeps up with writers still running
/// rather than catching up once they are done.
pub async fn subscriber_sees_concurrent_writers_in_order(store: Arc<dyn EventStore>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    const WRITERS: u64 = 8;
    const STREAMS_PER_WRITER: usize = 10;
    const APPENDS_PER_STREAM: u64 = 5;
    let start = store
        .head()
        .await
        .unwrap_or_else(|e| panic!("head failed: {e}"));
    // Every writer's streams and batches, planned up front so the subscriber
    // knows which events to wait for.
    let plans: Vec<Vec<(StreamId, Vec<Vec<NewEvent>>)>> = (0..WRITERS)
        .map(|writer| {
            (0..STREAMS_PER_WRITER)
                .map(|_| {
                    let batches = (0..APPENDS_PER_STREAM)
                        .map(|append| events(writer, 1 + append % 2))
                        .collect();
                    (unique_stream("torture"), batches)
                })
                .collect()
        })
        .collect();
    let expected: HashSet<Uuid> = plans
        .iter()
        .flatten()
        .flat_map(|(_, batches)| batches.iter().flatten().map(|e| e.event_id))
        .collect();
    let writers_done = Arc::new(AtomicBool::new(false));
    let (seen_tx, seen_rx) = tokio::sync::watch::channel(0usize);
    let subscriber = tokio::spawn(drain_live(
        store.subscribe_all(start),
        start,
        expected.clone(),
        seen_tx,
        Arc::clone(&writers_done),
    ));
    let mut tasks = Vec::new();
    for plan in plans {
        let store = Arc::clone(&store);
        let mut seen = seen_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for (i, (stream, batches)) in plan.into_iter().enumerate() {
                if i == STREAMS_PER_WRITER / 2 {
                    let mine = committed.len();
                    match tokio::time::timeout(
                        Duration::from_secs(20),
                        seen.wait_for(|n| *n >= mine),
                    )
                    .await
                    {
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => panic!("the subscriber stopped while writers ran"),
                        Err(_) => {
                            panic!("the subscriber did not deliver {mine} events while writers ran")
                        }
                    }
                }
                for (append, batch) in batches.into_iter().enumerate() {
                    let ids: Vec<Uuid> = batch.iter().map(|e| e.event_id).collect();
                    let expected = if append == 0 {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::StreamExists
                    };
                    store
                        .append(&stream, expected, batch)
                        .await
                        .unwrap_or_else(|e| panic!("append failed: {e}"));
                    committed.extend(ids);
                }
            }
            committed
        }));
    }
    let mut committed = HashSet::new();
    for task in tasks {
        committed.extend(
            task.await
                .unwrap_or_else(|e| panic!("writer panicked: {e}")),
        );
    }
    writers_done.store(true, Ordering::Release);
    let drained = subscriber
        .await
        .unwrap_or_else(|e| panic!("subscriber panicked: {e}"));
    assert_eq!(committed, expected, "a writer lost an append");
    let delivered: HashSet<Uuid> = drained.delivered.iter().map(|e| e.event_id).collect();
    assert_eq!(
        delivered.len(),
        drained.delivered.len(),
        "an event came twice"
    );
    assert_eq!(delivered, committed, "the subscriber missed events");
    assert!(
        drained.while_writing > 0,
        "the subscriber saw nothing while the writers ran"
    );
    // Delivery order is the log's order.
    let log: Vec<Uuid> = whole_log(&*store, start)
        .await
        .into_iter()
        .map(|e| e.event_id)
        .filter(|id| committed.contains(id))
        .collect();
    assert_eq!(
        drained
            .delivered
            .iter()
            .map(|e| e.event_id)
            .collect::<Vec<_>>(),
        log,
        "the subscription's order differs from read_all's"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::{EventStore, InMemoryEventStore};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_in_memory_store_conforms() {
        super::run_all(|| async { Arc::new(InMemoryEventStore::new()) as Arc<dyn EventStore> })
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_shared_in_memory_store_conforms() {
        let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        super::run_all(|| {
            let store = Arc::clone(&store);
            async move { store }
        })
        .await;
    }
}
