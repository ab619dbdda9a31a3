//! Schema evolution on every read path: events and commands written in the
//! shapes an older release stored are read as today's through one checked
//! [`Schema`], wherever they are read.
//!
//! The domain is a shelf (streams `shelf-<id>`) whose history an older
//! release wrote in four shapes:
//!
//! - `Stocked` v1 counted `n`; today's `Stocked` is v2 and calls it `count`
//!   (a reshape);
//! - `Restocked` v1 labelled and stocked a shelf at once: today it reads as
//!   `Labelled` then `Stocked` (a split, whose `Stocked` v1 is reshaped in
//!   turn);
//! - `Shelved` v1 is what `Stocked` was called before (a rename);
//! - `Audited` v1 told readers nothing they need: it reads as nothing (a
//!   drop).
//!
//! Commands too: `Deliver` v1 counted `n`, and `Inspect` v1 is dropped.
//!
//! Every upcaster counts its calls (a counting decorator, [`Calls`]). Each
//! test checks, on its own read path, that the count grew *and* that what
//! was read is the upcast event; where it is cheap, it also shows the same
//! history fails to decode without the schema, so the fixture is genuinely
//! old. The paths: an aggregate's load and command, a snapshot ignored or
//! used by its schema version, `read_all`, a live subscription, projection
//! runners and their rebuild, a saga's inputs through the relay and bus,
//! command consumers, a replica, a DCB decision; and two edge cases: a
//! dropped last event keeps the stream's stored version for the next
//! command, and an event of a newer version than the code knows is a typed
//! error on load and parked by projection runners, which read on.
//!
//! The store-backed paths run on the in-memory store and on PostgreSQL
//! (`DATABASE_URL`, a fresh schema per test; a missing server fails the test,
//! naming the URL, never skips it): each is a module with an `in_memory` and
//! a `postgres` test. Buses are in memory: the paths under test decode
//! messages, whatever carries them.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns may unwrap too

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use es_core::command::{outcome_of, CommandService, Commands};
use es_core::relay::default_route;
use es_core::replica::{with_source, ReplicaHandler};
use es_core::saga::{CommandRecord, COMMAND_RECORD};
use es_core::{
    Aggregate, App, AppendResult, CancellationToken, CodecError, CommandHandler, DcbStore, Decided,
    Decision, DecisionError, DecisionRunner, Decoded, Delivery, DomainEvent, EventBus, EventCodec,
    EventStore, ExpectedVersion, InMemoryBus, InMemoryCheckpointStore, InMemoryEventStore,
    InMemorySnapshotStore, InvalidTag, Loaded, Message, MessageHandler, Metadata, NewEvent,
    Outcome, Payload, Position, Projection, ProjectionError, Query, QueryItem, Reaction, Received,
    RecordedEvent, Relay, RelayPlan, Repository, RepositoryError, RetryPolicy, RunRelay, Saga,
    Schema, Snapshot, SnapshotPolicy, SnapshotStore, StoreError, StreamId, Subscription, Tag,
    Upcast, Upcaster,
};
use es_postgres::{PgEventStore, PgSnapshotStore};
use es_projections::postgres::{parked_events, rebuild, NoProgress, PgProjection};
use es_projections::postgres::{PgProjectionRunner, RebuildOptions};
use es_projections::{spawn_in_memory, ParkedEvent, ProjectionHandle, RunnerOptions};
use es_tests::eventually;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// How long anything asynchronous may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

/// Runs a test body, `async fn $name(backend: Backend)`, as the tests
/// `$name::in_memory` and `$name::postgres`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_memory() {
                super::$name(super::Backend::in_memory()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let backend = super::Backend::postgres().await;
                let cleanup = backend.clone();
                super::$name(backend).await;
                cleanup.drop_schemas().await;
            }
        }
    )*};
}

on_both_stores!(
    an_aggregate_loads_and_decides_on_upcast_history,
    a_snapshot_of_another_schema_version_is_replayed_and_one_of_this_version_used,
    read_all_subscriptions_and_projections_upcast_history_live_events_and_rebuilds,
    a_saga_reacts_to_old_inputs_relayed_from_the_store,
    command_consumers_upcast_old_commands_and_ack_dropped_ones,
    a_replica_copies_old_events_as_stored_and_reads_them_upcast,
    a_dcb_decision_folds_upcast_tagged_history,
    a_dropped_last_event_keeps_the_stored_version_for_the_next_command,
    a_newer_schema_version_is_a_typed_error_on_load_and_parked_by_projections,
);

// ---------------------------------------------------------------------------
// 1. Aggregates
// ---------------------------------------------------------------------------

