//! Dynamic consistency boundaries on PostgreSQL: es-core's DCB conformance
//! suite, the races, the locks (who waits for whom), and reads by query
//! under out-of-order commits.
//!
//! The races run `DCB_RACE_ROUNDS` rounds (default 100 on one boundary, 20
//! on disjoint ones).

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

use std::sync::Arc;
use std::time::{Duration, Instant};

use es_core::testing::conformance::{event, next_event, unique_stream};
use es_core::testing::dcb_conformance::{self, tagged_event, unique_tag};
use es_core::{
    AppendCondition, AppendResult, DcbStore, EventStore, ExpectedVersion, NewEvent, Position,
    Query, QueryItem, StoreError, StreamId, Tag,
};
use es_postgres::PgEventStore;
use sqlx::{Connection, PgPool};

/// The store (waiting up to 10 s for events held back by other sessions'
/// transactions) and its pool.
async fn store() -> (PgEventStore, PgPool) {
    let (pool, schema) = es_postgres::testing::fresh_schema_with(16).await;
    let store = PgEventStore::new(pool.clone(), schema)
        .with_read_wait(Duration::from_secs(10))
        .with_poll_interval(Duration::from_millis(100));
    (store, pool)
}

/// A transaction of its own on `pool` that has appended `events` to
/// `stream` and is still open, and what the append gave.
async fn open_append(
    store: &PgEventStore,
    pool: &PgPool,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, AppendResult) {
    let mut tx = pool.begin().await.unwrap();
    let result = store
        .append_in_tx(&mut tx, stream, expected, events)
        .await
        .unwrap();
    (tx, result)
}

async fn dyn_store() -> Arc<dyn DcbStore> {
    Arc::new(store().await.0)
}

macro_rules! checks {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            dcb_conformance::$name(dyn_store().await).await;
        }
    )*};
}

checks!(
    tags_round_trip,
    query_matching_rules,
    read_pages_and_marker,
    condition_after_marker,
    plain_tagged_append_moves_the_boundary,
    idempotent_conditional_reappend,
    overlapping_boundaries_keep_their_invariants,
    query_subscription_catches_up_then_goes_live,
    query_subscription_follows_concurrent_writers,
);

