//! The load generator: places orders as fast as `concurrency` workers can
//! (a closed loop), or at a fixed rate (`rate`, an open loop), and measures
//! completed orders per second and end-to-end latency (order accepted to
//! terminal status) in an HDR histogram.
//!
//! At a fixed rate, order `n` is due at `start + n / rate` and its latency is
//! counted from that moment, not from when a worker got to it: when the
//! system (or the number of workers) cannot keep up, the waiting shows in the
//! percentiles instead of silently lowering the rate (no coordinated
//! omission).
//!
//! Without a target it runs an embedded system in process and drives it
//! through the same service interface the HTTP handlers use; with a target
//! URL it drives a running system over HTTP.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use orders::order::{OrderItemRequest, OrderStatus, PaymentRequest, PlaceOrderRequest};
use orders::{Config, Error, Result, System};

/// What to run.
#[derive(Clone, Debug)]
pub(crate) struct LoadOptions {
    /// Orders to place.
    pub orders: u64,
    /// Concurrent workers.
    pub concurrency: usize,
    /// Products to spread the orders over.
    pub products: usize,
    /// A running system's base URL; `None` runs one in process.
    pub target: Option<String>,
    /// The bearer token sent with every request to the target (an admin's:
    /// the run creates products).
    pub token: Option<String>,
    /// Consumers per subscription (embedded only).
    pub consumers: u16,
    /// Show a progress bar.
    pub progress: bool,
    /// Orders per second to place at (an open loop); `None` places them as
    /// fast as the workers can.
    pub rate: Option<f64>,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub(crate) struct LoadReport {
    /// Where it ran (`embedded` or the target URL).
    pub target: String,
    /// Orders placed.
    pub placed: u64,
    /// Orders that completed.
    pub completed: u64,
    /// Orders that were cancelled.
    pub cancelled: u64,
    /// Orders that reached no terminal status in time, or failed to place.
    pub failed: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency percentiles in microseconds: p50, p95, p99, max.
    pub latency_us: [u64; 4],
    /// The fixed rate the orders were offered at, if any.
    pub rate: Option<f64>,
}

impl LoadReport {
    /// Completed orders per second.
    pub(crate) fn completed_per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |us: u64| us as f64 / 1000.0;
        writeln!(f, "target:            {}", self.target)?;
        writeln!(
            f,
            "orders:            {} placed, {} completed, {} cancelled, {} failed",
            self.placed, self.completed, self.cancelled, self.failed
        )?;
        writeln!(f, "elapsed:           {:.2} s", self.elapsed.as_secs_f64())?;
        writeln!(f, "completed/s:       {:.0}", self.completed_per_second())?;
        if let Some(rate) = self.rate {
            writeln!(f, "offered rate:      {rate:.0} orders/s (open loop)")?;
        }
        write!(
            f,
            "latency (ms):      p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
            ms(self.latency_us[0]),
            ms(self.latency_us[1]),
            ms(self.latency_us[2]),
            ms(self.latency_us[3])
        )
    }
}

/// Where a running system listens.
#[derive(Debug)]
struct Target {
    /// `host:port`, to connect to.
    address: String,
    /// The `Host` header.
    authority: HeaderValue,
    /// The URL's path, before every API path (empty for `http://host:port`).
    prefix: String,
    /// The `Authorization` header, when a token is given.
    authorization: Option<HeaderValue>,
}

impl Target {
    fn parse(url: &str) -> Result<Self> {
        let uri: Uri = url
            .parse()
            .map_err(|e| http_err(format!("target {url:?}: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(http_err(format!(
                "target {url:?}: only http:// URLs are supported"
            )));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| http_err(format!("target {url:?} has no host")))?;
        Ok(Self {
            address: format!(
                "{}:{}",
                authority.host(),
                authority.port_u16().unwrap_or(80)
            ),
            authority: HeaderValue::from_str(authority.as_str()).map_err(http_err)?,
            prefix: uri.path().trim_end_matches('/').to_owned(),
            authorization: None,
        })
    }
}

