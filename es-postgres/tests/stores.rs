//! Snapshots, checkpoints (in the caller's transaction, with or without a
//! notification), the inbox, the hold-back metric, live subscriptions across
//! stores and lost connections, es-core's repository creating aggregates on
//! PostgreSQL, and a replica on PostgreSQL fed by relayed messages.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

use std::time::Duration;

use es_core::doc_support::counter::{Counter, CounterCommand};
use es_core::testing::conformance::{event, events, unique_stream};
use es_core::{
    CheckpointStore, EventStore, ExpectedVersion, Inbox, Metadata, Payload, Position, Repository,
    Snapshot, SnapshotStore,
};
use es_postgres::{PgCheckpointStore, PgEventStore, PgInbox, PgSnapshotStore};
use futures::StreamExt;
use sqlx::Connection;
use uuid::Uuid;

#[tokio::test]
async fn snapshots_keep_the_newest() {
    let (pool, schema) = es_postgres::testing::fresh_schema().await;
    let snapshots = PgSnapshotStore::new(pool, &schema);
    let stream = unique_stream("snap");
    assert_eq!(snapshots.load(&stream).await.unwrap(), None);
    let at = |version, state: &str| Snapshot {
        stream_id: stream.clone(),
        version,
        schema_version: 2,
        state: Payload::from_json(state.to_owned()).unwrap(),
    };
    snapshots.save(at(10, r#"{"n":10}"#)).await.unwrap();
    snapshots.save(at(5, r#"{"n":5}"#)).await.unwrap();
    let loaded = snapshots.load(&stream).await.unwrap().unwrap();
    assert_eq!((loaded.version, loaded.schema_version), (10, 2));
    assert!(loaded
        .state
        .json_eq(&Payload::from_json(r#"{"n":10}"#).unwrap()));
    snapshots.save(at(20, r#"{"n":20}"#)).await.unwrap();
    assert_eq!(snapshots.load(&stream).await.unwrap().unwrap().version, 20);
    let bad = Snapshot {
        state: Payload::from_trusted_json("{oops"),
        ..at(30, "{}")
    };
    assert!(snapshots.save(bad).await.is_err());
    assert_eq!(snapshots.load(&stream).await.unwrap().unwrap().version, 20);
}

#[tokio::test]
async fn checkpoints_commit_with_the_callers_transaction() {
    let (pool, schema) = es_postgres::testing::fresh_schema().await;
    let checkpoints = PgCheckpointStore::new(pool.clone(), &schema);
    assert_eq!(checkpoints.load("p").await.unwrap(), None);
    checkpoints.save("p", Position::new(7, 3)).await.unwrap();
    assert_eq!(
        checkpoints.load("p").await.unwrap(),
        Some(Position::new(7, 3))
    );

    let mut conn = pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    checkpoints
        .save_in_tx(&mut tx, "p", Position::new(9, 1))
        .await
        .unwrap();
    assert_eq!(
        checkpoints.load_in_tx(&mut tx, "p").await.unwrap(),
        Some(Position::new(9, 1))
    );
    tx.rollback().await.unwrap();
    assert_eq!(
        checkpoints.load("p").await.unwrap(),
        Some(Position::new(7, 3))
    );

    let mut tx = conn.begin().await.unwrap();
    checkpoints
        .save_in_tx(&mut tx, "p", Position::new(9, 2))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        checkpoints.load("p").await.unwrap(),
        Some(Position::new(9, 2))
    );
    assert!(checkpoints
        .save("p", Position::new(u64::MAX, 0))
        .await
        .is_err());
}

/// A checkpoint saved with its notification: the listener hears it when the
/// transaction commits (for a new checkpoint and for a moved one), and not
/// at all when it rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_saved_notifying_is_heard_when_it_commits() {
    let (pool, schema) = es_postgres::testing::fresh_schema().await;
    let checkpoints = PgCheckpointStore::new(pool.clone(), &schema);
    let channel = format!("{schema}_checkpoints");
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen(&channel).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();

    for (position, payload) in [
        (Position::new(4, 1), "p 4.1"),
        (Position::new(5, 0), "p 5.0"),
    ] {
        let mut tx = conn.begin().await.unwrap();
        checkpoints
            .save_in_tx_notifying(&mut tx, "p", position, &channel, payload)
            .await
            .unwrap();
        // Nothing is delivered before the commit.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), listener.recv())
                .await
                .is_err()
        );
        tx.commit().await.unwrap();
        let note = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(note.payload(), payload);
        assert_eq!(checkpoints.load("p").await.unwrap(), Some(position));
    }

    let mut tx = conn.begin().await.unwrap();
    checkpoints
        .save_in_tx_notifying(&mut tx, "p", Position::new(6, 0), &channel, "p 6.0")
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), listener.recv())
            .await
            .is_err()
    );
    assert_eq!(
        checkpoints.load("p").await.unwrap(),
        Some(Position::new(5, 0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_records_once() {
    let (pool, schema) = es_postgres::testing::fresh_schema().await;
    let inbox = PgInbox::new(pool.clone(), &schema);
    let id = Uuid::now_v7();
    assert!(!inbox.contains("c", id).await.unwrap());
    assert!(inbox.record("c", id).await.unwrap());
    assert!(!inbox.record("c", id).await.unwrap());
    assert!(inbox.contains("c", id).await.unwrap());
    assert!(
        inbox.record("other", id).await.unwrap(),
        "consumers are separate"
    );

    // Forgotten: recorded again, for that consumer only.
    assert!(inbox.forget("c", id).await.unwrap());
    assert!(!inbox.forget("c", id).await.unwrap());
    assert!(!inbox.contains("c", id).await.unwrap());
    assert!(inbox.contains("other", id).await.unwrap());
    assert!(inbox.record("c", id).await.unwrap());

    // Rolled back: not recorded.
    let id = Uuid::now_v7();
    let mut conn = pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    assert!(inbox.record_in_tx(&mut tx, "c", id).await.unwrap());
    assert!(inbox.contains_in_tx(&mut tx, "c", id).await.unwrap());
    tx.rollback().await.unwrap();
    assert!(!inbox.contains("c", id).await.unwrap());

    // Two concurrent transactions: exactly one records it.
    let mut handles = Vec::new();
    for _ in 0..2 {
        let pool = pool.clone();
        let inbox = inbox.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            let mut tx = conn.begin().await.unwrap();
            let first = inbox.record_in_tx(&mut tx, "c", id).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.commit().await.unwrap();
            first
        }));
    }
    let mut firsts = 0;
    for h in handles {
        firsts += usize::from(h.await.unwrap());
    }
    assert_eq!(firsts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holdback_reports_the_open_writer() {
    let (pool, schema) = es_postgres::testing::fresh_schema().await;
    let store = PgEventStore::new(pool.clone(), schema).with_read_wait(Duration::from_millis(20));
    let mut conn = pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx)
        .await
        .unwrap();
    store
        .append(&unique_stream("h"), ExpectedVersion::NoStream, events(0, 3))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let held = store.holdback().await.unwrap();
    assert_eq!(held.events_held_back, 3, "{held:?}");
    assert!(held.xids_in_flight() >= 1);
    assert!(held.oldest_writer_age.is_some(), "{held:?}");
    // The oldest writer is ours, unless another session's transaction
    // (another test's) is older than ours: then it must be that one.
    let oldest = held.oldest_writer_pid.expect("the oldest writer's pid");
    if oldest != pid {
        let (ours, theirs): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT backend_xid::text::bigint FROM pg_stat_activity WHERE pid = $1),
                    (SELECT backend_xid::text::bigint FROM pg_stat_activity WHERE pid = $2)",
        )
        .bind(pid)
        .bind(oldest)
        .fetch_one(&pool)
        .await
        .unwrap();
        let ours = ours.expect("our transaction has an id");
        // A writer that has ended meanwhile can no longer be compared.
        assert!(
            theirs.is_none_or(|theirs| theirs <= ours),
            "{oldest} (xid {theirs:?}) reported as older than ours, {pid} (xid {ours})"
        );
    }
    assert!(store
        .read_all(Position::START, 10)
        .await
        .unwrap()
        .is_empty());
    tx.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if store.holdback().await.unwrap().events_held_back == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still held back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.read_all(Position::START, 10).await.unwrap().len(), 3);
}

/// A subscriber in one store is woken by appends of another store (another
/// process) through NOTIFY, also after its LISTEN connection was killed.
/// Polling is set to a minute, so only a wake-up can deliver in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_other_processes_and_survives_a_dropped_connection() {
    let (pool, schema) = es_postgres::testing::fresh_schema().await;
    let reader =
        PgEventStore::new(pool.clone(), schema.clone()).with_poll_interval(Duration::from_secs(60));
    let writer = PgEventStore::new(pool.clone(), schema);
    let mut sub = reader.subscribe_all(Position::START);
    // Let the listener connect.
    let listen = format!("LISTEN \"{}\"%", reader.channel());
    let find_listener = || {
        let pool = pool.clone();
        let listen = listen.clone();
        async move {
            for _ in 0..200 {
                let pid: Option<i32> = sqlx::query_scalar(
                    "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
                )
                .bind(&listen)
                .fetch_optional(&pool)
                .await
                .unwrap();
                if let Some(pid) = pid {
                    return pid;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let all: Vec<(i32, Option<String>, Option<String>)> =
                sqlx::query_as("SELECT pid, state, query FROM pg_stat_activity")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            panic!("the listener never connected: {listen} {all:#?}");
        }
    };
    let first_pid = find_listener().await;
    let e = event(1);
    let id = e.event_id;
    writer
        .append(&unique_stream("n"), ExpectedVersion::NoStream, vec![e])
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.event_id, id);

    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first_pid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);
    let e = event(2);
    let id = e.event_id;
    writer
        .append(&unique_stream("n"), ExpectedVersion::NoStream, vec![e])
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.event_id, id);
    let second_pid = find_listener().await;
    assert_ne!(first_pid, second_pid, "the listener reconnected");
    let e = event(3);
    let id = e.event_id;
    writer
        .append(&unique_stream("n"), ExpectedVersion::NoStream, vec![e])
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.event_id, id);
}

