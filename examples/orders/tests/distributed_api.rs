//! The black-box suite against the distributed deployment: every service its
//! own OS process over PostgreSQL, RabbitMQ and Redis, the API through the
//! gateway, emails through a real SMTP server; and the queues and replays
//! only the distributed deployment has.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod support;

use std::time::Duration;

use support::distributed::{
    amqp_url, database_url, delete_groups, serve_args, Cluster, EVERY_SERVICE_APART,
};
use support::{scenarios, until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_through_the_gateway() {
    // Every service its own process, the relay in the order process; a
    // payment window short enough to wait for, long enough to cancel in.
    let c = Cluster::start("api", &EVERY_SERVICE_APART[..5], Duration::from_secs(3)).await;
    let id = scenarios::all(&c.client()).await;
    // The history is the query service's replica of the order's stream, in
    // its own schema, carrying the order service's positions.
    let copied: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".events WHERE stream_id = $1",
        c.schema("query")
    ))
    .bind(format!("order-{id}"))
    .fetch_one(&c.pool)
    .await
    .unwrap();
    assert_eq!(copied, 4);
    // Exactly one email per order and kind.
    c.one_email_each();
    poison_is_parked(&c, &id).await;
    c.stop().await;
}

/// The gateway requires bearer tokens when the processes have a secret: the
/// authentication scenario through it, the services in one process behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_through_the_gateway() {
    let secret = "a secret for the distributed test";
    let c = Cluster::start_with_env(
        "auth",
        &[("all", "order,inventory,payment,notification,query")],
        Duration::from_secs(30),
        &[("ORDERS_JWT_SECRET", secret)],
    )
    .await;
    scenarios::authentication(&c.client(), secret).await;
    c.stop().await;
}

