//! End-to-end flows over the HTTP API, in process (`oneshot`).

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod common;

use axum::http::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_completes_and_notifies() {
    let app = common::app().await;
    let widget = app.product("Widget", "12.50", 10).await;
    let gadget = app.product("Gadget", "0.99", 5).await;
    let (status, placed) = app
        .order("Ada@Example.com", &[(&widget, 2), (&gadget, 3)], "tok_ok")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    assert_eq!(placed["status"], "Pending");
    let id = placed["order_id"].as_str().unwrap();
    let (status, read) = app
        .get(&format!(
            "/api/orders/{id}?min_position={}",
            placed["position"].as_str().unwrap()
        ))
        .await;
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
    assert_eq!(
        (w["available"].as_u64(), w["reserved"].as_u64()),
        (Some(8), Some(0)),
        "{w}"
    );
    let sent = app.system.sent.for_order(id.parse().unwrap());
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        sent[0].kind,
        orders::messages::NotificationKind::OrderConfirmed
    );
    let (_, events) = app.get(&format!("/api/orders/{id}/events")).await;
    let types: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "OrderCreated",
            "OrderInventoryConfirmed",
            "OrderPaymentConfirmed",
            "OrderCompleted"
        ]
    );
    for e in events.as_array().unwrap() {
        assert_eq!(
            e["correlation_id"].as_str(),
            Some(id),
            "one correlation id across hops"
        );
    }
    // One trace per order: every event of every stream of the order carries
    // a traceparent whose trace id is the order id.
    let trace = id.replace('-', "");
    let mine = app.order_events(id).await;
    assert!(
        mine.len() > 10,
        "events of the order across services: {}",
        mine.len()
    );
    let categories: std::collections::BTreeSet<&str> =
        mine.iter().map(|e| e.stream_id.category()).collect();
    for category in ["order", "order_saga", "inventory", "product", "payment"] {
        assert!(
            categories.contains(category),
            "{category} missing from {categories:?}"
        );
    }
    for e in &mine {
        let tp = e
            .metadata
            .traceparent
            .map(|t| t.to_string())
            .unwrap_or_default();
        assert!(
            tp.contains(&trace),
            "{} in {} has traceparent {tp:?}",
            e.event_type,
            e.stream_id
        );
    }
}

