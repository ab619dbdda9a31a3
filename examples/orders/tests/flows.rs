//! End-to-end flows over the HTTP API, in process (`oneshot`).

mod common;

use axum::http::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_completes_and_notifies() {
    let app = common::app().await;
    let widget = app.product("Widget", "12.50", 10).await;
    let gadget = app.product("Gadget", "0.99", 5).await;
    let (status, placed) = app.order("Ada@Example.com", &[(&widget, 2), (&gadget, 3)], "tok_ok").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    assert_eq!(placed["status"], "Pending");
    let id = placed["order_id"].as_str().unwrap();
    let (status, read) = app.get(&format!("/api/orders/{id}?min_position={}", placed["position"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read["total"], "27.97");
    let order = app.finished(id).await;
    assert_eq!(order["status"], "Completed", "{order}");
    assert!(order["completed_at"].is_string());
    assert_eq!(order["customer_email"], "ada@example.com");
    assert_eq!(order["items"][0]["unit_price"], "12.50");
    assert_eq!(order["items"][0]["product_name"], "Widget");
    app.settle().await;
    let (_, w) = app.get(&format!("/api/products/{widget}")).await;
    assert_eq!((w["available"].as_u64(), w["reserved"].as_u64()), (Some(8), Some(0)), "{w}");
    let sent = app.system.sent.for_order(id.parse().unwrap());
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].kind, orders::messages::NotificationKind::OrderConfirmed);
    let (_, events) = app.get(&format!("/api/orders/{id}/events")).await;
    let types: Vec<&str> = events.as_array().unwrap().iter().map(|e| e["event_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["OrderCreated", "OrderInventoryConfirmed", "OrderPaymentConfirmed", "OrderCompleted"]);
    for e in events.as_array().unwrap() {
        assert_eq!(e["correlation_id"].as_str(), Some(id), "one correlation id across hops");
    }
    let _ = json!({});
}
