//! The black-box tests' view of a deployment of the orders system: a
//! [`Deployment`] answers HTTP requests and a few questions only it can answer
//! (emails sent, payment state, when it is quiet); a [`Client`] holds the
//! domain helpers, written once over any deployment. `embedded` is the
//! in-process system, `distributed` the `orders` processes behind the gateway,
//! and `scenarios` the suite both run.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

pub mod distributed;
pub mod embedded;
pub mod scenarios;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
pub use reqwest::StatusCode;
use serde_json::{json, Value};

/// A running orders system, seen from outside.
#[async_trait]
pub trait Deployment: Send + Sync {
    /// Sends one request: its status and body (JSON, else the text as a JSON
    /// string, `Null` when empty), or why no answer came.
    async fn send(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<(StatusCode, Value), String>;
    /// Returns once the order service knows the product (it learns products
    /// through the bus).
    async fn await_product(&self, product_id: &str);
    /// The kinds (`OrderConfirmed`, `OrderCancelled`) of the notifications
    /// sent so far for the order.
    async fn sent(&self, order_id: &str) -> Vec<String>;
    /// The order's payment: `None`, `Authorised`, `Declined` or `Refunded`.
    async fn payment_state(&self, order_id: &str) -> String;
    /// A fingerprint of everything stored: equal before and after requests
    /// that write nothing.
    async fn written(&self) -> String;
    /// Returns once nothing is in flight.
    async fn settle(&self);
    /// How long an order waits for its payment.
    fn payment_timeout(&self) -> Duration;
    /// Whether the read model knows the store's head, and so refuses at once
    /// a `min_position` no write answered. The distributed query service, a
    /// replica, cannot tell such a position from one it has not reached yet:
    /// it answers 503 `not_caught_up` after its longest wait.
    fn knows_the_head(&self) -> bool;
    /// Whether a gateway answers a path no service takes: 404 `not_found`
    /// where a service answers 404 `no_route`.
    fn behind_gateway(&self) -> bool;
    /// Metrics this deployment exports beyond every deployment's.
    fn extra_metrics(&self) -> &'static [&'static str];
    /// Counters of this deployment that a completed order moves: `/metrics`
    /// shows each with a sample above zero.
    fn counted_metrics(&self) -> &'static [&'static str];
}

/// A deployment's HTTP client with the domain helpers.
#[derive(Clone)]
pub struct Client(pub Arc<dyn Deployment>);

/// Parses a response body: JSON, else the text as a JSON string, `Null` when
/// empty.
pub fn decode(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into()))
    }
}

/// An HTTP server at `base`, over a real socket.
pub struct Http {
    pub base: String,
    pub client: reqwest::Client,
}