/// A caller's W3C `traceparent` (the gateway's span, in the distributed
/// deployment) makes the whole order one trace with the caller's span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_traceparent_is_the_orders_trace() {
    let app = common::app().await;
    let widget = app.product("Traced", "1.00", 5).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let place = |traceparent: String| {
        let body = json!({
            "customer_email": "t@example.com",
            "items": [{"product_id": widget, "quantity": 1}],
            "payment": {"card_token": "tok_ok"}
        });
        let app = &app;
        async move {
            app.call(
                "POST",
                "/api/orders",
                Some(body),
                &[("traceparent", &traceparent)],
            )
            .await
        }
    };
    let (status, placed) = place(format!("00-{trace}-00f067aa0ba902b7-01")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    let id = placed["order_id"].as_str().unwrap();
    assert_eq!(app.finished(id).await["status"], "Completed");
    let mine = app.order_events(id).await;
    assert!(mine.len() > 10, "{}", mine.len());
    for e in mine {
        let tp = e
            .metadata
            .traceparent
            .map(|t| t.to_string())
            .unwrap_or_default();
        assert!(
            tp.starts_with(&format!("00-{trace}-")),
            "{} has {tp:?}",
            e.event_type
        );
        // A span of its own, not the caller's.
        assert!(!tp.contains("00f067aa0ba902b7"), "{tp}");
    }

    // A malformed traceparent is ignored: the order id is the trace id.
    let (_, placed) = place("not-a-traceparent".to_owned()).await;
    let id = placed["order_id"].as_str().unwrap();
    app.finished(id).await;
    let events = app.order_events(id).await;
    let created = events
        .iter()
        .find(|e| e.event_type.as_ref() == "OrderCreated")
        .unwrap();
    let tp = created.metadata.traceparent.unwrap().to_string();
    assert!(tp.contains(&id.replace('-', "")), "{tp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_stock_cancels_and_reserves_nothing() {
    let app = common::app().await;
    let plenty = app.product("Plenty", "1.00", 100).await;
    let scarce = app.product("Scarce", "2.00", 1).await;
    // Two lines: the first could be reserved, the second cannot: none is held.
    let (status, placed) = app
        .order("bo@example.com", &[(&plenty, 3), (&scarce, 2)], "tok_ok")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = placed["order_id"].as_str().unwrap();
    let order = app.finished(id).await;
    assert_eq!(order["status"], "Cancelled");
    assert!(
        order["cancellation_reason"]
            .as_str()
            .unwrap()
            .contains("insufficient stock of Scarce"),
        "{order}"
    );
    app.settle().await;
    for (p, stock) in [(&plenty, 100), (&scarce, 1)] {
        let (_, v) = app.get(&format!("/api/products/{p}")).await;
        assert_eq!(
            (v["available"].as_u64(), v["reserved"].as_u64()),
            (Some(stock), Some(0)),
            "{v}"
        );
    }
    let sent = app.system.sent.for_order(id.parse().unwrap());
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].kind,
        orders::messages::NotificationKind::OrderCancelled
    );
    let payment = app
        .system
        .payments
        .payment(id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        payment.state,
        orders::payment::PaymentState::None,
        "nothing was charged"
    );
    // Restocked, the same order goes through.
    let (code, v) = app
        .post(
            &format!("/api/products/{scarce}/restock"),
            json!({"quantity": 4}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["available"], 5);
    let (_, placed) = app
        .order("bo@example.com", &[(&plenty, 3), (&scarce, 2)], "tok_ok")
        .await;
    let order = app.finished(placed["order_id"].as_str().unwrap()).await;
    assert_eq!(order["status"], "Completed", "{order}");
    assert_eq!(order["total"], "7.00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_payment_releases_stock_and_cancels() {
    let app = common::app().await;
    let widget = app.product("Widget", "5.00", 4).await;
    let (_, placed) = app
        .order("cy@example.com", &[(&widget, 3)], "tok_decline")
        .await;
    let id = placed["order_id"].as_str().unwrap();
    let order = app.finished(id).await;
    assert_eq!(order["status"], "Cancelled");
    assert_eq!(
        order["cancellation_reason"],
        "payment declined: card declined"
    );
    app.settle().await;
    let (_, v) = app.get(&format!("/api/products/{widget}")).await;
    assert_eq!(
        (v["available"].as_u64(), v["reserved"].as_u64()),
        (Some(4), Some(0)),
        "{v}"
    );
    let kinds: Vec<_> = app
        .system
        .sent
        .for_order(id.parse().unwrap())
        .into_iter()
        .map(|n| n.kind)
        .collect();
    assert_eq!(kinds, [orders::messages::NotificationKind::OrderCancelled]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_cancellation_releases_and_refunds_and_illegal_transitions_are_409() {
    let app = common::app().await;
    let widget = app.product("Widget", "5.00", 4).await;
    // The gateway never answers: the order waits in InventoryConfirmed.
    let (_, placed) = app
        .order("di@example.com", &[(&widget, 2)], "tok_timeout")
        .await;
    let id = placed["order_id"].as_str().unwrap().to_owned();
    let mut status = String::new();
    for _ in 0..500 {
        let (_, o) = app.get(&format!("/api/orders/{id}")).await;
        status = o["status"].as_str().unwrap_or_default().to_owned();
        if status == "InventoryConfirmed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(status, "InventoryConfirmed");
    let (code, body) = app
        .post(
            &format!("/api/orders/{id}/cancel"),
            json!({"reason": "changed my mind"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "Cancelled");
    let (code, body) = app
        .post(
            &format!("/api/orders/{id}/cancel"),
            json!({"reason": "again"}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "illegal_transition");
    let order = app.finished(&id).await;
    assert_eq!(order["cancellation_reason"], "changed my mind");
    app.settle().await;
    let (_, v) = app.get(&format!("/api/products/{widget}")).await;
    assert_eq!(
        (v["available"].as_u64(), v["reserved"].as_u64()),
        (Some(4), Some(0)),
        "{v}"
    );

    // Paid then cancelled before completion is refunded: simulate with a
    // slow gateway and cancel as soon as the order is paid.
    let (_, placed) = app.order("di@example.com", &[(&widget, 1)], "tok_ok").await;
    let done = app.finished(placed["order_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "Completed");
    let (code, body) = app
        .post(
            &format!("/api/orders/{}/cancel", done["order_id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    let (code, _) = app
        .post(
            &format!("/api/orders/{}/cancel", uuid::Uuid::now_v7()),
            json!({}),
        )
        .await;

    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, body) = app
        .call("POST", &format!("/api/orders/{id}/cancel"), None, &[])
        .await;
    assert_eq!(
        code,
        StatusCode::CONFLICT,
        "no body is fine, still illegal: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_timeout_cancels_and_a_late_payment_is_refunded() {
    let app = common::app_with(orders::Config {
        payment_timeout: std::time::Duration::from_millis(300),
        ..orders::Config::default()
    })
    .await;
    let widget = app.product("Widget", "5.00", 5).await;
    let (_, silent) = app
        .order("ed@example.com", &[(&widget, 1)], "tok_timeout")
        .await;
    let (_, late) = app
        .order("ed@example.com", &[(&widget, 1)], "tok_delay_800")
        .await;
    for placed in [&silent, &late] {
        let order = app.finished(placed["order_id"].as_str().unwrap()).await;
        assert_eq!(order["status"], "Cancelled", "{order}");
        assert_eq!(order["cancellation_reason"], "payment timed out");
    }
    let late_id: uuid::Uuid = late["order_id"].as_str().unwrap().parse().unwrap();
    let mut state = orders::payment::PaymentState::None;
    for _ in 0..300 {
        state = app.system.payments.payment(late_id).await.unwrap().state;
        if state == orders::payment::PaymentState::Refunded {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        state,
        orders::payment::PaymentState::Refunded,
        "the late payment is refunded"
    );
    app.settle().await;
    let (_, v) = app.get(&format!("/api/products/{widget}")).await;
    assert_eq!(
        (v["available"].as_u64(), v["reserved"].as_u64()),
        (Some(5), Some(0)),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_list_search_and_stats() {
    let app = common::app().await;
    let widget = app.product("Blue Widget", "10.00", 100).await;
    let gizmo = app.product("Gizmo", "1.25", 100).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, p) = app
            .order(
                "fay@example.com",
                &[(&widget, 1)],
                if i == 4 { "tok_decline" } else { "tok_ok" },
            )
            .await;
        ids.push(p["order_id"].as_str().unwrap().to_owned());
    }
    let (_, p) = app.order("gus@example.com", &[(&gizmo, 2)], "tok_ok").await;
    ids.push(p["order_id"].as_str().unwrap().to_owned());
    for id in &ids {
        app.finished(id).await;
    }
    // Paging through a customer's orders, newest first.
    let (code, page) = app
        .get("/api/orders?customer_email=FAY@example.com&limit=2")
        .await;
    assert_eq!(code, StatusCode::OK, "{page}");
    assert_eq!(page["orders"].as_array().unwrap().len(), 2);
    assert_eq!(
        page["orders"][0]["order_id"].as_str(),
        Some(ids[4].as_str())
    );
    let mut seen = 2;
    let mut cursor = page["next_cursor"].as_str().unwrap().to_owned();
    loop {
        let (_, page) = app
            .get(&format!(
                "/api/orders?customer_email=fay@example.com&limit=2&cursor={cursor}"
            ))
            .await;
        seen += page["orders"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, 5);
    let (_, cancelled) = app.get("/api/orders?status=Cancelled").await;
    assert_eq!(cancelled["orders"].as_array().unwrap().len(), 1);
    let (code, _) = app.get("/api/orders?status=Shipped").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (_, found) = app.get("/api/orders/search?q=widget").await;
    assert_eq!(found["orders"].as_array().unwrap().len(), 5);
    let (_, found) = app.get("/api/orders/search?q=gus@").await;
    assert_eq!(found["orders"].as_array().unwrap().len(), 1);
    let (code, _) = app.get("/api/orders/search?q=").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (_, stats) = app.get("/api/stats").await;
    assert_eq!(stats["total_orders"], 6);
    assert_eq!(stats["by_status"]["Completed"]["count"], 5);
    assert_eq!(stats["by_status"]["Completed"]["revenue"], "42.50");
    assert_eq!(stats["by_status"]["Cancelled"]["count"], 1);
    assert_eq!(stats["by_status"]["Pending"]["count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_openapi() {
    let app = common::app().await;
    let widget = app.product("Widget", "1.00", 10).await;
    let (_, p) = app
        .order("hal@example.com", &[(&widget, 1)], "tok_ok")
        .await;
    app.finished(p["order_id"].as_str().unwrap()).await;
    let (code, health) = app.get("/health").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    let (code, text) = app.get("/metrics").await;
    assert_eq!(code, StatusCode::OK);
    let text = text.as_str().unwrap();
    for metric in [
        "orders_placed_total",
        "orders_finished_total",
        "saga_step_seconds",
        "order_end_to_end_seconds",
    ] {
        assert!(text.contains(metric), "{metric} missing from /metrics");
    }
    let (code, doc) = app.get("/openapi.json").await;
    assert_eq!(code, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/api/products",
        "/api/products/{id}",
        "/api/products/{id}/restock",
        "/api/orders",
        "/api/orders/{id}",
        "/api/orders/search",
        "/api/orders/{id}/events",
        "/api/orders/{id}/cancel",
        "/api/stats",
        "/health",
        "/metrics",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(
        paths["/api/orders"]["get"].is_object() && paths["/api/orders"]["post"].is_object(),
        "both services' /api/orders operations"
    );
}