/// A worker's way to the system under load: the embedded one, or a
/// keep-alive HTTP/1.1 connection of its own to a running one.
///
/// The connection is hyper's bare client, with no pool, retries or redirects
/// between the worker and the socket: on this 2-core machine the load
/// generator shares the CPU with the system it measures, and reqwest's
/// layers cost about twice as much per request.
enum Session {
    Embedded(Arc<System>),
    Http {
        target: Arc<Target>,
        sender: Option<SendRequest<Full<Bytes>>>,
    },
}

#[derive(Deserialize)]
struct Placed {
    order_id: Uuid,
}

#[derive(Deserialize)]
struct StatusOnly {
    status: OrderStatus,
}

#[derive(Deserialize)]
struct Created {
    product_id: Uuid,
}

fn http_err(e: impl std::fmt::Display) -> Error {
    Error::internal(format!("http: {e}"))
}

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl Session {
    /// Another session to the same system, with a connection of its own.
    fn another(&self) -> Self {
        match self {
            Self::Embedded(system) => Self::Embedded(Arc::clone(system)),
            Self::Http { target, .. } => Self::Http {
                target: Arc::clone(target),
                sender: None,
            },
        }
    }

    /// Sends one request on the session's connection (opened, or opened
    /// again after the server closed it, on demand) and reads the answer.
    async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes)> {
        let Self::Http { target, sender } = self else {
            return Err(Error::internal("an HTTP request on an embedded session"));
        };
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", target.prefix))
            .header(header::HOST, target.authority.clone());
        if let Some(authorization) = &target.authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(http_err)?;
        let address = &target.address;
        let kept = sender.take();
        let exchange = async move {
            let mut connection = match kept {
                Some(s) if !s.is_closed() => s,
                _ => {
                    let stream = tokio::net::TcpStream::connect(address)
                        .await
                        .map_err(|e| http_err(format!("connecting to {address}: {e}")))?;
                    let _ = stream.set_nodelay(true);
                    let (sender, connection) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream))
                            .await
                            .map_err(http_err)?;
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%error, "load connection closed");
                        }
                    });
                    sender
                }
            };
            connection.ready().await.map_err(http_err)?;
            let response = connection.send_request(request).await.map_err(http_err)?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(http_err)?;
            Ok::<_, Error>((status, body.to_bytes(), connection))
        };
        // The limit covers connecting too.
        let (status, answer, connection) =
            tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                .await
                .map_err(|_| http_err(format!("{path}: no answer in {REQUEST_TIMEOUT:?}")))??;
        // Kept for the next request only after a whole exchange: a connection
        // left mid-answer by an error or a timeout is dropped.
        *sender = Some(connection);
        Ok((status, answer))
    }

    async fn create_product(&mut self, i: usize) -> Result<Uuid> {
        let name = format!("Load product {i}");
        let price = format!("{}.{:02}", 1 + i % 50, i % 100);
        if let Self::Embedded(system) = self {
            let id = system
                .inventory
                .create_product(&name, &price, 1_000_000_000)
                .await?;
            system
                .orders
                .catalog()
                .get_or_wait(id, Duration::from_secs(10))
                .await;
            return Ok(id);
        }
        let body = json!({"name": name, "price": price, "stock": 1_000_000_000});
        let created: Created = self
            .post("/api/products", &body, "creating a product", |s| {
                s.is_success()
            })
            .await?;
        Ok(created.product_id)
    }

    async fn place(&mut self, request: PlaceOrderRequest) -> Result<Uuid> {
        if let Self::Embedded(system) = self {
            return Ok(system.orders.place_order(request, None).await?.order_id);
        }
        let placed: Placed = self
            .post("/api/orders", &request, "placing an order", |s| {
                s == StatusCode::ACCEPTED
            })
            .await?;
        Ok(placed.order_id)
    }

    /// POSTs `body` as JSON and reads the answer, when its status is one
    /// `accepted` takes.
    async fn post<T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &impl Serialize,
        what: &str,
        accepted: impl Fn(StatusCode) -> bool,
    ) -> Result<T> {
        let body = serde_json::to_vec(body).map_err(http_err)?;
        let (status, answer) = self.request(Method::POST, path, Some(body)).await?;
        if !accepted(status) {
            return Err(http_err(format!("{what} answered {status}")));
        }
        serde_json::from_slice(&answer).map_err(http_err)
    }

    async fn wait_terminal(&mut self, order_id: Uuid) -> Option<OrderStatus> {
        if let Self::Embedded(system) = self {
            return system
                .query
                .terminal_status(order_id, Duration::from_secs(60))
                .await;
        }
        let path = format!("/api/orders/{order_id}?wait_terminal_ms=10000");
        for _ in 0..6 {
            let (status, body) = self.request(Method::GET, &path, None).await.ok()?;
            if status == StatusCode::NOT_FOUND {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let status = serde_json::from_slice::<StatusOnly>(&body).ok()?.status;
            if status.is_terminal() {
                return Some(status);
            }
        }
        None
    }
}