/// A repository folds every event the old history reads as (split, renamed,
/// reshaped; the dropped one not at all) and decides commands on that
/// state, through `with_codec` and through `App::repository`.
async fn an_aggregate_loads_and_decides_on_upcast_history(backend: Backend) {
    let (schema, calls) = schema();
    let store = backend.store();
    append(&*store, "s1", legacy_history("s1")).await;

    // The history is old: without the schema it does not decode.
    let plain = Repository::<Shelf>::new(Arc::clone(&store));
    let refused = plain.load("s1").await;
    assert!(
        matches!(
            refused,
            Err(RepositoryError::Codec(CodecError::Decode { .. }))
        ),
        "{refused:?}"
    );

    let shelves = Repository::<Shelf>::new(Arc::clone(&store)).with_codec(schema.codec());
    let before = calls.now();
    let loaded = shelves.load("s1").await.unwrap();
    assert_eq!(calls.now() - before, Counts::HISTORY);
    assert_eq!(
        loaded,
        Loaded {
            state: legacy_shelf(),
            version: 4
        }
    );

    // The app's repository decides on the upcast state: 9 in stock.
    let (app, _bus) = app_on(Arc::clone(&store), schema);
    let shelves = app.repository::<Shelf>();
    let before = calls.now();
    let too_many = shelves
        .execute("s1", sell("s1", 10), &Metadata::new())
        .await;
    assert!(
        matches!(
            too_many,
            Err(RepositoryError::Rejected(ShelfError::NotEnough { have: 9 }))
        ),
        "{too_many:?}"
    );
    assert_eq!(calls.now() - before, Counts::HISTORY);
    let sold = shelves
        .execute("s1", sell("s1", 9), &Metadata::new())
        .await
        .unwrap();
    assert_eq!(sold.stream_version, 5);
    assert_eq!(sold.events, [ShelfEvent::sold("s1", 9)]);
    assert_eq!(shelves.load("s1").await.unwrap().state.stock, 0);
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 2. Snapshots
// ---------------------------------------------------------------------------

/// A snapshot under another state schema version is ignored and the whole
/// stream replayed through the upcasters; one under the repository's version
/// is used, and only the events after it are read (and upcast).
async fn a_snapshot_of_another_schema_version_is_replayed_and_one_of_this_version_used(
    backend: Backend,
) {
    let (schema, calls) = schema();
    let store = backend.store();
    let stream = shelf_stream("s1");
    append(&*store, "s1", legacy_history("s1")).await;
    // An older release's snapshot, of its state's schema version 1: its
    // state is not what the events say today.
    let stale = Snapshot {
        stream_id: stream.clone(),
        version: 4,
        schema_version: 1,
        state: payload(&json!({ "stock": 999, "label": "stale" })),
    };
    backend.snapshots.save(stale).await.unwrap();
    let shelves = Repository::<Shelf>::new(Arc::clone(&store))
        .with_codec(schema.codec())
        .with_snapshots(Arc::clone(&backend.snapshots), SnapshotPolicy::Every(5), 2);

    let before = calls.now();
    let loaded = shelves.load("s1").await.unwrap();
    assert_eq!(
        calls.now() - before,
        Counts::HISTORY,
        "the stream is replayed from its start"
    );
    assert_eq!(
        loaded,
        Loaded {
            state: legacy_shelf(),
            version: 4
        }
    );

    // A command crossing version 5 snapshots the state under version 2.
    shelves
        .execute("s1", sell("s1", 1), &Metadata::new())
        .await
        .unwrap();
    let taken = backend.snapshots.load(&stream).await.unwrap().unwrap();
    assert_eq!((taken.version, taken.schema_version), (5, 2));

    // An older release's event after it.
    let later = old("Stocked", "s1", &json!({ "shelf": "s1", "n": 10 }));
    store
        .append(&stream, ExpectedVersion::Exact(5), vec![later])
        .await
        .unwrap();
    let before = calls.now();
    let loaded = shelves.load("s1").await.unwrap();
    assert_eq!(
        calls.now() - before,
        Counts {
            stocked_v1: 1,
            ..Counts::default()
        },
        "only the event after the snapshot is read"
    );
    assert_eq!(
        loaded,
        Loaded {
            state: Shelf {
                stock: 18,
                label: Some("tea".into())
            },
            version: 6
        }
    );
}

// ---------------------------------------------------------------------------
// 3. The log: read_all, a live subscription, projections and rebuilds
// ---------------------------------------------------------------------------

/// `read_all` and a live `subscribe_all` decode through the schema; a
/// projection runner (in memory over the in-memory store, PostgreSQL's over
/// PostgreSQL) upcasts the history it catches up on and an old-shape event
/// appended live, and its rebuild upcasts it all again into the same model.
async fn read_all_subscriptions_and_projections_upcast_history_live_events_and_rebuilds(
    backend: Backend,
) {
    let (schema, calls) = schema();
    let codec = schema.codec::<ShelfEvent>();
    let store = backend.store();
    append(&*store, "s1", legacy_history("s1")).await;
    append(&*store, "s1", vec![current(&ShelfEvent::sold("s1", 1))]).await;
    let mut history = upcast_history("s1");
    history.push(ShelfEvent::sold("s1", 1));

    // read_all.
    let before = calls.now();
    let log = store.read_all(Position::START, 100).await.unwrap();
    assert_eq!(log.len(), 5);
    assert_eq!(decode_each(&codec, &log), history);
    assert_eq!(calls.now() - before, Counts::HISTORY);

    // A live subscription: the history, then an old-shape event as it
    // commits.
    let mut live = store.subscribe_all(Position::START);
    let mut seen = Vec::new();
    for _ in 0..log.len() {
        seen.push(next(&mut live).await);
    }
    assert_eq!(decode_each(&codec, &seen), history);
    let before = calls.now();
    append(&*store, "s1", vec![old_shelved("s1", 5)]).await;
    let arrived = next(&mut live).await;
    assert_eq!(
        decode_each(&codec, &[arrived]),
        [ShelfEvent::stocked("s1", 5)]
    );
    assert_eq!(
        calls.now() - before,
        Counts {
            shelved: 1,
            ..Counts::default()
        }
    );
    drop(live);

    // A projection: the history it catches up on.
    let expected = |stock| {
        BTreeMap::from([(
            "s1".to_owned(),
            Shelf {
                stock,
                label: Some("tea".into()),
            },
        )])
    };
    let before = calls.now();
    let mut projected = Projected::start(&backend, schema.codec()).await;
    projected.handle().catch_up(WAIT).await.unwrap();
    assert_eq!(projected.model().await, expected(13));
    let grown = calls.now() - before;
    assert!(
        grown.covers(Counts::HISTORY) && grown.shelved >= 2,
        "{grown:?}"
    );

    // An old-shape event appended while it runs.
    let before = calls.now();
    let at = append(&*store, "s1", vec![old_stocked("s1", 10)]).await;
    projected
        .handle()
        .wait_for(at.position, WAIT)
        .await
        .unwrap();
    assert_eq!(projected.model().await, expected(23));
    assert!(calls.now().stocked_v1 > before.stocked_v1);

    // Its rebuild reads, and upcasts, the whole log again.
    let before = calls.now();
    projected.rebuild().await;
    projected.handle().catch_up(WAIT).await.unwrap();
    assert_eq!(projected.model().await, expected(23));
    let grown = calls.now() - before;
    assert!(
        grown.covers(Counts::HISTORY) && grown.stocked_v1 >= 3 && grown.shelved >= 2,
        "{grown:?}"
    );
    assert_eq!(projected.parked().await, []);
    projected.handle().stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// 4. Sagas
// ---------------------------------------------------------------------------

/// An app's saga, fed by its relay and bus, reacts to old-shape inputs from
/// the store as to today's: a reshaped `Stocked` v1; a `Shelved` v1 that
/// reaches it only because the app binds the names its schema renames into
/// the saga's inputs; a `Restocked` v1 split into a `Labelled` (not an
/// input, left out) and a `Stocked`; and a `Merged` v1 split into two
/// `Stocked`, both handled.
async fn a_saga_reacts_to_old_inputs_relayed_from_the_store(backend: Backend) {
    let (schema, calls) = schema();
    let store = backend.store();
    let (mut app, bus) = app_on(Arc::clone(&store), schema);
    let replenish = app
        .saga::<Replenish>(REPLENISH_GROUP)
        .inputs_from(Shelf::TYPE)
        .deadline_tick(None)
        .start()
        .await
        .unwrap();
    app.start();

    let ids: [Uuid; 4] = std::array::from_fn(|_| Uuid::now_v7());
    append(
        &*store,
        "s1",
        vec![correlated(old_stocked("s1", 4), ids[0])],
    )
    .await;
    append(
        &*store,
        "s2",
        vec![correlated(old_shelved("s2", 6), ids[1])],
    )
    .await;
    let restocked = old(
        "Restocked",
        "s3",
        &json!({ "shelf": "s3", "n": 5, "label": "tea" }),
    );
    append(&*store, "s3", vec![correlated(restocked, ids[2])]).await;
    let merged = old("Merged", "s4", &json!({ "shelf": "s4", "a": 2, "b": 7 }));
    append(&*store, "s4", vec![correlated(merged, ids[3])]).await;
    eventually("the saga counted every old input", WAIT, || {
        let replenish = Arc::clone(&replenish);
        async move {
            let mut counted = Vec::new();
            for id in ids {
                counted.push(replenish.load(id).await.unwrap().state.stocked);
            }
            counted == [4, 6, 5, 9]
        }
    })
    .await;
    let grown = calls.now();
    assert!(
        grown.stocked_v1 >= 1 && grown.shelved >= 1 && grown.restocked >= 1,
        "{grown:?}"
    );
    app.stop().await;
    assert_eq!(bus.dead_letters(REPLENISH_GROUP), []);
}

// ---------------------------------------------------------------------------
// 5. Command consumers
// ---------------------------------------------------------------------------

/// Commands an older release's saga recorded are relayed and consumed by a
/// `CommandHandler` reading through the schema: `Deliver` v1 is upcast and
/// executed, `Inspect` v1 (dropped) acked and ignored. A `CommandService`
/// fed by `Commands` decodes through its own codec the same way; without
/// the schema, the old command is a dead letter.
async fn command_consumers_upcast_old_commands_and_ack_dropped_ones(backend: Backend) {
    let (schema, calls) = schema();
    let store = backend.store();
    let (mut app, bus) = app_on(Arc::clone(&store), schema);
    let shelves = app.repository::<Shelf>();
    let codec = app.codec::<ShelfMessage>();
    let handler =
        || CommandHandler::new(shelves.clone(), ShelfMessage::route).with_codec(codec.clone());
    app.commands(SHELF_SERVICE, SHELF_COMMANDS, handler())
        .await
        .unwrap();
    app.start();

    // Two commands an older release's saga sent, still in its stream.
    let saga = StreamId::for_aggregate(Replenish::TYPE, Uuid::now_v7()).unwrap();
    let records = vec![
        command_record("Inspect", &json!({ "shelf": "s1" })),
        command_record("Deliver", &json!({ "shelf": "s1", "n": 6 })),
    ];
    store
        .append(&saga, ExpectedVersion::NoStream, records)
        .await
        .unwrap();
    eventually("the old commands are consumed", WAIT, || {
        let (shelves, calls) = (shelves.clone(), calls.clone());
        async move {
            let stock = shelves.load("s1").await.unwrap().state.stock;
            stock == 6 && calls.now().inspect >= 1
        }
    })
    .await;
    assert!(calls.now().deliver_v1 >= 1);
    let delivered = shelves.load("s1").await.unwrap();

    // Delivered by hand, the dropped command is acked and changes nothing.
    let inspect = delivery("Inspect", &json!({ "shelf": "s1" }));
    assert_eq!(handler().handle(&inspect).await, Outcome::Ack);
    assert_eq!(shelves.load("s1").await.unwrap(), delivered);

    // Without the schema, the old command does not decode.
    let deliver = delivery("Deliver", &json!({ "shelf": "s1", "n": 2 }));
    let plain = CommandHandler::new(shelves.clone(), ShelfMessage::route);
    assert!(
        matches!(plain.handle(&deliver).await, Outcome::DeadLetter { .. }),
        "decoded an old command without the schema"
    );

    // A command service decodes through the codec it names.
    let service = Commands(Arc::new(ShelfService {
        shelves: shelves.clone(),
        codec,
    }));
    let before = calls.now();
    assert_eq!(service.handle(&deliver).await, Outcome::Ack);
    assert_eq!(service.handle(&inspect).await, Outcome::Ack);
    assert_eq!(
        calls.now() - before,
        Counts {
            deliver_v1: 1,
            inspect: 1,
            ..Counts::default()
        }
    );
    assert_eq!(shelves.load("s1").await.unwrap().state.stock, 8);

    app.stop().await;
    assert_eq!(bus.dead_letters(SHELF_SERVICE), []);
}

// ---------------------------------------------------------------------------
// 6. Replicas
// ---------------------------------------------------------------------------

/// A replica (in memory, or on PostgreSQL) copies a source's old events
/// exactly as stored, through a relay and a bus, decoding nothing; read
/// through the schema, the copy is today's history.
async fn a_replica_copies_old_events_as_stored_and_reads_them_upcast(backend: Backend) {
    let (schema, calls) = schema();
    let source: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    append(&*source, "s1", legacy_history("s1")).await;
    let replica = backend.store();
    let bus = Arc::new(InMemoryBus::new());
    let copying = Subscription::new("replica", [format!("{}.*", Shelf::TYPE)])
        .with_prefetch(1)
        .with_retry_delay(Duration::from_millis(10));
    let consumer = bus
        .subscribe(copying, Arc::new(ReplicaHandler::new(Arc::clone(&replica))))
        .await
        .unwrap();
    let relay = Relay::new(
        "source",
        source,
        Arc::clone(&bus) as Arc<dyn EventBus>,
        Arc::new(InMemoryCheckpointStore::new()),
    )
    .with_route(with_source(Arc::new(default_route), &[Shelf::TYPE]));
    let stop = CancellationToken::new();
    let relaying = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    let stream = shelf_stream("s1");
    eventually("the replica holds the shelf's 4 events", WAIT, || {
        let (replica, stream) = (Arc::clone(&replica), stream.clone());
        async move { replica.stream_version(&stream).await.unwrap() == 4 }
    })
    .await;
    stop.cancel();
    relaying.await.unwrap().unwrap();
    consumer.stop().await;

    // Copied as stored: the old types, versions and payloads.
    let copy = replica.read_stream(&stream, 1, 10).await.unwrap();
    let stored: Vec<_> = copy
        .iter()
        .map(|e| (&*e.event_type, e.schema_version))
        .collect();
    assert_eq!(
        stored,
        [
            ("Stocked", 1),
            ("Restocked", 1),
            ("Shelved", 1),
            ("Audited", 1)
        ]
    );
    assert!(copy[0]
        .payload
        .json_eq(&payload(&json!({ "shelf": "s1", "n": 3 }))));
    assert_eq!(
        calls.now(),
        Counts::default(),
        "replicating decodes nothing"
    );

    // Read through the schema, the copy is today's history.
    let codec = schema.codec::<ShelfEvent>();
    assert_eq!(decode_each(&codec, &copy), upcast_history("s1"));
    assert_eq!(calls.now(), Counts::HISTORY);
    let shelves = Repository::<Shelf>::new(replica).with_codec(codec);
    let loaded = shelves.load("s1").await.unwrap();
    assert_eq!(
        loaded,
        Loaded {
            state: legacy_shelf(),
            version: 4
        }
    );
}

// ---------------------------------------------------------------------------
// 7. Dynamic consistency boundaries
// ---------------------------------------------------------------------------

/// A `DecisionRunner` with the schema's codec folds the tagged old history
/// as today's events: it refuses to sell more than the 9 upcast stock,
/// sells 9, then sees its own (tagged) sale.
async fn a_dcb_decision_folds_upcast_tagged_history(backend: Backend) {
    let (schema, calls) = schema();
    let store = backend.store();
    let stream = shelf_stream("s1");
    append(&*store, "s1", legacy_history("s1")).await;
    let runner = |codec| {
        DecisionRunner::<ShelfEvent>::new(Arc::clone(&backend.events))
            .with_codec(codec)
            .with_retry(RetryPolicy::none())
    };
    let sell = |count| SellFromShelf {
        shelf: "s1".into(),
        count,
    };

    // Without the schema the old events do not decode.
    let plain = runner(EventCodec::new())
        .execute(&stream, &sell(1), Metadata::new())
        .await;
    assert!(
        matches!(plain, Err(DecisionError::Codec(CodecError::Decode { .. }))),
        "{plain:?}"
    );

    let runner = runner(schema.codec());
    let before = calls.now();
    let too_many = runner.execute(&stream, &sell(10), Metadata::new()).await;
    assert!(
        matches!(
            too_many,
            Err(DecisionError::Rejected(ShelfError::NotEnough { have: 9 }))
        ),
        "{too_many:?}"
    );
    assert_eq!(calls.now() - before, Counts::HISTORY);
    let Decided { events, .. } = runner
        .execute(&stream, &sell(9), Metadata::new())
        .await
        .unwrap();
    assert_eq!(events, [ShelfEvent::sold("s1", 9)]);
    let sold_out = runner.execute(&stream, &sell(1), Metadata::new()).await;
    assert!(
        matches!(
            sold_out,
            Err(DecisionError::Rejected(ShelfError::NotEnough { have: 0 }))
        ),
        "{sold_out:?}"
    );
}

// ---------------------------------------------------------------------------
// 8. A dropped last event
// ---------------------------------------------------------------------------

/// A stream whose last event is dropped by an upcaster loads at its stored
/// version (2, not the 1 event read), and the next command appends at 3
/// expecting exactly 2, without a conflict (no retry allowed).
async fn a_dropped_last_event_keeps_the_stored_version_for_the_next_command(backend: Backend) {
    let (schema, calls) = schema();
    let store = backend.store();
    let stream = shelf_stream("s1");
    let stocked = current(&ShelfEvent::stocked("s1", 3));
    let audited = old("Audited", "s1", &json!({ "shelf": "s1" }));
    append(&*store, "s1", vec![stocked, audited]).await;
    let shelves = Repository::<Shelf>::new(Arc::clone(&store))
        .with_codec(schema.codec())
        .with_retry(RetryPolicy::none());

    let before = calls.now();
    let loaded = shelves.load("s1").await.unwrap();
    assert_eq!(
        calls.now() - before,
        Counts {
            audited: 1,
            ..Counts::default()
        }
    );
    assert_eq!(
        loaded,
        Loaded {
            state: Shelf {
                stock: 3,
                label: None
            },
            version: 2
        }
    );

    // Counting the events read would expect version 1, and conflict.
    let miscounted = store
        .append(
            &stream,
            ExpectedVersion::Exact(1),
            vec![current(&ShelfEvent::sold("s1", 1))],
        )
        .await;
    assert!(
        matches!(
            miscounted,
            Err(StoreError::WrongExpectedVersion { actual: 2, .. })
        ),
        "{miscounted:?}"
    );

    let sold = shelves
        .execute("s1", sell("s1", 1), &Metadata::new())
        .await
        .unwrap();
    assert_eq!((sold.stream_version, sold.duplicate), (3, false));
    let tail = store.read_stream(&stream, 1, 10).await.unwrap();
    let versions: Vec<_> = tail
        .iter()
        .map(|e| (e.stream_version, &*e.event_type))
        .collect();
    assert_eq!(versions, [(1, "Stocked"), (2, "Audited"), (3, "Sold")]);
    assert_eq!(shelves.load("s1").await.unwrap().version, 3);
}

// ---------------------------------------------------------------------------
// 9. A newer version than the code knows
// ---------------------------------------------------------------------------

/// A `Stocked` v3, written by a newer release, is refused on load as
/// `CodecError::UnknownSchemaVersion` (not read as v2), and a projection
/// runner parks it and reads on, upcasting the old event after it.
async fn a_newer_schema_version_is_a_typed_error_on_load_and_parked_by_projections(
    backend: Backend,
) {
    let (schema, calls) = schema();
    let store = backend.store();
    append(&*store, "s1", vec![current(&ShelfEvent::stocked("s1", 3))]).await;
    let newer = NewEvent::new(
        "Stocked",
        3,
        payload(&json!({ "shelf": "s1", "count": 5, "unit": "box" })),
        Metadata::new(),
    );
    let newer = append(&*store, "s1", vec![newer]).await;
    append(&*store, "s1", vec![old_stocked("s1", 4)]).await;

    let shelves = Repository::<Shelf>::new(Arc::clone(&store)).with_codec(schema.codec());
    match shelves.load("s1").await {
        Err(RepositoryError::Codec(CodecError::UnknownSchemaVersion {
            event_type,
            version: 3,
            known: 2,
        })) if event_type == "Stocked" => {}
        other => panic!("expected UnknownSchemaVersion, got {other:?}"),
    }

    let projected = Projected::start(&backend, schema.codec()).await;
    projected.handle().catch_up(WAIT).await.unwrap();
    let parked = projected.parked().await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].position, newer.position);
    assert!(
        parked[0].error.contains("schema version 3, newer than 2"),
        "{parked:?}"
    );
    assert_eq!(
        projected.model().await,
        BTreeMap::from([(
            "s1".to_owned(),
            Shelf {
                stock: 7,
                label: None
            }
        )])
    );
    assert!(calls.now().stocked_v1 >= 1);
    projected.handle().stop().await.unwrap();
}

