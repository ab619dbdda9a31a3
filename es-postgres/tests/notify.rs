//! Waking subscribers of other processes: the `NOTIFY` rides on the first
//! append of each interval, so sparse appends send no `NOTIFY` transaction
//! of their own, and a burst sends at most one `NOTIFY` per interval; every
//! event still reaches a subscriber of another store (another process) in
//! time, with polling set too slow to deliver it.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

use std::collections::HashMap;
use std::time::Duration;

use es_core::testing::conformance::{event, unique_stream};
use es_core::{EventStore, ExpectedVersion, Position};
use es_postgres::{NotifyStats, PgEventStore};
use futures::StreamExt;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

/// How late an event may reach the other store's subscriber after its append
/// returned: far below the subscriber's poll interval, so only a `NOTIFY`
/// delivers it in time.
const LATENCY: Duration = Duration::from_millis(200);

/// The subscriber's poll interval.
const POLL: Duration = Duration::from_secs(5);

/// The interval of the store's `NOTIFY`s.
const INTERVAL: Duration = Duration::from_millis(5);

/// A writer store and a reader store on a pool of its own (standing for
/// another process), whose subscription from the start is listening.
async fn stores() -> (PgEventStore, PgEventStore, PgPool) {
    let (pool, schema) = es_postgres::testing::fresh_schema().await;
    let writer = PgEventStore::new(pool.clone(), schema.clone());
    let other = PgPoolOptions::new()
        .max_connections(4)
        .connect(&es_postgres::testing::database_url())
        .await
        .unwrap();
    let reader = PgEventStore::new(other, schema).with_poll_interval(POLL);
    (writer, reader, pool)
}

/// Receives `n` events of `reader`'s subscription from the start, once its
/// `LISTEN` connection is up: each event's id and when it arrived.
async fn receive(
    reader: &PgEventStore,
    pool: &PgPool,
    n: usize,
) -> JoinHandle<Vec<(Uuid, Instant)>> {
    let mut sub = reader.subscribe_all(Position::START);
    let listen = format!("LISTEN \"{}\"%", reader.channel());
    let mut connected = false;
    for _ in 0..400 {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
        )
        .bind(&listen)
        .fetch_optional(pool)
        .await
        .unwrap();
        if pid.is_some() {
            connected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(connected, "the listener never connected");
    tokio::spawn(async move {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let event = tokio::time::timeout(Duration::from_secs(60), sub.next())
                .await
                .expect("no event within a minute")
                .expect("the subscription ended")
                .expect("the subscription failed");
            got.push((event.event_id, Instant::now()));
        }
        got
    })
}

