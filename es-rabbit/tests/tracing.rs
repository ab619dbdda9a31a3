//! The consumer's span names the publisher's span as its parent across the
//! broker (W3C traceparent in the AMQP headers), with correlation and
//! causation ids as fields.

// Helpers outside #[test] fns unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bus, cleanup, config, eventually, message};
use es_core::{Delivery, EventBus, Outcome, Subscription};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;
use uuid::Uuid;

type Spans = Arc<Mutex<Vec<(String, HashMap<String, String>)>>>;

/// The captured spans, and the index of each live one by its id (for the
/// fields recorded after the span was created).
#[derive(Clone, Default)]
struct Capture(Spans, Arc<Mutex<HashMap<tracing::span::Id, usize>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        let name = attrs.metadata().name();
        if name.starts_with("es.rabbit.") {
            let mut fields = HashMap::new();
            attrs.record(&mut Fields(&mut fields));
            let mut spans = self.0.lock().unwrap();
            self.1.lock().unwrap().insert(id.clone(), spans.len());
            spans.push((name.to_owned(), fields));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: Context<'_, S>,
    ) {
        if let Some(&index) = self.1.lock().unwrap().get(id) {
            values.record(&mut Fields(&mut self.0.lock().unwrap()[index].1));
        }
    }

    fn on_close(&self, id: tracing::span::Id, _: Context<'_, S>) {
        self.1.lock().unwrap().remove(&id);
    }
}

#[tokio::test]
async fn the_consumer_span_continues_the_publisher_trace() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    // Current-thread runtime: every task of this test runs on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let bus = bus(config("tracing")).await;
    let got = Arc::new(Mutex::new(None));
    let sink = Arc::clone(&got);
    let handle = bus
        .subscribe(
            Subscription::new("g", ["order.*"]),
            Arc::new(move |d: Delivery| {
                let sink = Arc::clone(&sink);
                async move {
                    *sink.lock().unwrap() = Some(d);
                    Outcome::Ack
                }
            }),
        )
        .await
        .unwrap();
    let causation = Uuid::now_v7();
    let mut m = message("order", "Placed", 1);
    m.metadata = m.metadata.clone().with_causation_id(causation);
    let correlation = m.metadata.correlation_id.unwrap();
    bus.publish(std::slice::from_ref(&m)).await.unwrap();
    eventually("the delivery", Duration::from_secs(30), || {
        got.lock().unwrap().is_some()
    })
    .await;
    handle.stop().await;

    let spans = capture.0.lock().unwrap().clone();
    let find = |name: &str| {
        spans
            .iter()
            .find(|(n, f)| n == name && f.get("message_id") == Some(&m.message_id.to_string()))
            .map(|(_, f)| f.clone())
            .unwrap_or_else(|| panic!("no {name} span in {spans:?}"))
    };
    let publish = find("es.rabbit.publish");
    let consume = find("es.rabbit.consume");
    assert_eq!(consume["trace_id"], publish["trace_id"], "same trace");
    assert_eq!(
        consume["parent_span_id"], publish["span_id"],
        "the consumer's parent is the publish span"
    );
    assert_ne!(consume["span_id"], publish["span_id"]);
    for span in [&publish, &consume] {
        assert_eq!(span["correlation_id"], correlation.to_string());
        assert_eq!(span["causation_id"], causation.to_string());
    }
    // And the handler sees the publish span's context as the message's traceparent.
    let delivered = got.lock().unwrap().clone().unwrap();
    assert_eq!(
        delivered
            .message
            .metadata
            .traceparent
            .map(|t| t.to_string()),
        Some(format!(
            "00-{}-{}-01",
            publish["trace_id"], publish["span_id"]
        ))
    );
    cleanup(&bus).await;
}
