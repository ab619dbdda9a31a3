//! Throughput and lag of the PostgreSQL event store beside a raw-SQL baseline,
//! in one run against one database.
//!
//! ```text
//! cargo bench -p es-postgres --bench store            # 3 s per measurement
//! BENCH_SECS=5 cargo bench -p es-postgres --bench store
//! BENCH_GROUP=0 cargo bench -p es-postgres --bench store   # group commit off
//! BENCH_GROUP=8,32 cargo bench -p es-postgres --bench store # 8 in flight, groups of 32
//! BENCH_SINGLE_ONLY=1 cargo bench -p es-postgres --bench store # single-event appends only
//! ROUNDS=5 cargo bench -p es-postgres --bench store # single-event appends: 5 alternated rounds, median
//! ```
//!
//! Prints one markdown table row per measurement. The raw baseline inserts the
//! same rows into a copy of the events table (same columns, defaults and
//! indexes) with plain `INSERT` statements through sqlx.

#![allow(clippy::unwrap_used, missing_docs)] // a benchmark binary: panics are its error report

use std::future::Future;
use std::time::{Duration, Instant};

mod timing;

use es_core::{EventStore, ExpectedVersion, Metadata, NewEvent, Payload, Position, StreamId};
use es_postgres::PgEventStore;
use futures::StreamExt;
use timing::{pair, run_for, secs};
use uuid::Uuid;

const PAYLOAD: &str = r#"{"order_id":"0b7a3c1e-6d0e-4b8e-9a57-2f1c6e9d4a11","customer_email":"ada@example.com","items":[{"product_id":"5d0c","name":"Walnut Desk","unit_price":"199.99","quantity":2}],"total":"399.98"}"#;
const META: &str = r#"{"correlation_id":"0b7a3c1e-6d0e-4b8e-9a57-2f1c6e9d4a11","causation_id":"7f1d2c3b-1a2b-4c5d-8e9f-0a1b2c3d4e5f","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#;

fn metadata() -> Metadata {
    serde_json::from_str(META).unwrap()
}

fn new_event(meta: &Metadata) -> NewEvent {
    NewEvent::new(
        "OrderCreated",
        1,
        Payload::from_trusted_json(PAYLOAD),
        meta.clone(),
    )
}

fn stream() -> StreamId {
    StreamId::new(format!("order-{}", Uuid::now_v7().simple())).unwrap()
}

/// Runs `op` in `concurrency` tasks for the configured time; returns ops/s.
async fn run<F, Fut>(concurrency: usize, op: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    run_for(concurrency, secs(), op).await
}

