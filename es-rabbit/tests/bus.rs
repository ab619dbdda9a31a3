//! RabbitBus against the real broker: round trip, confirms, unroutable,
//! competing consumers, retry, dead letters, poison messages, duplicates.
// Helpers outside #[test] fns unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bus, config, eventually, message, Counter};
use es_core::{BusError, Delivery, EventBus, Message, Outcome, Subscription};

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_message_round_trips_with_its_metadata() {
    let bus = bus(config("roundtrip")).await;
    let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let handle = bus
        .subscribe(
            Subscription::new("g", ["order.*"]),
            Arc::new(move |d: Delivery| {
                let sink = Arc::clone(&sink);
                async move {
                    sink.lock().unwrap().push(d);
                    Outcome::Ack
                }
            }),
        )
        .await
        .unwrap();
    let mut sent = message("order", "OrderPlaced", 1);
    sent.schema_version = 4;
    sent.metadata = sent
        .metadata
        .clone()
        .with_causation_id(uuid::Uuid::now_v7())
        .with_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        )
        .with_header("tenant", "acme");
    bus.publish(std::slice::from_ref(&sent)).await.unwrap();
    eventually("the delivery", LIMIT, || !seen.lock().unwrap().is_empty()).await;
    handle.stop().await;
    let got = seen.lock().unwrap()[0].clone();
    assert_eq!(got.attempt, 1);
    let tp = got.message.metadata.traceparent.unwrap();
    // The header carries the publish span's context: same trace, new span.
    assert!(
        tp.to_string()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert_ne!(tp, sent.metadata.traceparent.unwrap());
    let mut expected: Message = sent;
    expected.metadata.traceparent = Some(tp);
    assert_eq!(got.message, expected);
    common::cleanup(&bus).await;
}

