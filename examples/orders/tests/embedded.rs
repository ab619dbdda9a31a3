//! The black-box suite on the embedded system (each scenario on a system of
//! its own, and all of them on one system served on a real socket), and what
//! only the embedded system can show: the store's events, a stopped read
//! model, the bus's dead letters, a manual clock.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the report.

mod support;

use std::sync::Arc;
use std::time::Duration;

use es_core::ManualClock;
use orders::Config;
use support::embedded::Embedded;
use support::{scenarios, Client, StatusCode};

async fn app() -> Arc<Embedded> {
    Embedded::with_timeout(Duration::from_secs(30)).await
}

macro_rules! on_embedded {
    ($($scenario:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $scenario() {
            scenarios::$scenario(&app().await.client()).await;
        }
    )*};
}

on_embedded!(
    bad_input,
    hostile_input,
    out_of_stock,
    declined_payment,
    cancellation,
    idempotency_keys,
    promotion_codes,
    queries,
    health_metrics_and_openapi
);

/// Every event of every stream of the order carries a traceparent whose
/// trace id is the order id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path() {
    let app = app().await;
    let id = scenarios::happy_path(&app.client()).await;
    app.one_trace(&id, &id.replace('-', "")).await;
}

/// With a secret configured, the API requires bearer tokens (over a real
/// socket, as a client sees it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication() {
    let secret = "a secret for the embedded test";
    let auth = orders::auth::AuthArgs {
        jwt_hs256_secret: Some(secret.into()),
        ..Default::default()
    };
    let config = Config {
        auth: auth.authenticator().unwrap(),
        ..Config::default()
    };
    let app = Embedded::start(config, true).await;
    scenarios::authentication(&app.client(), secret).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_timeout() {
    let app = Embedded::with_timeout(Duration::from_millis(300)).await;
    scenarios::payment_timeout(&app.client()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_on_one_system_over_a_real_socket() {
    let config = Config {
        payment_timeout: Duration::from_secs(2),
        ..Config::default()
    };
    let app = Embedded::start(config, true).await;
    scenarios::all(&app.client()).await;
}

/// A caller's W3C `traceparent` (the gateway's span, in the distributed
/// deployment) makes the whole order one trace with the caller's span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_traceparent_is_the_orders_trace() {
    let app = app().await;
    let c = app.client();
    let widget = c.product("Traced", "1.00", 5).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = Client::order_body("t@example.com", &[(&widget, 1)], "tok_ok");
    let place = |traceparent: String| {
        let (c, body) = (c.clone(), body.clone());
        async move {
            c.call(
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
    assert_eq!(c.finished(id).await["status"], "Completed");
    for e in app.one_trace(id, trace).await {
        let tp = e.metadata.traceparent.unwrap().to_string();
        // A span of its own, not the caller's.
        assert!(!tp.contains("00f067aa0ba902b7"), "{tp}");
    }

    // A malformed traceparent is ignored: the order id is the trace id.
    let (_, placed) = place("not-a-traceparent".to_owned()).await;
    let id = placed["order_id"].as_str().unwrap();
    c.finished(id).await;
    let events = app.order_events(id).await;
    let created = events
        .iter()
        .find(|e| e.event_type.as_ref() == "OrderCreated")
        .unwrap();
    let tp = created.metadata.traceparent.unwrap().to_string();
    assert!(tp.contains(&id.replace('-', "")), "{tp}");
}

/// A read model that will not reach the asked position answers 503
/// `not_caught_up` (the client may retry), not a 500 and not a stale order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_that_has_stopped_is_a_503() {
    let app = app().await;
    let c = app.client();
    let widget = c.product("Widget", "12.50", 10).await;
    // The read model stops following the store.
    app.system.query.projection().stop().await.unwrap();
    let (code, placed) = c.order("ada@example.com", &[(&widget, 1)], "tok_ok").await;
    assert_eq!(code, StatusCode::ACCEPTED, "{placed}");
    let id = placed["order_id"].as_str().unwrap();
    let position = placed["position"].as_str().unwrap();
    let started = std::time::Instant::now();
    let (code, answer) = c
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

/// Many buyers race for scarce stock: exactly as many complete as there are
/// units, nothing stays reserved, nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_buyers_for_scarce_stock() {
    let app = app().await;
    let c = app.client();
    let mut rng = fastrand::Rng::with_seed(2026);
    let mut rounds: Vec<(u64, usize)> = vec![(5, 40), (1, 25), (12, 60), (0, 10), (7, 7)];
    rounds.extend((0..35).map(|_| (rng.u64(0..8), rng.usize(1..30))));
    for (round, (units, buyers)) in rounds.into_iter().enumerate() {
        let product = c
            .product(&format!("Scarce {round}"), "9.99", units as i64)
            .await;
        let mut tasks = Vec::new();
        for b in 0..buyers {
            let (c, product) = (c.clone(), product.clone());
            tasks.push(tokio::spawn(async move {
                let id = c
                    .place(&format!("buyer{b}@example.com"), &[(&product, 1)], "tok_ok")
                    .await;
                c.finished(&id).await["status"].as_str().unwrap().to_owned()
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
        c.stock_is(&product, units.saturating_sub(buyers as u64), 0)
            .await;
    }
    assert_eq!(app.dead_letters(), 0, "no message was dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_30s_payment_deadline_on_a_manual_clock() {
    let clock = ManualClock::at("2026-01-01T00:00:00Z".parse().unwrap());
    let config = Config {
        clock: Arc::new(clock.clone()),
        deadline_tick: Duration::from_millis(10),
        ..Config::default()
    };
    let app = Embedded::start(config, false).await;
    let c = app.client();
    let widget = c.product("Widget", "3.00", 2).await;
    let id = c
        .place("jo@example.com", &[(&widget, 2)], "tok_timeout")
        .await;
    // Wait (real time) until stock is reserved and the deadline set.
    c.wait_status(&id, "InventoryConfirmed").await;
    c.settle().await;
    clock.advance(Duration::from_secs(29));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, o) = c.get(&format!("/api/orders/{id}")).await;
    assert_eq!(o["status"], "InventoryConfirmed", "29 s is not yet 30 s");
    clock.advance(Duration::from_secs(2));
    let order = c.finished(&id).await;
    assert_eq!(order["status"], "Cancelled");
    assert_eq!(order["cancellation_reason"], "payment timed out");
    c.stock_is(&widget, 2, 0).await;
}

/// The embedded read model lists no parked events and refuses a replay with
/// a JSON 409 that says why: it is rebuilt from the log at every start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_events_are_listed_and_a_replay_is_refused_in_memory() {
    let app = app().await;
    let client = app.client();
    let (code, parked) = client.get("/api/admin/read-model/parked").await;
    assert_eq!(code, StatusCode::OK, "{parked}");
    assert_eq!(parked, serde_json::json!([]));
    let (code, body) = client
        .post("/api/admin/read-model/parked/replay", serde_json::json!({}))
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("every start"),
        "{body}"
    );
}
