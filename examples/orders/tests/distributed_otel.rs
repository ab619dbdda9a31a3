//! OpenTelemetry export: one order placed through the gateway of the
//! distributed deployment (every service its own process, a relay process
//! too) is one trace, whose spans come from every process it crossed, each
//! linked to its parent, across HTTP, the event stores and RabbitMQ.
//!
//! The test process is the OTLP receiver: an HTTP server taking
//! `POST /v1/traces` (protobuf), as a collector would.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use support::distributed::{Cluster, EVERY_SERVICE_APART};

/// One span as received: the process's `service.name`, its name, ids
/// (lowercase hex; the parent empty for a root) and string attributes.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Received>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => s.clone(),
                AnyValue::IntValue(i) => i.to_string(),
                AnyValue::BoolValue(b) => b.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

/// `POST /v1/traces`: decodes the request and keeps its spans.
async fn export(State(spans): State<Spans>, body: Bytes) -> impl IntoResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
    };
    let mut received = Vec::new();
    for resource in request.resource_spans {
        let attributes = resource
            .resource
            .map(|r| text(&r.attributes))
            .unwrap_or_default();
        let service = attributes.get("service.name").cloned().unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                received.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    attributes: text(&span.attributes),
                });
            }
        }
    }
    spans.lock().unwrap().extend(received);
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

/// Starts the OTLP/HTTP receiver on a port of its own.
async fn receiver() -> (SocketAddr, Spans) {
    let spans = Spans::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(export))
        .with_state(Arc::clone(&spans));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, spans)
}

/// What is wrong with `trace` (the spans of one trace id), empty when
/// nothing is: a process, or a span the order must have crossed, that is
/// missing; a span whose parent is not among the spans received; more or
/// fewer than one root.
fn problems(trace: &[Received]) -> Vec<String> {
    let mut problems = Vec::new();
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    for service in ["gateway", "order", "inventory", "payment", "notification"] {
        if !services.contains(service) {
            problems.push(format!("no span from the {service} process"));
        }
    }
    // The spans the order's path crosses, each in the process that runs it
    // (`None`: whichever process holds the relay of the store); a name
    // ending in `*` is a prefix.
    let expected: [(&str, Option<&str>); 17] = [
        ("gateway.forward", Some("gateway")),
        ("order.place", Some("order")),
        ("es.command", Some("order")),
        ("es_postgres.append*", Some("order")),
        ("es.saga.react_local", Some("order")),
        ("es.rabbit.consume", Some("order")),
        ("es.saga.react", Some("order")),
        ("es.relay.publish", None),
        ("es.rabbit.publish", None),
        ("es.rabbit.consume", Some("inventory")),
        ("es_postgres.append*", Some("inventory")),
        ("es.rabbit.consume", Some("payment")),
        ("es.command", Some("payment")),
        ("es.rabbit.consume", Some("notification")),
        ("es.rabbit.consume", Some("query")),
        ("projection.batch", Some("query")),
        ("projection.apply", Some("query")),
    ];
    for (name, service) in expected {
        let named = |span: &str| match name.strip_suffix('*') {
            Some(prefix) => span.starts_with(prefix),
            None => span == name,
        };
        let found = trace
            .iter()
            .any(|s| named(&s.name) && service.is_none_or(|service| s.service == service));
        if !found {
            problems.push(format!(
                "no {name} span from {}",
                service.unwrap_or("any process")
            ));
        }
    }
    let ids: BTreeSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&Received> = trace.iter().filter(|s| s.parent.is_empty()).collect();
    if roots.len() != 1 || roots[0].name != "gateway.forward" {
        problems.push(format!(
            "the root must be the gateway's span, alone: {:?}",
            roots
                .iter()
                .map(|s| (&s.service, &s.name))
                .collect::<Vec<_>>()
        ));
    }
    for span in trace {
        if !span.parent.is_empty() && !ids.contains(span.parent.as_str()) {
            problems.push(format!(
                "{} in {} has parent {}, a span not received",
                span.name, span.service, span.parent
            ));
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_every_process() {
    let (addr, spans) = receiver().await;
    let endpoint = format!("http://{addr}");
    let c = Cluster::start_with_env(
        "otel",
        &EVERY_SERVICE_APART,
        Duration::from_secs(30),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            // Exported every 100 ms, so the test waits little.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let client = c.client();
    let product = client.product("Traced Widget", "3.00", 5).await;
    let id = client
        .place("traced@example.com", &[(&product, 1)], "tok_ok")
        .await;
    assert_eq!(client.finished(&id).await["status"], "Completed");
    assert!(
        !client.wait_emails(&id).await.is_empty(),
        "no email for {id}"
    );

    // The order's trace: the one of the order service's `order.place` span.
    let start = Instant::now();
    let limit = Duration::from_secs(15);
    let (trace, problems) = loop {
        let all = spans.lock().unwrap().clone();
        let trace_id = all
            .iter()
            .find(|s| s.name == "order.place" && s.attributes.get("order_id") == Some(&id))
            .map(|s| s.trace_id.clone());
        let trace: Vec<Received> = match &trace_id {
            Some(t) => all.into_iter().filter(|s| &s.trace_id == t).collect(),
            None => Vec::new(),
        };
        let found = if trace_id.is_some() {
            problems(&trace)
        } else {
            vec![format!("no order.place span for order {id}")]
        };
        if found.is_empty() || start.elapsed() > limit {
            break (trace, found);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut by_process: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for span in &trace {
        by_process
            .entry(span.service.as_str())
            .or_default()
            .insert(span.name.as_str());
    }
    if !problems.is_empty() {
        // Every span received, for the post-mortem.
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("otel-spans.txt");
        let all: Vec<String> = spans
            .lock()
            .unwrap()
            .iter()
            .map(|s| format!("{s:?}"))
            .collect();
        std::fs::write(&path, all.join("\n")).unwrap();
        panic!(
            "the order's trace after {limit:?}: {problems:#?}\nspans by process: {by_process:#?}\nevery span received: {}",
            path.display()
        );
    }
    // Every span of the order's trace is in that trace only: the events and
    // messages of the order carried it, not another.
    let correlated: Vec<&Received> = trace
        .iter()
        .filter(|s| s.attributes.get("correlation_id").is_some_and(|c| c != &id))
        .collect();
    assert!(
        correlated.is_empty(),
        "spans of another correlation in the order's trace: {correlated:#?}"
    );
    c.stop().await;
}
