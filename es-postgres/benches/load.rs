//! What a cold load of a long stream costs, split into its parts: the fetch
//! (the rows of 1,000 events through sqlx, undecoded: the ten columns of a
//! `RecordedEvent`, and the five of a `StreamEvent`, which is what a
//! replay reads), the store's reads (fetch and decode: `read_stream`, and
//! `read_stream_events`, which `Repository` loads with), and the decode of
//! the events into domain events (es-core's codec), each measured on its own
//! in alternated rounds.
//!
//! ```text
//! cargo bench -p es-postgres --bench load              # 5 rounds of 1 s per side
//! BENCH_SECS=2 ROUNDS=7 cargo bench -p es-postgres --bench load
//! ```
//!
//! Prints the per-operation time of each part per round, and the medians.

#![allow(clippy::unwrap_used, missing_docs)] // a benchmark binary: panics are its error report

use std::hint::black_box;
use std::time::{Duration, Instant};

use es_core::{
    DomainEvent, EventCodec, EventStore, ExpectedVersion, Metadata, NewEvent, Payload,
    RecordedEvent, StreamId,
};
use es_postgres::PgEventStore;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgPool, PgRow};
use uuid::Uuid;

const ITEM: &str =
    r#"{"product_id":"5d0c","name":"Walnut Desk","unit_price":"199.99","quantity":2}"#;

#[derive(Debug, Serialize, Deserialize)]
struct Item {
    product_id: String,
    name: String,
    unit_price: String,
    quantity: u32,
}

#[derive(Debug, Serialize, Deserialize)]
enum OrderEvent {
    ItemAdded(Item),
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        "ItemAdded"
    }
}

fn secs() -> Duration {
    Duration::from_secs_f64(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1.0),
    )
}

fn rounds() -> usize {
    std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

/// Runs `op` back to back for the configured time; returns µs per call.
async fn time<F, Fut>(mut op: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    op().await;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs() {
        op().await;
        n += 1;
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (pool, schema) = es_postgres::testing::fresh_schema_with(8).await;
    let store = PgEventStore::new(pool.clone(), schema.clone());
    let stream = StreamId::new(format!("order-{}", Uuid::now_v7().simple())).unwrap();
    for _ in 0..10 {
        let batch: Vec<_> = (0..100)
            .map(|_| {
                NewEvent::new(
                    "ItemAdded",
                    1,
                    Payload::from_trusted_json(ITEM),
                    Metadata::new(),
                )
            })
            .collect();
        store
            .append(&stream, ExpectedVersion::Any, batch)
            .await
            .unwrap();
    }
    let select = format!(
        "SELECT global_position, transaction_id, stream_version, event_id, event_type, \
         schema_version, payload::text, metadata::text, recorded_at, tags FROM \"{schema}\".events \
         WHERE tenant = '' AND stream_id = $1 AND stream_version >= $2 ORDER BY stream_version LIMIT $3"
    );
    let replay = format!(
        "SELECT stream_version, event_id, event_type, schema_version, payload::text \
         FROM \"{schema}\".events WHERE tenant = '' AND stream_id = $1 AND stream_version >= $2 \
         ORDER BY stream_version LIMIT $3"
    );
    let codec = EventCodec::<OrderEvent>::new();
    let recorded: Vec<RecordedEvent> = store.read_stream(&stream, 1, 1000).await.unwrap();
    assert_eq!(recorded.len(), 1000);

    println!(
        "1,000-event stream, 1 client, {} s per part per round, µs per operation",
        secs().as_secs_f64()
    );
    println!();
    println!(
        "| round | fetch, 10 columns | read_stream | fetch, 5 columns | read_stream_events | codec decode |"
    );
    println!("|---|---|---|---|---|---|");
    let mut medians: [Vec<f64>; 5] = Default::default();
    for round in 1..=rounds() {
        let fetch = time(|| fetch_rows(&pool, &select, &stream)).await;
        let read = time(|| async {
            let events = store.read_stream(&stream, 1, 1000).await.unwrap();
            assert_eq!(events.len(), 1000);
            black_box(events);
        })
        .await;
        let narrow = time(|| fetch_rows(&pool, &replay, &stream)).await;
        let events = time(|| async {
            let events = store.read_stream_events(&stream, 1, 1000).await.unwrap();
            assert_eq!(events.len(), 1000);
            black_box(events);
        })
        .await;
        let decode = time(|| async {
            for e in &recorded {
                black_box(codec.decode(e).unwrap());
            }
        })
        .await;
        let round_times = [fetch, read, narrow, events, decode];
        println!(
            "| {round} | {} |",
            round_times.map(|t| format!("{t:.0}")).join(" | ")
        );
        for (all, t) in medians.iter_mut().zip(round_times) {
            all.push(t);
        }
    }
    println!(
        "| median | {} |",
        medians.map(|m| format!("{:.0}", median(m))).join(" | ")
    );
}

/// The 1,000 rows `sql` selects from `stream`, fetched and left undecoded.
async fn fetch_rows(pool: &PgPool, sql: &str, stream: &StreamId) {
    let rows: Vec<PgRow> = sqlx::query(sql)
        .bind(stream.as_str())
        .bind(1i64)
        .bind(1000i64)
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1000);
    black_box(rows);
}
