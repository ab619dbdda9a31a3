#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use orders::{Config, System};
use serde_json::{json, Value};
use tower::ServiceExt;

pub struct App {
    pub system: System,
    pub router: Router,
}

pub async fn app_with(config: Config) -> App {
    let system = System::embedded(config).await.expect("system starts");
    let router = system.router();
    App { system, router }
}

pub async fn app() -> App {
    app_with(Config {
        payment_timeout: Duration::from_secs(30),
        ..Config::default()
    })
    .await
}

impl App {
    pub async fn call(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&b).unwrap())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        self.raw(req).await
    }

    pub async fn raw(&self, req: Request<Body>) -> (StatusCode, Value) {
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, value)
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call("GET", uri, None, &[]).await
    }

    pub async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", uri, Some(body), &[]).await
    }

    pub async fn product(&self, name: &str, price: &str, stock: i64) -> String {
        let (status, body) = self
            .post(
                "/api/products",
                json!({"name": name, "price": price, "stock": stock}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["product_id"].as_str().unwrap().to_owned();
        // The order service learns products through the bus.
        let uuid = id.parse().unwrap();
        assert!(self
            .system
            .orders
            .catalog()
            .get_or_wait(uuid, Duration::from_secs(5))
            .await
            .is_some());
        id
    }

    pub async fn order(
        &self,
        email: &str,
        items: &[(&str, i64)],
        token: &str,
    ) -> (StatusCode, Value) {
        let items: Vec<Value> = items
            .iter()
            .map(|(p, q)| json!({"product_id": p, "quantity": q}))
            .collect();
        self.post(
            "/api/orders",
            json!({"customer_email": email, "items": items, "payment": {"card_token": token}}),
        )
        .await
    }

    /// Every event of the order, in every service's streams (by correlation
    /// id), in log order.
    pub async fn order_events(&self, order_id: &str) -> Vec<es_core::RecordedEvent> {
        let all = self
            .system
            .store()
            .read_all(es_core::Position::START, 100_000)
            .await
            .unwrap();
        all.into_iter()
            .filter(|e| {
                e.metadata.correlation_id.map(|c| c.to_string()).as_deref() == Some(order_id)
            })
            .collect()
    }

    /// Waits for the order's terminal status (bounded) and returns the order.
    pub async fn finished(&self, order_id: &str) -> Value {
        let (status, body) = self
            .get(&format!("/api/orders/{order_id}?wait_terminal_ms=10000"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Waits until every queue is drained and nothing is in flight.
    pub async fn settle(&self) {
        let bus = self.system.memory_bus().unwrap();
        let mut quiet = 0;
        for _ in 0..2000 {
            let busy: usize = orders::system::groups::ALL
                .iter()
                .map(|g| bus.queue_depth(g))
                .sum();
            if busy == 0 {
                quiet += 1;
            } else {
                quiet = 0;
            }
            if quiet >= 5 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the system did not settle");
    }
}
