//! The in-memory runner against the in-memory store.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use es_core::{
    EventStore, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, Payload, Position,
    Projection, ProjectionError, RecordedEvent, StreamId,
};
use es_projections::{
    spawn_in_memory, spawn_in_memory_with, Error, OnError, RunState, RunnerOptions,
};
use tokio::sync::Semaphore;

const WAIT: Duration = Duration::from_secs(10);

/// Sums `amount` per stream; fails on `amount < 0`; ignores `Ignored` events.
struct Totals {
    name: &'static str,
    model: Mutex<HashMap<String, i64>>,
    gate: Option<Arc<Semaphore>>,
}

impl Default for Totals {
    fn default() -> Self {
        Self::named("totals")
    }
}

impl Totals {
    fn named(name: &'static str) -> Self {
        Self {
            name,
            model: Mutex::default(),
            gate: None,
        }
    }
}

impl Projection for Totals {
    type Tx = ();
    fn name(&self) -> &str {
        self.name
    }
    fn accepts(&self, event_type: &str) -> bool {
        event_type != "Ignored"
    }
    async fn apply(&self, _: &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        let value: serde_json::Value = event.payload.to_value().unwrap();
        let amount = value["amount"].as_i64().unwrap_or(0);
        if amount < 0 {
            return Err(ProjectionError::invalid(
                self.name(),
                event,
                "negative amount",
            ));
        }
        *self
            .model
            .lock()
            .unwrap()
            .entry(event.stream_id.to_string())
            .or_default() += amount;
        Ok(())
    }
}

fn event(event_type: &str, amount: i64) -> NewEvent {
    NewEvent::new(
        event_type,
        1,
        Payload::from_value(&serde_json::json!({ "amount": amount })).unwrap(),
        Metadata::new(),
    )
}

async fn append(store: &InMemoryEventStore, stream: &str, events: Vec<NewEvent>) -> Position {
    store
        .append(
            &StreamId::new(stream).unwrap(),
            ExpectedVersion::Any,
            events,
        )
        .await
        .unwrap()
        .position
}

fn total(p: &Totals, stream: &str) -> i64 {
    p.model.lock().unwrap().get(stream).copied().unwrap_or(0)
}

#[tokio::test]
async fn follows_history_and_live_events_and_reads_your_writes() {
    let store = InMemoryEventStore::new();
    append(&store, "a", vec![event("Added", 1), event("Added", 2)]).await;
    let totals = Arc::new(Totals::default());
    let handle = spawn_in_memory(Arc::new(store.clone()), Arc::clone(&totals));
    for i in 0..50 {
        let at = append(&store, "b", vec![event("Added", i)]).await;
        handle.wait_for(at, WAIT).await.unwrap();
        assert_eq!(total(&totals, "b"), (0..=i).sum::<i64>());
        assert!(handle.position() >= at);
    }
    assert_eq!(total(&totals, "a"), 3);
    // Catching up reads the head first: whatever was written before is in.
    append(&store, "c", vec![event("Added", 7)]).await;
    handle.catch_up(WAIT).await.unwrap();
    assert_eq!(total(&totals, "c"), 7);
    let lag = handle.lag().await.unwrap();
    assert!(lag.is_caught_up(), "{lag:?}");
    handle.stop().await.unwrap();
    assert!(matches!(handle.state(), RunState::Stopped));
}

#[tokio::test]
async fn skipped_types_still_advance_the_position() {
    let store = InMemoryEventStore::new();
    let totals = Arc::new(Totals::default());
    let handle = spawn_in_memory(Arc::new(store.clone()), Arc::clone(&totals));
    append(&store, "a", vec![event("Added", 5)]).await;
    let at = append(&store, "a", vec![event("Ignored", 100)]).await;
    handle.wait_for(at, WAIT).await.unwrap();
    assert_eq!(handle.position(), at);
    assert_eq!(total(&totals, "a"), 5);
}

#[tokio::test]
async fn a_failing_event_stops_the_runner_naming_event_and_position() {
    let store = InMemoryEventStore::new();
    let good = append(&store, "a", vec![event("Added", 1)]).await;
    let bad = append(&store, "a", vec![event("Added", -1)]).await;
    let after = append(&store, "a", vec![event("Added", 10)]).await;
    let totals = Arc::new(Totals::default());
    let handle = spawn_in_memory_with(
        Arc::new(store.clone()),
        Arc::clone(&totals),
        RunnerOptions::default().on_error(OnError::Stop),
    );
    let err = handle.wait_for(after, WAIT).await.unwrap_err();
    let Error::Failed { source, .. } = &err else {
        panic!("expected Failed, got {err}")
    };
    match &**source {
        Error::Apply {
            projection,
            position,
            event_type,
            ..
        } => {
            assert_eq!(projection, "totals");
            assert_eq!(*position, bad);
            assert_eq!(event_type, "Added");
        }
        other => panic!("expected Apply, got {other}"),
    }
    let text = err.to_string();
    assert!(text.contains(&bad.to_string()), "{text}");
    // The events before the failing one are applied and counted; nothing after.
    assert_eq!(handle.position(), good);
    assert_eq!(total(&totals, "a"), 1);
    assert!(matches!(handle.stop().await, Err(Error::Failed { .. })));
}

