//! es-rabbit throughput against the local RabbitMQ. Run:
//! `cargo bench -p es-rabbit --bench rabbit`.
//!
//! - `publish/es-rabbit` vs `publish/raw-lapin`: 1,000 persistent, mandatory,
//!   confirmed publishes to a topic exchange bound to a quorum queue, with
//!   the same confirm window (256) on both sides.
//! - `consume/ack`: 1,000 messages waiting in the queue, consumed and acked
//!   through a subscription (prefetch 64).
//! - `encode/*`: the client-side CPU per message (no broker).
//! - `publish/paired`: printed first; the three publish variants alternating
//!   round by round, medians and ratios (robust to a machine shared with
//!   builds).
//!
//! The relay from a PostgreSQL store is measured in the cross-crate package:
//! `cargo bench -p es-tests --bench relay`.

// A bench is a test harness: a panic is the failure report.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use es_core::{Delivery, EventBus, Message, Metadata, Outcome, Payload, Subscription};
use es_rabbit::{RabbitBus, RabbitConfig};
use lapin::options::{BasicPublishOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use uuid::Uuid;

const N: usize = 1_000;
const WINDOW: usize = 256;

fn messages() -> Vec<Message> {
    (0..N)
        .map(|n| Message {
            message_id: Uuid::now_v7(),
            topic: "bench".into(),
            message_type: "Placed".into(),
            schema_version: 1,
            payload: Payload::from_json(format!(r#"{{"order":"o-{n}","qty":2,"sku":"A-1"}}"#))
                .unwrap(),
            metadata: Metadata::new()
                .with_correlation_id(Uuid::now_v7())
                .with_causation_id(Uuid::now_v7()),
            source: None,
        })
        .collect()
}

struct Setup {
    bus: RabbitBus,
    raw: lapin::Channel,
    _conn: lapin::Connection,
    queue: String,
    exchange: String,
}

async fn setup() -> Setup {
    let prefix = format!("bench-{}.", &Uuid::new_v4().simple().to_string()[..8]);
    let config = RabbitConfig::from_env()
        .with_prefix(prefix)
        .with_confirm_window(WINDOW);
    let url = config.url.clone();
    let bus = RabbitBus::connect(config)
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ is required at {url}: {e}"));
    let sub = Subscription::new("g", ["bench.*"]);
    bus.declare(&sub).await.unwrap();
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let raw = conn.create_channel().await.unwrap();
    raw.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    Setup {
        queue: bus.topology().queue("g"),
        exchange: bus.topology().exchange("bench"),
        bus,
        raw,
        _conn: conn,
    }
}

async fn purge(s: &Setup) {
    s.raw
        .queue_purge(s.queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
}

/// The minimal baseline: confirmed, persistent, mandatory publishes with
/// lapin alone, carrying only a message id and type (no envelope headers).
async fn raw_publish(s: &Setup, batch: &[Message]) {
    raw_publish_with(s, batch, |m| {
        BasicProperties::default()
            .with_message_id(m.message_id.to_string().into())
            .with_type(m.message_type.as_ref().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
    })
    .await;
}

/// The like-for-like baseline: lapin alone, building by hand the same
/// properties and headers es-rabbit sends (the envelope, a traceparent).
async fn raw_publish_same_headers(s: &Setup, batch: &[Message]) {
    raw_publish_with(s, batch, |m| {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-es-topic".into(),
            AMQPValue::LongString(m.topic.as_ref().into()),
        );
        headers.insert(
            "x-es-schema-version".into(),
            AMQPValue::LongLongInt(i64::from(m.schema_version)),
        );
        if let Some(c) = m.metadata.causation_id {
            headers.insert(
                "x-es-causation-id".into(),
                AMQPValue::LongString(c.to_string().into()),
            );
        }
        let traceparent = format!("00-{:032x}-{:016x}-01", fastrand_u128(), fastrand_u64());
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(traceparent.into()),
        );
        let mut props = BasicProperties::default()
            .with_message_id(m.message_id.to_string().into())
            .with_type(m.message_type.as_ref().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(1)
            .with_headers(headers);
        if let Some(c) = m.metadata.correlation_id {
            props = props.with_correlation_id(c.to_string().into());
        }
        props
    })
    .await;
}

fn fastrand_u128() -> u128 {
    u128::from(Uuid::new_v4().as_u64_pair().0) << 64 | 1
}

fn fastrand_u64() -> u64 {
    Uuid::new_v4().as_u64_pair().1 | 1
}

async fn raw_publish_with(
    s: &Setup,
    batch: &[Message],
    props: impl Fn(&Message) -> BasicProperties,
) {
    let mut pending = VecDeque::with_capacity(WINDOW);
    for m in batch {
        let props = props(m);
        let confirm = s
            .raw
            .basic_publish(
                s.exchange.as_str().into(),
                m.routing_key().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                m.payload.as_str().as_bytes(),
                props,
            )
            .await
            .unwrap();
        pending.push_back(confirm);
        if pending.len() >= WINDOW {
            let c = pending.pop_front().unwrap().await.unwrap();
            assert!(c.is_ack() && c.take_message().is_none());
        }
    }
    while let Some(confirm) = pending.pop_front() {
        let c = confirm.await.unwrap();
        assert!(c.is_ack() && c.take_message().is_none());
    }
}

/// Whether the command line's filter (if any) selects benchmarks under
/// `name`, so that filtered-out groups do not even set up.
fn wanted(name: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    filters.is_empty()
        || filters
            .iter()
            .any(|f| name.contains(f.as_str()) || f.contains(name))
}

fn publish(c: &mut Criterion) {
    if !wanted("publish/") {
        return;
    }
    let rt = Runtime::new().unwrap();
    let s = rt.block_on(setup());
    let mut group = c.benchmark_group("publish");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(15));
    // Alternate the two so that broker state (queue length, WAL) is alike.
    group.bench_function("es-rabbit", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let s = &s;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch = messages();
                    let start = Instant::now();
                    s.bus.publish(&batch).await.unwrap();
                    total += start.elapsed();
                    purge(s).await;
                }
                total
            }
        });
    });
    group.bench_function("raw-lapin", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let s = &s;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch = messages();
                    let start = Instant::now();
                    raw_publish(s, &batch).await;
                    total += start.elapsed();
                    purge(s).await;
                }
                total
            }
        });
    });
    group.bench_function("raw-lapin-same-headers", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let s = &s;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch = messages();
                    let start = Instant::now();
                    raw_publish_same_headers(s, &batch).await;
                    total += start.elapsed();
                    purge(s).await;
                }
                total
            }
        });
    });
    group.finish();
    rt.block_on(cleanup(&s));
}

