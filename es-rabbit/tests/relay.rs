//! The relay: the store's log reaches RabbitMQ in order, from a PostgreSQL
//! checkpoint, with one active instance and a standby that takes over.

// Helpers outside #[test] fns unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bus, cleanup, config, eventually, Counter};
use es_core::{
    CancellationToken, CheckpointStore, Delivery, EventBus, EventStore, ExpectedVersion,
    InMemoryCheckpointStore, InMemoryEventStore, LeaderLock, LocalLeaderLock, Metadata, NewEvent,
    Outcome, Payload, Position, StreamId, Subscription,
};
use es_postgres::{PgCheckpointStore, PgEventStore, PgLeaderLock};
use es_rabbit::{RabbitBus, RabbitRelay};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(60);

async fn append(store: &dyn EventStore, count: usize, offset: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for n in offset..offset + count {
        let event = NewEvent::new(
            "OrderPlaced",
            1,
            Payload::from_json(format!(r#"{{"n":{n}}}"#)).unwrap(),
            Metadata::new().with_correlation_id(Uuid::now_v7()),
        );
        ids.push(event.event_id);
        let stream = StreamId::for_aggregate("order", n % 17).unwrap();
        store
            .append(&stream, ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
    ids
}

/// A relay of `store`'s log with its checkpoint in the store's schema and a
/// PostgreSQL advisory lock.
fn pg_relay(name: &str, store: &PgEventStore, bus: &RabbitBus) -> RabbitRelay {
    let pool = store.pool().clone();
    RabbitRelay::new(
        name,
        Arc::new(store.clone()),
        bus,
        Arc::new(PgCheckpointStore::new(pool.clone(), store.schema())),
        Arc::new(PgLeaderLock::new(pool)),
    )
}

#[tokio::test]
async fn the_relay_publishes_the_log_in_order_and_checkpoints_in_postgres() {
    let store = es_postgres::testing::fresh_store().await;
    let bus = bus(config("relay")).await;
    // Ordered consumption: one consumer, one message at a time.
    let seen: Arc<Mutex<Vec<Uuid>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let handle = bus
        .subscribe(
            Subscription::new("g", ["order.*"]).with_prefetch(1),
            Arc::new(move |d: Delivery| {
                let sink = Arc::clone(&sink);
                async move {
                    sink.lock().unwrap().push(d.message.message_id);
                    Outcome::Ack
                }
            }),
        )
        .await
        .unwrap();
    let ids = append(&store, 300, 0).await;
    let relay = Arc::new(pg_relay("orders-relay", &store, &bus).with_batch_size(64));
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let (relay, stop) = (Arc::clone(&relay), stop.clone());
        async move { relay.run(stop).await }
    });
    eventually("300 relayed", LIMIT, || seen.lock().unwrap().len() >= 300).await;
    let more = append(&store, 100, 300).await;
    eventually("400 relayed", LIMIT, || seen.lock().unwrap().len() >= 400).await;
    stop.cancel();
    running.await.unwrap().unwrap();
    handle.stop().await;
    assert_eq!(*relay.progress().borrow(), store.head().await.unwrap());

    let mut expected = ids;
    expected.extend(more);
    assert_eq!(
        *seen.lock().unwrap(),
        expected,
        "every event once, in log order"
    );
    let checkpoints = PgCheckpointStore::new(store.pool().clone(), store.schema());
    assert_eq!(
        checkpoints.load("orders-relay").await.unwrap(),
        Some(store.head().await.unwrap())
    );
    cleanup(&bus).await;
}

#[tokio::test]
async fn a_standby_relay_takes_over_when_the_active_one_dies() {
    let store = es_postgres::testing::fresh_store().await;
    let bus = bus(config("failover")).await;
    let counter = Counter::default();
    let handle = bus
        .subscribe(
            Subscription::new("g", ["order.*"]).with_prefetch(32),
            Arc::new(counter.clone()),
        )
        .await
        .unwrap();
    let lock = Arc::new(
        PgLeaderLock::new(store.pool().clone())
            .retry_interval(Duration::from_millis(100))
            .check_interval(Duration::from_millis(200), Duration::from_secs(2)),
    );
    let checkpoints = Arc::new(PgCheckpointStore::new(store.pool().clone(), store.schema()));
    let make = || {
        Arc::new(RabbitRelay::new(
            "orders-relay",
            Arc::new(store.clone()),
            &bus,
            Arc::clone(&checkpoints) as Arc<dyn CheckpointStore>,
            Arc::clone(&lock) as Arc<dyn LeaderLock>,
        ))
    };
    let (first, second) = (make(), make());
    let stop = CancellationToken::new();
    let mut first_active = first.active();
    let mut second_active = second.active();
    let first_task = tokio::spawn({
        let (relay, stop) = (Arc::clone(&first), stop.clone());
        async move { relay.run(stop).await }
    });
    first_active.wait_for(|a| *a).await.unwrap();
    let second_task = tokio::spawn({
        let (relay, stop) = (Arc::clone(&second), stop.clone());
        async move { relay.run(stop).await }
    });

    let mut ids = append(&store, 200, 0).await;
    eventually("200 relayed", LIMIT, || counter.applied_count() == 200).await;
    assert!(!*second_active.borrow(), "one active relay at a time");

    // The active relay dies (its task and lock connection go away).
    first_task.abort();
    let _ = first_task.await;
    tokio::time::timeout(LIMIT, second_active.wait_for(|a| *a))
        .await
        .expect("the standby takes over")
        .unwrap();
    ids.extend(append(&store, 200, 200).await);
    eventually("400 relayed", LIMIT, || counter.applied_count() == 400).await;
    stop.cancel();
    second_task.await.unwrap().unwrap();
    handle.stop().await;

    let applied: std::collections::HashSet<Uuid> =
        counter.applied.lock().unwrap().keys().copied().collect();
    assert_eq!(applied, ids.into_iter().collect());
    assert_eq!(counter.applied_twice(), 0);
    cleanup(&bus).await;
}

#[tokio::test]
async fn the_relay_runs_on_the_in_memory_store_with_a_local_lock() {
    let store = Arc::new(InMemoryEventStore::new());
    let bus = bus(config("memrelay")).await;
    bus.declare(&Subscription::new("g", ["order.*"]))
        .await
        .unwrap();
    append(store.as_ref(), 50, 0).await;
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let relay = RabbitRelay::new(
        "mem",
        store.clone(),
        &bus,
        checkpoints.clone(),
        Arc::new(LocalLeaderLock::new()),
    );
    let stop = CancellationToken::new();
    let relay = Arc::new(relay);
    let running = tokio::spawn({
        let (relay, stop) = (Arc::clone(&relay), stop.clone());
        async move { relay.run(stop).await }
    });
    let head = store.head().await.unwrap();
    for _ in 0..3000 {
        if checkpoints.load("mem").await.unwrap() == Some(head) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    running.await.unwrap().unwrap();
    assert_ne!(head, Position::START);
    assert_eq!(checkpoints.load("mem").await.unwrap(), Some(head));
    assert_eq!(bus.queue_depth("g").await.unwrap(), 50);
    cleanup(&bus).await;
}

#[tokio::test]
async fn a_command_no_queue_receives_holds_the_relay_until_one_is_bound() {
    let store = Arc::new(InMemoryEventStore::new());
    let bus = bus(config("mandatory")).await;
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let one = |stream: &str| {
        let stream = StreamId::new(stream).unwrap();
        let store = Arc::clone(&store);
        async move {
            let event = NewEvent::new(
                "Happened",
                1,
                Payload::from_json("{}").unwrap(),
                Metadata::new(),
            );
            store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .unwrap()
                .position
        }
    };
    // An event nobody listens to yet, then a command on a topic with no
    // queue (the default route publishes on the stream's category).
    let event_at = one("audit-1").await;
    let command_at = one("billing_commands-1").await;
    let relay = Arc::new(
        RabbitRelay::new(
            "mandatory",
            store.clone(),
            &bus,
            checkpoints.clone(),
            Arc::new(LocalLeaderLock::new()),
        )
        .with_batch_size(1)
        .with_mandatory_topics(["billing_commands"]),
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let (relay, stop) = (Arc::clone(&relay), stop.clone());
        async move { relay.run(stop).await }
    });
    let progress = relay.progress();
    eventually("the event passed over", LIMIT, || {
        *progress.borrow() >= event_at
    })
    .await;
    // The command is not confirmed and passed over: the relay retries it,
    // and says what holds it.
    let blocked = relay.blocked();
    eventually("the relay reports that it is blocked", LIMIT, || {
        blocked.borrow().is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(checkpoints.load("mandatory").await.unwrap(), Some(event_at));
    let holding = blocked.borrow().clone().unwrap();
    assert_eq!(
        holding.unroutable.as_deref(),
        Some("billing_commands.Happened")
    );
    assert!(holding.attempts >= 2, "{holding:?}");

    bus.declare(&Subscription::new("billing", ["billing_commands.*"]))
        .await
        .unwrap();
    eventually("the command delivered once a queue is bound", LIMIT, || {
        *progress.borrow() == command_at
    })
    .await;
    assert_eq!(bus.queue_depth("billing").await.unwrap(), 1);
    assert_eq!(*blocked.borrow(), None, "no longer blocked");
    stop.cancel();
    running.await.unwrap().unwrap();
    cleanup(&bus).await;
}
