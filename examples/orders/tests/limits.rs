//! The server's limits over real sockets: slow and idle clients are cut off
//! and never keep other clients waiting; requests over the in-flight cap or
//! the time limit are answered 503 with `Retry-After`.

#![allow(clippy::unwrap_used)] // A panic is the report.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use orders::http::{serve_on, Limits};
use orders::{Config, System};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Serves a fresh embedded system within `limits`; dropping the sender stops it.
async fn serve(limits: Limits) -> (SocketAddr, oneshot::Sender<()>, System) {
    let system = System::embedded(Config::default()).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_on(listener, system.router(), limits, async move {
        let _ = stopped.await;
    }));
    (addr, stop, system)
}

/// Whether the server closed `stream` (end of file or a reset) within `patience`.
async fn closed_within(stream: &mut TcpStream, patience: Duration) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(patience, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A 408 or similar before closing is fine: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_neither_hold_others_nor_stay_open() {
    let header_timeout = Duration::from_secs(2);
    let (addr, _stop, _system) = serve(Limits {
        header_timeout_secs: header_timeout.as_secs(),
        ..Limits::default()
    })
    .await;

    // 250 clients send half a request head and stall; 250 send nothing.
    let mut held = Vec::new();
    for i in 0..500 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: orders\r\nX-Slow: ")
                .await
                .unwrap();
        }
        held.push(stream);
    }
    let opened = Instant::now();

    // Meanwhile every other client is answered well within 2 s.
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let started = Instant::now();
        let response = client
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(2), "answered after {waited:?}");
    }

    // Every slow or idle connection is closed by the header timeout.
    for (i, stream) in held.iter_mut().enumerate() {
        let left = (header_timeout + Duration::from_secs(3)).saturating_sub(opened.elapsed());
        assert!(
            closed_within(stream, left.max(Duration::from_millis(100))).await,
            "connection {i} still open {:?} after it was opened",
            opened.elapsed()
        );
    }
    assert!(opened.elapsed() < header_timeout + Duration::from_secs(3));
}

/// An order whose payment never answers: it stays pending for the 30 s
/// payment window, so `wait_terminal_ms` holds its request that long.
async fn pending_order(addr: SocketAddr, client: &reqwest::Client) -> String {
    let product: Value = client
        .post(format!("http://{addr}/api/products"))
        .json(&json!({"name": "Lamp", "price": "3.00", "stock": 5}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let placed = client
        .post(format!("http://{addr}/api/orders"))
        .json(&json!({
            "customer_email": "slow@example.com",
            "items": [{"product_id": product["product_id"], "quantity": 1}],
            "payment": {"card_token": "tok_timeout"},
        }))
        .send()
        .await
        .unwrap();
    let placed: Value = placed.json().await.unwrap();
    placed["order_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_cap_or_the_time_limit_are_503_with_retry_after() {
    let (addr, _stop, _system) = serve(Limits {
        max_in_flight: 1,
        request_timeout_secs: 1,
        ..Limits::default()
    })
    .await;
    let client = reqwest::Client::new();
    let order = pending_order(addr, &client).await;
    let long_poll = format!("http://{addr}/api/orders/{order}?wait_terminal_ms=5000");

    // One request holds the only slot; the next is shed at once.
    let holder = tokio::spawn({
        let (client, url) = (client.clone(), long_poll.clone());
        async move {
            let started = Instant::now();
            let response = client.get(url).send().await.unwrap();
            (
                response.status(),
                started.elapsed(),
                response.headers().clone(),
            )
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let shed = client
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(shed.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.headers()["retry-after"], "1");
    assert!(started.elapsed() < Duration::from_millis(500));
    let body: Value = shed.json().await.unwrap();
    assert_eq!(body["code"], "overloaded");

    // The holder runs out of time after 1 s, not 5.
    let (status, took, headers) = holder.await.unwrap();
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // With the slot free again, requests are served.
    let ok = client
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), reqwest::StatusCode::OK);
}
