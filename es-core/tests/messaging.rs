//! The in-process bus, the relay, and sagas with deadlines on a virtual clock.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use es_core::bus::{Delivery, Message, Outcome, Subscription};
use es_core::doc_support::reminder::{Reminder, ReminderInput};
use es_core::saga::{COMMAND_RECORD, DEADLINE_SET};
use es_core::{
    CancellationToken, DeadlineScheduler, EventBus, EventStore, InMemoryBus,
    InMemoryCheckpointStore, InMemoryEventStore, ManualClock, Metadata, Position, Relay,
    SagaHandler, SagaManager, SagaOutcome, StreamId,
};
use uuid::Uuid;

fn msg(topic: &str, ty: &str, n: u32) -> Message {
    Message {
        message_id: Uuid::now_v7(),
        topic: topic.into(),
        message_type: ty.into(),
        schema_version: 1,
        payload: es_core::Payload::from_trusted_json(n.to_string()),
        metadata: Metadata::new(),
        source: None,
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_share_a_group_and_groups_each_get_a_copy() {
    let bus = InMemoryBus::new();
    let seen_a = Arc::new(Mutex::new(Vec::new()));
    let seen_b = Arc::new(Mutex::new(Vec::new()));
    let handler = |seen: Arc<Mutex<Vec<Uuid>>>| {
        Arc::new(move |d: Delivery| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(d.message.message_id);
                Outcome::Ack
            }
        })
    };
    let _a1 = bus
        .subscribe(Subscription::new("a", ["order.*"]), handler(seen_a.clone()))
        .await
        .unwrap();
    let _a2 = bus
        .subscribe(Subscription::new("a", ["order.*"]), handler(seen_a.clone()))
        .await
        .unwrap();
    let _b = bus
        .subscribe(
            Subscription::new("b", ["#.Created"]),
            handler(seen_b.clone()),
        )
        .await
        .unwrap();
    let messages: Vec<Message> = (0..200)
        .map(|n| msg("order", if n % 2 == 0 { "Created" } else { "Paid" }, n))
        .collect();
    bus.publish(&messages).await.unwrap();
    bus.publish(&[msg("inventory", "Reserved", 0)])
        .await
        .unwrap();
    eventually("deliveries", || {
        seen_a.lock().unwrap().len() == 200 && seen_b.lock().unwrap().len() == 100
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut a = seen_a.lock().unwrap().clone();
    a.sort();
    a.dedup();
    assert_eq!(
        a.len(),
        200,
        "a message was delivered twice within one group"
    );
    assert_eq!(seen_b.lock().unwrap().len(), 100);
    assert_eq!(bus.queue_depth("a"), 0);
}

#[tokio::test(start_paused = true)]
async fn retries_then_dead_letters_after_exactly_max_attempts() {
    let bus = InMemoryBus::new();
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&attempts);
    let handler = Arc::new(move |d: Delivery| {
        let counter = Arc::clone(&counter);
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            match d.message.message_type.as_ref() {
                "Flaky" if d.attempt < 3 => Outcome::retry("not yet"),
                "Flaky" => Outcome::Ack,
                "Poison" => Outcome::dead_letter("cannot parse"),
                "Panics" => panic!("handler bug"),
                _ => Outcome::retry("always failing"),
            }
        }
    });
    let sub = Subscription::new("g", ["t.*"])
        .with_max_attempts(4)
        .with_retry_delay(Duration::from_secs(2))
        .with_prefetch(1);
    let _h = bus.subscribe(sub, handler).await.unwrap();
    bus.publish(&[
        msg("t", "Flaky", 0),
        msg("t", "Poison", 0),
        msg("t", "Failing", 0),
        msg("t", "Panics", 0),
    ])
    .await
    .unwrap();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let dead = bus.dead_letters("g");
    let by_type = |t: &str| {
        dead.iter()
            .find(|d| d.message.as_ref().is_some_and(|m| &*m.message_type == t))
            .map(|d| (d.attempts, d.reason.clone()))
    };
    assert_eq!(by_type("Flaky"), None);
    assert_eq!(by_type("Poison"), Some((1, "cannot parse".into())));
    assert_eq!(by_type("Failing"), Some((4, "always failing".into())));
    assert_eq!(by_type("Panics").map(|(a, _)| a), Some(4));
    assert_eq!(attempts.load(Ordering::SeqCst), 3 + 1 + 4 + 4);
    assert_eq!(bus.queue_depth("g"), 0);
}