/// Runs a load test.
pub(crate) async fn run(options: LoadOptions) -> Result<LoadReport> {
    let (mut session, embedded, target) = match &options.target {
        Some(url) => (
            Session::Http {
                target: Arc::new(Target {
                    authorization: options
                        .token
                        .as_deref()
                        .map(|t| HeaderValue::from_str(&format!("Bearer {}", t.trim())))
                        .transpose()
                        .map_err(|_| http_err("the token is not a valid header value"))?,
                    ..Target::parse(url)?
                }),
                sender: None,
            },
            None,
            url.clone(),
        ),
        None => {
            let system = Arc::new(
                System::embedded(Config {
                    consumers: options.consumers,
                    ..Config::default()
                })
                .await?,
            );
            (
                Session::Embedded(Arc::clone(&system)),
                Some(system),
                "embedded (in process)".to_owned(),
            )
        }
    };
    let mut products = Vec::with_capacity(options.products);
    for i in 0..options.products.max(1) {
        products.push(session.create_product(i).await?);
    }
    let products = Arc::new(products);
    let bar = if options.progress {
        let bar = ProgressBar::new(options.orders);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} orders {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let next = Arc::new(AtomicU64::new(0));
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
            .map_err(|e| Error::caused("creating the latency histogram", e))?,
    ));
    let started = Instant::now();
    let sampler = embedded
        .as_ref()
        .map(|system| tokio::spawn(sample(Arc::clone(system))));
    let mut workers = Vec::new();
    for worker in 0..options.concurrency.max(1) {
        let (mut session, next, counts, histogram, bar, products) = (
            session.another(),
            Arc::clone(&next),
            Arc::clone(&counts),
            Arc::clone(&histogram),
            bar.clone(),
            Arc::clone(&products),
        );
        let total = options.orders;
        let rate = options.rate.filter(|r| r.is_finite() && *r > 0.0);
        workers.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).ok();
            let mut rng = fastrand::Rng::with_seed(worker as u64);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let t0 = match rate {
                    Some(rate) => {
                        let due = started + Duration::from_secs_f64(n as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                let product = products[rng.usize(..products.len())];
                let request = PlaceOrderRequest {
                    promotion_code: None,
                    customer_email: format!("load{}@example.com", rng.u32(..1000)),
                    items: vec![OrderItemRequest {
                        product_id: product,
                        quantity: 1 + i64::from(rng.u8(..3)),
                    }],
                    payment: PaymentRequest {
                        card_token: "tok_ok".into(),
                    },
                };
                let outcome = match session.place(request).await {
                    Ok(id) => session.wait_terminal(id).await,
                    Err(error) => {
                        tracing::warn!(%error, "order not placed");
                        None
                    }
                };
                let slot = match outcome {
                    Some(OrderStatus::Completed) => 0,
                    Some(_) => 1,
                    None => 2,
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
                if let (Some(h), true) = (local.as_mut(), slot < 2) {
                    let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                    let _ = h.record(us.max(1));
                }
                bar.inc(1);
            }
            if let Some(local) = local {
                let _ = histogram
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .add(&local);
            }
        }));
    }
    for w in workers {
        w.await
            .map_err(|e| Error::caused("a load worker failed", e))?;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let h = histogram
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    drop(session);
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    if let Some(system) = embedded {
        if let Ok(system) = Arc::try_unwrap(system) {
            system.shutdown().await;
        }
    }
    let placed = options.orders;
    Ok(LoadReport {
        target,
        placed,
        completed: counts[0].load(Ordering::Relaxed),
        cancelled: counts[1].load(Ordering::Relaxed),
        failed: counts[2].load(Ordering::Relaxed),
        elapsed,
        latency_us: [
            h.value_at_quantile(0.50),
            h.value_at_quantile(0.95),
            h.value_at_quantile(0.99),
            h.max(),
        ],
        rate: options.rate,
    })
}