/// `DCB_RACE_ROUNDS`, else `default`.
fn rounds(default: usize) -> usize {
    std::env::var("DCB_RACE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// 32 racers on one (type, tag) with one marker: exactly one commits and
/// 31 find the boundary moved, every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racers_on_one_boundary() {
    let rounds = rounds(100);
    let started = Instant::now();
    let tally = dcb_conformance::racers_on_one_boundary(dyn_store().await, rounds).await;
    println!(
        "racers on one boundary: {tally:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(tally.committed, rounds);
    assert_eq!(tally.moved, 31 * rounds);
}

/// 32 racers on disjoint tags: all commit, none conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racers_on_disjoint_boundaries() {
    let rounds = rounds(20);
    let started = Instant::now();
    let tally = dcb_conformance::racers_on_disjoint_boundaries(dyn_store().await, rounds).await;
    println!(
        "racers on disjoint boundaries: {tally:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(tally.committed, 32 * rounds);
    assert_eq!(tally.moved, 0);
}

/// A tagged append held open in a transaction holds its boundary: a
/// conditional append on it waits until it commits, then sees it and
/// fails; one on another tag does not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_append_waits_for_a_tagged_writer_of_its_boundary_only() {
    let (store, pool) = store().await;
    let (a, b) = (unique_tag("a"), unique_tag("b"));
    let on_a = Query::from(QueryItem::tagged(a.clone()));
    let on_b = Query::from(QueryItem::tagged(b.clone()));
    let marker_a = store.read(&on_a, Position::START, 10).await.unwrap().marker;
    let marker_b = store.read(&on_b, Position::START, 10).await.unwrap().marker;

    let (tx, _) = open_append(
        &store,
        &pool,
        &unique_stream("slow"),
        ExpectedVersion::NoStream,
        vec![tagged_event(1, "X", &[&a])],
    )
    .await;

    // Another boundary: no wait.
    tokio::time::timeout(
        Duration::from_secs(5),
        store.append_if(
            &unique_stream("dcb"),
            vec![tagged_event(2, "X", &[&b])],
            AppendCondition::after(on_b, marker_b),
        ),
    )
    .await
    .expect("an append on a disjoint boundary waited")
    .unwrap();

    // The same boundary: waits for the open transaction.
    let waiting = {
        let store = store.clone();
        let a = a.clone();
        tokio::spawn(async move {
            store
                .append_if(
                    &unique_stream("dcb"),
                    vec![tagged_event(3, "X", &[&a])],
                    AppendCondition::after(on_a, marker_a),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the conditional append did not wait"
    );
    tx.commit().await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the conditional append still waits")
        .unwrap();
    assert!(
        matches!(result, Err(StoreError::BoundaryMoved { .. })),
        "{result:?}"
    );
}

/// Writer A takes the lower sequence with a tagged event and stays open;
/// writer B appends a tagged event of the same boundary and commits. A read
/// by query holds B back (its marker is below both), so a decision made on
/// it cannot commit once A has; after A commits, the read and a query
/// subscription give A then B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_is_not_skipped_by_a_query_read_or_its_marker() {
    let (store, pool) = store().await;
    let a_tag = unique_tag("a");
    let query = Query::from(QueryItem::tagged(a_tag.clone()));
    let mut sub = store.subscribe(query.clone(), Position::START);

    let ea = tagged_event(1, "X", &[&a_tag]);
    let a_id = ea.event_id;
    let (tx_a, a_result) = open_append(
        &store,
        &pool,
        &unique_stream("a"),
        ExpectedVersion::NoStream,
        vec![ea],
    )
    .await;
    // B is tagged with A's tag but no condition: writers share the lock.
    let eb = tagged_event(2, "X", &[&a_tag]);
    let b_id = eb.event_id;
    let b_result = tokio::time::timeout(
        Duration::from_secs(5),
        store.append(&unique_stream("b"), ExpectedVersion::NoStream, vec![eb]),
    )
    .await
    .expect("a tagged writer waited for another")
    .unwrap();
    assert!(b_result.position.minor() > a_result.position.minor());

    // B is committed but held back behind A, and the marker is below both
    // (a handle that does not wait for A).
    let impatient = PgEventStore::new(store.pool().clone(), store.schema().to_owned())
        .with_read_wait(Duration::from_millis(50));
    let held = impatient.read(&query, Position::START, 10).await.unwrap();
    assert!(held.events.is_empty(), "{:?}", held.events);
    assert!(held.marker < a_result.position && held.marker < b_result.position);

    tx_a.commit().await.unwrap();
    store.wake_subscribers();

    // A decision made on the held-back read sees its boundary moved.
    let stale = store
        .append_if(
            &unique_stream("dcb"),
            vec![tagged_event(3, "X", &[&a_tag])],
            AppendCondition::after(query.clone(), held.marker),
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::BoundaryMoved { .. })),
        "{stale:?}"
    );

    let page = store.read(&query, held.marker, 10).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![a_id, b_id]
    );
    assert_eq!(next_event(&mut sub).await.event_id, a_id);
    assert_eq!(next_event(&mut sub).await.event_id, b_id);
}

