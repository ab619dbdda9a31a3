//! PostgreSQL unreachable for the services for a while (every connection of
//! the deployment terminated again and again; the shared server itself keeps
//! running) under load. Nothing may be acknowledged without its effect
//! committed: afterwards every accepted order is Completed or Cancelled,
//! stock adds up, no payment was taken twice, one email per order.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod support;

use std::time::Duration;

use es_postgres::sqlx;
use support::distributed::{place_many, products, Cluster, EVERY_SERVICE_APART};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_connections_cut_again_and_again() {
    let c = Cluster::start("pgcut", &EVERY_SERVICE_APART, Duration::from_secs(5)).await;
    let stock = products(&c.client(), "Crash Widget", "3.00", 3, 100).await;
    let load = tokio::spawn(place_many(
        c.client(),
        stock.clone(),
        200,
        8,
        "pgcut".into(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // For 4 s, every connection of the deployment is terminated every 100 ms:
    // PostgreSQL is unreachable for the services, and nothing they do in
    // that time may be acknowledged unless it committed.
    let pattern = format!("{}:%", c.namespace);
    let mut cut = 0i64;
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1 AND pid <> pg_backend_pid()) t",
        )
        .bind(&pattern)
        .fetch_one(&c.pool)
        .await
        .unwrap();
        cut += n;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cut > 0, "no connection of the deployment was cut");
    let orders = load.await.unwrap();
    let (completed, cancelled) = c.check_invariants(&stock, &orders).await;
    eprintln!("postgres cut: {cut} connections terminated; {} orders, {completed} completed, {cancelled} cancelled", orders.len());
    assert_eq!(completed + cancelled, 200);
    c.stop().await;
}
