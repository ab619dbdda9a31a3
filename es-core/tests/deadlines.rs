//! The deadline scheduler's checkpoint: a restart reads what the pending
//! deadlines span, not the log's history, and loses none of them.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use es_core::doc_support::reminder::{Reminder, ReminderInput};
use es_core::saga::DEADLINE_FIRED;
use es_core::{
    CancellationToken, DeadlineScheduler, EventStore, ExpectedVersion, InMemoryCheckpointStore,
    ManualClock, Metadata, NewEvent, Payload, Position, Saga, SagaManager, StreamId,
};
use support::Interloper;
use uuid::Uuid;

/// Waits until the scheduler's subscriptions have delivered `count` events.
async fn wait_delivered(delivered: &AtomicU64, count: u64) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while delivered.load(Ordering::SeqCst) < count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} of {count} events delivered",
            delivered.load(Ordering::SeqCst)
        )
    });
}

/// How many `$deadline-fired` records the saga's stream holds.
async fn fired(store: &dyn EventStore, saga: Uuid) -> usize {
    let stream = StreamId::for_aggregate(Reminder::TYPE, saga).unwrap();
    let events = store.read_stream(&stream, 1, 100).await.unwrap();
    events
        .iter()
        .filter(|e| &*e.event_type == DEADLINE_FIRED)
        .count()
}

/// Waits until the saga's deadline has fired.
async fn until_fired(store: &dyn EventStore, saga: Uuid, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while fired(store, saga).await == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

/// The log's length.
async fn logged(store: &dyn EventStore) -> u64 {
    store.read_all(Position::START, 10_000).await.unwrap().len() as u64
}

/// A restarted scheduler reads from the record of the oldest pending
/// deadline, not from the start of the log, and still fires it.
#[tokio::test]
async fn a_restart_reads_from_the_oldest_pending_deadline_and_fires_it() {
    let store = Arc::new(Interloper::new(false, None));
    let delivered = Arc::clone(&store.delivered);
    let clock = Arc::new(ManualClock::default());
    let manager = Arc::new(SagaManager::<Reminder>::new(
        Arc::clone(&store) as Arc<dyn EventStore>,
        clock.clone(),
    ));
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let (early, late) = (Uuid::now_v7(), Uuid::now_v7());
    let fill = |n: usize| {
        let store = Arc::clone(&store);
        async move {
            let filler = StreamId::new("filler-1").unwrap();
            for _ in 0..n / 100 {
                let batch = (0..100)
                    .map(|_| {
                        let payload = Payload::from_json("{}").unwrap();
                        NewEvent::new("Filled", 1, payload, Metadata::new())
                    })
                    .collect();
                store
                    .append(&filler, ExpectedVersion::Any, batch)
                    .await
                    .unwrap();
            }
        }
    };
    // The early deadline is due at 30 s, the late one at 50 s; 2,000 events
    // lie between their records.
    manager
        .handle(&ReminderInput::Started.to(early))
        .await
        .unwrap();
    fill(2_000).await;
    clock.advance(Duration::from_secs(20));
    manager
        .handle(&ReminderInput::Started.to(late))
        .await
        .unwrap();
    fill(100).await;

    let scheduler = || {
        DeadlineScheduler::new(Arc::clone(&manager), Duration::from_millis(5))
            .with_checkpoint(checkpoints.clone(), "reminder-deadlines")
            .with_checkpoint_every(Duration::ZERO)
    };
    let stop = CancellationToken::new();
    let first = tokio::spawn(scheduler().run(stop.clone()));
    wait_delivered(&delivered, logged(&*store).await).await;
    clock.advance(Duration::from_secs(15));
    until_fired(&*store, early, "the early deadline fires").await;
    // The scheduler reads its own fired record, then stops.
    let log = logged(&*store).await;
    wait_delivered(&delivered, log).await;
    stop.cancel();
    first.await.unwrap().unwrap();
    assert_eq!(
        fired(&*store, late).await,
        0,
        "the late deadline is not due yet"
    );

    // The second run reads only what follows the late deadline's record.
    delivered.store(0, Ordering::SeqCst);
    let stop = CancellationToken::new();
    let second = tokio::spawn(scheduler().run(stop.clone()));
    clock.advance(Duration::from_secs(20));
    until_fired(&*store, late, "the late deadline fires after the restart").await;
    stop.cancel();
    second.await.unwrap().unwrap();
    let read = delivered.load(Ordering::SeqCst);
    assert!(log > 2_100, "{log}");
    assert!(
        read < 150,
        "the restart read {read} events of a log of {log}"
    );
    // And the early deadline fired once.
    assert_eq!(fired(&*store, early).await, 1);
}
