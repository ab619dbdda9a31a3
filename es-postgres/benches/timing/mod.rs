//! Timing shared by the es-postgres benchmarks: a measurement's length
//! (`BENCH_SECS`), a closed loop of concurrent operations, and two
//! operations alternated in slices so a change of load hits both alike.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The length of one measurement: `BENCH_SECS`, 3 s by default.
pub(crate) fn secs() -> Duration {
    Duration::from_secs_f64(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    )
}

/// Runs `a` and `b` alternately, three slices each of a third of the
/// configured time, so a change of load on the machine hits both alike;
/// returns their ops/s.
pub(crate) async fn pair<F, Fut, G, Gut>(concurrency: usize, a: F, b: G) -> (f64, f64)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
    G: Fn() -> Gut + Send + Sync + 'static,
    Gut: Future<Output = ()> + Send,
{
    let (a, b) = (Arc::new(a), Arc::new(b));
    let slice = secs() / 3;
    let (mut ra, mut rb) = (0.0, 0.0);
    for _ in 0..3 {
        let a = a.clone();
        ra += run_for(concurrency, slice, move || a()).await;
        let b = b.clone();
        rb += run_for(concurrency, slice, move || b()).await;
    }
    (ra / 3.0, rb / 3.0)
}

/// Runs `op` in `concurrency` tasks for `time`; returns ops/s.
pub(crate) async fn run_for<F, Fut>(concurrency: usize, time: Duration, op: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let count = Arc::new(AtomicU64::new(0));
    // Warm up (prepared statements, pool connections).
    for _ in 0..concurrency.min(4) {
        op().await;
    }
    let start = Instant::now();
    let deadline = start + time;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let op = op.clone();
            let count = count.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    op().await;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}