// ===========================================================================
// Helpers
// ===========================================================================

// --- The schema, with counting upcasters -----------------------------------

/// How often each upcaster has run: the counting decorator's counters.
#[derive(Clone, Debug, Default)]
struct Calls {
    stocked_v1: Arc<AtomicUsize>,
    restocked: Arc<AtomicUsize>,
    shelved: Arc<AtomicUsize>,
    audited: Arc<AtomicUsize>,
    deliver_v1: Arc<AtomicUsize>,
    inspect: Arc<AtomicUsize>,
}

impl Calls {
    fn now(&self) -> Counts {
        let n = |c: &AtomicUsize| c.load(Ordering::SeqCst);
        Counts {
            stocked_v1: n(&self.stocked_v1),
            restocked: n(&self.restocked),
            shelved: n(&self.shelved),
            audited: n(&self.audited),
            deliver_v1: n(&self.deliver_v1),
            inspect: n(&self.inspect),
        }
    }
}

/// The upcasters' call counts at one moment, or how they grew.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    stocked_v1: usize,
    restocked: usize,
    shelved: usize,
    audited: usize,
    deliver_v1: usize,
    inspect: usize,
}

impl Counts {
    /// What reading [`legacy_history`] once costs: `Stocked` v1 reshaped
    /// twice (once stored, once out of the split), one split, one rename,
    /// one drop.
    const HISTORY: Self = Self {
        stocked_v1: 2,
        restocked: 1,
        shelved: 1,
        audited: 1,
        deliver_v1: 0,
        inspect: 0,
    };

