//! The relay on the in-memory store: it publishes the log and checkpoints
//! it, and a command that no queue receives holds it until one is bound.
//! (Its tests on PostgreSQL, with the advisory lock and a standby, are in
//! the cross-crate suite: `tests/tests/relay.rs`.)

// Helpers outside #[test] fns unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{bus, cleanup, config, eventually};
use es_core::{
    CancellationToken, CheckpointStore, EventBus, EventStore, ExpectedVersion,
    InMemoryCheckpointStore, InMemoryEventStore, LocalLeaderLock, Metadata, NewEvent, Payload,
    Position, StreamId, Subscription,
};
use es_rabbit::RabbitRelay;
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