#[tokio::test]
async fn dead_letter_policy_sets_the_event_aside_and_goes_on() {
    let store = InMemoryEventStore::new();
    append(&store, "a", vec![event("Added", 1)]).await;
    let bad = append(&store, "a", vec![event("Added", -7)]).await;
    let after = append(&store, "a", vec![event("Added", 10)]).await;
    let totals = Arc::new(Totals::default());
    let handle = spawn_in_memory_with(
        Arc::new(store.clone()),
        Arc::clone(&totals),
        RunnerOptions::default().on_error(OnError::DeadLetter),
    );
    handle.wait_for(after, WAIT).await.unwrap();
    assert_eq!(total(&totals, "a"), 11);
    let letters = handle.dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].position, bad);
    assert!(letters[0].error.contains("negative amount"), "{letters:?}");
}

#[tokio::test]
async fn wait_for_times_out_with_where_it_got_and_lag_counts_what_is_left() {
    let store = InMemoryEventStore::new();
    let gate = Arc::new(Semaphore::new(2));
    let totals = Arc::new(Totals {
        gate: Some(Arc::clone(&gate)),
        ..Totals::default()
    });
    let handle = spawn_in_memory_with(
        Arc::new(store.clone()),
        Arc::clone(&totals),
        RunnerOptions::default().batch_size(1),
    );
    let mut last = Position::START;
    for i in 0..5 {
        last = append(&store, "a", vec![event("Added", i)]).await;
    }
    let second = Position::new(2, 0);
    handle.wait_for(second, WAIT).await.unwrap();
    let err = handle
        .wait_for(last, Duration::from_millis(50))
        .await
        .unwrap_err();
    match err {
        Error::Timeout {
            wanted, reached, ..
        } => {
            assert_eq!(wanted, last);
            assert_eq!(reached, second);
        }
        other => panic!("expected Timeout, got {other}"),
    }
    let lag = handle.lag().await.unwrap();
    assert_eq!(lag.events, 3);
    assert!(!lag.events_capped);
    assert!(lag.seconds >= 0.0);
    gate.add_permits(3);
    handle.wait_for(last, WAIT).await.unwrap();
    assert_eq!(total(&totals, "a"), 10);
    assert!(handle.lag().await.unwrap().is_caught_up());
}

/// Waiting for the start of the log waits for the runner to be set up, not
/// just for a position every runner has from the outset.
#[tokio::test]
async fn waiting_for_the_start_waits_until_the_runner_is_running() {
    let store = InMemoryEventStore::new();
    let handle = spawn_in_memory(Arc::new(store.clone()), Arc::new(Totals::default()));
    // On this single-threaded runtime the runner's task has not run yet.
    assert!(matches!(handle.state(), RunState::Starting));
    handle.wait_for(Position::START, WAIT).await.unwrap();
    assert!(
        matches!(handle.state(), RunState::Running),
        "{:?}",
        handle.state()
    );
    // A runner stopped before it ever ran has not reached even the start.
    let never = spawn_in_memory(Arc::new(store), Arc::new(Totals::default()));
    never.stop().await.unwrap();
    let err = never.wait_for(Position::START, WAIT).await.unwrap_err();
    assert!(matches!(err, Error::Stopped { .. }), "{err}");
    handle.stop().await.unwrap();
}

#[tokio::test]
async fn stop_ends_the_runner_and_waits_report_it() {
    let store = InMemoryEventStore::new();
    let handle = spawn_in_memory(Arc::new(store.clone()), Arc::new(Totals::default()));
    handle.stop().await.unwrap();
    let at = append(&store, "a", vec![event("Added", 1)]).await;
    assert!(matches!(
        handle.wait_for(at, WAIT).await,
        Err(Error::Stopped { .. })
    ));
}

#[tokio::test]
async fn a_panicking_projection_stops_the_runner_under_stop_and_is_parked_by_default() {
    struct Panics;
    impl Projection for Panics {
        type Tx = ();
        fn name(&self) -> &str {
            "panics"
        }
        async fn apply(&self, _: &mut (), _: &RecordedEvent) -> Result<(), ProjectionError> {
            panic!("boom")
        }
    }
    let store = InMemoryEventStore::new();
    let at = append(&store, "a", vec![event("Added", 1)]).await;
    let stop = RunnerOptions::default().on_error(OnError::Stop);
    let handle = spawn_in_memory_with(Arc::new(store.clone()), Arc::new(Panics), stop);
    let err = handle.wait_for(at, WAIT).await.unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    assert!(
        format!("{:?}", std::error::Error::source(&err)).contains("boom"),
        "{err:?}"
    );
    // By default the event it panicked on is parked, and the runner goes on.
    let handle = spawn_in_memory(Arc::new(store.clone()), Arc::new(Panics));
    handle.wait_for(at, WAIT).await.unwrap();
    let parked = handle.dead_letters();
    assert_eq!(parked.len(), 1);
    assert!(parked[0].error.contains("boom"), "{parked:?}");
}