/// Polling alone (no NOTIFY) still delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_fallback_without_notify() {
    let (pool, schema) = es_postgres::testing::fresh_schema().await;
    let reader = PgEventStore::new(pool.clone(), schema.clone())
        .with_poll_interval(Duration::from_millis(50));
    let writer = PgEventStore::new(pool, schema).with_notify(false);
    let mut sub = reader.subscribe_all(Position::START);
    let e = event(1);
    let id = e.event_id;
    writer
        .append(&unique_stream("p"), ExpectedVersion::NoStream, vec![e])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.event_id, id);
}

async fn next(
    sub: &mut futures::stream::BoxStream<
        'static,
        Result<es_core::RecordedEvent, es_core::StoreError>,
    >,
) -> es_core::RecordedEvent {
    tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("no wake-up arrived")
        .expect("ended")
        .expect("failed")
}

/// `create` guesses that the stream is new; PostgreSQL's answers (a typed
/// version conflict, an idempotent re-append) decide what happens next.
#[tokio::test]
async fn repository_create_on_postgres() {
    let store = std::sync::Arc::new(es_postgres::testing::fresh_store().await);
    let repo = Repository::<Counter>::new(store.clone());
    let inc = |by| CounterCommand::Increment { by };
    let meta = Metadata::new();
    let id = Uuid::now_v7();
    let first = repo.create(id, inc(2), &meta).await.unwrap();
    assert_eq!((first.stream_version, first.duplicate), (1, false));
    // The stream exists: the conflict makes it load and decide on version 1.
    let second = repo.create(id, inc(3), &meta).await.unwrap();
    assert_eq!((second.stream_version, second.duplicate), (2, false));
    assert_eq!(repo.load(id).await.unwrap().state.value, 5);

    let command_id = Uuid::now_v7();
    let other = Uuid::now_v7();
    let placed = repo
        .create_once(other, command_id, inc(7), &meta)
        .await
        .unwrap();
    assert!(!placed.duplicate);
    // Same command again: PostgreSQL answers the same ids at the same
    // positions as an idempotent success.
    let again = repo
        .create_once(other, command_id, inc(7), &meta)
        .await
        .unwrap();
    assert!(again.duplicate && again.events.is_empty(), "{again:?}");
    // After the stream went on: the load after the conflict finds the id.
    repo.execute(other, inc(1), &meta).await.unwrap();
    let late = repo
        .create_once(other, command_id, inc(7), &meta)
        .await
        .unwrap();
    assert!(late.duplicate && late.events.is_empty(), "{late:?}");
    let stream = repo.stream_id(other).unwrap();
    assert_eq!(store.stream_version(&stream).await.unwrap(), 2);
    assert_eq!(repo.load(other).await.unwrap().state.value, 8);
}

