//! Part 1's black-box HTTP checks against the distributed deployment: every
//! service its own OS process over PostgreSQL, RabbitMQ and Redis, the API
//! through the gateway, emails through a real SMTP server.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod distributed_support;

use distributed_support::Cluster;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_api_through_the_gateway() {
    let c = Cluster::start(
        "api",
        &[
            ("order", "order"),
            ("inventory", "inventory"),
            ("payment", "payment"),
            ("notification", "notification"),
            ("query", "query"),
        ],
        "2s",
    )
    .await;
    let widget = c.product("Blue Widget", "10.00", 100).await;
    let gizmo = c.product("Gizmo", "1.25", 3).await;

    // Happy path, read-your-writes, one email.
    let (code, placed) = c.order("Fay@Example.com", &[(&widget, 2)], "tok_ok").await;
    assert_eq!(code, StatusCode::ACCEPTED, "{placed}");
    assert_eq!(placed["status"], "Pending");
    let id = placed["order_id"].as_str().unwrap().to_owned();
    let position = placed["position"].as_str().unwrap();
    let (code, view) = c
        .get(&format!("/api/orders/{id}?min_position={position}"))
        .await;
    assert_eq!(
        code,
        StatusCode::OK,
        "read-your-writes across processes: {view}"
    );
    assert_eq!(view["customer_email"], "fay@example.com");
    assert_eq!(view["total"], "20.00");
    let done = c.finished(&id).await;
    assert_eq!(done["status"], "Completed", "{done}");
    assert!(done["completed_at"].is_string());
    assert_eq!(c.wait_mail(&format!("Order {id}: OrderConfirmed")).await, 1);
    let (_, p) = c.get(&format!("/api/products/{widget}")).await;
    assert_eq!(
        (p["available"].as_u64(), p["reserved"].as_u64()),
        (Some(98), Some(0)),
        "{p}"
    );
    let (code, events) = c.get(&format!("/api/orders/{id}/events")).await;
    assert_eq!(code, StatusCode::OK);
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
    // The history is the query service's replica of the order's stream, in
    // its own schema, carrying the order service's positions.
    assert_eq!(events[0]["position"].as_str(), Some(position), "{events}");
    let copied: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".events WHERE stream_id = $1",
        c.schema("query")
    ))
    .bind(format!("order-{id}"))
    .fetch_one(&c.pool)
    .await
    .unwrap();
    assert_eq!(copied, 4);

    // Out of stock: cancelled, nothing reserved.
    let (_, placed) = c.order("gus@example.com", &[(&gizmo, 5)], "tok_ok").await;
    let oos = placed["order_id"].as_str().unwrap().to_owned();
    let v = c.finished(&oos).await;
    assert_eq!(v["status"], "Cancelled", "{v}");
    assert_eq!(
        c.wait_mail(&format!("Order {oos}: OrderCancelled")).await,
        1
    );

    // Declined payment: stock released.
    let (_, placed) = c
        .order("gus@example.com", &[(&gizmo, 2)], "tok_decline")
        .await;
    let declined = placed["order_id"].as_str().unwrap().to_owned();
    assert_eq!(c.finished(&declined).await["status"], "Cancelled");

    // Payment timeout (2 s here): cancelled, stock released.
    let (_, placed) = c
        .order("hal@example.com", &[(&gizmo, 1)], "tok_timeout")
        .await;
    let timed_out = placed["order_id"].as_str().unwrap().to_owned();
    let v = c.finished(&timed_out).await;
    assert_eq!(v["status"], "Cancelled", "{v}");

    // Customer cancellation, then illegal transitions are 409.
    let (_, placed) = c
        .order("ivy@example.com", &[(&widget, 1)], "tok_delay_1500")
        .await;
    let cancel = placed["order_id"].as_str().unwrap().to_owned();
    let (code, body) = c
        .post(
            &format!("/api/orders/{cancel}/cancel"),
            json!({"reason": "changed my mind"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let v = c.finished(&cancel).await;
    assert_eq!(v["status"], "Cancelled");
    assert_eq!(v["cancellation_reason"], "changed my mind");
    let (code, _) = c
        .post(&format!("/api/orders/{cancel}/cancel"), json!({}))
        .await;
    assert_eq!(code, StatusCode::CONFLICT);
    let (code, _) = c.post(&format!("/api/orders/{id}/cancel"), json!({})).await;
    assert_eq!(
        code,
        StatusCode::CONFLICT,
        "a completed order cannot be cancelled"
    );

    // Bad input: 4xx with a JSON body, nothing created.
    let (code, body) = c.order("not-an-email", &[(&widget, 1)], "tok_ok").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["field"], "customer_email");
    let (code, _) = c.order("a@example.com", &[(&widget, 0)], "tok_ok").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let (code, _) = c.order("a@example.com", &[], "tok_ok").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let unknown = uuid::Uuid::new_v4().to_string();
    let (code, body) = c.order("a@example.com", &[(&unknown, 1)], "tok_ok").await;
    assert_eq!(
        (code, body["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_product"))
    );
    let res = c
        .client
        .post(format!("{}/api/orders", c.gateway))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = c
        .client
        .post(format!("{}/api/products", c.gateway))
        .header("content-type", "application/json")
        .body(vec![b' '; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (code, _) = c.get("/api/orders/not-a-uuid").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, _) = c.get(&format!("/api/orders/{unknown}")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    // Idempotency keys, stored durably with the order.
    let body = json!({"customer_email": "jo@example.com", "items": [{"product_id": widget, "quantity": 1}], "payment": {"card_token": "tok_ok"}});
    let (c1, first) = c
        .call(
            "POST",
            "/api/orders",
            Some(body.clone()),
            &[("Idempotency-Key", "key-1")],
        )
        .await;
    let (c2, second) = c
        .call(
            "POST",
            "/api/orders",
            Some(body),
            &[("Idempotency-Key", "key-1")],
        )
        .await;
    assert_eq!((c1, c2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(first, second);
    let other = json!({"customer_email": "jo@example.com", "items": [{"product_id": widget, "quantity": 2}], "payment": {"card_token": "tok_ok"}});
    let (code, _) = c
        .call(
            "POST",
            "/api/orders",
            Some(other),
            &[("Idempotency-Key", "key-1")],
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    let keyed = first["order_id"].as_str().unwrap().to_owned();
    c.finished(&keyed).await;

    // Queries: a customer's orders with paging, status filter, search, stats.
    let (code, page) = c
        .get("/api/orders?customer_email=GUS@example.com&limit=1")
        .await;
    assert_eq!(code, StatusCode::OK, "{page}");
    assert_eq!(page["orders"].as_array().unwrap().len(), 1);
    assert_eq!(
        page["orders"][0]["order_id"].as_str(),
        Some(declined.as_str()),
        "newest first"
    );
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page) = c
        .get(&format!(
            "/api/orders?customer_email=gus@example.com&limit=1&cursor={cursor}"
        ))
        .await;
    assert_eq!(page["orders"][0]["order_id"].as_str(), Some(oos.as_str()));
    assert!(page["next_cursor"].is_null());
    let (_, cancelled) = c.get("/api/orders?status=Cancelled").await;
    assert_eq!(cancelled["orders"].as_array().unwrap().len(), 4);
    let (code, _) = c.get("/api/orders?status=Shipped").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (_, found) = c.get("/api/orders/search?q=widget").await;
    assert_eq!(found["orders"].as_array().unwrap().len(), 3, "{found}");
    let (_, found) = c.get("/api/orders/search?q=gus@").await;
    assert_eq!(found["orders"].as_array().unwrap().len(), 2);
    let (code, _) = c.get("/api/orders/search?q=").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (_, stats) = c.get("/api/stats").await;
    assert_eq!(stats["total_orders"], 6, "{stats}");
    assert_eq!(stats["by_status"]["Completed"]["count"], 2);
    assert_eq!(stats["by_status"]["Completed"]["revenue"], "30.00");
    assert_eq!(stats["by_status"]["Cancelled"]["count"], 4);

    // Operations: health, every process's metrics, the merged OpenAPI document.
    let (code, health) = c.get("/health").await;
    assert_eq!(
        (code, health["status"].as_str()),
        (StatusCode::OK, Some("ok")),
        "{health}"
    );
    let (code, text) = c.get("/metrics").await;
    assert_eq!(code, StatusCode::OK);
    let text = text.as_str().unwrap();
    for metric in [
        "orders_placed_total",
        "orders_finished_total",
        "saga_step_seconds",
        "order_end_to_end_seconds",
        "bus_queue_depth",
        "relay_lag_events",
        "projection_lag_events",
        "gateway_request_seconds",
    ] {
        assert!(text.contains(metric), "{metric} missing from /metrics");
    }
    let (code, doc) = c.get("/openapi.json").await;
    assert_eq!(code, StatusCode::OK);
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
    // Restock through the gateway.
    let (code, p) = c
        .post(
            &format!("/api/products/{gizmo}/restock"),
            json!({"quantity": 7}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{p}");
    assert_eq!(p["available"], 10);
    // Exactly one email per order and kind.
    for (subject, n) in c.mail() {
        assert_eq!(n, 1, "{subject}");
    }
    c.stop().await;
}

/// Every process declares every group's queues at start-up: an order event
/// published while only the payment service runs waits in the query
/// service's queue instead of being lost to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_declares_the_queues_of_services_it_does_not_run() {
    use distributed_support::{amqp_url, database_url};
    use es_core::{EventBus, Message, Metadata, Payload};
    use orders::distributed::ServeArgs;
    use orders::system::groups;

    let namespace = format!("ttopo_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut args = ServeArgs::defaults();
    args.services = Some(vec!["payment".into()]);
    args.namespace = namespace.clone();
    args.database_url = database_url();
    args.amqp_url = amqp_url();
    args.queue_expires_secs = Some(300);
    let node = orders::distributed::start(&args, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let bus = es_rabbit::RabbitBus::connect(
        es_rabbit::RabbitConfig::new(amqp_url()).with_prefix(format!("{namespace}.")),
    )
    .await
    .unwrap();
    assert_eq!(bus.queue_depth(groups::QUERY).await.unwrap(), 0);
    let created = Message {
        message_id: uuid::Uuid::now_v7(),
        topic: orders::messages::topics::ORDER.into(),
        message_type: "OrderCreated".into(),
        schema_version: 1,
        payload: Payload::from_json("{}").unwrap(),
        metadata: Metadata::new(),
    };
    bus.publish(&[created]).await.unwrap();
    let mut depth = 0;
    for _ in 0..50 {
        depth = bus.queue_depth(groups::QUERY).await.unwrap();
        if depth == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        depth, 1,
        "the order event was not kept for the query service"
    );
    assert_eq!(bus.queue_depth(groups::SAGA).await.unwrap(), 1);
    node.shutdown().await;
    for group in groups::ALL {
        let subscription = es_core::Subscription::new(group, Vec::<String>::new())
            .with_retry_delay(orders::distributed::RETRY_DELAY);
        let _ = bus.delete_group(&subscription).await;
    }
    bus.close().await;
    let pool = es_postgres::PgConfig::from_url(&database_url())
        .unwrap()
        .pool()
        .await
        .unwrap();
    sqlx::query(&format!(
        "DROP SCHEMA IF EXISTS \"{namespace}_payment\" CASCADE"
    ))
    .execute(&pool)
    .await
    .unwrap();
}

/// `orders replay-orders` publishes the order store's order events (not the
/// saga's) into the query service's queue only, with their source headers;
/// a replica fed from it holds each once, however often it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_orders_fills_a_replica_once() {
    use distributed_support::{amqp_url, database_url};
    use es_core::replica::{ReplicaHandler, Source};
    use es_core::{EventBus, EventStore, ExpectedVersion, Metadata, NewEvent, Payload, StreamId};
    use orders::distributed::{replay_orders, subscription, ServeArgs};
    use orders::system::groups;

    let namespace = format!(
        "treplay_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut args = ServeArgs::defaults();
    args.namespace = namespace.clone();
    args.database_url = database_url();
    args.amqp_url = amqp_url();
    args.queue_expires_secs = Some(300);
    let pool = es_postgres::PgConfig::from_url(&database_url())
        .unwrap()
        .pool()
        .await
        .unwrap();
    let schema = args.schema("order");
    es_postgres::migrate(&pool, &schema).await.unwrap();
    let orders_store = es_postgres::PgEventStore::new(pool.clone(), schema.clone());
    let order = StreamId::for_aggregate("order", uuid::Uuid::now_v7()).unwrap();
    let saga = StreamId::for_aggregate("order_saga", uuid::Uuid::now_v7()).unwrap();
    let event = |t: &str| NewEvent::new(t, 1, Payload::from_json("{}").unwrap(), Metadata::new());
    orders_store
        .append(
            &order,
            ExpectedVersion::NoStream,
            vec![event("OrderCreated"), event("OrderCompleted")],
        )
        .await
        .unwrap();
    orders_store
        .append(&saga, ExpectedVersion::NoStream, vec![event("Started")])
        .await
        .unwrap();
    let bus = es_rabbit::RabbitBus::connect(
        es_rabbit::RabbitConfig::new(amqp_url())
            .with_prefix(format!("{namespace}."))
            .with_queue_expires(Some(std::time::Duration::from_secs(300))),
    )
    .await
    .unwrap();
    // The saga's queue exists too, bound to the order events: it must get none.
    bus.declare(&subscription(&args, groups::SAGA))
        .await
        .unwrap();
    assert_eq!(replay_orders(&args).await.unwrap(), 2);
    assert_eq!(replay_orders(&args).await.unwrap(), 2);

    let replica = std::sync::Arc::new(es_core::InMemoryEventStore::new());
    let handle = bus
        .subscribe(
            subscription(&args, groups::QUERY),
            std::sync::Arc::new(ReplicaHandler::new(replica.clone())),
        )
        .await
        .unwrap();
    for _ in 0..100 {
        if bus.queue_depth(groups::QUERY).await.unwrap() == 0
            && replica.read_stream(&order, 1, 10).await.unwrap().len() == 2
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    handle.stop().await;
    let copy = replica.read_stream(&order, 1, 10).await.unwrap();
    let source = orders_store.read_stream(&order, 1, 10).await.unwrap();
    assert_eq!(copy.len(), 2, "each event once, after two replays");
    for (got, want) in copy.iter().zip(&source) {
        assert_eq!(got.event_id, want.event_id);
        assert_eq!(
            Source::of_event(got).map(|s| s.position),
            Some(want.position)
        );
    }
    assert!(replica.read_stream(&saga, 1, 10).await.unwrap().is_empty());
    // Only the query service's queue got them.
    assert_eq!(bus.queue_depth(groups::SAGA).await.unwrap(), 0);
    for group in groups::ALL {
        let s = es_core::Subscription::new(group, Vec::<String>::new())
            .with_retry_delay(orders::distributed::RETRY_DELAY);
        let _ = bus.delete_group(&s).await;
    }
    bus.close().await;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}
