//! The global log never skips an event committed late by a slow writer.
//!
//! Two deterministic interleavings reproduce the two ways a reader loses
//! events, and a many-writer torture test shows a naive `position > last`
//! reader (and an xmin-filtered reader with a position-only cursor) skipping
//! events while `read_all`/`subscribe_all` see every one, in order.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use es_core::testing::conformance::{event, next_event, unique_stream, whole_log};
use es_core::{EventStore, ExpectedVersion, Position, RecordedEvent};
use es_postgres::PgEventStore;
use sqlx::{Connection, PgPool};
use uuid::Uuid;

/// The store (waiting up to 10 s for events held back by other sessions'
/// transactions, so reads that must see everything do) and its pool.
async fn store() -> (PgEventStore, PgPool) {
    let (pool, schema) = es_postgres::testing::fresh_schema().await;
    let store = PgEventStore::new(pool.clone(), schema)
        .with_read_wait(Duration::from_secs(10))
        .with_poll_interval(Duration::from_millis(100));
    (store, pool)
}

/// A handle on the same schema that does not wait for held-back events.
fn impatient(store: &PgEventStore) -> PgEventStore {
    PgEventStore::new(store.pool().clone(), store.schema().to_owned())
        .with_read_wait(Duration::from_millis(50))
}

/// A reader that follows `global_position > last` (no xmin filter).
async fn naive_read(store: &PgEventStore, after: i64) -> Vec<(i64, Uuid)> {
    sqlx::query_as(&format!(
        "SELECT global_position, event_id FROM \"{}\".events WHERE global_position > $1 \
         ORDER BY global_position",
        store.schema()
    ))
    .bind(after)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// A reader that filters by xmin but keeps a position-only cursor.
async fn xmin_position_read(store: &PgEventStore, after: i64) -> Vec<(i64, Uuid)> {
    sqlx::query_as(&format!(
        "SELECT global_position, event_id FROM \"{}\".events WHERE global_position > $1 \
         AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())::text::bigint \
         ORDER BY global_position",
        store.schema()
    ))
    .bind(after)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// Writer A takes a position and stays open; writer B takes a later position
/// and commits. A naive reader sees B, moves its cursor past A's position and
/// never sees A. The store holds B back until A commits, then yields A, B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_of_a_lower_position_is_not_skipped() {
    let (store, pool) = store().await;
    let mut sub = store.subscribe_all(Position::START);

    let mut a = pool.acquire().await.unwrap();
    let mut tx_a = a.begin().await.unwrap();
    let ea = event(1);
    let a_id = ea.event_id;
    let a_result = store
        .append_in_tx(
            &mut tx_a,
            &unique_stream("a"),
            ExpectedVersion::NoStream,
            vec![ea],
        )
        .await
        .unwrap();

    let eb = event(2);
    let b_id = eb.event_id;
    let b_result = store
        .append(&unique_stream("b"), ExpectedVersion::NoStream, vec![eb])
        .await
        .unwrap();
    assert!(
        b_result.position.minor() > a_result.position.minor(),
        "B took the later sequence"
    );
    assert!(b_result.position > a_result.position);

    // B is committed but held back behind A.
    assert!(impatient(&store)
        .read_all(Position::START, 100)
        .await
        .unwrap()
        .is_empty());
    let naive = naive_read(&store, 0).await;
    assert_eq!(naive.iter().map(|r| r.1).collect::<Vec<_>>(), vec![b_id]);
    let naive_cursor = naive[0].0;
    let holdback = store.holdback().await.unwrap();
    assert!(holdback.events_held_back >= 1, "{holdback:?}");

    tx_a.commit().await.unwrap();
    store.wake_subscribers();

    let log = whole_log(&store, Position::START).await;
    assert_eq!(
        log.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![a_id, b_id]
    );
    assert_eq!(log[0].position, a_result.position);
    assert_eq!(log[1].position, b_result.position);
    // The naive reader never sees A.
    assert!(
        naive_read(&store, naive_cursor).await.is_empty(),
        "the naive reader skipped A"
    );
    // The subscriber sees both, in order.
    assert_eq!(next_event(&mut sub).await.event_id, a_id);
    assert_eq!(next_event(&mut sub).await.event_id, b_id);
}

/// Transaction A gets the older id, B the newer; B takes the lower sequence,
/// A the higher one and commits first. A reader that filters by xmin but
/// keeps a position-only cursor reads A, moves past B's lower sequence, and
/// skips B when it commits. The (transaction id, sequence) cursor does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_transaction_with_higher_sequence_committing_first() {
    let (store, pool) = store().await;
    let mut sub = store.subscribe_all(Position::START);

    let mut a = pool.acquire().await.unwrap();
    let mut tx_a = a.begin().await.unwrap();
    let xid_a: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *tx_a)
        .await
        .unwrap();

    let mut b = pool.acquire().await.unwrap();
    let mut tx_b = b.begin().await.unwrap();
    let eb = event(2);
    let b_id = eb.event_id;
    let b_result = store
        .append_in_tx(
            &mut tx_b,
            &unique_stream("b"),
            ExpectedVersion::NoStream,
            vec![eb],
        )
        .await
        .unwrap();

    let ea = event(1);
    let a_id = ea.event_id;
    let a_result = store
        .append_in_tx(
            &mut tx_a,
            &unique_stream("a"),
            ExpectedVersion::NoStream,
            vec![ea],
        )
        .await
        .unwrap();
    assert_eq!(a_result.position.major().to_string(), xid_a);
    assert!(
        a_result.position.major() < b_result.position.major(),
        "A is the older transaction"
    );
    assert!(
        a_result.position.minor() > b_result.position.minor(),
        "A took the higher sequence"
    );
    tx_a.commit().await.unwrap();

    // A is readable (B, still running, is younger); the xmin/position reader
    // reads A and moves its cursor past B's sequence.
    let first = whole_log(&store, Position::START).await;
    assert_eq!(
        first.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![a_id]
    );
    let xmin_reader = xmin_position_read(&store, 0).await;
    assert_eq!(
        xmin_reader.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![a_id]
    );
    let cursor = xmin_reader[0].0;

    tx_b.commit().await.unwrap();
    store.wake_subscribers();

    let rest = whole_log(&store, first[0].position).await;
    assert_eq!(
        rest.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![b_id]
    );
    assert!(
        xmin_position_read(&store, cursor).await.is_empty(),
        "the position-only cursor skipped B"
    );
    assert_eq!(next_event(&mut sub).await.event_id, a_id);
    assert_eq!(next_event(&mut sub).await.event_id, b_id);
}