/// A NUL smuggled past the edge, straight into the order store, is refused by
/// PostgreSQL in the query service's read model: the event is parked, the
/// orders after it are served, and the parked event shows in the query
/// service's `/metrics` and `/health`.
async fn poison_is_parked(c: &std::sync::Arc<Cluster>, template: &str) {
    use es_core::{
        DomainEvent, EventStore, ExpectedVersion, Metadata, NewEvent, Payload, StreamId,
    };
    use orders::order::OrderEvent;
    let client = c.client();
    let (_, history) = client.get(&format!("/api/orders/{template}/events")).await;
    let mut created = history[0]["data"].clone();
    assert_eq!(history[0]["event_type"], "OrderCreated", "{history}");
    let poisoned = uuid::Uuid::now_v7();
    created["order_id"] = serde_json::json!(poisoned);
    created["customer_email"] = serde_json::json!("nul\u{0}byte@example.com");
    // The history masks card tokens; the stored event carries the real one.
    created["card_token"] = serde_json::json!("tok_ok");
    let store = es_postgres::PgEventStore::new(c.pool.clone(), c.schema("order"));
    store
        .append(
            &StreamId::for_aggregate("order", poisoned).unwrap(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                "OrderCreated",
                // The history shows the event as the current release reads it.
                <OrderEvent as DomainEvent>::known_version("OrderCreated").unwrap(),
                Payload::from_value(&created).unwrap(),
                Metadata::new().with_correlation_id(poisoned),
            )],
        )
        .await
        .unwrap();
    // The read model goes on: an order placed after it is served.
    let widget = client.product("After Poison", "2.00", 5).await;
    let next = client
        .place("after-poison@example.com", &[(&widget, 1)], "tok_ok")
        .await;
    assert_eq!(client.finished(&next).await["status"], "Completed");
    let health = until(
        100,
        100,
        || c.process_get("query", "/health"),
        |(_, body)| body.contains("\"parked_events\":1"),
    )
    .await;
    assert!(health.1.contains("\"status\":\"degraded\""), "{health:?}");
    // The gateway's health says which upstream is degraded, and still
    // answers 200: it serves.
    let (code, gateway) = client.get("/health").await;
    assert_eq!(code, reqwest::StatusCode::OK, "{gateway}");
    assert_eq!(gateway["status"], "degraded", "{gateway}");
    assert_eq!(gateway["upstreams"]["query#1"], "degraded", "{gateway}");
    let (_, metrics) = c.process_get("query", "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("es_projections_dead_letters_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // The gateway's /metrics holds its own samples and every upstream's,
    // each labelled with its process.
    let (_, all) = c.process_get("gateway", "/metrics").await;
    assert!(all.contains("process=\"gateway\""), "{all}");
    assert!(
        all.lines()
            .any(|l| l.starts_with("es_projections_dead_letters_total{")
                && l.contains("process=\"query@")
                && !l.ends_with(" 0")),
        "{all}"
    );
    let (code, _) = client.get(&format!("/api/orders/{poisoned}")).await;
    assert_eq!(code, reqwest::StatusCode::NOT_FOUND);

    // The operator reads the parked event, and a replay before any fix
    // leaves it parked with the model untouched: a NUL cannot be stored.
    let (code, parked) = client.get("/api/admin/read-model/parked").await;
    assert_eq!(code, reqwest::StatusCode::OK, "{parked}");
    assert_eq!(parked.as_array().map(Vec::len), Some(1), "{parked}");
    assert_eq!(parked[0]["stream_id"], format!("order-{poisoned}"));
    assert!(
        parked[0]["error"].as_str().unwrap().contains("0x00"),
        "{parked}"
    );
    let (code, report) = client
        .post("/api/admin/read-model/parked/replay", serde_json::json!({}))
        .await;
    assert_eq!(code, reqwest::StatusCode::OK, "{report}");
    assert_eq!(report["applied"], 0, "{report}");
    assert_eq!(report["still_parked"], 1, "{report}");
    // The command-line replay (`orders replay-parked`) does the same.
    let mut args = support::distributed::serve_args("unused");
    args.namespace = c.namespace.clone();
    let report = orders::distributed::replay_parked_events(&args)
        .await
        .unwrap();
    assert_eq!((report.applied, report.still_parked), (0, 1), "{report:?}");
    let (code, _) = client.get(&format!("/api/orders/{poisoned}")).await;
    assert_eq!(code, reqwest::StatusCode::NOT_FOUND);

    // A fault the operator can fix: a migration added a trigger that
    // refuses cancellation reasons of declined payments as invalid data
    // (SQLSTATE 22023). A declined order's cancellation is parked; the order
    // stays open in the read model.
    let model = format!("{}_rm", c.schema("query"));
    for sql in [
        format!(
            "CREATE FUNCTION \"{model}\".refuse_declined() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.cancellation_reason LIKE 'payment declined%' THEN \
             RAISE EXCEPTION 'refused by a bad migration' USING ERRCODE = '22023'; END IF; \
             RETURN NEW; END $$"
        ),
        format!(
            "CREATE TRIGGER refuse_declined BEFORE UPDATE ON \"{model}\".orders \
             FOR EACH ROW EXECUTE FUNCTION \"{model}\".refuse_declined()"
        ),
    ] {
        sqlx::query(&sql).execute(&c.pool).await.unwrap();
    }
    let declined = client
        .place("narrow@example.com", &[(&widget, 1)], "tok_decline")
        .await;
    let parked_now = || async { client.get("/api/admin/read-model/parked").await.1 };
    let parked = until(300, 100, parked_now, |p| {
        p.as_array().map(Vec::len) == Some(2)
    })
    .await;
    assert_eq!(parked.as_array().map(Vec::len), Some(2), "{parked}");
    assert_eq!(parked[1]["event_type"], "OrderCancelled", "{parked}");
    let (_, open) = client.get(&format!("/api/orders/{declined}")).await;
    assert_ne!(open["status"], "Cancelled", "{open}");
    // Fixed, then replayed: the cancellation is applied once, the NUL stays.
    sqlx::query(&format!(
        "DROP TRIGGER refuse_declined ON \"{model}\".orders"
    ))
    .execute(&c.pool)
    .await
    .unwrap();
    let (code, report) = client
        .post("/api/admin/read-model/parked/replay", serde_json::json!({}))
        .await;
    assert_eq!(code, reqwest::StatusCode::OK, "{report}");
    assert_eq!(
        (report["applied"].as_u64(), report["still_parked"].as_u64()),
        (Some(1), Some(1)),
        "{report}"
    );
    let (_, again) = client
        .post("/api/admin/read-model/parked/replay", serde_json::json!({}))
        .await;
    assert_eq!(again["applied"], 0, "{again}");
    let (_, fixed) = client.get(&format!("/api/orders/{declined}")).await;
    assert_eq!(fixed["status"], "Cancelled", "{fixed}");
    assert!(
        fixed["cancellation_reason"]
            .as_str()
            .unwrap()
            .starts_with("payment declined"),
        "{fixed}"
    );
    let (_, parked) = client.get("/api/admin/read-model/parked").await;
    assert_eq!(parked.as_array().map(Vec::len), Some(1), "{parked}");
}

