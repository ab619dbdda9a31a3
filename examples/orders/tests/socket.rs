//! The API over a real socket.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_real_socket() {
    let app = common::app().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = app.router.clone();
    let server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let client = reqwest::Client::new();

    let res = client
        .post(format!("{base}/api/products"))
        .json(&json!({"name": "Lamp", "price": "19.90", "stock": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let product = res.json::<Value>().await.unwrap()["product_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let place = |token: &str, key: Option<&str>| {
        let mut req = client.post(format!("{base}/api/orders")).json(&json!({
            "customer_email": "kim@example.com",
            "items": [{"product_id": product, "quantity": 1}],
            "payment": {"card_token": token}
        }));
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        req.send()
    };
    let res = place("tok_ok", Some("sock-1")).await.unwrap();
    assert_eq!(res.status(), 202);
    let ok: Value = res.json().await.unwrap();
    let again: Value = place("tok_ok", Some("sock-1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ok, again);
    let declined: Value = place("tok_decline", None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (placed, expected) in [(&ok, "Completed"), (&declined, "Cancelled")] {
        let order: Value = client
            .get(format!(
                "{base}/api/orders/{}?min_position={}&wait_terminal_ms=10000",
                placed["order_id"].as_str().unwrap(),
                placed["position"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(order["status"], expected, "{order}");
        assert_eq!(order["total"], "19.90");
    }
    let res = client
        .post(format!("{base}/api/orders"))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await.unwrap()["code"], "malformed_json");
    let res = client
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert!(res.text().await.unwrap().contains("orders_placed_total"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    server.abort();
}