async fn xact_commit(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Asserts that every event of `appended` arrived within `LATENCY` of its
/// append returning. A failure shows how late each late event was, and the
/// hold-back now: a transaction open elsewhere in the cluster holds every
/// reader back (up to the read wait, 1 s), a missed wake-up shows as the
/// poll interval.
async fn assert_in_time(
    reader: &PgEventStore,
    appended: &HashMap<Uuid, Instant>,
    got: &[(Uuid, Instant)],
) {
    let arrived: HashMap<Uuid, Instant> = got.iter().copied().collect();
    let late: Vec<(Uuid, Option<Duration>)> = appended
        .iter()
        .filter_map(|(id, at)| match arrived.get(id) {
            Some(when) => {
                let after = when.saturating_duration_since(*at);
                (after > LATENCY).then_some((*id, Some(after)))
            }
            None => Some((*id, None)),
        })
        .collect();
    if !late.is_empty() {
        let holdback = reader.holdback().await;
        panic!(
            "events later than {LATENCY:?} (None: never): {late:?}; hold-back now: {holdback:?}"
        );
    }
}

/// Appends 20 ms apart: each carries its own `NOTIFY`, none needs a
/// transaction of its own, and the other store's subscriber gets every event
/// within `LATENCY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_appends_carry_their_notify_and_send_none_of_their_own() {
    const N: u64 = 50;
    let (writer, reader, pool) = stores().await;
    let receiver = receive(&reader, &pool, 50).await;

    let commits_before = xact_commit(&pool).await;
    let mut appended = HashMap::new();
    for i in 0..N {
        let e = event(i);
        let id = e.event_id;
        writer
            .append(&unique_stream("sparse"), ExpectedVersion::NoStream, vec![e])
            .await
            .unwrap();
        appended.insert(id, Instant::now());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = receiver.await.unwrap();
    let stats = writer.notify_stats();
    let commits = xact_commit(&pool).await - commits_before;
    eprintln!(
        "{N} sparse appends: {} NOTIFYs carried, {} separate; \
         {commits} transactions committed in the database meanwhile (every client's)",
        stats.carried, stats.separate
    );

    assert_eq!(got.len(), 50);
    assert_in_time(&reader, &appended, &got).await;
    assert!(stats.separate <= 2, "{stats:?}");
    assert!(stats.carried >= 45, "{stats:?}");
}

/// Two appends started together: the first takes the interval's `NOTIFY`,
/// the second is announced by a `NOTIFY` of its own once the interval is
/// over, and both reach the other store's subscriber within `LATENCY`. On a
/// loaded machine the second may start after the first's interval is over
/// and carry a `NOTIFY` of its own; the pair is then tried again, up to 10
/// times, until the second finds the interval taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_that_finds_the_interval_taken_is_announced_after_it() {
    for _ in 0..10 {
        let (writer, reader, pool) = stores().await;
        let receiver = receive(&reader, &pool, 2).await;

        let (a, b) = (event(1), event(2));
        let ids = [a.event_id, b.event_id];
        let (stream_a, stream_b) = (unique_stream("pair"), unique_stream("pair"));
        let (ra, rb) = tokio::join!(
            writer.append(&stream_a, ExpectedVersion::NoStream, vec![a]),
            writer.append(&stream_b, ExpectedVersion::NoStream, vec![b]),
        );
        let done = Instant::now();
        ra.unwrap();
        rb.unwrap();
        let got = receiver.await.unwrap();
        let appended: HashMap<Uuid, Instant> = ids.iter().map(|id| (*id, done)).collect();
        assert_in_time(&reader, &appended, &got).await;

        // A separate NOTIFY is counted once it committed, after the event
        // may already have arrived.
        let deadline = Instant::now() + Duration::from_secs(5);
        let announced = |s: es_postgres::NotifyStats| s.carried + s.separate;
        while announced(writer.notify_stats()) < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stats = writer.notify_stats();
        if (stats.carried, stats.separate) == (1, 1) {
            return;
        }
        // Each carried its own: they started in two intervals.
        assert_eq!((stats.carried, stats.separate), (2, 0), "{stats:?}");
    }
    panic!("in 10 tries, the second append never found the interval taken");
}

/// 2,000 appends from 16 tasks: at most one `NOTIFY` per interval in all,
/// most carried by appends, and every event reaches the other store's
/// subscriber, the last ones without waiting for a poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_sends_at_most_one_notify_per_interval() {
    const TASKS: u64 = 16;
    const EACH: u64 = 125;
    const ALL: usize = 2_000;
    let (writer, reader, pool) = stores().await;
    let receiver = receive(&reader, &pool, ALL).await;

    let start = Instant::now();
    let tasks: Vec<JoinHandle<Vec<Uuid>>> = (0..TASKS)
        .map(|t| {
            let writer = writer.clone();
            tokio::spawn(async move {
                let stream = unique_stream("burst");
                let mut ids = Vec::new();
                for i in 0..EACH {
                    let e = event(t * EACH + i);
                    ids.push(e.event_id);
                    writer
                        .append(&stream, ExpectedVersion::Exact(i), vec![e])
                        .await
                        .unwrap();
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(ALL);
    for task in tasks {
        ids.extend(task.await.unwrap());
    }
    let elapsed = start.elapsed();
    let last_append = Instant::now();
    let got = receiver.await.unwrap();
    let all_in = last_append.elapsed();
    // A NOTIFY sent for the last appends is counted once it committed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats: NotifyStats = writer.notify_stats();
    let intervals = elapsed.as_nanos() / INTERVAL.as_nanos();
    eprintln!(
        "{} appends in {elapsed:?} ({intervals} intervals): {} NOTIFYs carried, {} separate; \
         the subscriber had every event {all_in:?} after the last append",
        ALL, stats.carried, stats.separate
    );

    let arrived: std::collections::HashSet<Uuid> = got.iter().map(|(id, _)| *id).collect();
    assert_eq!(arrived.len(), ALL);
    assert!(ids.iter().all(|id| arrived.contains(id)));
    assert!(
        u128::from(stats.carried + stats.separate) <= intervals + 2,
        "{stats:?} for {intervals} intervals"
    );
    assert!(stats.carried > stats.separate, "{stats:?}");
    assert!(all_in < POLL / 2, "the last events waited {all_in:?}");
}
