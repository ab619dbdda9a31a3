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
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        // The parent's name, under a key no span here uses as a field.
        if let Some(parent) = ctx.span(id).and_then(|s| s.parent()) {
            fields.insert("^parent".to_owned(), parent.name().to_owned());
        }
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_owned(), fields));
    }
}

/// Captures every span at debug level and above on this thread, with a
/// current-thread runtime whose tasks (the runner's) run under it.
fn capturing() -> (
    Spans,
    tracing::subscriber::DefaultGuard,
    tokio::runtime::Runtime,
) {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry()
        .with(Capture(Arc::clone(&spans)))
        .with(tracing_subscriber::filter::LevelFilter::DEBUG);
    let guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (spans, guard, rt)
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
    let (spans, _guard, rt) = capturing();
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

/// The set-based path (`PgProjection::apply_batch`) applies a batch in one
/// statement, yet each event still gets its `projection.apply` span with its
/// ids, under a `projection.apply_batch` span naming the batch's positions.
#[cfg(feature = "postgres")]
#[test]
fn a_set_based_batch_gets_a_span_and_one_span_per_event_with_its_ids() {
    use es_core::Position;
    use es_postgres::PgEventStore;
    use es_projections::doc_support::Balances;
    use es_projections::postgres::PgProjectionRunner;

    let (spans, _guard, rt) = capturing();
    let recorded = rt.block_on(async {
        let (pool, schema) = es_postgres::testing::fresh_schema_with(4).await;
        let model = format!("{schema}_m");
        let store: Arc<dyn EventStore> = Arc::new(PgEventStore::new(pool.clone(), schema.clone()));
        let events = (1..=3)
            .map(|amount| {
                let metadata = Metadata::new()
                    .with_correlation_id(uuid::Uuid::now_v7())
                    .with_causation_id(uuid::Uuid::now_v7());
                let payload = Payload::from_value(&serde_json::json!({ "amount": amount }));
                NewEvent::new("Deposited", 1, payload.unwrap(), metadata)
            })
            .collect();
        let at = store
            .append(
                &StreamId::new("acct-1").unwrap(),
                ExpectedVersion::Any,
                events,
            )
            .await
            .unwrap()
            .position;
        let projection = Balances {
            name: "traced-set-based".to_owned(),
            batched: true,
        };
        let handle = PgProjectionRunner::new(
            pool.clone(),
            &schema,
            &model,
            Arc::clone(&store),
            Arc::new(projection),
        )
        .unwrap()
        .spawn();
        handle.wait_for(at, Duration::from_secs(30)).await.unwrap();
        handle.stop().await.unwrap();
        let recorded = store.read_all(Position::START, 10).await.unwrap();
        for s in [&model, &schema] {
            let sql = format!("DROP SCHEMA IF EXISTS \"{s}\" CASCADE");
            sqlx::query(&sql).execute(&pool).await.unwrap();
        }
        recorded
    });
    assert_eq!(recorded.len(), 3);
    let spans = spans.lock().unwrap();
    let batches: Vec<_> = spans
        .iter()
        .filter(|(name, f)| {
            name == "projection.apply_batch" && f["projection"] == "traced-set-based"
        })
        .collect();
    assert!(!batches.is_empty(), "no projection.apply_batch span");
    assert_eq!(batches[0].1["first"], recorded[0].position.to_string());
    assert_eq!(batches[0].1["^parent"], "projection.batch");
    for event in &recorded {
        let step = spans
            .iter()
            .find(|(name, f)| {
                name == "projection.apply" && f["event_id"] == event.event_id.to_string()
            })
            .unwrap_or_else(|| panic!("no span for the event at {}", event.position));
        assert_eq!(step.1["^parent"], "projection.apply_batch");
        assert_eq!(step.1["projection"], "traced-set-based");
        assert_eq!(
            step.1["correlation_id"],
            event.metadata.correlation_id.unwrap().to_string()
        );
        assert_eq!(
            step.1["causation_id"],
            event.metadata.causation_id.unwrap().to_string()
        );
        assert_eq!(step.1["position"], event.position.to_string());
    }
}
