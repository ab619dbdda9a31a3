//! Bad input gets a 4xx with a JSON body that says what is wrong, and
//! changes nothing; idempotency keys.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_orders_are_refused_and_change_nothing() {
    let app = common::app().await;
    let widget = app.product("Widget", "12.50", 10).await;
    // The largest price accepted: two of them are past the largest total.
    let yacht = app.product("Yacht", "100000000000.00", 10).await;
    let head_before = app.system.store().head().await.unwrap();
    let unknown = uuid::Uuid::now_v7().to_string();
    let good_item = json!([{"product_id": widget, "quantity": 1}]);
    let cases = [
        (
            json!({"customer_email": "a@b.co", "items": [], "payment": {"card_token": "tok_ok"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "items",
        ),
        (
            json!({"customer_email": "a@b.co", "items": [{"product_id": widget, "quantity": 0}], "payment": {"card_token": "tok_ok"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "items[0].quantity",
        ),
        (
            json!({"customer_email": "a@b.co", "items": [{"product_id": widget, "quantity": -3}], "payment": {"card_token": "tok_ok"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "items[0].quantity",
        ),
        (
            json!({"customer_email": "not-an-email", "items": good_item, "payment": {"card_token": "tok_ok"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "customer_email",
        ),
        (
            json!({"customer_email": "a@b.co", "items": [{"product_id": unknown, "quantity": 1}], "payment": {"card_token": "tok_ok"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown product",
        ),
        (
            json!({"customer_email": "a@b.co", "items": good_item, "payment": {"card_token": ""}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "payment.card_token",
        ),
        (
            json!({"customer_email": "a@b.co", "items": good_item}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "payment",
        ),
        (
            json!({"customer_email": "a@b.co", "items": good_item, "payment": {"card_token": "tok_ok"}, "total": "0.01"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "total",
        ),
        (
            json!({"customer_email": "a@b.co", "items": [{"product_id": yacht, "quantity": 2}], "payment": {"card_token": "tok_ok"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "total",
        ),
        (
            json!({"customer_email": "a@b.co", "items": [{"product_id": "nope", "quantity": 1}], "payment": {"card_token": "tok_ok"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "product_id",
        ),
    ];
    for (body, status, mention) in cases {
        let (code, answer) = app.post("/api/orders", body.clone()).await;
        assert_eq!(code, status, "{body} -> {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(answer["code"].is_string(), "{answer}");
        assert!(
            message.contains(mention),
            "{body}: {message:?} should mention {mention:?}"
        );
    }
    // Malformed JSON, wrong content type, oversized body.
    let raw = |body: Vec<u8>, ct: &str| {
        Request::post("/api/orders")
            .header("content-type", ct)
            .body(Body::from(body))
            .unwrap()
    };
    let (code, answer) = app
        .raw(raw(b"{\"customer_email\": ".to_vec(), "application/json"))
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["code"], "malformed_json");
    let (code, answer) = app.raw(raw(b"{}".to_vec(), "text/plain")).await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{answer}");
    let big = format!("{{\"customer_email\":\"{}\"}}", "a".repeat(100_000));
    let (code, answer) = app.raw(raw(big.into_bytes(), "application/json")).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["code"], "body_too_large");
    // Bad products.
    for (body, field) in [
        (json!({"name": "X", "price": "1.234", "stock": 1}), "price"),
        (json!({"name": "X", "price": "-1", "stock": 1}), "price"),
        (json!({"name": "X", "price": "0", "stock": 1}), "price"),
        (json!({"name": "", "price": "1.00", "stock": 1}), "name"),
        (json!({"name": "X", "price": "1.00", "stock": -1}), "stock"),
    ] {
        let (code, answer) = app.post("/api/products", body.clone()).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {answer}");
        assert_eq!(answer["field"], field, "{answer}");
    }
    let (code, _) = app
        .post(
            &format!("/api/products/{widget}/restock"),
            json!({"quantity": 0}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let (code, answer) = app.get("/api/products/not-a-uuid").await;
    assert_eq!(
        (code, answer["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (code, _) = app.get(&format!("/api/orders/{unknown}")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, _) = app
        .get(&format!("/api/orders/{unknown}?min_position=nonsense"))
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    // A position no write answered is refused at once, not waited for.
    let started = std::time::Instant::now();
    let (code, answer) = app
        .get(&format!("/api/orders/{unknown}?min_position=999999.0"))
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["field"], "min_position", "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Query parameters of the wrong type, an unknown path, a method a path
    // does not take: JSON errors too.
    for uri in [
        "/api/orders?limit=abc",
        "/api/orders?limit=-1",
        "/api/orders?status=Pending&limit=99999999999999999999999",
        &format!("/api/orders/{unknown}?wait_terminal_ms=soon"),
    ] {
        let (code, answer) = app.get(uri).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{uri} -> {answer}");
        assert_eq!(answer["code"], "invalid_query", "{uri} -> {answer}");
    }
    let (code, answer) = app.get("/api/nothing-here").await;
    assert_eq!(
        (code, answer["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_route"))
    );
    let delete = Request::delete("/api/orders").body(Body::empty()).unwrap();
    let (code, answer) = app.raw(delete).await;
    assert_eq!(
        (code, answer["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    // Nothing was written by any of it.
    assert_eq!(app.system.store().head().await.unwrap(), head_before);
    let (_, stats) = app.get("/api/stats").await;
    assert_eq!(stats["total_orders"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys() {
    let app = common::app().await;
    let widget = app.product("Widget", "2.00", 100).await;
    let body = json!({"customer_email": "ivy@example.com", "items": [{"product_id": widget, "quantity": 1}], "payment": {"card_token": "tok_ok"}});
    let key = [("idempotency-key", "order-42")];
    let (code, first) = app
        .call("POST", "/api/orders", Some(body.clone()), &key)
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{first}");
    let (code, again) = app
        .call("POST", "/api/orders", Some(body.clone()), &key)
        .await;
    assert_eq!(code, StatusCode::ACCEPTED);
    assert_eq!(
        first, again,
        "the same key and body answer the first answer"
    );
    let mut other = body.clone();
    other["items"][0]["quantity"] = json!(2);
    let (code, answer) = app.call("POST", "/api/orders", Some(other), &key).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["code"], "idempotency_key_reused");
    // Concurrent retries with one key create one order.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let router = app.router.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            use tower::ServiceExt;
            let req = Request::post("/api/orders")
                .header("content-type", "application/json")
                .header("idempotency-key", "burst")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap();
            let res = router.oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::ACCEPTED);
            let bytes = http_body_util::BodyExt::collect(res.into_body())
                .await
                .unwrap()
                .to_bytes();
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["order_id"].clone()
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap().to_string());
    }
    assert_eq!(ids.len(), 1, "one order for one key");
    let order = app.finished(first["order_id"].as_str().unwrap()).await;
    assert_eq!(order["status"], "Completed");
    app.settle().await;
    let (_, stats) = app.get("/api/stats").await;
    assert_eq!(stats["total_orders"], 2, "{stats}");
    let (_, w) = app.get(&format!("/api/products/{widget}")).await;
    assert_eq!(w["available"], 98);
}

/// A read model that will not reach the asked position answers 503
/// `not_caught_up` (the client may retry), not a 500 and not a stale order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_that_has_stopped_is_a_503() {
    let app = common::app().await;
    let widget = app.product("Widget", "12.50", 10).await;
    // The read model stops following the store.
    app.system.query.projection().stop().await.unwrap();
    let (code, placed) = app
        .order("ada@example.com", &[(&widget, 1)], "tok_ok")
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{placed}");
    let id = placed["order_id"].as_str().unwrap();
    let position = placed["position"].as_str().unwrap();
    let started = std::time::Instant::now();
    let (code, answer) = app
        .get(&format!("/api/orders/{id}?min_position={position}"))
        .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["code"], "not_caught_up", "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("not running"),
        "{answer}"
    );
    // At once: a stopped read model is not waited for.
    assert!(started.elapsed() < orders::query::MAX_WAIT);
}