    /// Whether every count is at least `other`'s.
    fn covers(self, other: Self) -> bool {
        self.stocked_v1 >= other.stocked_v1
            && self.restocked >= other.restocked
            && self.shelved >= other.shelved
            && self.audited >= other.audited
            && self.deliver_v1 >= other.deliver_v1
            && self.inspect >= other.inspect
    }
}

impl std::ops::Sub for Counts {
    type Output = Self;

    fn sub(self, before: Self) -> Self {
        Self {
            stocked_v1: self.stocked_v1 - before.stocked_v1,
            restocked: self.restocked - before.restocked,
            shelved: self.shelved - before.shelved,
            audited: self.audited - before.audited,
            deliver_v1: self.deliver_v1 - before.deliver_v1,
            inspect: self.inspect - before.inspect,
        }
    }
}

/// The counting decorator: `upcast`, counting its calls in `calls`.
fn counted<T>(
    calls: &Arc<AtomicUsize>,
    upcast: impl Fn(Value) -> Result<T, String> + Send + Sync + 'static,
) -> impl Fn(Value) -> Result<T, String> + Send + Sync + 'static {
    let calls = Arc::clone(calls);
    move |value| {
        calls.fetch_add(1, Ordering::SeqCst);
        upcast(value)
    }
}

/// The application's schema, each upcaster counted in the [`Calls`]
/// returned with it (one registry per test: tests run in parallel).
fn schema() -> (Schema, Calls) {
    let calls = Calls::default();
    let nothing: [(&str, u32); 0] = [];
    let schema = Schema::builder()
        .events::<ShelfEvent>()
        .events::<ShelfMessage>()
        .upcaster(Upcaster::new(
            "Stocked",
            1,
            counted(&calls.stocked_v1, n_to_count),
        ))
        .upcaster(Upcaster::split(
            "Restocked",
            1,
            [("Labelled", 1), ("Stocked", 1)],
            counted(&calls.restocked, |v| {
                Ok(vec![
                    Upcast::new(
                        "Labelled",
                        1,
                        json!({ "shelf": v["shelf"], "label": v["label"] }),
                    ),
                    Upcast::new("Stocked", 1, json!({ "shelf": v["shelf"], "n": v["n"] })),
                ])
            }),
        ))
        .upcaster(
            Upcaster::new("Shelved", 1, counted(&calls.shelved, n_to_count)).renamed_to("Stocked"),
        )
        // Two stockings recorded as one event: two of the saga's inputs.
        .upcaster(Upcaster::split("Merged", 1, [("Stocked", 1)], |v| {
            Ok(["a", "b"]
                .into_iter()
                .map(|n| Upcast::new("Stocked", 1, json!({ "shelf": v["shelf"], "n": v[n] })))
                .collect())
        }))
        // `Upcaster::drop`, counted.
        .upcaster(Upcaster::split(
            "Audited",
            1,
            nothing,
            counted(&calls.audited, |_| Ok(Vec::new())),
        ))
        .upcaster(Upcaster::new(
            "Deliver",
            1,
            counted(&calls.deliver_v1, n_to_count),
        ))
        .upcaster(Upcaster::split(
            "Inspect",
            1,
            nothing,
            counted(&calls.inspect, |_| Ok(Vec::new())),
        ))
        .build()
        .expect("the schema's chains end at today's versions");
    (schema, calls)
}

