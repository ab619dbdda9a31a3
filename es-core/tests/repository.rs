//! The repository: load, execute, retries, snapshots, idempotent commands.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

use std::sync::atomic::Ordering;
use std::sync::Arc;

mod support;

use es_core::doc_support::counter::{Counter, CounterCommand, CounterEvent};
use es_core::{
    EventStore, InMemoryEventStore, InMemorySnapshotStore, Metadata, Repository, RepositoryError,
    RetryPolicy, Snapshot, SnapshotPolicy, SnapshotStore, StreamId,
};
use support::Interloper;
use uuid::Uuid;

fn inc(by: u32) -> CounterCommand {
    CounterCommand::Increment { by }
}

/// A counter whose every command [creates](es_core::Aggregate::creates) it,
/// on the counter's streams, recording each state it decides on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Fresh(Counter);

/// An increment, and where [`Fresh`] records the states it decided on.
#[derive(Clone, Debug)]
struct Observed {
    by: u32,
    seen: Arc<std::sync::Mutex<Vec<Counter>>>,
}

impl Observed {
    fn new(by: u32) -> Self {
        Self {
            by,
            seen: Arc::default(),
        }
    }

    /// The state of the last decision.
    fn last(&self) -> Option<Counter> {
        self.seen.lock().unwrap().last().cloned()
    }
}

impl es_core::Aggregate for Fresh {
    type Event = CounterEvent;
    type Command = Observed;
    type Error = es_core::doc_support::counter::CounterError;
    const TYPE: &'static str = "counter";

    fn apply(&mut self, event: &CounterEvent) {
        self.0.apply(event);
    }

    fn handle(&self, command: Observed) -> Result<Vec<CounterEvent>, Self::Error> {
        command.seen.lock().unwrap().push(self.0.clone());
        self.0.handle(inc(command.by))
    }

    fn creates(_command: &Observed) -> bool {
        true
    }
}