/// Transaction A gets the older id, B the newer; B writes a tagged event
/// first (lower sequence), another transaction commits, and A writes its
/// tagged event later (higher sequence) and commits first. A had its id
/// before its tag locks, so its event lands after every transaction that
/// had ended when it took them: after B in the log, though its id is
/// older. The query subscription holds A back while B runs, then gives B
/// and A in log order; nothing is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_transaction_with_a_higher_sequence_committing_first() {
    let (store, pool) = store().await;
    let tag = unique_tag("t");
    let query = Query::from(QueryItem::tagged(tag.clone()));
    let mut sub = store.subscribe(query.clone(), Position::START);

    let mut a = pool.acquire().await.unwrap();
    let mut tx_a = a.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx_a)
        .await
        .unwrap();
    let eb = tagged_event(2, "X", &[&tag]);
    let b_id = eb.event_id;
    let (tx_b, b_result) = open_append(
        &store,
        &pool,
        &unique_stream("b"),
        ExpectedVersion::Any,
        vec![eb],
    )
    .await;
    // Untagged noise: a transaction newer than B ends before A's write.
    store
        .append(&unique_stream("n"), ExpectedVersion::Any, vec![event(9)])
        .await
        .unwrap();
    let ea = tagged_event(1, "X", &[&tag]);
    let a_id = ea.event_id;
    let a_result = store
        .append_in_tx(
            &mut tx_a,
            &unique_stream("a"),
            ExpectedVersion::Any,
            vec![ea],
        )
        .await
        .unwrap();
    assert!(a_result.position.major() > b_result.position.major());
    assert!(a_result.position.minor() > b_result.position.minor());
    tx_a.commit().await.unwrap();
    store.wake_subscribers();
    let early = tokio::time::timeout(Duration::from_millis(300), next_event(&mut sub)).await;
    assert!(
        early.is_err(),
        "A was delivered before B, which precedes it"
    );
    tx_b.commit().await.unwrap();
    store.wake_subscribers();
    assert_eq!(next_event(&mut sub).await.event_id, b_id);
    assert_eq!(next_event(&mut sub).await.event_id, a_id);
    let page = store.read(&query, Position::START, 10).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![b_id, a_id]
    );
}

/// A transaction that has begun and taken its id, as one that wrote
/// something else first.
async fn open_with_id(pool: &PgPool) -> sqlx::PgConnection {
    let mut conn = pool.acquire().await.unwrap().detach();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// A writer's own committed event, held back by two older transactions
/// still running (with another boundary's commit between them): the two
/// transactions, the event's tag and its id.
async fn own_event_held_back(
    store: &PgEventStore,
    pool: &PgPool,
) -> (sqlx::PgConnection, sqlx::PgConnection, Tag, uuid::Uuid) {
    let (mine, other) = (unique_tag("mine"), unique_tag("other"));
    let first = open_with_id(pool).await;
    store
        .append(
            &unique_stream("o"),
            ExpectedVersion::Any,
            vec![tagged_event(1, "X", &[&other])],
        )
        .await
        .unwrap();
    let second = open_with_id(pool).await;
    let own = tagged_event(2, "X", &[&mine]);
    let own_id = own.event_id;
    store
        .append(&unique_stream("m"), ExpectedVersion::Any, vec![own])
        .await
        .unwrap();
    (first, second, mine, own_id)
}

/// A writer's own committed event, held back by two older transactions
/// still running (with another boundary's commit between them), is in its
/// next read by query at once: no writer of its boundary is running, so
/// the read holds the boundary's keys and reads past the horizon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_by_query_does_not_wait_for_transactions_outside_its_boundary() {
    let (store, pool) = store().await;
    let store = store.with_read_wait(Duration::from_secs(60));
    let (first, second, mine, own_id) = own_event_held_back(&store, &pool).await;
    let query = Query::from(QueryItem::tagged(mine));
    let page = tokio::time::timeout(
        Duration::from_secs(5),
        store.read(&query, Position::START, 10),
    )
    .await
    .expect("the read waited for transactions that write none of its tags")
    .unwrap();
    for conn in [first, second] {
        conn.close().await.unwrap();
    }
    assert_eq!(
        page.events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![own_id]
    );
}

/// The same, with a writer of the boundary running: the read cannot hold
/// the boundary's keys, reads at the horizon, and waits for every older
/// transaction that holds back the query's rows, not only for the first
/// one holding back any row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_by_query_beside_a_writer_of_its_boundary_waits_for_the_rows_held_back() {
    let (store, pool) = store().await;
    let (first, second, mine, own_id) = own_event_held_back(&store, &pool).await;
    let (writing, _) = open_append(
        &store,
        &pool,
        &unique_stream("w"),
        ExpectedVersion::Any,
        vec![tagged_event(3, "X", &[&mine])],
    )
    .await;
    let closer = tokio::spawn(async move {
        for (after, conn) in [(50, first), (250, second)] {
            tokio::time::sleep(Duration::from_millis(after)).await;
            conn.close().await.unwrap();
        }
    });
    let query = Query::from(QueryItem::tagged(mine));
    let page = store.read(&query, Position::START, 10).await.unwrap();
    closer.await.unwrap();
    writing.rollback().await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![own_id]
    );
}

