//! Resilience against the real broker: connections cut and a broker restart
//! during a publish-and-consume run (nothing lost, nothing applied twice),
//! and a consumer killed mid-batch (its unacked messages go to another).
//!
//! These tests cut connections or stop the broker, so they run one at a time.
// Helpers outside #[test] fns unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    bus, cleanup, close_connections, config, eventually, message, BrokerStopped, Counter,
};
use es_core::{Delivery, EventBus, Message, Outcome, Subscription};
use es_rabbit::RabbitBus;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(90);
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Publishes `total` messages in batches, retrying a batch until the broker
/// confirms it (a retried batch may be delivered twice: at least once).
async fn publish_all(bus: RabbitBus, total: u64, sent: Arc<Mutex<HashSet<Uuid>>>) -> u32 {
    let mut failures = 0;
    for start in (0..total).step_by(25) {
        let batch: Vec<Message> = (start..(start + 25).min(total))
            .map(|n| message("order", "Placed", n))
            .collect();
        loop {
            match bus.publish(&batch).await {
                Ok(()) => break,
                Err(_) => {
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        sent.lock()
            .unwrap()
            .extend(batch.iter().map(|m| m.message_id));
        // Paced so that the run outlasts the disruption (rabbitmqctl is slow).
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    failures
}

async fn run_with_disruption(test: &str, disrupt: impl FnOnce(&str) + Send + 'static) {
    const TOTAL: u64 = 4_000;
    let cfg = config(test);
    let name = cfg.connection_name.clone();
    let publisher = bus(cfg.clone()).await;
    let consumer = bus(cfg).await;
    let counter = Counter::default();
    let handle = consumer
        .subscribe(
            Subscription::new("g", ["order.*"]).with_prefetch(16),
            Arc::new(counter.clone()),
        )
        .await
        .unwrap();
    let sent: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let publishing = tokio::spawn(publish_all(publisher.clone(), TOTAL, Arc::clone(&sent)));
    eventually("the run under way", LIMIT, || counter.applied_count() > 200).await;
    // The broker is disrupted while publishing and consuming go on.
    let disrupting = tokio::task::spawn_blocking(move || disrupt(&name));
    disrupting.await.unwrap();
    let failures = publishing.await.unwrap();
    eventually("every published message applied", LIMIT, || {
        counter.applied_count() == TOTAL as usize
    })
    .await;
    handle.stop().await;
    let sent = sent.lock().unwrap().clone();
    let applied: HashSet<Uuid> = counter.applied.lock().unwrap().keys().copied().collect();
    assert_eq!(sent.len(), TOTAL as usize);
    assert_eq!(applied, sent, "nothing lost, nothing foreign");
    assert_eq!(counter.applied_twice(), 0, "nothing applied twice");
    assert!(counter.deliveries() >= TOTAL);
    assert!(
        consumer.connections_opened() >= 2 && publisher.connections_opened() >= 2,
        "both reconnected: consumer {}, publisher {}",
        consumer.connections_opened(),
        publisher.connections_opened()
    );
    println!(
        "{test}: {TOTAL} published ({failures} publish attempts failed), {} deliveries, {TOTAL} applied once",
        counter.deliveries()
    );
    cleanup(&publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_during_publish_and_consume_lose_nothing() {
    let _serial = SERIAL.lock().await;
    run_with_disruption("cut", |name| {
        let closed = close_connections(name);
        assert!(closed >= 2, "closed {closed} connections named {name}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_during_publish_and_consume_loses_nothing() {
    let _serial = SERIAL.lock().await;
    run_with_disruption("restart", |_| {
        let stopped = BrokerStopped::stop();
        std::thread::sleep(Duration::from_millis(1_000));
        drop(stopped); // start_app, and wait until it answers
    })
    .await;
}

#[tokio::test]
async fn a_consumer_killed_mid_batch_has_its_messages_redelivered_to_another() {
    let _serial = SERIAL.lock().await;
    const TOTAL: u64 = 100;
    let cfg = config("killed");
    let victim_name = format!("{}victim", cfg.connection_name);
    let victim = bus(cfg.clone().with_connection_name(victim_name.clone())).await;
    let survivor = bus(cfg.with_connection_name("survivor")).await;
    let sub = Subscription::new("g", ["order.*"]).with_prefetch(10);

    // The victim takes 10 messages and hangs on them until released.
    let held: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let release = Arc::new(tokio::sync::Notify::new());
    let (h, r) = (Arc::clone(&held), Arc::clone(&release));
    let victim_handle = victim
        .subscribe(
            sub.clone(),
            Arc::new(move |d: Delivery| {
                let (h, r) = (Arc::clone(&h), Arc::clone(&r));
                async move {
                    h.lock().unwrap().insert(d.message.message_id);
                    r.notified().await;
                    Outcome::Ack
                }
            }),
        )
        .await
        .unwrap();
    let batch: Vec<Message> = (0..TOTAL).map(|n| message("order", "Placed", n)).collect();
    victim.publish(&batch).await.unwrap();
    eventually("the victim holds a full prefetch", LIMIT, || {
        held.lock().unwrap().len() == 10
    })
    .await;

    // Kill it: its connection dies under it (as when its process dies).
    assert_eq!(close_connections(&victim_name), 1);
    drop(victim_handle);

    let attempts: Arc<Mutex<Vec<(Uuid, u32)>>> = Arc::default();
    let counter = Counter::default();
    let (a, c) = (Arc::clone(&attempts), counter.clone());
    let survivor_handle = survivor
        .subscribe(
            sub,
            Arc::new(move |d: Delivery| {
                let (a, c) = (Arc::clone(&a), c.clone());
                async move {
                    a.lock().unwrap().push((d.message.message_id, d.attempt));
                    es_core::MessageHandler::handle(&c, &d).await
                }
            }),
        )
        .await
        .unwrap();
    eventually("all applied by the survivor", LIMIT, || {
        counter.applied_count() == TOTAL as usize
    })
    .await;
    // The victim's handlers now finish; their acks must not be sent on the
    // dead channel (nor on any other).
    release.notify_waiters();
    tokio::time::sleep(Duration::from_millis(200)).await;
    survivor_handle.stop().await;

    let held = held.lock().unwrap().clone();
    let attempts = attempts.lock().unwrap().clone();
    for id in &held {
        let attempt = attempts.iter().find(|(m, _)| m == id).map(|(_, a)| *a);
        assert_eq!(attempt, Some(2), "held message redelivered as attempt 2");
    }
    assert_eq!(counter.applied_twice(), 0);
    assert_eq!(survivor.queue_depth("g").await.unwrap(), 0);
    cleanup(&survivor).await;
}
