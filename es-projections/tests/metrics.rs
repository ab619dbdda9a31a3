//! The runner's metrics, seen through a recorder installed for this test
//! binary.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use es_core::{
    EventStore, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, Payload, Projection,
    ProjectionError, RecordedEvent, StreamId,
};
use es_projections::telemetry;
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata as Meta,
    Recorder, SharedString, Unit,
};

#[derive(Default)]
struct Cell(AtomicU64, Mutex<Vec<f64>>);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::SeqCst);
    }
}

impl HistogramFn for Cell {
    fn record(&self, value: f64) {
        self.1.lock().unwrap().push(value);
    }
}

#[derive(Default)]
struct TestRecorder(Mutex<HashMap<String, Arc<Cell>>>);

impl TestRecorder {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        Arc::clone(self.0.lock().unwrap().entry(name).or_default())
    }
    fn get(&self, name: &str, projection: &str) -> Option<Arc<Cell>> {
        self.0
            .lock()
            .unwrap()
            .get(&format!("{name}{{projection={projection}}}"))
            .cloned()
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Meta<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Meta<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, key: &Key, _: &Meta<'_>) -> Histogram {
        Histogram::from_arc(self.cell(key))
    }
}

struct Forward(&'static TestRecorder);

impl Recorder for Forward {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, m: &Meta<'_>) -> Counter {
        self.0.register_counter(key, m)
    }
    fn register_gauge(&self, key: &Key, m: &Meta<'_>) -> Gauge {
        self.0.register_gauge(key, m)
    }
    fn register_histogram(&self, key: &Key, m: &Meta<'_>) -> Histogram {
        self.0.register_histogram(key, m)
    }
}

fn recorder() -> &'static TestRecorder {
    static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let r: &'static TestRecorder = Box::leak(Box::default());
        metrics::set_global_recorder(Forward(r)).unwrap();
        r
    })
}

struct OnlyA;

impl Projection for OnlyA {
    type Tx = ();
    fn name(&self) -> &str {
        "metrics-only-a"
    }
    fn accepts(&self, event_type: &str) -> bool {
        event_type == "A"
    }
    async fn apply(&self, _: &mut (), _: &RecordedEvent) -> Result<(), ProjectionError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_counts_applied_and_skipped_events_batches_latency_and_lag() {
    let rec = recorder();
    let store = InMemoryEventStore::new();
    let stream = StreamId::new("m-1").unwrap();
    let mut last = es_core::Position::START;
    for i in 0..10 {
        let kind = if i % 5 == 4 { "B" } else { "A" };
        let e = NewEvent::new(kind, 1, Payload::from_json("{}").unwrap(), Metadata::new());
        last = store
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await
            .unwrap()
            .position;
    }
    let handle = es_projections::spawn_in_memory(Arc::new(store.clone()), Arc::new(OnlyA));
    handle
        .wait_for(last, Duration::from_secs(10))
        .await
        .unwrap();
    let name = "metrics-only-a";
    let count = |metric| {
        rec.get(metric, name)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    };
    assert_eq!(count(telemetry::EVENTS_APPLIED), 8);
    assert_eq!(count(telemetry::EVENTS_SKIPPED), 2);
    assert!(count(telemetry::BATCHES) >= 1);
    let latency = rec.get(telemetry::BATCH_SECONDS, name).unwrap();
    assert!(!latency.1.lock().unwrap().is_empty());
    assert!(latency.1.lock().unwrap().iter().all(|s| *s >= 0.0));
    let lag = rec.get(telemetry::LAG_EVENTS, name).unwrap();
    assert_eq!(f64::from_bits(lag.0.load(Ordering::SeqCst)), 0.0);
    assert!(rec.get(telemetry::LAG_SECONDS, name).is_some());
    handle.stop().await.unwrap();
    let _ = store.head().await.unwrap();
}

/// Applies `A` events once the gate lets it; fails on `Bad` events.
struct Gated {
    name: &'static str,
    gate: tokio::sync::Semaphore,
}

impl Projection for Gated {
    type Tx = ();
    fn name(&self) -> &str {
        self.name
    }
    async fn apply(&self, _: &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
        self.gate.acquire().await.unwrap().forget();
        if &*event.event_type == "Bad" {
            return Err(ProjectionError::invalid(self.name, event, "bad"));
        }
        Ok(())
    }
}

async fn append_kinds(store: &InMemoryEventStore, kinds: &[&str]) -> es_core::Position {
    let stream = StreamId::new("lag-1").unwrap();
    let mut last = es_core::Position::START;
    for kind in kinds {
        let e = NewEvent::new(*kind, 1, Payload::from_json("{}").unwrap(), Metadata::new());
        last = store
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await
            .unwrap()
            .position;
    }
    last
}

/// The lag-in-events gauge of `projection`, once it reads `want` (or what it
/// reads after 10 s).
async fn lag_gauge_reaching(projection: &str, want: f64) -> Option<f64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = recorder()
            .get(telemetry::LAG_EVENTS, projection)
            .map(|c| f64::from_bits(c.0.load(Ordering::SeqCst)));
        if now == Some(want) || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A runner stuck in a batch commits nothing, yet its lag gauge follows the
/// log on a timer: events appended meanwhile show; and once it gets going
/// again the gauge goes back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_gauge_grows_while_the_runner_is_stuck() {
    let _ = recorder();
    let store = InMemoryEventStore::new();
    let name = "metrics-stuck";
    let projection = Arc::new(Gated {
        name,
        gate: tokio::sync::Semaphore::new(3),
    });
    let handle = es_projections::spawn_in_memory_with(
        Arc::new(store.clone()),
        Arc::clone(&projection),
        es_projections::RunnerOptions::default().lag_interval(Duration::from_millis(20)),
    );
    let first = append_kinds(&store, &["A", "A", "A"]).await;
    handle
        .wait_for(first, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(lag_gauge_reaching(name, 0.0).await, Some(0.0));
    // The gate is shut: the runner hangs in its next batch.
    let last = append_kinds(&store, &["A", "A", "A", "A", "A"]).await;
    assert_eq!(lag_gauge_reaching(name, 5.0).await, Some(5.0));
    assert_eq!(handle.position(), first);
    projection.gate.add_permits(5);
    handle
        .wait_for(last, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(lag_gauge_reaching(name, 0.0).await, Some(0.0));
    handle.stop().await.unwrap();
}

/// A runner that stops on a failing event reports the lag it leaves behind
/// (the failing event and what follows), not the last good batch's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_runner_reports_the_lag_it_leaves_behind() {
    let rec = recorder();
    let store = InMemoryEventStore::new();
    let name = "metrics-failed";
    append_kinds(&store, &["A", "A", "Bad", "A"]).await;
    let handle = es_projections::spawn_in_memory_with(
        Arc::new(store.clone()),
        Arc::new(Gated {
            name,
            gate: tokio::sync::Semaphore::new(100),
        }),
        es_projections::RunnerOptions::default().on_error(es_projections::OnError::Stop),
    );
    assert!(matches!(
        handle.finished().await,
        es_projections::RunState::Failed(_)
    ));
    let lag = rec.get(telemetry::LAG_EVENTS, name).unwrap();
    assert_eq!(f64::from_bits(lag.0.load(Ordering::SeqCst)), 2.0);
    assert!(rec.get(telemetry::LAG_SECONDS, name).is_some());
}