/// Every process declares every group's queues at start-up: an order event
/// published while only the payment service runs waits in the query
/// service's queue instead of being lost to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_declares_the_queues_of_services_it_does_not_run() {
    use es_core::{EventBus, Message, Metadata, Payload};
    use orders::system::groups;

    let mut args = serve_args("ttopo");
    args.services = Some(vec!["payment".into()]);
    let namespace = args.namespace.clone();
    let node = orders::distributed::start(&args, Duration::from_secs(30))
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
        source: None,
    };
    // The saga takes order events in the order service's writes, and
    // inventory and payment events from its queue.
    let reserved = Message {
        message_id: uuid::Uuid::now_v7(),
        topic: orders::messages::topics::INVENTORY.into(),
        message_type: "InventoryReserved".into(),
        ..created.clone()
    };
    bus.publish(&[created, reserved]).await.unwrap();
    let query_depth = || async { bus.queue_depth(groups::QUERY).await.unwrap() };
    let depth = until(50, 100, query_depth, |d| *d == 1).await;
    assert_eq!(
        depth, 1,
        "the order event was not kept for the query service"
    );
    assert_eq!(bus.queue_depth(groups::SAGA).await.unwrap(), 1);
    node.shutdown().await;
    delete_groups(&bus).await;
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
    use es_core::replica::{ReplicaHandler, Source};
    use es_core::{EventBus, EventStore, ExpectedVersion, Metadata, NewEvent, Payload, StreamId};
    use orders::distributed::{replay_orders, subscription};
    use orders::system::groups;

    let args = serve_args("treplay");
    let namespace = args.namespace.clone();
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
            .with_queue_expires(Some(Duration::from_secs(300))),
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
    let drained = || async {
        bus.queue_depth(groups::QUERY).await.unwrap() == 0
            && replica.read_stream(&order, 1, 10).await.unwrap().len() == 2
    };
    until(100, 100, drained, |done| *done).await;
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
    delete_groups(&bus).await;
    bus.close().await;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

/// The relay's process reports the events its store holds back behind an
/// open writer (`store_xmin_holdback_events`) and the transaction ids in
/// flight, and the gauge falls back to 0 once the writer commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holdback_gauge_counts_events_behind_an_open_writer() {
    use es_core::{EventStore, ExpectedVersion, Metadata, NewEvent, Payload, StreamId};
    use sqlx::Acquire;

    let mut args = serve_args("thold");
    args.services = Some(vec!["relay".into()]);
    let namespace = args.namespace.clone();
    let node = orders::distributed::start(&args, Duration::from_secs(30))
        .await
        .unwrap();
    let pool = es_postgres::PgConfig::from_url(&database_url())
        .unwrap()
        .pool()
        .await
        .unwrap();
    let store = es_postgres::PgEventStore::new(pool.clone(), args.schema("order"));
    // A writer that has taken its transaction id and not committed.
    let mut conn = pool.acquire().await.unwrap();
    let mut open = conn.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .unwrap();
    let events = (0..3)
        .map(|_| {
            NewEvent::new(
                "Audited",
                1,
                Payload::from_json("{}").unwrap(),
                Metadata::new(),
            )
        })
        .collect();
    store
        .append(
            &StreamId::new("audit-1").unwrap(),
            ExpectedVersion::NoStream,
            events,
        )
        .await
        .unwrap();
    let gauge = |value: &'static str| {
        move |text: &String| {
            text.lines()
                .any(|l| l == format!("store_xmin_holdback_events{{store=\"order\"}} {value}"))
        }
    };
    // What the process's /metrics answers (the gauges measured per scrape).
    let router = node.router();
    let metrics = || {
        let router = router.clone();
        async move {
            use tower::ServiceExt;
            let request = axum::http::Request::get("/metrics")
                .body(axum::body::Body::empty())
                .unwrap();
            let response = router.oneshot(request).await.unwrap();
            assert!(response.status().is_success());
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            String::from_utf8(bytes.to_vec()).unwrap()
        }
    };
    let held = until(100, 100, metrics, gauge("3")).await;
    assert!(gauge("3")(&held), "{held}");
    assert!(
        held.lines()
            .any(|l| l.starts_with("store_xids_in_flight{store=\"order\"}") && !l.ends_with(" 0")),
        "{held}"
    );
    open.commit().await.unwrap();
    // Another test's older writer may hold the horizon a while longer.
    let released = until(600, 100, metrics, gauge("0")).await;
    assert!(gauge("0")(&released), "{released}");
    node.shutdown().await;
    for service in ["order", "inventory", "payment", "notification", "query"] {
        sqlx::query(&format!(
            "DROP SCHEMA IF EXISTS \"{namespace}_{service}\" CASCADE"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
}