/// Version 1 of `Stocked` (and `Shelved`, and `Deliver`) counted `n`; today
/// the field is `count`.
fn n_to_count(mut value: Value) -> Result<Value, String> {
    let fields = value.as_object_mut().ok_or("not an object")?;
    let n = fields.remove("n").ok_or("no n")?;
    fields.insert("count".into(), n);
    Ok(value)
}

// --- Old and current events ------------------------------------------------

/// What an older release stored on shelf `shelf`.
fn legacy_history(shelf: &str) -> Vec<NewEvent> {
    vec![
        old_stocked(shelf, 3),
        old(
            "Restocked",
            shelf,
            &json!({ "shelf": shelf, "n": 4, "label": "tea" }),
        ),
        old_shelved(shelf, 2),
        old("Audited", shelf, &json!({ "shelf": shelf, "by": "night" })),
    ]
}

/// What [`legacy_history`] reads as today.
fn upcast_history(shelf: &str) -> Vec<ShelfEvent> {
    vec![
        ShelfEvent::stocked(shelf, 3),
        ShelfEvent::Labelled {
            shelf: shelf.into(),
            label: "tea".into(),
        },
        ShelfEvent::stocked(shelf, 4),
        ShelfEvent::stocked(shelf, 2),
    ]
}

/// The shelf [`legacy_history`] folds into.
fn legacy_shelf() -> Shelf {
    Shelf {
        stock: 9,
        label: Some("tea".into()),
    }
}