/// Logs, every second, where work is waiting: bus queues and the read
/// model's lag (at debug level; `RUST_LOG=orders_load=debug`).
async fn sample(system: Arc<System>) {
    let store = Arc::clone(system.store());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let depths: Vec<String> = orders::system::groups::ALL
            .iter()
            .map(|g| {
                format!(
                    "{g}={}",
                    system.memory_bus().map_or(0, |b| b.queue_depth(g))
                )
            })
            .collect();
        let head = store.head().await.map(|p| p.major()).unwrap_or_default();
        let projected = system.query.projection().position().major();
        tracing::debug!(
            head,
            projection_behind = head.saturating_sub(projected),
            queues = %depths.join(" "),
            "load sample"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(orders: u64, rate: Option<f64>) -> LoadOptions {
        LoadOptions {
            orders,
            concurrency: 8,
            products: 4,
            target: None,
            token: None,
            consumers: 1,
            progress: false,
            rate,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_loop_run_completes_every_order() {
        let report = run(options(40, None)).await.unwrap();
        assert_eq!(
            (report.placed, report.completed, report.failed),
            (40, 40, 0)
        );
        assert!(report.latency_us[0] > 0 && report.latency_us[0] <= report.latency_us[3]);
        assert!(report.rate.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http_run_drives_a_running_system_over_its_api() {
        let system = System::embedded(Config::default()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(std::future::IntoFuture::into_future(axum::serve(
            listener,
            system.router(),
        )));
        let report = run(LoadOptions {
            target: Some(url.clone()),
            token: None,
            ..options(40, None)
        })
        .await
        .unwrap();
        assert_eq!(
            (report.placed, report.completed, report.failed),
            (40, 40, 0)
        );
        assert_eq!(report.target, url);
        // The orders went through the API into this system.
        assert_eq!(system.query.model().stats().total_orders, 40);
        assert_eq!(system.sent.sent().len(), 40);
        server.abort();

        let error = run(LoadOptions {
            target: Some("https://127.0.0.1:1".into()),
            token: None,
            ..options(1, None)
        })
        .await
        .unwrap_err();
        assert!(error.to_string().contains("only http://"), "{error}");
    }

    #[test]
    fn a_target_url_gives_the_address_host_and_path_prefix() {
        let parts = |url: &str| {
            let target = Target::parse(url).unwrap();
            let host = target.authority.to_str().unwrap().to_owned();
            (target.address, host, target.prefix)
        };
        assert_eq!(
            parts("http://127.0.0.1:18080"),
            (
                "127.0.0.1:18080".into(),
                "127.0.0.1:18080".into(),
                String::new()
            )
        );
        assert_eq!(
            parts("http://shop.example/gateway/"),
            (
                "shop.example:80".into(),
                "shop.example".into(),
                "/gateway".into()
            )
        );
        assert!(Target::parse("not a url").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fixed_rate_run_offers_orders_on_schedule() {
        let report = run(options(30, Some(100.0))).await.unwrap();
        assert_eq!((report.completed, report.failed), (30, 0));
        // The last order is due 29/100 s after the start: the run cannot end
        // before it.
        assert!(
            report.elapsed >= Duration::from_millis(290),
            "{:?}",
            report.elapsed
        );
        assert!(report
            .to_string()
            .contains("offered rate:      100 orders/s"));
    }
}
