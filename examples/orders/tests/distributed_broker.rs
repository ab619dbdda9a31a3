//! A RabbitMQ restart (`rabbitmqctl stop_app` / `start_app`) mid-flow under
//! load, every service its own OS process. A guard brings the broker back and
//! waits for it even when the test fails. Afterwards every order is Completed
//! or Cancelled, stock adds up, no payment was taken twice, one email per
//! order and kind.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod support;

use std::process::Command;
use std::time::Duration;

use support::distributed::{place_many, products, Cluster, EVERY_SERVICE_APART};

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Starts the broker's app again (and waits until it answers) when dropped.
struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        rabbitmqctl(&["start_app"]);
        for _ in 0..120 {
            if rabbitmqctl(&["await_startup"])
                && std::net::TcpStream::connect("127.0.0.1:5672").is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("RabbitMQ did not come back: start it with `rabbitmq-server -detached`");
    }
}

// A restart makes the relay publish a batch again when the broker went away
// before confirming it: a duplicate reserve command, running beside the one
// that failed for want of stock, must not reserve a line after the failure
// was recorded (inventory::hold's unit tests replay both orderings).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restart_mid_flow() {
    let c = Cluster::start("broker", &EVERY_SERVICE_APART, Duration::from_secs(5)).await;
    let stock = products(&c.client(), "Broker Widget", "2.00", 3, 100).await;
    let load = tokio::spawn(place_many(
        c.client(),
        stock.clone(),
        200,
        8,
        "broker".into(),
    ));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    {
        let _guard = BrokerGuard;
        assert!(
            tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
                .await
                .unwrap(),
            "rabbitmqctl stop_app failed (is rabbitmqctl on PATH and the broker local?)"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::spawn_blocking(move || drop(_guard))
            .await
            .unwrap();
    }
    let orders = load.await.unwrap();
    let (completed, cancelled) = c.check_invariants(&stock, &orders).await;
    eprintln!(
        "broker restart: {} orders, {completed} completed, {cancelled} cancelled",
        orders.len()
    );
    assert_eq!(completed + cancelled, 200);
    c.stop().await;
}