/// An event of `event_type` v1 in its old shape, tagged with its shelf.
fn old(event_type: &str, shelf: &str, body: &Value) -> NewEvent {
    NewEvent::new(event_type, 1, payload(body), Metadata::new()).tagged(shelf_tag(shelf))
}

fn old_stocked(shelf: &str, n: u32) -> NewEvent {
    old("Stocked", shelf, &json!({ "shelf": shelf, "n": n }))
}

fn old_shelved(shelf: &str, n: u32) -> NewEvent {
    old("Shelved", shelf, &json!({ "shelf": shelf, "n": n }))
}

/// `event` in the conversation `correlation` (a saga instance's id).
fn correlated(mut event: NewEvent, correlation: Uuid) -> NewEvent {
    event.metadata = event.metadata.with_correlation_id(correlation);
    event
}

/// `event` as today's code writes it.
fn current(event: &ShelfEvent) -> NewEvent {
    EventCodec::new().encode(event, Metadata::new()).unwrap()
}

/// A command record an older release's saga stored: `Deliver` or
/// `Inspect` v1 to the shelf service.
fn command_record(command_type: &str, body: &Value) -> NewEvent {
    let record = CommandRecord {
        topic: SHELF_COMMANDS.into(),
        command_type: command_type.into(),
        schema_version: 1,
        payload: payload(body),
    };
    NewEvent::new(
        COMMAND_RECORD,
        1,
        record.to_payload().unwrap(),
        Metadata::new(),
    )
}

/// A v1 command message, delivered once.
fn delivery(command_type: &str, body: &Value) -> Delivery {
    let message = Message {
        message_id: Uuid::now_v7(),
        topic: SHELF_COMMANDS.into(),
        message_type: command_type.into(),
        schema_version: 1,
        payload: payload(body),
        metadata: Metadata::new(),
        source: None,
    };
    Delivery {
        message,
        attempt: 1,
    }
}

fn payload(body: &Value) -> Payload {
    Payload::from_value(body).unwrap()
}

fn shelf_stream(shelf: &str) -> StreamId {
    StreamId::for_aggregate(Shelf::TYPE, shelf).unwrap()
}

fn shelf_tag(shelf: &str) -> Tag {
    Tag::of("shelf", shelf).unwrap()
}

/// Appends `events` to shelf `shelf`'s stream, whatever its version.
async fn append(store: &dyn EventStore, shelf: &str, events: Vec<NewEvent>) -> AppendResult {
    store
        .append(&shelf_stream(shelf), ExpectedVersion::Any, events)
        .await
        .unwrap()
}

/// Every event the recorded ones read as, in order.
fn decode_each(codec: &EventCodec<ShelfEvent>, recorded: &[RecordedEvent]) -> Vec<ShelfEvent> {
    recorded
        .iter()
        .flat_map(|e| codec.decode_all(e).unwrap())
        .collect()
}

/// The next event of a subscription.
async fn next(
    log: &mut futures::stream::BoxStream<'static, Result<RecordedEvent, StoreError>>,
) -> RecordedEvent {
    tokio::time::timeout(WAIT, log.next())
        .await
        .expect("the subscription delivers within the wait")
        .expect("the subscription goes on")
        .unwrap()
}

// --- The shelf ---------------------------------------------------------------

/// A shelf's events. Written by hand rather than derived: they carry their
/// shelf's tag, for decisions on a dynamic consistency boundary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum ShelfEvent {
    /// Version 2 (v1 counted `n`).
    Stocked {
        shelf: String,
        count: u32,
    },
    Sold {
        shelf: String,
        count: u32,
    },
    Labelled {
        shelf: String,
        label: String,
    },
}

impl ShelfEvent {
    fn stocked(shelf: &str, count: u32) -> Self {
        Self::Stocked {
            shelf: shelf.into(),
            count,
        }
    }

    fn sold(shelf: &str, count: u32) -> Self {
        Self::Sold {
            shelf: shelf.into(),
            count,
        }
    }

    fn shelf(&self) -> &str {
        match self {
            Self::Stocked { shelf, .. }
            | Self::Sold { shelf, .. }
            | Self::Labelled { shelf, .. } => shelf,
        }
    }
}

impl DomainEvent for ShelfEvent {
    const EVENT_TYPES: &'static [&'static str] = &["Stocked", "Sold", "Labelled"];

    fn event_type(&self) -> &'static str {
        match self {
            Self::Stocked { .. } => "Stocked",
            Self::Sold { .. } => "Sold",
            Self::Labelled { .. } => "Labelled",
        }
    }

    fn schema_version(&self) -> u32 {
        Self::known_version(self.event_type()).unwrap_or(1)
    }

    fn known_version(event_type: &str) -> Option<u32> {
        match event_type {
            "Stocked" => Some(2),
            "Sold" | "Labelled" => Some(1),
            _ => None,
        }
    }

    fn tags(&self) -> Result<Vec<Tag>, InvalidTag> {
        Ok(vec![Tag::of("shelf", self.shelf())?])
    }
}

/// A shelf: its stock and label.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Shelf {
    stock: u32,
    label: Option<String>,
}

#[derive(Clone, Debug)]
enum ShelfCommand {
    Stock { shelf: String, count: u32 },
    Sell { shelf: String, count: u32 },
}