/// `ROUNDS` (default 1) alternated pairs of `a` and `b`: prints each
/// round's ratio when there are several, and returns the rates of the round
/// whose ratio is the median.
async fn rounds<F, Fut, G, Gut>(concurrency: usize, a: F, b: G) -> (f64, f64)
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send,
    G: Fn() -> Gut + Send + Sync + Clone + 'static,
    Gut: Future<Output = ()> + Send,
{
    let n: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut results = Vec::with_capacity(n);
    for _ in 0..n {
        results.push(pair(concurrency, a.clone(), b.clone()).await);
    }
    if n > 1 {
        println!(
            "| {concurrency} writers, per-round ratios | {} | |",
            results
                .iter()
                .map(|(a, b)| format!("{:.2}", a / b))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    results.sort_by(|x, y| (x.0 / x.1).total_cmp(&(y.0 / y.1)));
    results[n / 2]
}

fn row(name: &str, value: f64, unit: &str, note: &str) {
    println!("| {name} | {value:.0} {unit} | {note} |");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (pool, schema) = es_postgres::testing::fresh_schema_with(40).await;
    let mut store = PgEventStore::new(pool.clone(), schema.clone())
        .with_notify(std::env::var("BENCH_NOTIFY").map_or(true, |v| v != "0"));
    // BENCH_GROUP=<in flight>,<group size> (0 turns group commit off).
    let group = std::env::var("BENCH_GROUP").ok();
    if let Some((in_flight, size)) = group.as_deref().map(|g| {
        let mut parts = g.split(',').map(|p| p.trim().parse::<usize>().unwrap());
        (
            parts.next().unwrap(),
            parts.next().unwrap_or(es_postgres::DEFAULT_MAX_GROUP),
        )
    }) {
        store = store.with_group_commit(in_flight, size);
    }
    let q = format!("\"{schema}\"");
    sqlx::query(&format!(
        "CREATE TABLE {q}.raw_events (LIKE {q}.events INCLUDING ALL)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .unwrap();
    println!(
        "schema {schema}, PostgreSQL {version}, {} s per measurement, group commit {}",
        secs().as_secs_f64(),
        group.as_deref().unwrap_or("default")
    );
    println!();
    println!("| measurement | result | note |");
    println!("|---|---|---|");
    let meta = metadata();

    // Single-event appends to distinct streams.
    let mut single = Vec::new();
    for c in [1usize, 8, 32] {
        let s = store.clone();
        let m = meta.clone();
        let ours = move || {
            let s = s.clone();
            let e = new_event(&m);
            async move {
                s.append(&stream(), ExpectedVersion::NoStream, vec![e])
                    .await
                    .unwrap();
            }
        };
        let p = pool.clone();
        let insert = format!(
            "INSERT INTO {q}.raw_events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) \
             VALUES ($1, 1, $2, 'OrderCreated', 1, $3::jsonb, $4::jsonb)"
        );
        let raw = move || {
            let p = p.clone();
            let insert = insert.clone();
            async move {
                sqlx::query(&insert)
                    .bind(stream().as_str())
                    .bind(Uuid::now_v7())
                    .bind(PAYLOAD)
                    .bind(META)
                    .execute(&p)
                    .await
                    .unwrap();
            }
        };
        let (ours, raw) = rounds(c, ours, raw).await;
        row(
            &format!("es-postgres append, 1 event, {c} writers"),
            ours,
            "events/s",
            &format!("{:.2}x raw", ours / raw),
        );
        row(
            &format!("raw INSERT, 1 event, {c} writers"),
            raw,
            "events/s",
            "baseline",
        );
        single.push((c, ours, raw));
    }

    if std::env::var_os("BENCH_SINGLE_ONLY").is_some() {
        return;
    }

    // 100-event batches.
    for c in [1usize, 8] {
        let s = store.clone();
        let m = meta.clone();
        let ours = move || {
            let s = s.clone();
            let batch: Vec<_> = (0..100).map(|_| new_event(&m)).collect();
            async move {
                s.append(&stream(), ExpectedVersion::NoStream, batch)
                    .await
                    .unwrap();
            }
        };
        let p = pool.clone();
        let mut insert = format!(
            "INSERT INTO {q}.raw_events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) VALUES "
        );
        for i in 0..100 {
            let b = i * 3;
            if i > 0 {
                insert.push(',');
            }
            insert.push_str(&format!(
                "(${}, {}, ${}, 'OrderCreated', 1, ${}::jsonb, $301::jsonb)",
                b + 1,
                i + 1,
                b + 2,
                b + 3
            ));
        }
        let raw = move || {
            let p = p.clone();
            let insert = insert.clone();
            async move {
                let stream = stream();
                let mut query = sqlx::query(&insert);
                for _ in 0..100 {
                    query = query
                        .bind(stream.as_str())
                        .bind(Uuid::now_v7())
                        .bind(PAYLOAD);
                }
                query.bind(META).execute(&p).await.unwrap();
            }
        };
        let (ours, raw) = pair(c, ours, raw).await;
        let (ours, raw) = (ours * 100.0, raw * 100.0);
        row(
            &format!("es-postgres append, 100-event batch, {c} writers"),
            ours,
            "events/s",
            &format!("{:.2}x raw", ours / raw),
        );
        row(
            &format!("raw multi-row INSERT, 100 rows, {c} writers"),
            raw,
            "events/s",
            "baseline",
        );
    }

    // Loading a 1,000-event aggregate.
    let big = stream();
    for _ in 0..10 {
        let batch: Vec<_> = (0..100).map(|_| new_event(&meta)).collect();
        store
            .append(&big, ExpectedVersion::Any, batch)
            .await
            .unwrap();
    }
    for c in [1usize, 8] {
        let s = store.clone();
        let big = big.clone();
        let loads = run(c, move || {
            let s = s.clone();
            let big = big.clone();
            async move {
                let events = s.read_stream(&big, 1, usize::MAX).await.unwrap();
                assert_eq!(events.len(), 1000);
            }
        })
        .await;
        row(
            &format!("load a 1,000-event stream, {c} readers"),
            loads,
            "loads/s",
            &format!("{:.0} events/s", loads * 1000.0),
        );
    }

    // read_all throughput: the whole log from the start, 1,000-event pages.
    let start = Instant::now();
    let mut after = Position::START;
    let mut total = 0usize;
    while start.elapsed() < secs() {
        let page = store.read_all(after, 1000).await.unwrap();
        match page.last() {
            Some(last) => after = last.position,
            None => after = Position::START,
        }
        total += page.len();
    }
    let read_rate = total as f64 / start.elapsed().as_secs_f64();
    let log_len: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {q}.events"))
        .fetch_one(&pool)
        .await
        .unwrap();
    row(
        "read_all, 1,000-event pages, 1 reader",
        read_rate,
        "events/s",
        &format!("log of {log_len} events"),
    );

    // Subscription lag under write load: 8 writers append single events
    // while a subscriber follows from the head; lag = delivery time minus the
    // event's recorded_at (the writing transaction's start).
    let head = store.head().await.unwrap();
    let mut sub = store.subscribe_all(head);
    let s = store.clone();
    let m = meta.clone();
    let writers = tokio::spawn(async move {
        run(8, move || {
            let s = s.clone();
            let e = new_event(&m);
            async move {
                s.append(&stream(), ExpectedVersion::NoStream, vec![e])
                    .await
                    .unwrap();
            }
        })
        .await
    });
    let mut lags = Vec::new();
    let deadline = Instant::now() + secs() + Duration::from_millis(500);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            Ok(Some(Ok(e))) => {
                let lag = chrono::Utc::now() - e.recorded_at;
                lags.push(lag.num_microseconds().unwrap_or(0).max(0) as f64 / 1000.0);
            }
            Ok(other) => panic!("subscription ended: {other:?}"),
            Err(_) => {}
        }
    }
    let write_rate = writers.await.unwrap();
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| lags[((lags.len() as f64 - 1.0) * p) as usize];
    println!(
        "| subscription lag, 8 writers at {write_rate:.0} events/s | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | {} events delivered |",
        pct(0.5),
        pct(0.99),
        pct(1.0),
        lags.len()
    );
    let held = store.holdback().await.unwrap();
    println!();
    println!("hold-back after the run: {held:?}");
    println!();
    println!(
        "ratios to raw: {}",
        single
            .iter()
            .map(|(c, o, r)| format!("c={c}: {:.2}", o / r))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
