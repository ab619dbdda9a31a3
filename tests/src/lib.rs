//! The framework's cross-crate test suite, and the fixtures its tests share.
//!
//! One small domain of its own ([`bank`]: accounts and a transfer saga with
//! compensation) runs as a whole [`pipeline`] (repository, store, relay,
//! bus, saga, command consumer, projection) on two sets of backends behind
//! one [`pipeline::Backend`] trait: [`embedded`] (in memory) and
//! [`production`] (PostgreSQL and RabbitMQ). The same test body drives both
//! and checks the same invariants. [`buses`] holds the fixtures on which
//! es-core's bus conformance suite runs against both buses.
//!
//! The tests are in `tests/tests/`; run them with `cargo test -p es-tests`.
//! Those on the production backends need PostgreSQL at `DATABASE_URL` and
//! RabbitMQ at `AMQP_URL` (loopback defaults) and fail, naming the URL, when
//! either is missing.

pub mod balances;
pub mod bank;
pub mod buses;
pub mod embedded;
pub mod pipeline;
pub mod production;

use std::future::Future;
use std::time::{Duration, Instant};

/// Waits, polling, until `check` answers true; panics naming `what` once
/// `limit` has passed. The limit only turns a hang into a failure.
///
/// # Panics
/// When `limit` passes first.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
