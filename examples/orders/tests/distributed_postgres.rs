//! PostgreSQL unreachable for the services for a while, under load: every
//! connection of the deployment terminated again and again, then the server
//! itself stopped for 20 s. Nothing may be acknowledged without its effect
//! committed: afterwards every accepted order is Completed or Cancelled,
//! stock adds up, no payment was taken twice, one email per order.
//!
//! The two tests stop the shared server in turn, never at once; the second
//! always starts the server again and waits until it answers, even when it
//! fails.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod support;

use std::process::Command;
use std::time::Duration;

use es_postgres::sqlx;
use support::distributed::{place_many, products, Cluster, EVERY_SERVICE_APART};

/// One test of this file at a time: they take PostgreSQL away.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_connections_cut_again_and_again() {
    let _turn = ONE_AT_A_TIME.lock().await;
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
    // The report an order that never finished would give: its trail
    // through the services' stores.
    let trail = c.trail(&orders[0].0).await;
    assert!(
        trail.contains("OrderCreated") && trail.contains("InventoryReserv"),
        "{trail}"
    );
    c.stop().await;
}

/// The local PostgreSQL cluster, as `pg_ctlcluster` names it (`15 main`).
fn local_cluster() -> Option<String> {
    let versions = std::fs::read_dir("/etc/postgresql").ok()?;
    let mut versions: Vec<String> = versions
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    versions.sort_by_key(|v| v.parse::<u32>().unwrap_or(0));
    versions.pop()
}

fn pg_ctlcluster(version: &str, action: &str) -> bool {
    Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", action])
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts the server again when dropped (the test ended, or failed) and waits
/// until it answers.
struct BringBack(String);

impl Drop for BringBack {
    fn drop(&mut self) {
        for _ in 0..120 {
            pg_ctlcluster(&self.0, "start");
            let ready = Command::new("pg_isready")
                .args(["-h", "127.0.0.1", "-p", "5432"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("PostgreSQL did not come back within a minute");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_server_stopped_for_20_s_under_load() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(version) = local_cluster().filter(|_| which("pg_ctlcluster")) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs the local PostgreSQL cluster and pg_ctlcluster to stop and start it"
        );
        eprintln!("skipped: no local PostgreSQL cluster to stop (pg_ctlcluster)");
        return;
    };
    let c = Cluster::start("pgstop", &EVERY_SERVICE_APART, Duration::from_secs(5)).await;
    let stock = products(&c.client(), "Outage Widget", "3.00", 3, 100).await;
    let load = tokio::spawn(place_many(
        c.client(),
        stock.clone(),
        120,
        8,
        "pgstop".into(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let _back = BringBack(version.clone());
        // A checkpoint first: the shutdown's own then has little to write,
        // and the stop stays well inside pg_ctlcluster's 60 s wait.
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qc",
                "CHECKPOINT",
            ])
            .status();
        assert!(
            pg_ctlcluster(&version, "stop"),
            "pg_ctlcluster {version} main stop failed"
        );
        let answers = Command::new("pg_isready")
            .args(["-h", "127.0.0.1", "-p", "5432"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(!answers, "PostgreSQL still answers after stop");
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
    let orders = load.await.unwrap();
    let (completed, cancelled) = c.check_invariants(&stock, &orders).await;
    eprintln!(
        "postgres stopped 20 s: {} orders, {completed} completed, {cancelled} cancelled",
        orders.len()
    );
    assert_eq!(completed + cancelled, 120);
    c.stop().await;
}

fn which(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}