impl Http {
    pub fn new(base: String) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Self { base, client }
    }

    pub async fn send(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<(StatusCode, Value), String> {
        let mut req = self
            .client
            .request(method.parse().unwrap(), format!("{}{uri}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req
            .body(body)
            .send()
            .await
            .map_err(|e| format!("{method} {uri}: {e}"))?;
        let status = res.status();
        let bytes = res.bytes().await.map_err(|e| e.to_string())?;
        Ok((status, decode(&bytes)))
    }
}

/// A tag no other test run uses, for names, emails and keys on a shared
/// deployment.
pub fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// Calls `probe` until `done` holds for its answer, at most `tries` times
/// `every_ms` apart; its last answer.
pub async fn until<T, F: std::future::Future<Output = T>>(
    tries: usize,
    every_ms: u64,
    mut probe: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let mut answer = probe().await;
    for _ in 1..tries {
        if done(&answer) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
        answer = probe().await;
    }
    answer
}

/// `"42.50"` in cents (0 when absent).
pub fn cents(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or("0");
    let (units, fraction) = s.split_once('.').unwrap_or((s, "0"));
    units.parse::<i64>().unwrap() * 100 + format!("{fraction:0<2}").parse::<i64>().unwrap()
}

impl Client {
    pub fn new(deployment: Arc<dyn Deployment>) -> Self {
        Self(deployment)
    }

    /// A request with a JSON body (if any); panics when no answer comes.
    pub async fn call(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        match body {
            Some(b) => {
                let mut all = vec![("content-type", "application/json")];
                all.extend_from_slice(headers);
                self.raw(method, uri, &all, serde_json::to_vec(&b).unwrap())
                    .await
            }
            None => self.raw(method, uri, headers, Vec::new()).await,
        }
    }

    /// A request with these exact headers and body bytes.
    pub async fn raw(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        self.0
            .send(method, uri, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call("GET", uri, None, &[]).await
    }

    pub async fn post(&self, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", uri, Some(body), &[]).await
    }

    /// Creates a product and waits until the order service knows it.
    pub async fn product(&self, name: &str, price: &str, stock: i64) -> String {
        let (status, body) = self
            .post(
                "/api/products",
                json!({"name": name, "price": price, "stock": stock}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["product_id"].as_str().unwrap().to_owned();
        self.0.await_product(&id).await;
        id
    }

    /// The body of an order request.
    pub fn order_body(email: &str, items: &[(&str, i64)], token: &str) -> Value {
        let items: Vec<Value> = items
            .iter()
            .map(|(p, q)| json!({"product_id": p, "quantity": q}))
            .collect();
        json!({"customer_email": email, "items": items, "payment": {"card_token": token}})
    }

    pub async fn order(
        &self,
        email: &str,
        items: &[(&str, i64)],
        token: &str,
    ) -> (StatusCode, Value) {
        self.post("/api/orders", Self::order_body(email, items, token))
            .await
    }

    /// Places an order that must be accepted; its id.
    pub async fn place(&self, email: &str, items: &[(&str, i64)], token: &str) -> String {
        let (status, placed) = self.order(email, items, token).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
        placed["order_id"].as_str().unwrap().to_owned()
    }

    /// Places an order with an idempotency key, retrying (same key) until it
    /// is accepted: the gateway answers 5xx while a service is down.
    pub async fn place_retrying(
        &self,
        key: &str,
        email: &str,
        items: &[(&str, i64)],
        token: &str,
    ) -> String {
        let body = serde_json::to_vec(&Self::order_body(email, items, token)).unwrap();
        let headers = [
            ("content-type", "application/json"),
            ("Idempotency-Key", key),
        ];
        for _ in 0..1200 {
            if let Ok((status, v)) = self
                .0
                .send("POST", "/api/orders", &headers, body.clone())
                .await
            {
                if status == StatusCode::ACCEPTED {
                    return v["order_id"].as_str().unwrap().to_owned();
                }
                assert!(
                    status.is_server_error(),
                    "placing {key} answered {status}: {v}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("order {key} was never accepted");
    }

    /// Asks to cancel the order (with `body` as its JSON body, if any).
    pub async fn cancel(&self, id: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call("POST", &format!("/api/orders/{id}/cancel"), body, &[])
            .await
    }

    /// Waits until the order is Completed or Cancelled (up to a minute); its
    /// view.
    pub async fn finished(&self, id: &str) -> Value {
        match self.finished_within(id, Duration::from_secs(60)).await {
            Ok(view) => view,
            Err(last) => panic!("order {id} never finished; its last view: {last}"),
        }
    }

    /// Waits until the order is Completed or Cancelled, up to `limit`: its
    /// view, or the last view seen when it did not finish in time.
    pub async fn finished_within(&self, id: &str, limit: Duration) -> Result<Value, Value> {
        let uri = format!("/api/orders/{id}?wait_terminal_ms=1000");
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < limit {
            if let Ok((status, v)) = self.0.send("GET", &uri, &[], Vec::new()).await {
                assert!(
                    status == StatusCode::OK
                        || status == StatusCode::NOT_FOUND
                        || status.is_server_error(),
                    "{uri}: {status} {v}"
                );
                if matches!(v["status"].as_str(), Some("Completed" | "Cancelled")) {
                    return Ok(v);
                }
                last = v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last)
    }

    /// Waits (up to 5 s) until the order's view shows `status`.
    pub async fn wait_status(&self, id: &str, status: &str) {
        let uri = &format!("/api/orders/{id}");
        let (_, seen) = until(
            500,
            10,
            move || self.get(uri),
            |(_, o)| o["status"] == status,
        )
        .await;
        assert_eq!(seen["status"], status, "{seen}");
    }

    /// Once the deployment is quiet, the product shows `available` and
    /// `reserved` units (the distributed deployment may take a little longer
    /// to show the last release: polled for up to 10 s).
    pub async fn stock_is(&self, product: &str, available: u64, reserved: u64) {
        self.settle().await;
        let uri = &format!("/api/products/{product}");
        let units = |v: &Value| (v["available"].as_u64(), v["reserved"].as_u64());
        let want = (Some(available), Some(reserved));
        let (_, v) = until(100, 100, move || self.get(uri), |(_, v)| units(v) == want).await;
        assert_eq!(units(&v), want, "{product}: {v}");
    }

    /// The kinds of the notifications the order got, once it got one (up to
    /// 30 s) and the deployment is quiet.
    pub async fn emails(&self, order_id: &str) -> Vec<String> {
        self.wait_emails(order_id).await;
        self.settle().await;
        self.sent(order_id).await
    }

    /// The kinds of the notifications the order got, once it got one (up to
    /// 30 s).
    pub async fn wait_emails(&self, order_id: &str) -> Vec<String> {
        until(300, 100, move || self.sent(order_id), |s| !s.is_empty()).await
    }

    /// Waits (up to 30 s) until the order's payment is in `state`.
    pub async fn payment_becomes(&self, order_id: &str, state: &str) {
        let seen = until(
            300,
            100,
            move || self.payment_state(order_id),
            |s| s == state,
        )
        .await;
        assert_eq!(seen, state, "the payment of {order_id}");
    }

    /// How many orders `/api/orders?<query>` lists, page after page.
    pub async fn count_orders(&self, query: &str) -> usize {
        let mut uri = format!("/api/orders?{query}&limit=100");
        let mut n = 0;
        loop {
            let (code, page) = self.get(&uri).await;
            assert_eq!(code, StatusCode::OK, "{uri}: {page}");
            n += page["orders"].as_array().unwrap().len();
            match page["next_cursor"].as_str() {
                Some(c) => uri = format!("/api/orders?{query}&limit=100&cursor={c}"),
                None => return n,
            }
        }
    }

    pub async fn stats(&self) -> Value {
        let (code, stats) = self.get("/api/stats").await;
        assert_eq!(code, StatusCode::OK, "{stats}");
        stats
    }
}

impl std::ops::Deref for Client {
    type Target = dyn Deployment;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}
