//! The HTTP gateway: forwards each path of the public API to the service
//! that owns it (in process when that service runs here, else over HTTP to
//! its configured addresses, round robin, the next one on a connection
//! failure), and serves the merged OpenAPI document, a health check of the
//! upstreams and every process's metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use es_rabbit::TraceParent;
use tower::ServiceExt;
use tracing::Instrument;

use crate::http::{ApiError, MAX_BODY_BYTES};
use crate::telemetry::Gauges;
use crate::{Error, Result};

/// The services with an HTTP surface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Owner {
    /// `POST /api/orders`, `POST /api/orders/{id}/cancel`.
    Order,
    /// `/api/products/...`.
    Inventory,
    /// Every other `/api/orders...` path and `/api/stats`.
    Query,
}

impl Owner {
    fn as_str(self) -> &'static str {
        match self {
            Self::Order => "order",
            Self::Inventory => "inventory",
            Self::Query => "query",
        }
    }

    /// The owner of a request, if the path is part of the API.
    pub(crate) fn of(method: &Method, path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        match segments.as_slice() {
            ["", "api", "products", ..] => Some(Self::Inventory),
            ["", "api", "orders"] if method == Method::POST => Some(Self::Order),
            ["", "api", "orders", _, "cancel"] => Some(Self::Order),
            ["", "api", "orders", ..]
            | ["", "api", "stats"]
            | ["", "api", "admin", "read-model", ..] => Some(Self::Query),
            _ => None,
        }
    }
}

/// Where the services are: one or more base URLs each (comma-separated).
#[derive(Clone, Debug)]
pub(crate) struct Upstreams {
    /// The order service.
    pub order: String,
    /// The inventory service.
    pub inventory: String,
    /// The query service.
    pub query: String,
}

struct Pool {
    urls: Vec<String>,
    next: AtomicUsize,
}

impl Pool {
    fn new(list: &str) -> Self {
        Self {
            urls: list
                .split(',')
                .map(|u| u.trim().trim_end_matches('/').to_owned())
                .filter(|u| !u.is_empty())
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The addresses, starting with the next in turn.
    fn order(&self) -> Vec<&str> {
        let n = self.urls.len().max(1);
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..self.urls.len())
            .map(|i| self.urls[(start + i) % n].as_str())
            .collect()
    }
}

struct Gateway {
    client: reqwest::Client,
    local: Router,
    /// The gauges of the services this process runs, measured per scrape.
    gauges: Arc<Gauges>,
    owners: BTreeSet<Owner>,
    pools: BTreeMap<Owner, Pool>,
}

/// The gateway's router: `routes` serves the owners in `owners` in process
/// (with `gauges`, their gauges); the rest go to `upstreams`.
///
/// # Errors
/// When the HTTP client cannot be built.
pub(crate) fn gateway_router(
    upstreams: &Upstreams,
    local: Router,
    owners: BTreeSet<Owner>,
    gauges: Arc<Gauges>,
) -> Result<Router> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| Error::caused("building the HTTP client", e))?;
    let pools = BTreeMap::from([
        (Owner::Order, Pool::new(&upstreams.order)),
        (Owner::Inventory, Pool::new(&upstreams.inventory)),
        (Owner::Query, Pool::new(&upstreams.query)),
    ]);
    let state = Arc::new(Gateway {
        client,
        local: local.layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES)),
        owners,
        pools,
        gauges,
    });
    Ok(Router::new()
        .route("/health", get(health))
        .route("/metrics", get(all_metrics))
        .route(
            "/openapi.json",
            get(|| async { Json(crate::node::openapi()) }),
        )
        .fallback(forward)
        .with_state(state))
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    ApiError::new(status, code, message).into_response()
}

const FORWARDED: [HeaderName; 6] = [
    header::CONTENT_TYPE,
    header::ACCEPT,
    // The services check the token again when they have a key, and trust the
    // caller the gateway established when they have none.
    header::AUTHORIZATION,
    HeaderName::from_static(crate::auth::CALLER_HEADER),
    HeaderName::from_static("idempotency-key"),
    HeaderName::from_static("traceparent"),
];

