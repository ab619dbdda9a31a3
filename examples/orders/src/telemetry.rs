//! Metrics, logs and exported spans.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use es_core::relay::Blocked;
use es_core::{CheckpointStore, EventStore, InMemoryBus, Position};
use es_postgres::sqlx::PgPool;
use es_postgres::PgEventStore;
use es_rabbit::RabbitBus;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::sync::watch;

use crate::backends::Backends;
use crate::query::OrderQueries;

/// The process's Prometheus recorder (installed on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::debug!("a metrics recorder was already installed");
        }
        handle
    })
}

/// Keeps the log writer's thread and the span exporter running; dropping it
/// exports the spans not yet sent and flushes what is buffered. Hold it
/// until the process ends.
#[must_use = "dropping the guard stops the log writer and the span exporter"]
pub struct LogGuard {
    tracer: Option<SdkTracerProvider>,
    _writer: tracing_appender::non_blocking::WorkerGuard,
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogGuard")
            .field("exporting", &self.tracer.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take() {
            if let Err(error) = tracer.shutdown() {
                tracing::warn!(%error, "the span exporter did not shut down cleanly");
            }
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default_level`), with the
/// spans' fields (correlation and causation ids) on every line; and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
/// set, exports the spans with OTLP over HTTP as `service`
/// (`OTEL_SERVICE_NAME` overrides it); see [`exported`] for which spans.
///
/// Lines are written by a thread of their own, so a slow terminal or pipe
/// never blocks the runtime's workers (a write to stderr is a blocking
/// system call, one per line). The writer does not drop lines: when its
/// buffer is full, logging waits, as a direct write would. Colours are used
/// only when stderr is a terminal. Spans are exported in batches by a thread
/// of their own (every `OTEL_BSP_SCHEDULE_DELAY` milliseconds, 5000 unless
/// set); an exporter that cannot be built is reported and logging goes on.
pub fn init_tracing(json: bool, default_level: &str, service: &str) -> LogGuard {
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("orders-log")
        .finish(std::io::stderr());
    let (tracer, failed) = match otlp_tracer(service) {
        Ok(tracer) => (tracer, None),
        Err(error) => (None, Some(error)),
    };
    let exporting = tracer.as_ref().map(|provider| provider.tracer("orders"));
    let _ = subscriber(json, filter, writer, exporting).try_init();
    if let Some(error) = failed {
        tracing::warn!(%error, "spans are not exported: the OTLP exporter could not be built");
    }
    LogGuard {
        tracer,
        _writer: guard,
    }
}

/// The process's subscriber: the log lines, to `writer` (JSON or text,
/// coloured only on a terminal), as `filter` lets them through; and, with a
/// `tracer`, the spans exported.
///
/// One filter for both layers: what `filter` lets through, and the spans
/// [`exported`] takes (per-layer filters, tried here, lost spans of both
/// layers at random). The log lines name the exported debug spans in their
/// context too.
fn subscriber<W>(
    json: bool,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt;
    match tracer {
        Some(tracer) => Box::new(
            tracing_subscriber::registry()
                .with(Exporting(filter))
                .with(lines(json, writer))
                .with(tracing_opentelemetry::layer().with_tracer(tracer)),
        ),
        None => Box::new(
            tracing_subscriber::registry()
                .with(filter)
                .with(lines(json, writer)),
        ),
    }
}

/// The log lines, to `writer`: JSON or text, coloured only on a terminal.
fn lines<S, W>(json: bool, writer: W) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use std::io::IsTerminal;
    use tracing_subscriber::Layer;
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    if json {
        lines.json().boxed()
    } else {
        lines.boxed()
    }
}

/// The filter of a process that exports spans: its log filter, widened to
/// the spans [`exported`] takes.
struct Exporting(tracing_subscriber::EnvFilter);

impl<S> tracing_subscriber::Layer<S> for Exporting
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if exported(meta) {
            tracing::subscriber::Interest::always()
        } else {
            tracing_subscriber::Layer::<S>::register_callsite(&self.0, meta)
        }
    }

    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        exported(meta) || tracing_subscriber::Layer::<S>::enabled(&self.0, meta, cx)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        let logged = tracing_subscriber::Layer::<S>::max_level_hint(&self.0)
            .unwrap_or(tracing::level_filters::LevelFilter::TRACE);
        Some(logged.max(tracing::level_filters::LevelFilter::DEBUG))
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_new_span(attrs, id, cx);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_record(id, values, cx);
    }

    fn on_enter(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_enter(id, cx);
    }

    fn on_exit(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_exit(id, cx);
    }

    fn on_close(&self, id: tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_close(id, cx);
    }
}

/// The targets whose spans are exported: the framework's and this system's.
pub const EXPORTED_TARGETS: [&str; 5] = [
    "es_core",
    "es_postgres",
    "es_rabbit",
    "es_projections",
    "orders",
];

/// Whether `meta` is a span exported whatever the log filter says: the
/// spans of [`EXPORTED_TARGETS`] down to debug level (a command, a saga's
/// reaction, a store's append and a projection's apply are debug spans). The
/// events the log filter lets through go with them, as span events.
pub fn exported(meta: &tracing::Metadata<'_>) -> bool {
    let target = meta.target();
    let ours = EXPORTED_TARGETS.iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    });
    ours && !meta.is_event() && *meta.level() <= tracing::Level::DEBUG
}

/// The tracer provider exporting with OTLP over HTTP (protobuf) as
/// `service`, when an endpoint is set (and `OTEL_SDK_DISABLED` is not
/// `true`); `None` otherwise. It must be built on a Tokio runtime, which
/// sends the exports.
fn otlp_tracer(
    service: &str,
) -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true");
    if disabled
        || !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    {
        return Ok(None);
    }
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return Err(opentelemetry_otlp::ExporterBuildError::InternalFailure(
            "spans are exported from a Tokio runtime, and there is none".to_owned(),
        ));
    };
    let exporter =
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(otlp_http::Client::new(runtime).map_err(|e| {
                opentelemetry_otlp::ExporterBuildError::InternalFailure(e.to_string())
            })?)
            .build()?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// The OTLP exporter's HTTP client.
mod otlp_http {
    use std::time::Duration;

    use opentelemetry_http::{Bytes, HttpError, Request, Response};

    /// How long one export may take, answer included.
    const TIMEOUT: Duration = Duration::from_secs(10);

    /// The process's reqwest client, run on its Tokio runtime: the batch
    /// processor that calls it runs on a thread of its own, outside the
    /// runtime.
    #[derive(Debug)]
    pub(super) struct Client {
        http: reqwest::Client,
        runtime: tokio::runtime::Handle,
    }

    impl Client {
        pub(super) fn new(runtime: tokio::runtime::Handle) -> Result<Self, reqwest::Error> {
            Ok(Self {
                http: reqwest::Client::builder().timeout(TIMEOUT).build()?,
                runtime,
            })
        }
    }

    #[async_trait::async_trait]
    impl opentelemetry_http::HttpClient for Client {
        async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
            let request = reqwest::Request::try_from(request)?;
            let http = self.http.clone();
            let (status, headers, body) = self
                .runtime
                .spawn(async move {
                    let response = http.execute(request).await?;
                    let status = response.status();
                    let headers = response.headers().clone();
                    let body = response.bytes().await?;
                    Ok::<_, reqwest::Error>((status, headers, body))
                })
                .await??;
            let mut response = Response::builder().status(status).body(body)?;
            *response.headers_mut() = headers;
            Ok(response)
        }
    }
}

/// One relay's gauges: how far it is behind its store, and the store's xmin
/// hold-back on PostgreSQL.
pub(crate) struct RelayGauge {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) checkpoints: Arc<dyn CheckpointStore>,
    pub(crate) name: String,
    pub(crate) label: &'static str,
    pub(crate) pg: Option<PgEventStore>,
    pub(crate) blocked: watch::Receiver<Option<Blocked>>,
}

/// The longest a scrape waits for the gauges: a broker or a database that
/// does not answer leaves their last values in the answer.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a measurement answers the scrapes that follow it.
const MEASURE_EVERY: Duration = Duration::from_secs(1);

/// The process's gauges, measured when `/metrics` is scraped (at most once
/// a second): queue depths of the groups it consumes, relay lag per store,
/// projection lag, the PostgreSQL xmin hold-back and pool size. Nobody
/// scraping costs the broker and the database nothing.
pub(crate) struct Gauges {
    memory_bus: Option<InMemoryBus>,
    rabbit: Option<(RabbitBus, PgPool)>,
    pub(crate) groups: Vec<&'static str>,
    pub(crate) relays: Vec<RelayGauge>,
    pub(crate) query: Option<Arc<dyn OrderQueries>>,
    /// When the gauges were last measured; held while measuring, so
    /// scrapes at once share one measurement.
    measured: tokio::sync::Mutex<Option<Instant>>,
}

impl Gauges {
    pub(crate) fn new(backends: &Backends) -> Self {
        Self {
            memory_bus: backends.memory_bus().cloned(),
            rabbit: backends
                .distributed()
                .map(|(_, pool, bus)| (bus.clone(), pool.clone())),
            groups: Vec::new(),
            relays: Vec::new(),
            query: None,
            measured: tokio::sync::Mutex::new(None),
        }
    }

    /// Measures the gauges for a scrape, unless a measurement finished
    /// less than [`MEASURE_EVERY`] ago; bounded by [`MEASURE_TIMEOUT`].
    pub(crate) async fn refresh(&self) {
        let mut measured = self.measured.lock().await;
        if measured.is_some_and(|at| at.elapsed() < MEASURE_EVERY) {
            return;
        }
        if tokio::time::timeout(MEASURE_TIMEOUT, self.measure())
            .await
            .is_err()
        {
            tracing::debug!("gauges: a measurement ran out of time; the last values stand");
        }
        *measured = Some(Instant::now());
    }

    /// The process's metrics in Prometheus text, the gauges measured for
    /// this scrape (see [`Gauges::refresh`]).
    pub(crate) async fn render(&self) -> String {
        self.refresh().await;
        prometheus().render()
    }

    /// Measures every gauge, each on its own: one that waits (a relay's lag
    /// read held back by an open transaction, say) holds up none of the
    /// others, and each is set as soon as it is known.
    async fn measure(&self) {
        let mut parts: Vec<BoxFuture<'_, ()>> = Vec::new();
        for &group in &self.groups {
            if let Some(bus) = &self.memory_bus {
                metrics::gauge!("bus_queue_depth", "group" => group)
                    .set(bus.queue_depth(group) as f64);
            }
            if let Some((bus, _)) = &self.rabbit {
                parts.push(Box::pin(async move {
                    if let Ok(depth) = bus.queue_depth(group).await {
                        metrics::gauge!("bus_queue_depth", "group" => group).set(f64::from(depth));
                    }
                    if let Ok(depth) = bus.dead_letter_depth(group).await {
                        metrics::gauge!("bus_dead_letter_depth", "group" => group)
                            .set(f64::from(depth));
                    }
                }));
            }
        }
        for relay in &self.relays {
            let blocked = relay.blocked.borrow().is_some();
            metrics::gauge!("relay_blocked", "store" => relay.label).set(if blocked {
                1.0
            } else {
                0.0
            });
            parts.push(Box::pin(async move {
                let relayed = relay
                    .checkpoints
                    .load(&relay.name)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(Position::START);
                if let Ok(lag) =
                    es_projections::telemetry::measure_lag(relay.store.as_ref(), relayed, 10_000)
                        .await
                {
                    metrics::gauge!("relay_lag_events", "store" => relay.label)
                        .set(lag.events as f64);
                    metrics::gauge!("relay_lag_seconds", "store" => relay.label).set(lag.seconds);
                }
            }));
            if let Some(store) = &relay.pg {
                parts.push(Box::pin(async move {
                    if let Ok(holdback) = store.holdback().await {
                        metrics::gauge!("store_xmin_holdback_events", "store" => relay.label)
                            .set(holdback.events_held_back as f64);
                        metrics::gauge!("store_xids_in_flight", "store" => relay.label)
                            .set(holdback.xids_in_flight() as f64);
                    }
                }));
            }
        }
        if let Some(query) = &self.query {
            parts.push(Box::pin(async move {
                if let Ok(lag) = query.lag().await {
                    metrics::gauge!("projection_lag_events", "projection" => "orders_read_model")
                        .set(lag.events as f64);
                    metrics::gauge!("projection_lag_seconds", "projection" => "orders_read_model")
                        .set(lag.seconds);
                }
            }));
        }
        if let Some((_, pool)) = &self.rabbit {
            metrics::gauge!("pg_pool_connections").set(f64::from(pool.size()));
        }
        futures::future::join_all(parts).await;
    }
}

#[cfg(test)]
mod tests {
    use es_core::TraceParent;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

    /// The spans the process's subscriber exports while `f` runs, with the
    /// log filter of the distributed deployment's tests.
    fn exported_by(f: impl FnOnce()) -> Vec<opentelemetry_sdk::trace::SpanData> {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let filter = tracing_subscriber::EnvFilter::new("warn,orders=info,es_rabbit=info");
        let subscriber =
            super::subscriber(false, filter, std::io::sink, Some(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, f);
        let _ = provider.force_flush();
        exporter.get_finished_spans().unwrap()
    }

    #[test]
    fn logged_and_unlogged_spans_are_exported_in_the_callers_trace() {
        let caller = TraceParent::new_root();
        let spans = exported_by(|| {
            let span = tracing::info_span!(target: "orders::order", "order.place");
            let own = es_core::otel::continue_trace(&span, Some(caller)).unwrap();
            drop(span.enter());
            let command = tracing::debug_span!(target: "es_core::repository", "es.command");
            es_core::otel::continue_trace(&command, Some(own));
            command.in_scope(|| {
                let append =
                    tracing::debug_span!(target: "es_postgres::store", "es_postgres.append");
                drop(append);
            });
        });
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        for span in &spans {
            assert_eq!(
                format!("{}", span.span_context.trace_id()),
                caller.trace_id()
            );
        }
    }
}