#[tokio::test]
async fn mandatory_unroutable_is_an_error_and_non_mandatory_is_not() {
    let bus = bus(config("unroutable")).await;
    let m = message("nobody", "Listens", 1);
    match bus.publish(std::slice::from_ref(&m)).await {
        Err(BusError::Unroutable {
            message_id,
            routing_key,
        }) => {
            assert_eq!(message_id, m.message_id);
            assert_eq!(routing_key, "nobody.Listens");
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }
    bus.with_mandatory(false)
        .publish(std::slice::from_ref(&m))
        .await
        .unwrap();
    // The channel survived: a routable publish still works.
    bus.declare(&Subscription::new("g", ["nobody.#"]))
        .await
        .unwrap();
    bus.publish(&[m]).await.unwrap();
    assert_eq!(bus.queue_depth("g").await.unwrap(), 1);
    common::cleanup(&bus).await;
}

#[tokio::test]
async fn declare_is_idempotent_and_conflicts_are_typed() {
    let bus = bus(config("declare")).await;
    let sub = Subscription::new("g", ["order.*", "payment.Taken"]);
    bus.declare(&sub).await.unwrap();
    bus.declare(&sub).await.unwrap();
    let changed = sub.clone().with_max_attempts(9);
    assert!(matches!(
        bus.declare(&changed).await,
        Err(BusError::InvalidSubscription { .. })
    ));
    assert!(matches!(
        bus.declare(&Subscription::new("g", ["#"])).await,
        Err(BusError::InvalidSubscription { .. })
    ));
    // Declared groups receive messages published before anyone consumes.
    bus.publish(&[message("order", "A", 1), message("payment", "Taken", 2)])
        .await
        .unwrap();
    assert_eq!(bus.queue_depth("g").await.unwrap(), 2);
    common::cleanup(&bus).await;
}

#[tokio::test]
async fn competing_consumers_share_a_group() {
    let cfg = config("compete");
    let a = bus(cfg.clone()).await;
    let b = bus(cfg.with_connection_name("other")).await;
    let sub = Subscription::new("g", ["order.*"]).with_prefetch(4);
    let ca = Counter::default();
    let cb = Counter {
        inbox: Arc::clone(&ca.inbox),
        applied: Arc::clone(&ca.applied),
        ..Counter::default()
    };
    let ha = a
        .subscribe(sub.clone(), Arc::new(ca.clone()))
        .await
        .unwrap();
    let hb = b.subscribe(sub, Arc::new(cb.clone())).await.unwrap();
    let batch: Vec<Message> = (0..400).map(|n| message("order", "Placed", n)).collect();
    a.publish(&batch).await.unwrap();
    eventually("all 400 applied", LIMIT, || ca.applied_count() == 400).await;
    ha.stop().await;
    hb.stop().await;
    assert_eq!(ca.applied_twice(), 0);
    assert!(
        ca.deliveries() > 0 && cb.deliveries() > 0,
        "both consumers worked: {} / {}",
        ca.deliveries(),
        cb.deliveries()
    );
    common::cleanup(&a).await;
}

/// A handler that never returns must not keep its subscription from
/// reconnecting once the connection is gone: running handlers get the
/// operation limit, then are dropped unsettled, and the consumer consumes
/// again (the stuck message comes back to it, redelivered).
#[tokio::test]
async fn a_stuck_handler_does_not_hold_up_reconnecting() {
    let mut cfg = config("stuck");
    cfg.operation_timeout = Duration::from_secs(2);
    let consumer = bus(cfg.clone()).await;
    let publisher = bus(cfg.with_connection_name("publisher")).await;
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (seen, stuck) = (Arc::clone(&handled), Arc::clone(&gate));
    let handle = consumer
        .subscribe(
            Subscription::new("g", ["order.*"]).with_prefetch(4),
            Arc::new(move |d: Delivery| {
                let (seen, stuck) = (Arc::clone(&seen), Arc::clone(&stuck));
                async move {
                    let kind = d.message.message_type.to_string();
                    seen.lock().unwrap().push(kind.clone());
                    if kind == "Stuck" {
                        // Held until the gate closes at the end of the test.
                        let _ = stuck.acquire().await;
                    }
                    Outcome::Ack
                }
            }),
        )
        .await
        .unwrap();
    let count = |kind: &str| {
        handled
            .lock()
            .unwrap()
            .iter()
            .filter(|k| *k == kind)
            .count()
    };
    publisher
        .publish(&[message("order", "Stuck", 1)])
        .await
        .unwrap();
    eventually("the stuck handler running", LIMIT, || count("Stuck") == 1).await;

    consumer.close().await;
    publisher
        .publish(&[message("order", "Placed", 2)])
        .await
        .unwrap();
    eventually(
        "a message published after the connection went",
        LIMIT,
        || count("Placed") == 1,
    )
    .await;
    eventually("the stuck message redelivered", LIMIT, || {
        count("Stuck") >= 2
    })
    .await;
    assert!(consumer.connections_opened() >= 2);

    gate.close();
    handle.stop().await;
    common::cleanup(&publisher).await;
}

#[tokio::test]
async fn retry_waits_and_counts_attempts() {
    let bus = bus(config("retry")).await;
    let delay = Duration::from_millis(200);
    let attempts: Arc<Mutex<Vec<(u32, std::time::Instant)>>> = Arc::default();
    let seen = Arc::clone(&attempts);
    let handle = bus
        .subscribe(
            Subscription::new("g", ["order.*"])
                .with_max_attempts(5)
                .with_retry_delay(delay),
            Arc::new(move |d: Delivery| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.lock()
                        .unwrap()
                        .push((d.attempt, std::time::Instant::now()));
                    if d.attempt < 3 {
                        Outcome::retry("not yet")
                    } else {
                        Outcome::Ack
                    }
                }
            }),
        )
        .await
        .unwrap();
    bus.publish(&[message("order", "Placed", 1)]).await.unwrap();
    eventually("third attempt", LIMIT, || {
        attempts.lock().unwrap().len() == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    handle.stop().await;
    let attempts = attempts.lock().unwrap().clone();
    let numbers: Vec<u32> = attempts.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, vec![1, 2, 3]);
    // Each retry waited its delay in the retry queue before coming back.
    for pair in attempts.windows(2) {
        let waited = pair[1].1 - pair[0].1;
        assert!(
            waited >= delay,
            "attempt {} came {waited:?} after the one before",
            pair[1].0
        );
    }
    assert_eq!(bus.dead_letter_depth("g").await.unwrap(), 0);
    common::cleanup(&bus).await;
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_after_exactly_max_attempts_without_blocking() {
    let bus = bus(config("poison")).await;
    let calls = Arc::new(AtomicU32::new(0));
    let good = Counter::default();
    let (c, g) = (Arc::clone(&calls), good.clone());
    let handle = bus
        .subscribe(
            Subscription::new("g", ["order.*"])
                .with_prefetch(1)
                .with_max_attempts(3)
                .with_retry_delay(Duration::from_millis(100)),
            Arc::new(move |d: Delivery| {
                let (c, g) = (Arc::clone(&c), g.clone());
                async move {
                    if &*d.message.message_type == "Poison" {
                        c.fetch_add(1, Ordering::SeqCst);
                        Outcome::retry("always fails")
                    } else {
                        es_core::MessageHandler::handle(&g, &d).await
                    }
                }
            }),
        )
        .await
        .unwrap();
    let poison = message("order", "Poison", 0);
    let mut batch = vec![poison.clone()];
    batch.extend((1..=20).map(|n| message("order", "Fine", n)));
    bus.publish(&batch).await.unwrap();
    eventually("fine messages applied", LIMIT, || {
        good.applied_count() == 20
    })
    .await;
    let mut dead = Vec::new();
    for _ in 0..500 {
        dead.extend(bus.take_dead_letters("g", 10).await.unwrap());
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.stop().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "handled exactly max_attempts times"
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].message.as_ref().unwrap().message_id,
        poison.message_id
    );
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].reason, "always fails");
    common::cleanup(&bus).await;
}