/// A decision on a boundary written since an unrelated transaction began,
/// while that transaction is still open: the read sees the boundary's last
/// write and the decision is made at once, not held up until the unrelated
/// transaction ends (a read at the horizon would miss the write, and every
/// decision made on it would find the boundary moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_is_not_held_up_by_an_unrelated_open_transaction() {
    use es_core::doc_support::coupon::{CouponError, CouponEvent, Redeem};
    use es_core::{DecisionError, DecisionRunner, Metadata};

    let (store, pool) = store().await;
    let runner = DecisionRunner::<CouponEvent>::new(Arc::new(store));
    let unrelated = open_with_id(&pool).await;
    let redeem = Redeem {
        coupon: unique_tag("c").value().to_owned(),
        customer: 7,
    };
    runner
        .execute(&unique_stream("redemption"), &redeem, Metadata::new())
        .await
        .unwrap();
    let again = tokio::time::timeout(
        Duration::from_secs(5),
        runner.execute(&unique_stream("redemption"), &redeem, Metadata::new()),
    )
    .await
    .expect("the decision waited for an unrelated transaction");
    unrelated.close().await.unwrap();
    assert!(
        matches!(
            again,
            Err(DecisionError::Rejected(CouponError::AlreadyRedeemed))
        ),
        "{again:?}"
    );
}

/// A transaction that took its id before it wrote a tagged event (it wrote
/// something else first) and was running, without the boundary's locks,
/// when a read by query gave its marker: its event lands after that marker,
/// though its id is below the marker's base, and a decision made on the
/// read finds the boundary moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tagged_write_by_a_transaction_with_an_older_id_moves_a_later_marker() {
    let (store, pool) = store().await;
    let tag = unique_tag("late");
    let query = Query::from(QueryItem::tagged(tag.clone()));
    let mut early = open_with_id(&pool).await;
    // Later transactions end, so the read's snapshot edge passes the
    // early transaction's id.
    for n in 0..3 {
        store
            .append(&unique_stream("n"), ExpectedVersion::Any, vec![event(n)])
            .await
            .unwrap();
    }
    let page = store.read(&query, Position::START, 10).await.unwrap();
    assert!(page.events.is_empty());
    let written = store
        .append_in_tx(
            &mut early,
            &unique_stream("e"),
            ExpectedVersion::Any,
            vec![tagged_event(1, "X", &[&tag])],
        )
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut early).await.unwrap();
    assert!(written.position > page.marker, "{written:?} {page:?}");
    let stale = store
        .append_if(
            &unique_stream("dcb"),
            vec![tagged_event(2, "X", &[&tag])],
            AppendCondition::after(query.clone(), page.marker),
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::BoundaryMoved { .. })),
        "{stale:?}"
    );
}

