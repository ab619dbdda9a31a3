//! es-rabbit's relay on the production backends: the PostgreSQL store's log
//! reaches RabbitMQ in order from a PostgreSQL checkpoint, with one active
//! instance under a PostgreSQL advisory lock and a standby that takes over.
//! (The relay's tests on the in-memory store are es-rabbit's own.)

// Helpers outside #[test] fns unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use es_core::{
    CancellationToken, CheckpointStore, Delivery, EventBus, EventStore, ExpectedVersion,
    LeaderLock, Metadata, NewEvent, Outcome, Payload, StreamId, Subscription,
};
use es_postgres::{PgCheckpointStore, PgEventStore, PgLeaderLock};
use es_rabbit::{RabbitBus, RabbitRelay};
use es_tests::eventually;
use es_tests::production::{rabbit, rabbit_config};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(60);

/// Appends `count` events, one per call, over 17 streams; their ids in
/// log order.
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

/// The message ids a subscription received, in the order it received them.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Uuid>>>);

impl Received {
    async fn subscribe(&self, bus: &RabbitBus, prefetch: u16) -> es_core::SubscriptionHandle {
        let sink = self.clone();
        bus.subscribe(
            Subscription::new("g", ["order.*"]).with_prefetch(prefetch),
            Arc::new(move |d: Delivery| {
                let sink = sink.clone();
                async move {
                    sink.0.lock().unwrap().push(d.message.message_id);
                    Outcome::Ack
                }
            }),
        )
        .await
        .unwrap()
    }

    fn ids(&self) -> Vec<Uuid> {
        self.0.lock().unwrap().clone()
    }

    fn distinct(&self) -> usize {
        self.0.lock().unwrap().iter().collect::<HashSet<_>>().len()
    }
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

async fn cleanup(bus: &RabbitBus) {
    bus.delete_group(&Subscription::new("g", ["order.*"]))
        .await
        .unwrap();
    bus.delete_exchanges(&["order"]).await.unwrap();
}

#[tokio::test]
async fn the_relay_publishes_the_log_in_order_and_checkpoints_in_postgres() {
    let store = es_postgres::testing::fresh_store().await;
    let bus = rabbit(rabbit_config("relay")).await;
    // Ordered consumption: one consumer, one message at a time.
    let received = Received::default();
    let handle = received.subscribe(&bus, 1).await;
    let ids = append(&store, 300, 0).await;
    let relay = Arc::new(pg_relay("orders-relay", &store, &bus).with_batch_size(64));
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let (relay, stop) = (Arc::clone(&relay), stop.clone());
        async move { relay.run(stop).await }
    });
    eventually("300 relayed", LIMIT, || async {
        received.ids().len() >= 300
    })
    .await;
    let more = append(&store, 100, 300).await;
    eventually("400 relayed", LIMIT, || async {
        received.ids().len() >= 400
    })
    .await;
    stop.cancel();
    running.await.unwrap().unwrap();
    handle.stop().await;
    assert_eq!(*relay.progress().borrow(), store.head().await.unwrap());

    let mut expected = ids;
    expected.extend(more);
    assert_eq!(received.ids(), expected, "every event once, in log order");
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
    let bus = rabbit(rabbit_config("failover")).await;
    let received = Received::default();
    let handle = received.subscribe(&bus, 32).await;
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
    eventually("200 relayed", LIMIT, || async {
        received.distinct() == 200
    })
    .await;
    assert!(!*second_active.borrow(), "one active relay at a time");

    // The active relay dies (its task and lock connection go away).
    first_task.abort();
    let _ = first_task.await;
    tokio::time::timeout(LIMIT, second_active.wait_for(|a| *a))
        .await
        .expect("the standby takes over")
        .unwrap();
    ids.extend(append(&store, 200, 200).await);
    eventually("400 relayed", LIMIT, || async {
        received.distinct() == 400
    })
    .await;
    stop.cancel();
    second_task.await.unwrap().unwrap();
    handle.stop().await;

    // Every event reached the bus: a takeover may publish some again (the
    // consumers deduplicate by message id), never lose one.
    let got: HashSet<Uuid> = received.ids().into_iter().collect();
    assert_eq!(got, ids.into_iter().collect());
    cleanup(&bus).await;
}
