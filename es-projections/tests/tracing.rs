//! The runner's spans: one per batch, one per event carrying the event's
//! correlation and causation ids.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use es_core::{
    EventStore, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, Payload, Projection,
    ProjectionError, RecordedEvent, StreamId,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type Spans = Arc<Mutex<Vec<(String, BTreeMap<String, String>)>>>;

struct Capture(Spans);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_owned(), fields));
    }
}

struct Nothing;

impl Projection for Nothing {
    type Tx = ();
    fn name(&self) -> &str {
        "traced"
    }
    async fn apply(&self, _: &mut (), _: &RecordedEvent) -> Result<(), ProjectionError> {
        Ok(())
    }
}

#[test]
fn batches_and_events_get_spans_with_correlation_and_causation_ids() {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry()
        .with(Capture(Arc::clone(&spans)))
        .with(tracing_subscriber::filter::LevelFilter::DEBUG);
    let _guard = tracing::subscriber::set_default(subscriber);
    // A current-thread runtime: the runner's task runs on this thread, under
    // this subscriber.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (correlation, causation) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    rt.block_on(async {
        let store = InMemoryEventStore::new();
        let metadata = Metadata::new()
            .with_correlation_id(correlation)
            .with_causation_id(causation);
        let event = NewEvent::new("Traced", 1, Payload::from_json("{}").unwrap(), metadata);
        let at = store
            .append(
                &StreamId::new("t-1").unwrap(),
                ExpectedVersion::Any,
                vec![event],
            )
            .await
            .unwrap()
            .position;
        let handle = es_projections::spawn_in_memory(Arc::new(store), Arc::new(Nothing));
        handle.wait_for(at, Duration::from_secs(10)).await.unwrap();
        handle.stop().await.unwrap();
    });
    let spans = spans.lock().unwrap();
    let batch = spans
        .iter()
        .find(|(name, _)| name == "projection.batch")
        .unwrap();
    assert_eq!(batch.1["projection"], "traced");
    assert_eq!(batch.1["events"], "1");
    let apply = spans
        .iter()
        .find(|(name, _)| name == "projection.apply")
        .unwrap();
    assert_eq!(apply.1["correlation_id"], correlation.to_string());
    assert_eq!(apply.1["causation_id"], causation.to_string());
    assert_eq!(apply.1["event_type"], "Traced");
    assert_eq!(apply.1["position"], "1.0");
}