#[tokio::test]
async fn a_replica_on_postgres_copies_a_stream_whatever_the_delivery_order() {
    use es_core::replica::{with_source, ReplicaHandler, Source};
    use es_core::{relay::default_route, InMemoryEventStore, Message, Outcome};
    let replica = std::sync::Arc::new(es_postgres::testing::fresh_store().await);
    let source = InMemoryEventStore::new();
    let stream = unique_stream("replicated");
    source
        .append(&stream, ExpectedVersion::NoStream, events(1, 3))
        .await
        .unwrap();
    let recorded = source.read_stream(&stream, 1, 10).await.unwrap();
    let route = with_source(std::sync::Arc::new(default_route), &["replicated"]);
    let messages: Vec<Message> = recorded.iter().filter_map(|e| route(e)).collect();
    let handler = ReplicaHandler::new(replica.clone());
    // The last before the others: it waits for its predecessor.
    assert!(matches!(
        handler.replicate(&messages[2]).await,
        Outcome::Retry { .. }
    ));
    for m in &messages {
        assert_eq!(handler.replicate(m).await, Outcome::Ack);
    }
    // A redelivery after the stream moved past it is a duplicate.
    assert_eq!(handler.replicate(&messages[0]).await, Outcome::Ack);
    // Another payload in the same place: the copies diverged.
    let mut changed = messages[1].clone();
    changed.payload = Payload::from_json(r#"{"n":99}"#).unwrap();
    assert!(matches!(
        handler.replicate(&changed).await,
        Outcome::DeadLetter { .. }
    ));
    let copy = replica.read_stream(&stream, 1, 10).await.unwrap();
    assert_eq!(copy.len(), 3);
    for (got, want) in copy.iter().zip(&recorded) {
        assert_eq!(
            (got.event_id, got.stream_version),
            (want.event_id, want.stream_version)
        );
        assert!(got.payload.json_eq(&want.payload));
        assert_eq!(Source::of_event(got), Some(Source::of_recorded(want)));
    }
}

/// Two subscribers of one store, each in its own task, woken by the same
/// appends: every event reaches both, and a read of the log answers both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_woken_together_share_their_reads() {
    let (pool, schema) = es_postgres::testing::fresh_schema().await;
    // No polling in the test's time: only the appends wake them.
    let store = PgEventStore::new(pool, schema).with_poll_interval(Duration::from_secs(60));
    let follow = |store: &PgEventStore| {
        let mut log = store.subscribe_all(Position::START);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = log.next().await {
                if tx.send(event.unwrap().event_id).is_err() {
                    return;
                }
            }
        });
        rx
    };
    let (mut a, mut b) = (follow(&store), follow(&store));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = store.log_reads();
    const APPENDS: u64 = 40;
    for _ in 0..APPENDS {
        let appended = events(0, 1);
        let id = appended[0].event_id;
        store
            .append(
                &unique_stream("shared"),
                ExpectedVersion::NoStream,
                appended,
            )
            .await
            .unwrap();
        for rx in [&mut a, &mut b] {
            let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap();
            assert_eq!(got, Some(id));
        }
    }
    let reads = store.log_reads() - before;
    // Unshared, each subscriber reads at least once per append (76 reads
    // were measured for the two before reads were shared).
    assert!(
        reads <= APPENDS + APPENDS / 4,
        "{reads} reads for {APPENDS} appends followed by two subscribers"
    );
}