#[tokio::test]
async fn executes_and_loads_with_metadata_on_every_event() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Counter>::new(store.clone());
    let correlation = Uuid::now_v7();
    let meta = Metadata::new()
        .with_correlation_id(correlation)
        .with_causation_id(Uuid::now_v7());
    let first = repo.execute("c1", inc(2), &meta).await.unwrap();
    assert_eq!(
        (first.stream_version, first.events.len(), first.duplicate),
        (1, 1, false)
    );
    repo.execute("c1", inc(3), &meta).await.unwrap();
    let loaded = repo.load("c1").await.unwrap();
    assert_eq!((loaded.state.value, loaded.version), (5, 2));
    let stream = StreamId::new("counter-c1").unwrap();
    let stored = store.read_stream(&stream, 1, 10).await.unwrap();
    assert!(stored.iter().all(|e| e.metadata == meta));
    assert!(matches!(
        repo.execute("c1", inc(0), &meta).await,
        Err(RepositoryError::Rejected(_))
    ));
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        2,
        "a rejected command wrote"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_on_one_aggregate_all_land_through_retries() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Counter>::new(store.clone()).with_retry(RetryPolicy {
        max_attempts: 1_000,
        ..RetryPolicy::default()
    });
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let repo = repo.clone();
            tokio::spawn(async move {
                for _ in 0..25 {
                    repo.execute("hot", inc(1), &Metadata::new()).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let loaded = repo.load("hot").await.unwrap();
    assert_eq!((loaded.state.value, loaded.version), (200, 200));
}

#[tokio::test]
async fn a_lost_race_is_decided_again_or_reported_as_contention() {
    let store = Arc::new(Interloper::new(true, None));
    let repo = Repository::<Counter>::new(store.clone());
    let mut decisions = 0;
    repo.execute_with("r", &Metadata::new(), None, |state| {
        decisions += 1;
        Ok(vec![CounterEvent::Incremented {
            by: state.value as u32 + 1,
        }])
    })
    .await
    .unwrap();
    assert_eq!(
        decisions, 2,
        "the command was not decided again on the new state"
    );
    assert_eq!(repo.load("r").await.unwrap().state.value, 100 + 101);

    store.armed.store(true, Ordering::SeqCst);
    let strict = Repository::<Counter>::new(store.clone()).with_retry(RetryPolicy::none());
    match strict.execute("r", inc(1), &Metadata::new()).await {
        Err(RepositoryError::Contention { attempts: 1, .. }) => {}
        other => panic!("expected contention, got {other:?}"),
    }
}

#[tokio::test]
async fn execute_once_applies_a_command_id_once() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Counter>::new(store.clone());
    let command_id = Uuid::now_v7();
    let first = repo
        .execute_once("o", command_id, inc(5), &Metadata::new())
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = repo
        .execute_once("o", command_id, inc(5), &Metadata::new())
        .await
        .unwrap();
    assert!(again.duplicate && again.events.is_empty());
    assert_eq!(repo.load("o").await.unwrap().state.value, 5);
    // The same command id on another aggregate is another command.
    repo.execute_once("p", command_id, inc(1), &Metadata::new())
        .await
        .unwrap();
    assert_eq!(repo.load("p").await.unwrap().state.value, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_executions_of_one_command_id_write_once() {
    // The decision is not deterministic (think of a clock reading in the
    // event): the losers must still answer "duplicate", not fail.
    for round in 0..20 {
        // Every execution loads before any appends: they all race.
        let store = Arc::new(Interloper::new(
            false,
            Some(std::time::Duration::from_millis(5)),
        ));
        let repo = Repository::<Counter>::new(store.clone());
        let command_id = Uuid::now_v7();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let repo = repo.clone();
                tokio::spawn(async move {
                    repo.execute_with("same", &Metadata::new(), Some(command_id), |_| {
                        Ok(vec![CounterEvent::Incremented {
                            by: fastrand::u32(1..1_000_000),
                        }])
                    })
                    .await
                })
            })
            .collect();
        let mut written = 0;
        for task in tasks {
            let committed = task
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            written += usize::from(!committed.duplicate);
        }
        assert_eq!(written, 1, "round {round}");
        assert_eq!(repo.load("same").await.unwrap().version, 1);
    }
}

#[tokio::test]
async fn snapshots_by_policy_give_the_same_state() {
    // Never armed: it only records what `read_stream` is asked for.
    let store = Arc::new(Interloper::new(false, None));
    let snapshots = Arc::new(InMemorySnapshotStore::new());
    let repo = Repository::<Counter>::new(store.clone()).with_snapshots(
        snapshots.clone(),
        SnapshotPolicy::Every(10),
        1,
    );
    for i in 1..=25 {
        repo.execute("s", inc(i), &Metadata::new()).await.unwrap();
    }
    let stream = StreamId::new("counter-s").unwrap();
    let snap = snapshots.load(&stream).await.unwrap().expect("a snapshot");
    assert_eq!(snap.version, 20);
    let reset = || {
        store.read.store(0, Ordering::SeqCst);
        store.reads_from.lock().unwrap().clear();
    };
    let read_since_reset = || {
        (
            store.reads_from.lock().unwrap().clone(),
            store.read.load(Ordering::SeqCst),
        )
    };

    // With the snapshot, only the tail after version 20 is read.
    reset();
    let with = repo.load("s").await.unwrap();
    assert_eq!(read_since_reset(), (vec![21], 5));
    reset();
    let without = Repository::<Counter>::new(store.clone())
        .load("s")
        .await
        .unwrap();
    assert_eq!(read_since_reset(), (vec![1], 25));
    assert_eq!(with, without);
    assert_eq!(with.state.value, (1..=25).sum::<u64>());

    // A snapshot of another schema version, or one that does not decode, is
    // ignored: the whole stream is read instead.
    snapshots
        .save(Snapshot {
            stream_id: stream.clone(),
            version: 24,
            schema_version: 1,
            state: es_core::Payload::from_json(r#"{"wrong":true}"#).unwrap(),
        })
        .await
        .unwrap();
    reset();
    assert_eq!(repo.load("s").await.unwrap(), without);
    assert_eq!(read_since_reset(), (vec![1], 25));
    let v2 = Repository::<Counter>::new(store.clone()).with_snapshots(
        snapshots,
        SnapshotPolicy::Every(10),
        2,
    );
    reset();
    assert_eq!(v2.load("s").await.unwrap(), without);
    assert_eq!(read_since_reset(), (vec![1], 25));
}

#[tokio::test]
async fn a_state_cache_reads_only_the_tail_and_sees_other_writers() {
    // Never armed: it only counts what `read_stream` hands out.
    let store = Arc::new(Interloper::new(false, None));
    let cached = Repository::<Counter>::new(store.clone()).with_state_cache(16);
    let other = Repository::<Counter>::new(store.clone());
    for i in 1..=100 {
        cached
            .execute("long", inc(i), &Metadata::new())
            .await
            .unwrap();
    }
    // The first command read nothing (a new stream), and so did every later
    // one: each started from the state the previous one left.
    assert_eq!(store.read.load(Ordering::SeqCst), 0);

    // Another writer appends; the cached repository reads just those events
    // and decides on the up-to-date state.
    for _ in 0..3 {
        other
            .execute("long", inc(1000), &Metadata::new())
            .await
            .unwrap();
    }
    store.read.store(0, Ordering::SeqCst);
    let mut seen = 0;
    cached
        .execute_with("long", &Metadata::new(), None, |state| {
            seen = state.value;
            Ok(vec![CounterEvent::Incremented { by: 1 }])
        })
        .await
        .unwrap();
    assert_eq!(seen, (1..=100).sum::<u64>() + 3000);
    assert_eq!(
        store.read.load(Ordering::SeqCst),
        3,
        "read more than the tail"
    );

    // A rejected command leaves the cached state usable.
    assert!(matches!(
        cached.execute("long", inc(0), &Metadata::new()).await,
        Err(RepositoryError::Rejected(_))
    ));
    let after = cached
        .execute("long", inc(1), &Metadata::new())
        .await
        .unwrap();
    assert_eq!(after.stream_version, 105);
    assert_eq!(
        cached.load("long").await.unwrap(),
        other.load("long").await.unwrap()
    );
    // `load` left the cached state in place.
    store.read.store(0, Ordering::SeqCst);
    cached
        .execute("long", inc(1), &Metadata::new())
        .await
        .unwrap();
    assert_eq!(store.read.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_cached_state_is_decided_on_unread_and_checked_by_the_append() {
    let store = Arc::new(Interloper::new(false, None));
    let cached = Repository::<Counter>::new(store.clone()).with_state_cache(16);
    let other = Repository::<Counter>::new(store.clone());
    let first = Uuid::now_v7();
    cached
        .execute_once("c", first, inc(1), &Metadata::new())
        .await
        .unwrap();
    // The first command read the (empty) stream; on the cached state
    // `execute_once` reads nothing.
    assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    cached
        .execute_once("c", Uuid::now_v7(), inc(2), &Metadata::new())
        .await
        .unwrap();
    assert_eq!(store.reads.load(Ordering::SeqCst), 1);

    // A command id whose events the cached state holds already: the cached
    // decision appends the same derived ids, which the store refuses, so it
    // is a duplicate, still unread.
    let again = cached
        .execute_once("c", first, inc(1), &Metadata::new())
        .await
        .unwrap();
    assert!(again.duplicate && again.events.is_empty(), "{again:?}");
    assert_eq!(again.stream_version, 2);
    assert_eq!(store.reads.load(Ordering::SeqCst), 1);

    // Another writer appends: the append expecting the cached version fails,
    // and the command reads the tail after it and is decided again there.
    other.execute("c", inc(10), &Metadata::new()).await.unwrap();
    store.reads_from.lock().unwrap().clear();
    let mut decided_on = Vec::new();
    let after = cached
        .execute_with("c", &Metadata::new(), None, |state| {
            decided_on.push(state.value);
            Ok(vec![CounterEvent::Incremented { by: 1 }])
        })
        .await
        .unwrap();
    assert_eq!(decided_on, vec![3, 13]);
    assert_eq!(after.stream_version, 4);
    assert_eq!(*store.reads_from.lock().unwrap(), vec![3]);

    // A refusal decided on the cached state is confirmed on the tail first.
    other
        .execute("c", inc(100), &Metadata::new())
        .await
        .unwrap();
    store.reads_from.lock().unwrap().clear();
    let mut refused_on = Vec::new();
    let refused = cached
        .execute_with("c", &Metadata::new(), None, |state| {
            refused_on.push(state.value);
            if state.value < 100 {
                Err(es_core::doc_support::counter::CounterError::ZeroStep)
            } else {
                Ok(vec![CounterEvent::Incremented { by: 1 }])
            }
        })
        .await
        .unwrap();
    assert_eq!(refused_on, vec![14, 114], "a cached refusal was final");
    assert_eq!(refused.stream_version, 6);
    assert_eq!(*store.reads_from.lock().unwrap(), vec![5]);
    assert_eq!(
        cached.load("c").await.unwrap(),
        other.load("c").await.unwrap()
    );
}

#[tokio::test]
async fn a_command_id_hidden_behind_a_snapshot_is_still_a_duplicate() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Counter>::new(store.clone())
        .with_snapshots(
            Arc::new(InMemorySnapshotStore::new()),
            SnapshotPolicy::Every(2),
            1,
        )
        .with_state_cache(8);
    let command_id = Uuid::now_v7();
    repo.execute_once("hidden", command_id, inc(5), &Metadata::new())
        .await
        .unwrap();
    for _ in 0..4 {
        repo.execute("hidden", inc(1), &Metadata::new())
            .await
            .unwrap();
    }
    // The snapshot (version 4) hides the command's event (version 1) from the
    // load: the store's event ids still tell.
    let again = repo
        .execute_once("hidden", command_id, inc(5), &Metadata::new())
        .await
        .unwrap();
    assert!(again.duplicate && again.events.is_empty());
    assert_eq!(again.stream_version, 5);
    assert_eq!(repo.load("hidden").await.unwrap().state.value, 9);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever mix of writers (cached, uncached, a tiny cache that evicts,
    /// commands with ids, refused commands), the decision a cached repository
    /// returns or writes was taken on exactly the state a full load gives.
    #[test]
    fn cached_decisions_see_the_state_a_full_load_gives(
        ops in proptest::collection::vec((0u8..5, 0u8..3, 0u32..4), 1..60)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let store = Arc::new(InMemoryEventStore::new());
            let cached = Repository::<Counter>::new(store.clone()).with_state_cache(64);
            let tiny = Repository::<Counter>::new(store.clone()).with_state_cache(1);
            let plain = Repository::<Counter>::new(store.clone());
            let guessing = Repository::<Fresh>::new(store.clone());
            for (writer, aggregate, by) in ops {
                let id = format!("a{aggregate}");
                let expected = plain.load(&id).await.unwrap();
                if writer == 4 {
                    // `execute` of a command that creates the aggregate:
                    // decided on the empty state unread, and again on the
                    // stream as read when that guess was wrong.
                    let command = Observed::new(by);
                    let result = guessing.execute(&id, command.clone(), &Metadata::new()).await;
                    assert_eq!(command.last(), Some(expected.state.clone()));
                    match result {
                        Ok(c) => assert_eq!(c.stream_version, expected.version + 1),
                        Err(RepositoryError::Rejected(_)) => assert_eq!(by, 0),
                        Err(e) => panic!("{e}"),
                    }
                    continue;
                }
                let repo = match writer { 0 => &cached, 1 => &tiny, _ => &plain };
                let mut seen = None;
                let result = repo
                    .execute_with(&id, &Metadata::new(), (writer == 3).then(Uuid::now_v7), |state| {
                        seen = Some(state.clone());
                        if by == 0 {
                            Err(es_core::doc_support::counter::CounterError::ZeroStep)
                        } else {
                            Ok(vec![CounterEvent::Incremented { by }])
                        }
                    })
                    .await;
                assert_eq!(seen.as_ref(), Some(&expected.state));
                match result {
                    Ok(c) => assert_eq!(c.stream_version, expected.version + 1),
                    Err(RepositoryError::Rejected(_)) => assert_eq!(by, 0),
                    Err(e) => panic!("{e}"),
                }
            }
        });
    }
}

#[tokio::test]
async fn create_appends_without_reading_and_falls_back_when_the_stream_exists() {
    let store = Arc::new(Interloper::new(false, None));
    let repo = Repository::<Counter>::new(store.clone());
    let new = repo
        .create("fresh", inc(2), &Metadata::new())
        .await
        .unwrap();
    assert_eq!((new.stream_version, new.events.len()), (1, 1));
    assert_eq!(store.reads.load(Ordering::SeqCst), 0, "create read first");

    // The stream exists: the command is decided on the loaded state, as by
    // `execute`, after one read.
    let again = repo
        .create("fresh", inc(3), &Metadata::new())
        .await
        .unwrap();
    assert_eq!((again.stream_version, again.duplicate), (2, false));
    assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    assert_eq!(repo.load("fresh").await.unwrap().state.value, 5);
    // A refusal on the guessed empty state is not final: it is decided again
    // on the stream as it is (which refuses too, here).
    let reads = store.reads.load(Ordering::SeqCst);
    assert!(matches!(
        repo.create("fresh", inc(0), &Metadata::new()).await,
        Err(RepositoryError::Rejected(_))
    ));
    assert_eq!(
        store.reads.load(Ordering::SeqCst),
        reads + 1,
        "refused unread"
    );
    let stream = StreamId::new("counter-fresh").unwrap();
    assert_eq!(store.stream_version(&stream).await.unwrap(), 2);
}

#[tokio::test]
async fn execute_decides_a_creating_command_unread_and_reads_once_when_the_stream_exists() {
    let store = Arc::new(Interloper::new(false, None));
    let repo = Repository::<Fresh>::new(store.clone());
    let first = Observed::new(2);
    let new = repo
        .execute("new", first.clone(), &Metadata::new())
        .await
        .unwrap();
    assert_eq!(new.stream_version, 1);
    assert_eq!(store.reads.load(Ordering::SeqCst), 0, "execute read first");
    assert_eq!(first.seen.lock().unwrap().len(), 1);

    // Wrong guess: nothing written on it, one read, decided again.
    let second = Observed::new(3);
    let again = repo
        .execute("new", second.clone(), &Metadata::new())
        .await
        .unwrap();
    assert_eq!(again.stream_version, 2);
    assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    assert_eq!(
        *second.seen.lock().unwrap(),
        vec![Counter::default(), Counter { value: 2 }]
    );
    // Counter's own commands do not create it: they read first.
    Repository::<Counter>::new(store.clone())
        .execute("other", inc(1), &Metadata::new())
        .await
        .unwrap();
    assert_eq!(store.reads.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn create_once_answers_a_repeated_command_id_as_a_duplicate() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Counter>::new(store.clone());
    let command_id = Uuid::now_v7();
    let first = repo
        .create_once("o", command_id, inc(5), &Metadata::new())
        .await
        .unwrap();
    assert!(!first.duplicate && first.events.len() == 1);
    // The stream holds exactly the command's events: the store's idempotent
    // re-append answers.
    let again = repo
        .create_once("o", command_id, inc(5), &Metadata::new())
        .await
        .unwrap();
    assert!(again.duplicate && again.events.is_empty(), "{again:?}");
    // The stream went on since: the load after the wrong guess finds the id.
    repo.execute("o", inc(1), &Metadata::new()).await.unwrap();
    let late = repo
        .create_once("o", command_id, inc(5), &Metadata::new())
        .await
        .unwrap();
    assert!(late.duplicate && late.events.is_empty(), "{late:?}");
    let loaded = repo.load("o").await.unwrap();
    assert_eq!((loaded.state.value, loaded.version), (6, 2));
}

/// A stream longer than the repository reads at once (4,096 events) loads
/// whole, and so does one that ends exactly where a read does; a command then
/// continues its version.
#[tokio::test]
async fn a_stream_longer_than_a_read_loads_whole() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Counter>::new(store.clone());
    let codec = es_core::EventCodec::<CounterEvent>::new();
    for (id, len) in [("exact", 4_096u64), ("long", 2 * 4_096 + 3)] {
        let stream = StreamId::new(format!("counter-{id}")).unwrap();
        let events = (0..len)
            .map(|_| {
                codec
                    .encode(&CounterEvent::Incremented { by: 1 }, Metadata::new())
                    .unwrap()
            })
            .collect();
        store
            .append(&stream, es_core::ExpectedVersion::NoStream, events)
            .await
            .unwrap();
        let loaded = repo.load(id).await.unwrap();
        assert_eq!((loaded.state.value, loaded.version), (len, len));
        let next = repo.execute(id, inc(2), &Metadata::new()).await.unwrap();
        assert_eq!(next.stream_version, len + 1);
        assert_eq!(repo.load(id).await.unwrap().state.value, len + 2);
    }
}

/// An event the aggregate's codec cannot read fails the load with a codec
/// error, however far into the stream it stands, and a command on that
/// aggregate writes nothing.
#[tokio::test]
async fn an_undecodable_event_fails_the_load_as_a_codec_error() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Counter>::new(store.clone());
    let stream = StreamId::new("counter-bad").unwrap();
    let codec = es_core::EventCodec::<CounterEvent>::new();
    let mut events: Vec<_> = (0..5_000)
        .map(|_| {
            codec
                .encode(&CounterEvent::Incremented { by: 1 }, Metadata::new())
                .unwrap()
        })
        .collect();
    events[4_500] = es_core::NewEvent::new(
        "Incremented",
        1,
        es_core::Payload::from_json(r#"{"by":"not a number"}"#).unwrap(),
        Metadata::new(),
    );
    store
        .append(&stream, es_core::ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    assert!(matches!(
        repo.load("bad").await,
        Err(RepositoryError::Codec(_))
    ));
    assert!(matches!(
        repo.execute("bad", inc(1), &Metadata::new()).await,
        Err(RepositoryError::Codec(_))
    ));
    assert_eq!(store.stream_version(&stream).await.unwrap(), 5_000);
}