/// A tagged append that races another on the same stream and loses some of
/// its versions (the other, still open, holds the next one) writes nothing
/// of that attempt and appends after the winner once it commits: the
/// stream's versions stay contiguous, and no tag row of the lost attempt is
/// left without its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tagged_append_that_loses_part_of_its_versions_takes_back_what_it_wrote() {
    let (store, pool) = store().await;
    let tag = unique_tag("race");
    let stream = unique_stream("race");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![tagged_event(1, "X", &[&tag])],
        )
        .await
        .unwrap();
    let (winner, _) = open_append(
        &store,
        &pool,
        &stream,
        ExpectedVersion::Exact(1),
        vec![tagged_event(2, "X", &[&tag])],
    )
    .await;
    let loser = {
        let store = store.clone();
        let stream = stream.clone();
        let events = (3..6).map(|n| tagged_event(n, "X", &[&tag])).collect();
        tokio::spawn(async move { store.append(&stream, ExpectedVersion::Any, events).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    winner.commit().await.unwrap();
    let lost = loser.await.unwrap().unwrap();
    assert_eq!(lost.stream_version, 5);
    let versions: Vec<u64> = store
        .read_stream(&stream, 1, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.stream_version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
    let orphans: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{0}\".event_tags t WHERE NOT EXISTS \
         (SELECT 1 FROM \"{0}\".events e WHERE e.transaction_id = t.transaction_id \
          AND e.global_position = t.global_position)",
        store.schema()
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0);
    let query = Query::from(QueryItem::tagged(tag));
    assert_eq!(
        store
            .read(&query, Position::START, 10)
            .await
            .unwrap()
            .events
            .len(),
        5
    );
}

/// The functions of tagged appends and reads by query plan their lookups
/// with sequential scans off: the plans a session caches while the log is
/// nearly empty would otherwise scan the whole log on every call, until
/// statistics are gathered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dcb_functions_never_plan_a_scan_of_the_log() {
    let (store, pool) = store().await;
    let settings: Vec<(String, Option<Vec<String>>)> = sqlx::query_as(
        "SELECT p.proname::text, p.proconfig FROM pg_proc p \
         JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = $1 AND p.proname IN ('append_tagged', 'read_by_query') \
         ORDER BY 1",
    )
    .bind(store.schema())
    .fetch_all(&pool)
    .await
    .unwrap();
    let off = Some(vec!["enable_seqscan=off".to_owned()]);
    assert_eq!(
        settings,
        vec![
            ("append_tagged".to_owned(), off.clone()),
            ("read_by_query".to_owned(), off)
        ]
    );
}

/// A multi-stream write holding tagged events is atomic: a refused part
/// writes nothing, tags included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_multi_stream_writes_are_atomic() {
    let (store, _) = store().await;
    let tag = unique_tag("m");
    let taken = unique_stream("m");
    store
        .append(&taken, ExpectedVersion::NoStream, vec![event(0)])
        .await
        .unwrap();
    let refused = store
        .append_streams(vec![
            es_core::StreamAppend::new(
                unique_stream("m"),
                ExpectedVersion::NoStream,
                vec![tagged_event(1, "X", &[&tag])],
            ),
            es_core::StreamAppend::new(
                taken.clone(),
                ExpectedVersion::NoStream,
                vec![tagged_event(2, "X", &[&tag])],
            ),
        ])
        .await;
    assert!(
        matches!(refused, Err(StoreError::WrongExpectedVersion { .. })),
        "{refused:?}"
    );
    let query = Query::from(QueryItem::tagged(tag));
    assert!(store
        .read(&query, Position::START, 10)
        .await
        .unwrap()
        .events
        .is_empty());
}

/// 32 decision runners redeem one coupon for one customer at once: one
/// redeems; the others read again, see the redemption and are rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_runner_decides_again_when_the_boundary_moved() {
    use es_core::doc_support::coupon::{CouponError, CouponEvent, Redeem};
    use es_core::{DecisionError, DecisionRunner, Metadata, RetryPolicy};

    let store = dyn_store().await;
    let runner = DecisionRunner::<CouponEvent>::new(store).with_retry(RetryPolicy {
        max_attempts: 50,
        ..RetryPolicy::default()
    });
    let coupon = unique_tag("c").value().to_owned();
    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let runner = runner.clone();
        let barrier = Arc::clone(&barrier);
        let redeem = Redeem {
            coupon: coupon.clone(),
            customer: 7,
        };
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            runner
                .execute(&unique_stream("redemption"), &redeem, Metadata::new())
                .await
        }));
    }
    let (mut redeemed, mut rejected) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => redeemed += 1,
            Err(DecisionError::Rejected(CouponError::AlreadyRedeemed)) => rejected += 1,
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!((redeemed, rejected), (1, 31));
}