fn consume(c: &mut Criterion) {
    if !wanted("consume/ack") {
        return;
    }
    let rt = Runtime::new().unwrap();
    let s = rt.block_on(setup());
    let mut group = c.benchmark_group("consume");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    group.bench_function("ack", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let s = &s;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    s.bus.publish(&messages()).await.unwrap();
                    let handled = Arc::new(AtomicUsize::new(0));
                    let (done_tx, mut done_rx) = watch::channel(false);
                    let h = Arc::clone(&handled);
                    let start = Instant::now();
                    let handle = s
                        .bus
                        .subscribe(
                            Subscription::new("g", ["bench.*"]).with_prefetch(64),
                            Arc::new(move |_d: Delivery| {
                                let (h, done) = (Arc::clone(&h), done_tx.clone());
                                async move {
                                    if h.fetch_add(1, Ordering::SeqCst) + 1 == N {
                                        done.send_replace(true);
                                    }
                                    Outcome::Ack
                                }
                            }),
                        )
                        .await
                        .unwrap();
                    done_rx.wait_for(|d| *d).await.unwrap();
                    handle.stop().await;
                    total += start.elapsed();
                    purge(s).await;
                }
                total
            }
        });
    });
    group.finish();
    rt.block_on(cleanup(&s));
}

async fn cleanup(s: &Setup) {
    let sub = Subscription::new("g", ["bench.*"]);
    s.bus.delete_group(&sub).await.unwrap();
    s.bus.delete_exchanges(&["bench"]).await.unwrap();
}

/// The same 1,000-message confirmed batch through es-rabbit and through raw
/// lapin, alternating round by round so that both meet the same broker and
/// machine load (this machine is shared with builds); prints the medians
/// and their ratio.
fn paired() {
    const ROUNDS: usize = 60;
    let rt = Runtime::new().unwrap();
    let s = rt.block_on(setup());
    let (mut ours, mut raw, mut same) = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        for round in 0..ROUNDS + 3 {
            // Rotate the order so that none always goes first.
            for k in 0..3 {
                let which = (round + k) % 3;
                let batch = messages();
                let start = Instant::now();
                match which {
                    0 => s.bus.publish(&batch).await.unwrap(),
                    1 => raw_publish(&s, &batch).await,
                    _ => raw_publish_same_headers(&s, &batch).await,
                }
                let rate = N as f64 / start.elapsed().as_secs_f64();
                purge(&s).await;
                if round >= 3 {
                    [&mut ours, &mut raw, &mut same][which].push(rate);
                }
            }
        }
    });
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    if std::env::var_os("PAIRED_DEBUG").is_some() {
        println!("es-rabbit {ours:.0?}\nraw {raw:.0?}\nsame {same:.0?}");
    }
    // Per-round ratios: the three runs of a round share the machine's load.
    let mut vs_raw: Vec<f64> = ours.iter().zip(&raw).map(|(o, r)| o / r).collect();
    let mut vs_same: Vec<f64> = ours.iter().zip(&same).map(|(o, h)| o / h).collect();
    let (rr, rh) = (median(&mut vs_raw), median(&mut vs_same));
    let (o, r, h) = (median(&mut ours), median(&mut raw), median(&mut same));
    println!(
        "publish/paired ({ROUNDS} alternating rounds of {N}): median es-rabbit {o:.0} msg/s; raw lapin minimal properties {r:.0} msg/s; raw lapin same headers {h:.0} msg/s; median per-round ratio es-rabbit/raw-minimal {rr:.2}, es-rabbit/raw-same-headers {rh:.2}"
    );
    rt.block_on(cleanup(&s));
}

/// The client-side CPU per message, without the broker: es-rabbit's
/// envelope encoding (properties, headers, a new traceparent) against the
/// minimal properties of the raw baseline. Deterministic where the broker
/// round trips above are noisy.
fn encode(c: &mut Criterion) {
    let batch = messages();
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("es-rabbit", |b| {
        b.iter(|| {
            for m in &batch {
                let trace = es_rabbit::TraceParent::child_of(m.metadata.traceparent);
                let props = es_rabbit::codec::properties(m, &trace.to_string()).unwrap();
                std::hint::black_box((props, m.routing_key()));
            }
        });
    });
    group.bench_function("raw-minimal", |b| {
        b.iter(|| {
            for m in &batch {
                let props = BasicProperties::default()
                    .with_message_id(m.message_id.to_string().into())
                    .with_type(m.message_type.as_ref().into())
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2);
                std::hint::black_box((props, m.routing_key()));
            }
        });
    });
    group.finish();
}

criterion_group!(benches, encode, publish, consume);

fn main() {
    if std::env::args()
        .skip(1)
        .all(|a| a.starts_with('-') || "publish/paired".contains(a.as_str()))
    {
        paired();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