async fn forward(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let Some(owner) = Owner::of(&method, &path) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for {method} {path}"),
        );
    };
    let incoming = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let span = tracing::info_span!("gateway.forward", %method, %path, service = owner.as_str(), trace_id = tracing::field::Empty, span_id = tracing::field::Empty);
    // The exported span's own context, else a span id of its own: the
    // service's span names it as its parent.
    let trace = es_core::otel::continue_trace(&span, incoming)
        .unwrap_or_else(|| TraceParent::child_of(incoming));
    span.record("trace_id", tracing::field::display(trace.trace_id()));
    span.record("span_id", tracing::field::display(trace.span_id()));
    let response = async {
        let (mut parts, body) = request.into_parts();
        if let Ok(v) = HeaderValue::from_str(&trace.to_string()) {
            parts.headers.insert("traceparent", v);
        }
        if gw.owners.contains(&owner) {
            let request = Request::from_parts(parts, body);
            return match gw.local.clone().oneshot(request).await {
                Ok(r) => r,
                Err(e) => match e {},
            };
        }
        let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES * 4).await {
            Ok(b) => b,
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                )
            }
        };
        let query = parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let mut last_error = String::new();
        for base in gw.pools[&owner].order() {
            let mut upstream = gw
                .client
                .request(method.clone(), format!("{base}{path}{query}"));
            for name in &FORWARDED {
                if let Some(v) = parts.headers.get(name) {
                    upstream = upstream.header(name, v);
                }
            }
            match upstream.body(Bytes::clone(&bytes)).send().await {
                Ok(res) => {
                    let status = res.status();
                    let content_type = res.headers().get(header::CONTENT_TYPE).cloned();
                    let challenge = res.headers().get(header::WWW_AUTHENTICATE).cloned();
                    let body = match res.bytes().await {
                        Ok(b) => b,
                        Err(e) => {
                            last_error = format!("{base}: {e}");
                            break;
                        }
                    };
                    let mut response = Response::new(Body::from(body));
                    *response.status_mut() = status;
                    if let Some(ct) = content_type {
                        response.headers_mut().insert(header::CONTENT_TYPE, ct);
                    }
                    if let Some(challenge) = challenge {
                        response
                            .headers_mut()
                            .insert(header::WWW_AUTHENTICATE, challenge);
                    }
                    return response;
                }
                // Not connected: nothing was sent; try the next address.
                Err(e) if e.is_connect() => last_error = format!("{base}: {e}"),
                Err(e) => {
                    last_error = format!("{base}: {e}");
                    break;
                }
            }
        }
        // The addresses and the cause are for the operator, not the client.
        tracing::warn!(error = %last_error, "upstream unavailable");
        error(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            format!("the {} service did not answer", owner.as_str()),
        )
    }
    .instrument(span)
    .await;
    ::metrics::histogram!("gateway_request_seconds", "service" => owner.as_str(), "status" => response.status().as_u16().to_string())
        .record(started.elapsed().as_secs_f64());
    response
}

