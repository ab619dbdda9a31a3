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