#[tokio::test]
async fn dead_letter_outcome_records_the_reason() {
    let bus = bus(config("deadletter")).await;
    let handle = bus
        .subscribe(
            Subscription::new("g", ["order.*"]),
            Arc::new(|_d: Delivery| async { Outcome::dead_letter("order unknown") }),
        )
        .await
        .unwrap();
    let m = message("order", "Placed", 1);
    bus.publish(std::slice::from_ref(&m)).await.unwrap();
    let mut dead = Vec::new();
    for _ in 0..1500 {
        dead.extend(bus.take_dead_letters("g", 10).await.unwrap());
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.stop().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "order unknown");
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(dead[0].message.as_ref().unwrap().message_id, m.message_id);
    common::cleanup(&bus).await;
}

#[tokio::test]
async fn an_undecodable_message_goes_to_the_dead_letters_and_does_not_block() {
    let cfg = config("undecodable");
    let bus = bus(cfg.clone()).await;
    let good = Counter::default();
    let handle = bus
        .subscribe(
            Subscription::new("g", ["order.*"]).with_prefetch(1),
            Arc::new(good.clone()),
        )
        .await
        .unwrap();
    // A foreign producer publishes garbage on the exchange.
    let conn = lapin::Connection::connect(&cfg.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        bus.topology().exchange("order").into(),
        "order.Garbage".into(),
        lapin::options::BasicPublishOptions::default(),
        b"\xff not json",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    bus.publish(&[message("order", "Fine", 1)]).await.unwrap();
    eventually("the good message", LIMIT, || good.applied_count() == 1).await;
    let mut dead = Vec::new();
    for _ in 0..500 {
        dead.extend(bus.take_dead_letters("g", 10).await.unwrap());
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.stop().await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.starts_with("undecodable message"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].body, b"\xff not json");
    assert!(dead[0].message.is_none());
    common::cleanup(&bus).await;
}

#[tokio::test]
async fn a_thousand_duplicates_are_applied_once() {
    let bus = bus(config("dupes")).await;
    let counter = Counter::default();
    let handle = bus
        .subscribe(
            Subscription::new("g", ["order.*"]).with_prefetch(32),
            Arc::new(counter.clone()),
        )
        .await
        .unwrap();
    let m = message("order", "Placed", 1);
    let dupes = vec![m.clone(); 1000];
    bus.publish(&dupes).await.unwrap();
    eventually("1,000 deliveries", LIMIT, || counter.deliveries() == 1000).await;
    handle.stop().await;
    assert_eq!(counter.applied_count(), 1);
    assert_eq!(counter.applied.lock().unwrap()[&m.message_id], 1);
    assert_eq!(bus.queue_depth("g").await.unwrap(), 0);
    common::cleanup(&bus).await;
}

#[tokio::test]
async fn a_nack_from_the_broker_is_an_error() {
    let cfg = config("nack");
    let bus = bus(cfg.clone()).await;
    // A full queue that rejects publishes makes the broker nack them.
    let conn = lapin::Connection::connect(&cfg.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let exchange = bus.topology().exchange("order");
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    let queue = bus.topology().queue("tiny");
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(queue.as_str().into(), Default::default(), args)
        .await
        .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "order.#".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let (first, second) = (message("order", "A", 1), message("order", "B", 2));
    bus.publish(std::slice::from_ref(&first)).await.unwrap();
    match bus.publish(std::slice::from_ref(&second)).await {
        Err(BusError::Nacked { message_id }) => assert_eq!(message_id, second.message_id),
        other => panic!("expected Nacked, got {other:?}"),
    }
    let _ = conn.close(200, "done".into()).await;
    common::cleanup(&bus).await;
}

#[tokio::test]
async fn queues_are_quorum_with_an_explicit_delivery_limit() {
    let bus = bus(config("limits")).await;
    let sub = Subscription::new("g", ["order.*"])
        .with_max_attempts(4)
        .with_retry_delay(Duration::from_millis(250));
    bus.declare(&sub).await.unwrap();
    let listing = common::rabbitmqctl(&["list_queues", "name", "arguments", "-q"]);
    let line = |name: String| {
        listing
            .lines()
            .find(|l| l.split('\t').next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{name} not declared:\n{listing}"))
            .to_owned()
    };
    let work = line(bus.topology().queue("g"));
    assert!(
        work.contains("x-queue-type") && work.contains("quorum"),
        "{work}"
    );
    assert!(
        work.contains("x-delivery-limit") && work.contains(",4}"),
        "{work}"
    );
    assert!(work.contains("x-dead-letter-exchange"), "{work}");
    let retry = line(bus.topology().retry_queue(&sub));
    assert!(
        retry.contains("x-message-ttl") && retry.contains(",250}"),
        "{retry}"
    );
    let dead = line(bus.topology().dead_letter_queue("g"));
    assert!(dead.contains("quorum"), "{dead}");
    common::cleanup(&bus).await;
}

#[tokio::test]
async fn unused_queues_expire_when_asked() {
    let bus = bus(config("expires").with_queue_expires(Some(Duration::from_secs(1)))).await;
    let sub = Subscription::new("g", ["order.*"]);
    bus.declare(&sub).await.unwrap();
    let names = [
        bus.topology().queue("g"),
        bus.topology().retry_queue(&sub),
        bus.topology().dead_letter_queue("g"),
    ];
    let declared = common::rabbitmqctl(&["list_queues", "name", "arguments", "-q"]);
    for name in &names {
        let line = declared
            .lines()
            .find(|l| l.split('\t').next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{name} not declared:\n{declared}"));
        assert!(
            line.contains("x-expires") && line.contains(",1000}"),
            "{line}"
        );
    }
    let start = std::time::Instant::now();
    loop {
        let listing = common::rabbitmqctl(&["list_queues", "name", "-q"]);
        let left: Vec<_> = names
            .iter()
            .filter(|n| listing.lines().any(|l| l.trim() == n.as_str()))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "still declared a minute after their 1 s expiry: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    common::cleanup(&bus).await;
}
