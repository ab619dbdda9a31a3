//! SIGKILL, under load, of whichever process holds the active order relay
//! (another must take over), then of the order, inventory, payment and query
//! services and the relay process in turn, each restarted (every service its
//! own OS process). Afterwards every order is Completed or Cancelled, stock
//! adds up (available + reserved + sold = initial, nothing left reserved), no
//! payment was taken twice and every order got exactly one email of its
//! outcome.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod support;

use std::time::Duration;

use support::distributed::{place_many, products, Cluster, EVERY_SERVICE_APART};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_each_service_in_turn_under_load() {
    let c = Cluster::start("kill", &EVERY_SERVICE_APART, Duration::from_secs(5)).await;
    let stock = products(&c.client(), "Crash Widget", "3.00", 4, 100).await;
    let load = tokio::spawn(place_many(c.client(), stock.clone(), 300, 8, "kill".into()));
    // The order store's relay runs, single-active, in both the order and the
    // relay processes: kill whichever holds it now, and see the other take
    // over.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let holder = c
        .relay_taken_over("order", "", Duration::from_secs(30))
        .await;
    c.kill(&holder).await;
    let successor = c
        .relay_taken_over("order", &holder, Duration::from_secs(30))
        .await;
    eprintln!("sigkill: the order relay moved from {holder} to {successor}");
    c.restart(&holder).await;
    for target in ["order", "inventory", "payment", "query", "relay"] {
        tokio::time::sleep(Duration::from_millis(800)).await;
        c.kill(target).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        c.restart(target).await;
    }
    let orders = load.await.unwrap();
    let (completed, cancelled) = c.check_invariants(&stock, &orders).await;
    eprintln!(
        "sigkill: {} orders, {completed} completed, {cancelled} cancelled",
        orders.len()
    );
    assert_eq!(completed + cancelled, 300);
    assert!(completed > 0 && cancelled > 0);
    c.stop().await;
}
