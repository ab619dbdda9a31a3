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

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::order::{OrderItemRequest, OrderStatus, PaymentRequest, PlaceOrderRequest};
use crate::{Config, Error, Result, System};

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Orders to place.
    pub orders: u64,
    /// Concurrent workers.
    pub concurrency: usize,
    /// Products to spread the orders over.
    pub products: usize,
    /// A running system's base URL; `None` runs one in process.
    pub target: Option<String>,
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
pub struct LoadReport {
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
    pub fn completed_per_second(&self) -> f64 {
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

/// The system under load, embedded or remote.
#[derive(Clone)]
enum Driver {
    Embedded(Arc<System>),
    Http {
        client: reqwest::Client,
        base: String,
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

impl Driver {
    async fn create_product(&self, i: usize) -> Result<Uuid> {
        let name = format!("Load product {i}");
        let price = format!("{}.{:02}", 1 + i % 50, i % 100);
        match self {
            Self::Embedded(system) => {
                let id = system
                    .inventory
                    .create_product(&name, &price, 1_000_000_000)
                    .await?;
                system
                    .orders
                    .catalog()
                    .get_or_wait(id, Duration::from_secs(10))
                    .await;
                Ok(id)
            }
            Self::Http { client, base } => {
                let res = client
                    .post(format!("{base}/api/products"))
                    .json(&json!({"name": name, "price": price, "stock": 1_000_000_000}))
                    .send()
                    .await
                    .map_err(http_err)?;
                if !res.status().is_success() {
                    return Err(http_err(format!(
                        "creating a product answered {}",
                        res.status()
                    )));
                }
                Ok(res.json::<Created>().await.map_err(http_err)?.product_id)
            }
        }
    }

    async fn place(&self, request: PlaceOrderRequest) -> Result<Uuid> {
        match self {
            Self::Embedded(system) => Ok(system.orders.place_order(request, None).await?.order_id),
            Self::Http { client, base } => {
                let res = client
                    .post(format!("{base}/api/orders"))
                    .json(&request)
                    .send()
                    .await
                    .map_err(http_err)?;
                if res.status() != reqwest::StatusCode::ACCEPTED {
                    return Err(http_err(format!(
                        "placing an order answered {}",
                        res.status()
                    )));
                }
                Ok(res.json::<Placed>().await.map_err(http_err)?.order_id)
            }
        }
    }

    async fn wait_terminal(&self, order_id: Uuid) -> Option<OrderStatus> {
        match self {
            Self::Embedded(system) => {
                system
                    .query
                    .wait_terminal(order_id, Duration::from_secs(60))
                    .await
            }
            Self::Http { client, base } => {
                for _ in 0..6 {
                    let res = client
                        .get(format!(
                            "{base}/api/orders/{order_id}?wait_terminal_ms=10000"
                        ))
                        .send()
                        .await
                        .ok()?;
                    if res.status() == reqwest::StatusCode::NOT_FOUND {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    let status = res.json::<StatusOnly>().await.ok()?.status;
                    if status.is_terminal() {
                        return Some(status);
                    }
                }
                None
            }
        }
    }
}

/// Runs a load test.
pub async fn run(options: LoadOptions) -> Result<LoadReport> {
    let (driver, embedded, target) = match &options.target {
        Some(url) => {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(options.concurrency.max(1))
                .timeout(Duration::from_secs(30))
                .build()
                .map_err(http_err)?;
            let base = url.trim_end_matches('/').to_owned();
            (Driver::Http { client, base }, None, url.clone())
        }
        None => {
            let system = Arc::new(
                System::embedded(Config {
                    consumers: options.consumers,
                    ..Config::default()
                })
                .await?,
            );
            (
                Driver::Embedded(Arc::clone(&system)),
                Some(system),
                "embedded (in process)".to_owned(),
            )
        }
    };
    let mut products = Vec::with_capacity(options.products);
    for i in 0..options.products.max(1) {
        products.push(driver.create_product(i).await?);
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
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(Error::internal)?,
    ));
    let started = Instant::now();
    let sampler = embedded
        .as_ref()
        .map(|system| tokio::spawn(sample(Arc::clone(system))));
    let mut workers = Vec::new();
    for worker in 0..options.concurrency.max(1) {
        let (driver, next, counts, histogram, bar, products) = (
            driver.clone(),
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
                    customer_email: format!("load{}@example.com", rng.u32(..1000)),
                    items: vec![OrderItemRequest {
                        product_id: product,
                        quantity: 1 + i64::from(rng.u8(..3)),
                    }],
                    payment: PaymentRequest {
                        card_token: "tok_ok".into(),
                    },
                };
                let outcome = match driver.place(request).await {
                    Ok(id) => driver.wait_terminal(id).await,
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
        w.await.map_err(Error::internal)?;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let h = histogram
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    drop(driver);
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
/// model's lag (at debug level; `RUST_LOG=orders::load=debug`).
async fn sample(system: Arc<System>) {
    let store = Arc::clone(system.store());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let depths: Vec<String> = crate::system::groups::ALL
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