/// Many writers, some holding their transaction open at random before and
/// after taking a position. The subscriber sees exactly the committed log, in
/// order, once each; the naive readers following along skip events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writer_torture() {
    const WRITERS: usize = 8;
    const APPENDS: usize = 25;
    const MAX_ROUNDS: usize = 20;
    let (store, pool) = store().await;
    let mut sub = store.subscribe_all(Position::START);
    let mut received: Vec<RecordedEvent> = Vec::new();
    let mut naive_seen = HashSet::new();
    let mut xmin_seen = HashSet::new();
    let mut all_ids = HashSet::new();
    let (mut naive_cursor, mut xmin_cursor) = (0i64, 0i64);
    let mut rounds = 0;
    loop {
        rounds += 1;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The naive readers poll while the writers run.
        let readers = {
            let store = store.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let (mut n_seen, mut x_seen) = (Vec::new(), Vec::new());
                let (mut nc, mut xc) = (naive_cursor, xmin_cursor);
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::Acquire);
                    for (pos, id) in naive_read(&store, nc).await {
                        nc = pos;
                        n_seen.push(id);
                    }
                    for (pos, id) in xmin_position_read(&store, xc).await {
                        xc = pos;
                        x_seen.push(id);
                    }
                    if finished {
                        return (n_seen, x_seen, nc, xc);
                    }
                    tokio::time::sleep(Duration::from_micros(300)).await;
                }
            })
        };
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let store = store.clone();
            let pool = pool.clone();
            writers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..APPENDS {
                    let e = event((w * 1000 + i) as u64);
                    ids.push(e.event_id);
                    let stream = unique_stream("t");
                    if (w + i) % 2 == 0 {
                        let mut conn = pool.acquire().await.unwrap();
                        let mut tx = conn.begin().await.unwrap();
                        sqlx::query("SELECT pg_current_xact_id()")
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                        tokio::time::sleep(Duration::from_micros(fastrand::u64(0..2_000))).await;
                        store
                            .append_in_tx(&mut tx, &stream, ExpectedVersion::NoStream, vec![e])
                            .await
                            .unwrap();
                        tokio::time::sleep(Duration::from_micros(fastrand::u64(0..2_000))).await;
                        tx.commit().await.unwrap();
                    } else {
                        store
                            .append(&stream, ExpectedVersion::NoStream, vec![e])
                            .await
                            .unwrap();
                    }
                }
                ids
            }));
        }
        for w in writers {
            all_ids.extend(w.await.unwrap());
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        let (n, x, nc, xc) = readers.await.unwrap();
        naive_cursor = nc;
        xmin_cursor = xc;
        naive_seen.extend(n);
        xmin_seen.extend(x);
        while received.len() < all_ids.len() {
            received.push(next_event(&mut sub).await);
        }
        let naive_skipped = all_ids.len() - naive_seen.len();
        let xmin_skipped = all_ids.len() - xmin_seen.len();
        if (naive_skipped > 0 && xmin_skipped > 0) || rounds == MAX_ROUNDS {
            // The store's log: every committed event once, in strictly
            // increasing positions, and the subscriber saw exactly that.
            let log = whole_log(&store, Position::START).await;
            assert_eq!(log.len(), all_ids.len());
            assert_eq!(
                log.iter().map(|e| e.event_id).collect::<HashSet<_>>(),
                all_ids
            );
            assert!(log.windows(2).all(|w| w[0].position < w[1].position));
            assert_eq!(
                received.iter().map(|e| e.event_id).collect::<Vec<_>>(),
                log.iter().map(|e| e.event_id).collect::<Vec<_>>(),
                "the subscriber skipped, repeated or reordered events"
            );
            assert!(
                naive_skipped > 0,
                "the naive reader skipped nothing in {rounds} rounds"
            );
            assert!(
                xmin_skipped > 0,
                "the xmin/position-only reader skipped nothing in {rounds} rounds"
            );
            eprintln!(
                "{rounds} rounds, {} events: naive reader skipped {naive_skipped}, xmin/position-only reader skipped {xmin_skipped}, subscriber skipped 0",
                all_ids.len()
            );
            return;
        }
    }
}

/// An append returns only once its transaction has committed: another
/// connection sees the event as soon as the call returns (a driver call that
/// returned at the first result row would answer before the commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_are_committed() {
    let (store, pool) = store().await;
    let mut other = pool.acquire().await.unwrap();
    let count = format!(
        "SELECT count(*) FROM \"{}\".events WHERE event_id = $1",
        store.schema()
    );
    for round in 0..200u64 {
        let e = event(round);
        let id = e.event_id;
        store
            .append(&unique_stream("ack"), ExpectedVersion::NoStream, vec![e])
            .await
            .unwrap();
        let seen: i64 = sqlx::query_scalar(&count)
            .bind(id)
            .fetch_one(&mut *other)
            .await
            .unwrap();
        assert_eq!(seen, 1, "round {round}: acknowledged but not visible");
    }
}
