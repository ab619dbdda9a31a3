//! Many buyers race for scarce stock; the payment deadline on virtual time.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use es_core::ManualClock;
use orders::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_buyers_for_scarce_stock() {
    let app = Arc::new(common::app().await);
    let mut rng = fastrand::Rng::with_seed(2026);
    let mut rounds: Vec<(u64, usize)> = vec![(5, 40), (1, 25), (12, 60), (0, 10), (7, 7)];
    rounds.extend((0..35).map(|_| (rng.u64(0..8), rng.usize(1..30))));
    for (round, (units, buyers)) in rounds.into_iter().enumerate() {
        let product = app
            .product(&format!("Scarce {round}"), "9.99", units as i64)
            .await;
        let mut tasks = Vec::new();
        for b in 0..buyers {
            let (app, product) = (Arc::clone(&app), product.clone());
            tasks.push(tokio::spawn(async move {
                let (code, placed) = app
                    .order(&format!("buyer{b}@example.com"), &[(&product, 1)], "tok_ok")
                    .await;
                assert_eq!(code, StatusCode::ACCEPTED, "{placed}");
                app.finished(placed["order_id"].as_str().unwrap()).await["status"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }));
        }
        let mut completed = 0;
        for t in tasks {
            match t.await.unwrap().as_str() {
                "Completed" => completed += 1,
                "Cancelled" => {}
                other => panic!("unexpected final status {other}"),
            }
        }
        assert_eq!(
            completed,
            units.min(buyers as u64),
            "round {round}: exactly as many completions as units"
        );
        app.settle().await;
        let (_, v) = app.get(&format!("/api/products/{product}")).await;
        assert_eq!(
            v["available"].as_u64(),
            Some(units.saturating_sub(buyers as u64)),
            "{v}"
        );
        assert_eq!(v["reserved"].as_u64(), Some(0), "{v}");
    }
    let dead: usize = orders::system::groups::ALL
        .iter()
        .map(|g| app.system.memory_bus().unwrap().dead_letters(g).len())
        .sum();
    assert_eq!(dead, 0, "no message was dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_30s_payment_deadline_on_a_manual_clock() {
    let clock = ManualClock::at("2026-01-01T00:00:00Z".parse().unwrap());
    let app = common::app_with(Config {
        clock: Arc::new(clock.clone()),
        deadline_tick: Duration::from_millis(10),
        ..Config::default()
    })
    .await;
    let widget = app.product("Widget", "3.00", 2).await;
    let (_, placed) = app
        .order("jo@example.com", &[(&widget, 2)], "tok_timeout")
        .await;
    let id = placed["order_id"].as_str().unwrap();
    // Wait (real time) until stock is reserved and the deadline set.
    let mut status = String::new();
    for _ in 0..500 {
        let (_, o) = app.get(&format!("/api/orders/{id}")).await;
        status = o["status"].as_str().unwrap_or_default().to_owned();
        if status == "InventoryConfirmed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, "InventoryConfirmed");
    app.settle().await;
    clock.advance(Duration::from_secs(29));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, o) = app.get(&format!("/api/orders/{id}")).await;
    assert_eq!(o["status"], "InventoryConfirmed", "29 s is not yet 30 s");
    clock.advance(Duration::from_secs(2));
    let order = app.finished(id).await;
    assert_eq!(order["status"], "Cancelled");
    assert_eq!(order["cancellation_reason"], "payment timed out");
    app.settle().await;
    let (_, v) = app.get(&format!("/api/products/{widget}")).await;
    assert_eq!(
        (v["available"].as_u64(), v["reserved"].as_u64()),
        (Some(2), Some(0)),
        "{v}"
    );
}