#[tokio::test]
async fn declared_groups_keep_messages_until_consumed_and_stopping_stops() {
    let bus = InMemoryBus::new();
    bus.declare(&Subscription::new("late", ["x.#"]))
        .await
        .unwrap();
    bus.publish(&[msg("x", "A", 1), msg("y", "A", 1)])
        .await
        .unwrap();
    assert_eq!(bus.queue_depth("late"), 1);
    let got = Arc::new(AtomicU32::new(0));
    let g = Arc::clone(&got);
    let handle = bus
        .subscribe(
            Subscription::new("late", ["x.#"]),
            Arc::new(move |_d: Delivery| {
                let g = Arc::clone(&g);
                async move {
                    g.fetch_add(1, Ordering::SeqCst);
                    Outcome::Ack
                }
            }),
        )
        .await
        .unwrap();
    eventually("the waiting message", || got.load(Ordering::SeqCst) == 1).await;
    handle.stop().await;
    bus.publish(&[msg("x", "B", 2)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        got.load(Ordering::SeqCst),
        1,
        "a stopped subscription consumed"
    );
    assert_eq!(bus.queue_depth("late"), 1);
    assert!(bus
        .subscribe(
            Subscription::new("", ["x"]),
            Arc::new(|_d: Delivery| async { Outcome::Ack })
        )
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_the_log_in_order_and_resumes_from_its_checkpoint() {
    let store = Arc::new(InMemoryEventStore::new());
    let bus = InMemoryBus::new();
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let received = Arc::new(Mutex::new(Vec::new()));
    let r = Arc::clone(&received);
    let _h = bus
        .subscribe(
            Subscription::new("all", ["#"]).with_prefetch(1),
            Arc::new(move |d: Delivery| {
                let r = Arc::clone(&r);
                async move {
                    r.lock().unwrap().push(d.message);
                    Outcome::Ack
                }
            }),
        )
        .await
        .unwrap();
    let stream = StreamId::new("thing-1").unwrap();
    let written = es_core::testing::conformance::events(0, 50);
    let ids: Vec<Uuid> = written.iter().map(|e| e.event_id).collect();
    store
        .append(&stream, es_core::ExpectedVersion::Any, written)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let relay = Arc::new(
        Relay::new(
            "relay",
            store.clone(),
            Arc::new(bus.clone()),
            checkpoints.clone(),
        )
        .with_batch_size(7),
    );
    let running = tokio::spawn({
        let (relay, stop) = (Arc::clone(&relay), stop.clone());
        async move { relay.run(stop).await }
    });
    eventually("50 messages", || received.lock().unwrap().len() == 50).await;
    stop.cancel();
    running.await.unwrap().unwrap();
    let got: Vec<Uuid> = received
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(got, ids, "relayed out of order or with gaps");
    assert!(received
        .lock()
        .unwrap()
        .iter()
        .all(|m| &*m.topic == "thing"));
    let head = store.head().await.unwrap();
    assert_eq!(
        es_core::CheckpointStore::load(&*checkpoints, "relay")
            .await
            .unwrap(),
        Some(head)
    );

    // A new relay instance resumes after the checkpoint: only new events go out.
    store
        .append(
            &stream,
            es_core::ExpectedVersion::Any,
            es_core::testing::conformance::events(50, 3),
        )
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let relay = Relay::new(
        "relay",
        store.clone(),
        Arc::new(bus.clone()),
        checkpoints.clone(),
    );
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    eventually("53 messages", || received.lock().unwrap().len() == 53).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(
        received.lock().unwrap().len(),
        53,
        "the restarted relay republished old events"
    );
}

fn input(saga: Uuid, input: &ReminderInput) -> Message {
    input.to(saga)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_reacts_once_per_message_and_its_deadline_fires_on_the_virtual_clock() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let clock = ManualClock::default();
    let manager = Arc::new(SagaManager::<Reminder>::new(
        Arc::clone(&store),
        Arc::new(clock.clone()),
    ));
    let (nudged, stopped_early) = (Uuid::now_v7(), Uuid::now_v7());

    let start = input(nudged, &ReminderInput::Started);
    assert!(matches!(
        manager.handle(&start).await.unwrap(),
        SagaOutcome::Reacted { .. }
    ));
    assert_eq!(
        manager.handle(&start).await.unwrap(),
        SagaOutcome::Duplicate
    );
    let instance = manager.load(nudged).await.unwrap();
    assert!(instance.state.waiting);
    assert_eq!(instance.deadlines.len(), 1);
    let stream = SagaManager::<Reminder>::stream_id(nudged);
    let records = store.read_stream(&stream, 1, 10).await.unwrap();
    let types: Vec<&str> = records.iter().map(|r| &*r.event_type).collect();
    assert_eq!(
        types,
        vec!["Waiting", DEADLINE_SET],
        "one reaction, one atomic append"
    );
    assert!(records
        .iter()
        .all(|r| r.metadata.correlation_id == Some(nudged)
            && r.metadata.causation_id == Some(start.message_id)));

    manager
        .handle(&input(stopped_early, &ReminderInput::Started))
        .await
        .unwrap();
    manager
        .handle(&input(stopped_early, &ReminderInput::Stopped))
        .await
        .unwrap();
    assert!(manager
        .load(stopped_early)
        .await
        .unwrap()
        .deadlines
        .is_empty());

    // Not due yet: nothing fires.
    assert_eq!(
        manager.fire_deadline(nudged, "nudge").await.unwrap(),
        SagaOutcome::Ignored
    );

    let stop = CancellationToken::new();
    let scheduler = DeadlineScheduler::new(Arc::clone(&manager), Duration::from_millis(10));
    let running = tokio::spawn(scheduler.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        2,
        "fired before its time"
    );
    clock.advance(Duration::from_secs(30));
    let mut fired = false;
    for _ in 0..500 {
        if store.stream_version(&stream).await.unwrap() > 2 {
            fired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(fired, "the deadline did not fire");
    stop.cancel();
    running.await.unwrap().unwrap();

    let records = store.read_stream(&stream, 1, 10).await.unwrap();
    let types: Vec<&str> = records.iter().map(|r| &*r.event_type).collect();
    assert_eq!(
        types,
        vec![
            "Waiting",
            DEADLINE_SET,
            "$deadline-fired",
            "Done",
            COMMAND_RECORD
        ]
    );
    assert_eq!(
        manager.fire_deadline(nudged, "nudge").await.unwrap(),
        SagaOutcome::Ignored,
        "fired twice"
    );
    let early = SagaManager::<Reminder>::stream_id(stopped_early);
    let early_types: Vec<String> = store
        .read_stream(&early, 1, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.event_type.to_string())
        .collect();
    assert!(
        !early_types.contains(&COMMAND_RECORD.to_string()),
        "a cancelled deadline fired: {early_types:?}"
    );

    // The relay turns the command record into a command message with the record's id.
    let bus = InMemoryBus::new();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    let _h = bus
        .subscribe(
            Subscription::new("people", ["people.*"]),
            Arc::new(move |d: Delivery| {
                let g = Arc::clone(&g);
                async move {
                    g.lock().unwrap().push(d.message);
                    Outcome::Ack
                }
            }),
        )
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let relay = Relay::new(
        "r",
        Arc::clone(&store),
        Arc::new(bus),
        Arc::new(InMemoryCheckpointStore::new()),
    );
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    eventually("the nudge", || got.lock().unwrap().len() == 1).await;
    stop.cancel();
    running.await.unwrap().unwrap();
    let nudge = got.lock().unwrap()[0].clone();
    assert_eq!(&*nudge.message_type, "Nudge");
    assert_eq!(nudge.message_id, records[4].event_id);
    assert_eq!(nudge.metadata.correlation_id, Some(nudged));
    let _ = Position::START;
}

#[tokio::test]
async fn the_saga_handler_dead_letters_undecodable_input() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let manager = Arc::new(SagaManager::<Reminder>::new(
        store,
        Arc::new(ManualClock::default()),
    ));
    let handler = SagaHandler(manager);
    let bad = msg("reminders", "Unknown", 1);
    let outcome = es_core::MessageHandler::handle(
        &handler,
        &Delivery {
            message: bad,
            attempt: 1,
        },
    )
    .await;
    assert!(matches!(outcome, Outcome::DeadLetter { .. }), "{outcome:?}");
    let good = input(Uuid::now_v7(), &ReminderInput::Started);
    let outcome = es_core::MessageHandler::handle(
        &handler,
        &Delivery {
            message: good,
            attempt: 1,
        },
    )
    .await;
    assert_eq!(outcome, Outcome::Ack);
}

#[tokio::test]
async fn managers_sharing_a_store_see_each_others_reactions() {
    // Each manager keeps folded instances in memory; what another manager
    // appended meanwhile must still count.
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let clock = Arc::new(ManualClock::default());
    let a = SagaManager::<Reminder>::new(Arc::clone(&store), clock.clone()).with_instance_cache(16);
    let b = SagaManager::<Reminder>::new(Arc::clone(&store), clock).with_instance_cache(16);
    let saga = Uuid::now_v7();
    let started = input(saga, &ReminderInput::Started);
    let stopped = input(saga, &ReminderInput::Stopped);
    assert!(matches!(
        a.handle(&started).await.unwrap(),
        SagaOutcome::Reacted { .. }
    ));
    assert!(a.load(saga).await.unwrap().state.waiting);
    assert_eq!(b.handle(&started).await.unwrap(), SagaOutcome::Duplicate);
    assert!(matches!(
        b.handle(&stopped).await.unwrap(),
        SagaOutcome::Reacted { .. }
    ));
    // a's cached instance predates the stop: it must catch up.
    assert_eq!(a.handle(&stopped).await.unwrap(), SagaOutcome::Duplicate);
    let seen_by_a = a.load(saga).await.unwrap();
    assert!(seen_by_a.state.done && seen_by_a.deadlines.is_empty());
    assert_eq!(seen_by_a, b.load(saga).await.unwrap());
}

#[tokio::test]
async fn an_instance_cache_reads_nothing_before_a_reaction_it_writes() {
    let store = Arc::new(support::Interloper::new(false, None));
    let clock = Arc::new(ManualClock::default());
    let cached = SagaManager::<Reminder>::new(store.clone(), clock.clone()).with_instance_cache(16);
    let saga = Uuid::now_v7();
    let started = input(saga, &ReminderInput::Started);
    let stopped = input(saga, &ReminderInput::Stopped);
    assert!(matches!(
        cached.handle(&started).await.unwrap(),
        SagaOutcome::Reacted { version: 2, .. }
    ));
    assert!(matches!(
        cached.handle(&stopped).await.unwrap(),
        SagaOutcome::Reacted { version: 4, .. }
    ));
    assert_eq!(
        cached.handle(&stopped).await.unwrap(),
        SagaOutcome::Duplicate
    );
    // The first reaction loaded the (empty) stream; the second decided on the
    // instance the first left, reading nothing; the duplicate, which writes
    // nothing, was confirmed by reading the tail after version 4.
    assert_eq!(*store.reads_from.lock().unwrap(), vec![1, 5]);
    let uncached = SagaManager::<Reminder>::new(store.clone(), clock);
    let full = uncached.load(saga).await.unwrap();
    assert!(full.state.done && full.deadlines.is_empty());
}

#[tokio::test]
async fn a_stale_cached_instance_never_decides_to_do_nothing() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let clock = Arc::new(ManualClock::default());
    let a = SagaManager::<Reminder>::new(Arc::clone(&store), clock.clone()).with_instance_cache(16);
    let b = SagaManager::<Reminder>::new(Arc::clone(&store), clock);
    let saga = Uuid::now_v7();
    // a caches the instance while there is nothing to stop.
    assert_eq!(
        a.handle(&input(saga, &ReminderInput::Stopped))
            .await
            .unwrap(),
        SagaOutcome::NoChange
    );
    // b starts it behind a's back.
    assert!(matches!(
        b.handle(&input(saga, &ReminderInput::Started))
            .await
            .unwrap(),
        SagaOutcome::Reacted { .. }
    ));
    // On a's cached instance a stop changes nothing; on the stream it stops.
    assert!(matches!(
        a.handle(&input(saga, &ReminderInput::Stopped))
            .await
            .unwrap(),
        SagaOutcome::Reacted { .. }
    ));
    assert!(b.load(saga).await.unwrap().state.done);
}