#[tokio::test]
async fn several_projections_run_independently() {
    let store = InMemoryEventStore::new();
    let one = Arc::new(Totals::named("totals-one"));
    let two = Arc::new(Totals::named("totals-two"));
    let h1 = spawn_in_memory(Arc::new(store.clone()), Arc::clone(&one));
    let h2 = spawn_in_memory(Arc::new(store.clone()), Arc::clone(&two));
    assert_eq!((h1.name(), h2.name()), ("totals-one", "totals-two"));
    let at = append(&store, "a", vec![event("Added", 4)]).await;
    h1.wait_for(at, WAIT).await.unwrap();
    h1.stop().await.unwrap();
    let later = append(&store, "a", vec![event("Added", 4)]).await;
    h2.wait_for(later, WAIT).await.unwrap();
    assert_eq!(total(&one, "a"), 4);
    assert_eq!(total(&two, "a"), 8);
    assert!(matches!(h1.state(), RunState::Stopped));
    assert!(matches!(h2.state(), RunState::Running));
    h2.stop().await.unwrap();
}

/// Fails with a storage error the first `failures` times it sees an event
/// of type `Flaky`, then applies it as `Totals` does.
struct FlakyStorage {
    totals: Totals,
    failures: std::sync::atomic::AtomicU32,
}

impl Projection for FlakyStorage {
    type Tx = ();
    fn name(&self) -> &str {
        "flaky"
    }
    fn accepts(&self, event_type: &str) -> bool {
        self.totals.accepts(event_type)
    }
    async fn apply(&self, tx: &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
        use std::sync::atomic::Ordering;
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if &*event.event_type == "Flaky" && failing {
            return Err(ProjectionError::storage(
                "flaky",
                "the read model's connection dropped",
            ));
        }
        self.totals.apply(tx, event).await
    }
}

/// With the default options a refused event is parked and the runner goes
/// on, while a storage failure is retried until the event applies: it is
/// never parked for the storage's fault.
#[tokio::test]
async fn an_invalid_event_is_parked_and_a_storage_failure_retried_by_default() {
    let store = InMemoryEventStore::new();
    append(&store, "a", vec![event("Added", 1)]).await;
    let bad = append(&store, "a", vec![event("Added", -1)]).await;
    append(&store, "a", vec![event("Flaky", 10)]).await;
    let after = append(&store, "a", vec![event("Added", 100)]).await;
    let projection = Arc::new(FlakyStorage {
        totals: Totals::named("flaky"),
        failures: std::sync::atomic::AtomicU32::new(2),
    });
    let handle = spawn_in_memory(Arc::new(store.clone()), Arc::clone(&projection));
    handle.wait_for(after, WAIT).await.unwrap();
    let parked = handle.dead_letters();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].position, bad);
    assert!(parked[0].error.contains("negative amount"), "{parked:?}");
    assert_eq!(
        projection.totals.model.lock().unwrap().get("a").copied(),
        Some(111)
    );
    assert_eq!(
        projection
            .failures
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// An event written by a newer release (a later schema version than this
/// code reads) is parked as such, and the runner reads on.
#[tokio::test]
async fn an_event_of_a_newer_schema_version_is_parked_and_the_runner_reads_on() {
    #[derive(
        Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, es_core::DomainEvent,
    )]
    #[event(crate = "es_core")]
    enum Ledger {
        Added { amount: i64 },
    }
    #[derive(Default)]
    struct Sum(Mutex<i64>);
    impl Projection for Sum {
        type Tx = ();
        fn name(&self) -> &str {
            "sum"
        }
        async fn apply(&self, _: &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
            let Ledger::Added { amount } = es_core::projection::decode(self.name(), event)?;
            *self.0.lock().unwrap() += amount;
            Ok(())
        }
    }

    let store = InMemoryEventStore::new();
    let mut newer = event("Added", 1_000);
    newer.schema_version = 2;
    let parked_at = append(&store, "a", vec![newer]).await;
    let after = append(&store, "a", vec![event("Added", 5)]).await;
    let sum = Arc::new(Sum::default());
    let handle = spawn_in_memory(Arc::new(store.clone()), Arc::clone(&sum));
    handle.wait_for(after, WAIT).await.unwrap();
    let parked = handle.dead_letters();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].position, parked_at);
    assert!(
        parked[0].error.contains("schema version 2, newer than 1"),
        "{parked:?}"
    );
    assert_eq!(*sum.0.lock().unwrap(), 5);
    handle.stop().await.unwrap();
}