fn sell(shelf: &str, count: u32) -> ShelfCommand {
    ShelfCommand::Sell {
        shelf: shelf.into(),
        count,
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum ShelfError {
    #[error("only {have} in stock")]
    NotEnough { have: u32 },
}

impl Aggregate for Shelf {
    type Event = ShelfEvent;
    type Command = ShelfCommand;
    type Error = ShelfError;
    const TYPE: &'static str = "shelf";

    fn apply(&mut self, event: &ShelfEvent) {
        match event {
            ShelfEvent::Stocked { count, .. } => self.stock += count,
            ShelfEvent::Sold { count, .. } => self.stock = self.stock.saturating_sub(*count),
            ShelfEvent::Labelled { label, .. } => self.label = Some(label.clone()),
        }
    }

    fn handle(&self, command: ShelfCommand) -> Result<Vec<ShelfEvent>, ShelfError> {
        match command {
            ShelfCommand::Stock { shelf, count } => Ok(vec![ShelfEvent::Stocked { shelf, count }]),
            ShelfCommand::Sell { count, .. } if count > self.stock => {
                Err(ShelfError::NotEnough { have: self.stock })
            }
            ShelfCommand::Sell { shelf, count } => Ok(vec![ShelfEvent::Sold { shelf, count }]),
        }
    }
}

/// The shelf service's command topic and consumer group.
const SHELF_COMMANDS: &str = "shelf_commands";
const SHELF_SERVICE: &str = "shelf_service";

/// Commands to the shelf service, on the bus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
enum ShelfMessage {
    /// Version 2 (v1 counted `n`).
    #[event(version = 2)]
    Deliver { shelf: String, count: u32 },
}

impl ShelfMessage {
    fn route(self) -> Option<(String, ShelfCommand)> {
        let Self::Deliver { shelf, count } = self;
        Some((shelf.clone(), ShelfCommand::Stock { shelf, count }))
    }
}

/// The shelf service as a `CommandService` (fed by `Commands`), decoding
/// through the codec it is given.
struct ShelfService {
    shelves: Repository<Shelf>,
    codec: EventCodec<ShelfMessage>,
}

#[async_trait]
impl CommandService for ShelfService {
    type Command = ShelfMessage;

    fn codec(&self) -> EventCodec<ShelfMessage> {
        self.codec.clone()
    }

    async fn execute(
        &self,
        command: ShelfMessage,
        message: &Message,
        metadata: &Metadata,
    ) -> Outcome {
        let Some((shelf, command)) = command.route() else {
            return Outcome::dead_letter("not a shelf command");
        };
        let executed = self
            .shelves
            .execute_once(shelf, message.message_id, command, metadata)
            .await;
        outcome_of(executed, Shelf::TYPE)
    }
}

/// A decision over a shelf's boundary: every event tagged with the shelf,
/// whatever its stored type (a type filter matches stored names, so it
/// would have to name the old ones too).
struct SellFromShelf {
    shelf: String,
    count: u32,
}

impl Decision for SellFromShelf {
    type Event = ShelfEvent;
    type State = Shelf;
    type Rejection = ShelfError;

    fn query(&self) -> Query {
        Query::from(QueryItem::tagged(shelf_tag(&self.shelf)))
    }

    fn evolve(&self, state: &mut Shelf, event: &ShelfEvent) {
        state.apply(event);
    }

    fn decide(&self, state: &Shelf) -> Result<Vec<ShelfEvent>, ShelfError> {
        state.handle(sell(&self.shelf, self.count))
    }
}

// --- The saga ----------------------------------------------------------------

const REPLENISH_GROUP: &str = "replenish";

/// The saga's inputs: the shelves' `Stocked`, read as today's v2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
enum ShelfInput {
    #[event(version = 2)]
    Stocked { shelf: String, count: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
enum ReplenishEvent {
    Counted { count: u32 },
}

/// Counts what was stocked in its conversation.
#[derive(Debug, Default)]
struct Replenish {
    stocked: u32,
}

impl Saga for Replenish {
    type Event = ReplenishEvent;
    type Input = ShelfInput;
    type Command = ShelfMessage;
    const TYPE: &'static str = "replenish";

    fn apply(&mut self, event: &ReplenishEvent) {
        let ReplenishEvent::Counted { count } = event;
        self.stocked += count;
    }

    fn react(&self, input: &ShelfInput, _: Received<'_>) -> Reaction<ReplenishEvent, ShelfMessage> {
        let ShelfInput::Stocked { count, .. } = input;
        Reaction::none().event(ReplenishEvent::Counted { count: *count })
    }
}

// --- Projections -------------------------------------------------------------

const TOTALS: &str = "shelf_totals";

/// Decodes a shelf event for a projection: what does not decode (a newer
/// version) is the event's fault, so the runner parks it.
fn decode(
    codec: &EventCodec<ShelfEvent>,
    event: &RecordedEvent,
) -> Result<Decoded<ShelfEvent>, ProjectionError> {
    codec
        .decode_all(event)
        .map_err(|e| ProjectionError::invalid(TOTALS, event, e))
}

/// The shelves, in memory.
struct Totals {
    codec: EventCodec<ShelfEvent>,
    model: Mutex<BTreeMap<String, Shelf>>,
}

impl Projection for Totals {
    type Tx = ();

    fn name(&self) -> &str {
        TOTALS
    }

    async fn apply(&self, (): &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
        for current in decode(&self.codec, event)? {
            let mut model = self.model.lock().unwrap_or_else(PoisonError::into_inner);
            model
                .entry(current.shelf().to_owned())
                .or_default()
                .apply(&current);
        }
        Ok(())
    }
}

/// The shelves, in a PostgreSQL table.
struct PgTotals {
    codec: EventCodec<ShelfEvent>,
}

impl Projection for PgTotals {
    type Tx = PgConnection;

    fn name(&self) -> &str {
        TOTALS
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        let storage = |e: sqlx::Error| ProjectionError::storage(TOTALS, e);
        for current in decode(&self.codec, event)? {
            let row: Option<(i64, Option<String>)> =
                sqlx::query_as("SELECT stock, label FROM shelves WHERE shelf = $1")
                    .bind(current.shelf())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(storage)?;
            let mut shelf = row.map(shelf_of).unwrap_or_default();
            shelf.apply(&current);
            sqlx::query(
                "INSERT INTO shelves (shelf, stock, label) VALUES ($1, $2, $3) \
                 ON CONFLICT (shelf) DO UPDATE SET stock = EXCLUDED.stock, label = EXCLUDED.label",
            )
            .bind(current.shelf())
            .bind(i64::from(shelf.stock))
            .bind(shelf.label)
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
        }
        Ok(())
    }
}

impl PgProjection for PgTotals {
    async fn setup(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS shelves \
             (shelf text PRIMARY KEY, stock bigint NOT NULL, label text)",
        )
        .execute(conn)
        .await
        .map_err(|e| ProjectionError::storage(TOTALS, e))?;
        Ok(())
    }
}

fn shelf_of((stock, label): (i64, Option<String>)) -> Shelf {
    Shelf {
        stock: u32::try_from(stock).unwrap(),
        label,
    }
}

/// A running projection of the shelves: the in-memory runner over the
/// in-memory store, PostgreSQL's runner over PostgreSQL.
enum Projected {
    Memory {
        store: Arc<dyn EventStore>,
        codec: EventCodec<ShelfEvent>,
        totals: Arc<Totals>,
        handle: ProjectionHandle,
    },
    Postgres {
        pg: Pg,
        store: Arc<dyn EventStore>,
        totals: Arc<PgTotals>,
        handle: ProjectionHandle,
    },
}

impl Projected {
    async fn start(backend: &Backend, codec: EventCodec<ShelfEvent>) -> Self {
        let store = backend.store();
        match &backend.postgres {
            None => {
                let totals = Arc::new(Totals {
                    codec: codec.clone(),
                    model: Mutex::default(),
                });
                let handle = spawn_in_memory(Arc::clone(&store), Arc::clone(&totals));
                Self::Memory {
                    store,
                    codec,
                    totals,
                    handle,
                }
            }
            Some(pg) => {
                let totals = Arc::new(PgTotals { codec });
                let handle = pg_runner(pg, &store, &totals).spawn();
                Self::Postgres {
                    pg: pg.clone(),
                    store,
                    totals,
                    handle,
                }
            }
        }
    }

    fn handle(&self) -> &ProjectionHandle {
        match self {
            Self::Memory { handle, .. } | Self::Postgres { handle, .. } => handle,
        }
    }

    /// The read model, by shelf.
    async fn model(&self) -> BTreeMap<String, Shelf> {
        match self {
            Self::Memory { totals, .. } => totals
                .model
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            Self::Postgres { pg, .. } => {
                let rows: Vec<(String, i64, Option<String>)> = sqlx::query_as(&format!(
                    "SELECT shelf, stock, label FROM \"{}\".shelves",
                    pg.model
                ))
                .fetch_all(&pg.pool)
                .await
                .unwrap();
                rows.into_iter()
                    .map(|(shelf, stock, label)| (shelf, shelf_of((stock, label))))
                    .collect()
            }
        }
    }

    /// The events set aside: the handle's, and for PostgreSQL the durable
    /// record, which must agree.
    async fn parked(&self) -> Vec<ParkedEvent> {
        let parked = self.handle().dead_letters();
        if let Self::Postgres { pg, .. } = self {
            let stored = parked_events(&pg.pool, &pg.schema, TOTALS, 10)
                .await
                .unwrap();
            let at = |p: &[ParkedEvent]| p.iter().map(|e| e.position).collect::<Vec<_>>();
            assert_eq!(
                at(&stored),
                at(&parked),
                "the parked table and the handle disagree"
            );
        }
        parked
    }

    /// Rebuilds the model from the start of the log: the in-memory runner
    /// by starting over into a new model (its checkpoint is in memory);
    /// PostgreSQL's with `es_projections::postgres::rebuild`, swapped in
    /// while the live runner goes on.
    async fn rebuild(&mut self) {
        match self {
            Self::Memory {
                store,
                codec,
                totals,
                handle,
            } => {
                handle.stop().await.unwrap();
                *totals = Arc::new(Totals {
                    codec: codec.clone(),
                    model: Mutex::default(),
                });
                *handle = spawn_in_memory(Arc::clone(store), Arc::clone(totals));
            }
            Self::Postgres {
                pg, store, totals, ..
            } => {
                let report = rebuild(
                    &pg_runner(pg, store, totals),
                    &RebuildOptions::default(),
                    &NoProgress,
                )
                .await
                .unwrap();
                assert!(report.events >= 7, "{report:?}");
                assert_eq!(report.dead_letters, 0, "{report:?}");
            }
        }
    }
}

fn pg_runner(
    pg: &Pg,
    store: &Arc<dyn EventStore>,
    totals: &Arc<PgTotals>,
) -> PgProjectionRunner<PgTotals> {
    PgProjectionRunner::new(
        pg.pool.clone(),
        &pg.schema,
        &pg.model,
        Arc::clone(store),
        Arc::clone(totals),
    )
    .unwrap()
    .with_options(
        RunnerOptions::default().backoff(Duration::from_millis(10), Duration::from_millis(100)),
    )
    .with_leader_check(Duration::from_millis(100))
}

// --- Backends ----------------------------------------------------------------

/// A test's stores: in memory, or on PostgreSQL in a fresh schema.
#[derive(Clone)]
struct Backend {
    events: Arc<dyn DcbStore>,
    snapshots: Arc<dyn SnapshotStore>,
    postgres: Option<Pg>,
}

/// A PostgreSQL test's pool, its store's schema (also the projection
/// runner's) and its read model's schema.
#[derive(Clone)]
struct Pg {
    pool: PgPool,
    schema: String,
    model: String,
}

impl Backend {
    fn in_memory() -> Self {
        Self {
            events: Arc::new(InMemoryEventStore::new()),
            snapshots: Arc::new(InMemorySnapshotStore::new()),
            postgres: None,
        }
    }

    /// Fails, naming the URL, when PostgreSQL cannot be reached.
    async fn postgres() -> Self {
        let (pool, schema) = es_postgres::testing::fresh_schema_with(6).await;
        let store = PgEventStore::new(pool.clone(), schema.clone())
            .with_read_wait(Duration::from_secs(10))
            .with_poll_interval(Duration::from_millis(20));
        let model = format!("m_{}", &Uuid::new_v4().simple().to_string()[..16]);
        Self {
            events: Arc::new(store),
            snapshots: Arc::new(PgSnapshotStore::new(pool.clone(), &schema)),
            postgres: Some(Pg {
                pool,
                schema,
                model,
            }),
        }
    }

    fn store(&self) -> Arc<dyn EventStore> {
        Arc::clone(&self.events) as Arc<dyn EventStore>
    }

    /// Drops a PostgreSQL test's schemas (after it passed; a failed test
    /// leaves them to look at).
    async fn drop_schemas(&self) {
        let Some(pg) = &self.postgres else { return };
        for schema in [
            pg.schema.clone(),
            pg.model.clone(),
            format!("{}__rebuild", pg.model),
            format!("{}__old", pg.model),
        ] {
            sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .execute(&pg.pool)
                .await
                .unwrap();
        }
    }
}

/// An app on `store` (with the in-memory bus, which it answers too, and a
/// relay), decoding through `schema`.
fn app_on(store: Arc<dyn EventStore>, schema: Schema) -> (App, Arc<InMemoryBus>) {
    let bus = Arc::new(InMemoryBus::new());
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let relay = {
        let (store, bus, checkpoints) = (
            Arc::clone(&store),
            Arc::clone(&bus),
            Arc::clone(&checkpoints),
        );
        Box::new(move |plan: RelayPlan| {
            Arc::new(Relay::new("schema-evolution", store, bus, checkpoints).with_route(plan.route))
                as Arc<dyn RunRelay>
        })
    };
    let app =
        App::new("schema-evolution", store, bus.clone(), checkpoints, relay).with_schema(schema);
    (app, bus)
}