/// The gateway's health: 503 when an upstream does not answer, `degraded`
/// (200) when one says it is (parked events, a blocked relay).
async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    let mut upstreams = serde_json::Map::new();
    let (mut up_all, mut ok_all) = (true, true);
    for (owner, pool) in &gw.pools {
        if gw.owners.contains(owner) {
            upstreams.insert(owner.as_str().into(), "in process".into());
            continue;
        }
        for (i, base) in pool.urls.iter().enumerate() {
            let answer = gw
                .client
                .get(format!("{base}/health"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            let status = match answer {
                Ok(r) if r.status().is_success() => {
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    if body["status"] == "ok" {
                        "ok"
                    } else {
                        "degraded"
                    }
                }
                _ => "unavailable",
            };
            up_all &= status != "unavailable";
            ok_all &= status == "ok";
            // Instances by number: their addresses are internal.
            upstreams.insert(format!("{}#{}", owner.as_str(), i + 1), status.into());
        }
    }
    let body = serde_json::json!({
        "status": if ok_all { "ok" } else { "degraded" },
        "upstreams": upstreams,
    });
    let status = if up_all {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// The gateway's metrics and every upstream's, each sample labelled with the
/// process it came from (`process="gateway"`, `process="order@http://..."`).
async fn all_metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let mut texts = vec![("gateway".to_owned(), gw.gauges.render().await)];
    let mut seen = BTreeSet::new();
    for (owner, pool) in &gw.pools {
        if gw.owners.contains(owner) {
            continue;
        }
        for base in &pool.urls {
            if !seen.insert(base.clone()) {
                continue;
            }
            if let Ok(res) = gw
                .client
                .get(format!("{base}/metrics"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if let Ok(text) = res.text().await {
                    texts.push((format!("{}@{base}", owner.as_str()), text));
                }
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        merge_metrics(&texts),
    )
        .into_response()
}

/// Merges Prometheus texts: one `# HELP`/`# TYPE` per family, every family's
/// samples together, each labelled with its process.
pub(super) fn merge_metrics(texts: &[(String, String)]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for (process, text) in texts {
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                let (_, name) = (words.next(), words.next().unwrap_or_default().to_owned());
                let family = families.entry(name.clone()).or_insert_with(|| {
                    order.push(name.clone());
                    Default::default()
                });
                if !family.0.iter().any(|l| l == line) {
                    family.0.push(line.to_owned());
                }
                current = name;
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let (name, rest) = line.split_at(name_end);
            let labelled = match rest.strip_prefix('{') {
                Some(labels) => format!("{name}{{process=\"{process}\",{labels}"),
                None => format!("{name}{{process=\"{process}\"}}{rest}"),
            };
            let key = if current.is_empty() || !name.starts_with(current.as_str()) {
                name.to_owned()
            } else {
                current.clone()
            };
            let family = families.entry(key.clone()).or_insert_with(|| {
                order.push(key.clone());
                Default::default()
            });
            family.1.push(labelled);
        }
    }
    let mut out = String::new();
    for name in order {
        if let Some((meta, samples)) = families.get(&name) {
            for l in meta.iter().chain(samples) {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners() {
        assert_eq!(Owner::of(&Method::POST, "/api/orders"), Some(Owner::Order));
        assert_eq!(Owner::of(&Method::GET, "/api/orders"), Some(Owner::Query));
        assert_eq!(
            Owner::of(&Method::GET, "/api/orders/search"),
            Some(Owner::Query)
        );
        assert_eq!(
            Owner::of(&Method::POST, "/api/orders/x/cancel"),
            Some(Owner::Order)
        );
        assert_eq!(
            Owner::of(&Method::GET, "/api/orders/x/events"),
            Some(Owner::Query)
        );
        assert_eq!(
            Owner::of(&Method::POST, "/api/products/x/restock"),
            Some(Owner::Inventory)
        );
        assert_eq!(Owner::of(&Method::GET, "/api/stats"), Some(Owner::Query));
        assert_eq!(
            Owner::of(&Method::POST, "/api/admin/read-model/parked/replay"),
            Some(Owner::Query)
        );
        assert_eq!(Owner::of(&Method::GET, "/nope"), None);
    }

    #[test]
    fn merged_metrics_keep_families_together() {
        let a = "# TYPE x counter\nx 1\n# TYPE y gauge\ny{a=\"b\"} 2\n".to_owned();
        let b = "# TYPE x counter\nx 3\n".to_owned();
        let merged = merge_metrics(&[("p".into(), a), ("q".into(), b)]);
        assert_eq!(
            merged,
            "# TYPE x counter\nx{process=\"p\"} 1\nx{process=\"q\"} 3\n# TYPE y gauge\ny{process=\"p\",a=\"b\"} 2\n"
        );
    }
}
