//! A deployment of the orders system as separate OS processes (the built
//! `orders` binary) for the distributed tests, with a real SMTP server
//! (Python's aiosmtpd) recording every email it receives.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use es_postgres::sqlx::{self, PgPool};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A port free now, below Linux's ephemeral range (32768 and up): a port the
/// kernel handed out for `:0` may meanwhile become the source port of an
/// outgoing connection (to PostgreSQL, say), and then the process restarted on
/// it cannot listen. Never the same port twice in one test binary.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

const SMTP_SERVER: &str = r#"
import asyncio, sys
from aiosmtpd.controller import Controller
from email import message_from_bytes
out = sys.argv[2]
class Handler:
    async def handle_DATA(self, server, session, envelope):
        msg = message_from_bytes(envelope.content)
        with open(out, 'a') as f:
            f.write(msg['Subject'] + '\n')
        return '250 OK'
c = Controller(Handler(), hostname='127.0.0.1', port=int(sys.argv[1]))
c.start()
print('ready', flush=True)
import time
while True:
    time.sleep(3600)
"#;

pub struct Proc {
    pub service: String,
    pub port: u16,
    pub child: Child,
}

/// The deployment: one process per entry of `layout`, plus a gateway.
pub struct Cluster {
    pub namespace: String,
    pub gateway: String,
    pub client: reqwest::Client,
    pub pool: PgPool,
    procs: BTreeMap<String, Proc>,
    smtp: Child,
    pub smtp_port: u16,
    pub mail_log: PathBuf,
    logs: PathBuf,
    payment_timeout: String,
}

/// Every service its own process, plus a separate relay process.
pub const EVERY_SERVICE_APART: [(&str, &str); 6] = [
    ("order", "order"),
    ("inventory", "inventory"),
    ("payment", "payment"),
    ("notification", "notification"),
    ("query", "query"),
    ("relay", "relay"),
];

impl Cluster {
    /// Creates `n` products named `<name> <i>` at `price` with `stock` units
    /// each; returns (product id, initial stock) pairs.
    pub async fn products(
        &self,
        name: &str,
        price: &str,
        n: usize,
        stock: u64,
    ) -> Vec<(String, u64)> {
        let mut made = Vec::new();
        for i in 0..n {
            let id = self
                .product(&format!("{name} {i}"), price, stock as i64)
                .await;
            made.push((id, stock));
        }
        made
    }

    /// Starts the SMTP server, `workers` (name -> service list) and a
    /// gateway, each its own process, and waits until all answer.
    pub async fn start(test: &str, workers: &[(&str, &str)], payment_timeout: &str) -> Self {
        let namespace = format!(
            "t{}_{}",
            test,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("distributed")
            .join(&namespace);
        std::fs::create_dir_all(&logs).unwrap();
        let pool = es_postgres::PgConfig::from_url(&database_url())
            .unwrap()
            .max_connections(4)
            .pool()
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {} is not answering: {e}", database_url()));
        // Fail early, with the URL, when a backend is absent.
        redis_check().await;
        let smtp_port = free_port();
        let mail_log = logs.join("mail.txt");
        std::fs::write(&mail_log, "").unwrap();
        let script = logs.join("smtp.py");
        std::fs::write(&script, SMTP_SERVER).unwrap();
        let mut smtp = Command::new("python3")
            .arg(&script)
            .arg(smtp_port.to_string())
            .arg(&mail_log)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(logs.join("smtp.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs (the SMTP server needs python3 with aiosmtpd: scripts/services.sh ensure_smtp_tools)");
        let mut up = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", smtp_port))
                .await
                .is_ok()
            {
                up = true;
                break;
            }
            if let Ok(Some(status)) = smtp.try_wait() {
                panic!("the SMTP server (aiosmtpd) exited with {status}; is aiosmtpd installed? see {}", logs.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(up, "the SMTP server did not start on 127.0.0.1:{smtp_port}");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut cluster = Self {
            namespace,
            gateway: String::new(),
            client,
            pool,
            procs: BTreeMap::new(),
            smtp,
            smtp_port,
            mail_log,
            logs,
            payment_timeout: payment_timeout.to_owned(),
        };
        for (name, services) in workers {
            cluster.spawn(name, services, free_port()).await;
        }
        for (name, _) in workers {
            cluster.wait_healthy(name).await;
        }
        let gw_port = free_port();
        cluster.spawn("gateway", "gateway", gw_port).await;
        cluster.wait_healthy("gateway").await;
        cluster.gateway = format!("http://127.0.0.1:{gw_port}");
        cluster
    }

    fn urls(&self, service: &str) -> String {
        self.procs
            .values()
            .filter(|p| p.service.split(',').any(|s| s == service))
            .map(|p| format!("http://127.0.0.1:{}", p.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn spawn(&mut self, name: &str, services: &str, port: u16) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_orders"))
            .args([
                "serve",
                "--services",
                services,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["--payment-timeout", &self.payment_timeout])
            .env("DATABASE_URL", database_url())
            .env("AMQP_URL", amqp_url())
            .env("REDIS_URL", redis_url())
            .env("ORDERS_NAMESPACE", &self.namespace)
            .env("ORDERS_SMTP", format!("127.0.0.1:{}", self.smtp_port))
            .env("ORDERS_ORDER_URL", self.urls("order"))
            .env("ORDERS_INVENTORY_URL", self.urls("inventory"))
            .env("ORDERS_QUERY_URL", self.urls("query"))
            .env("ORDERS_PG_POOL", "4")
            // A run that dies before its teardown leaves no queues behind.
            .env("ORDERS_QUEUE_EXPIRES_SECS", "1800")
            .env(
                "RUST_LOG",
                "warn,orders=info,es_rabbit=info,es_postgres=info",
            )
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("the orders binary starts");
        self.procs.insert(
            name.to_owned(),
            Proc {
                service: services.to_owned(),
                port,
                child,
            },
        );
    }

    pub async fn wait_healthy(&mut self, name: &str) {
        let port = self.procs[name].port;
        for _ in 0..600 {
            if let Ok(r) = self
                .client
                .get(format!("http://127.0.0.1:{port}/health"))
                .send()
                .await
            {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.procs.get_mut(name).unwrap().child.try_wait() {
                panic!(
                    "{name} exited with {status}: see {}",
                    self.logs.join(format!("{name}.log")).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{name} did not become healthy: see {}", self.logs.display());
    }

    /// SIGKILLs a process.
    pub async fn kill(&mut self, name: &str) {
        let proc = self.procs.get_mut(name).unwrap();
        proc.child.start_kill().unwrap();
        let _ = proc.child.wait().await;
    }

    /// The process whose relay of `store` is the active one, from each
    /// process's own `/metrics` (`relay_active{store=...} 1`).
    pub async fn active_relay(&self, store: &str) -> Option<String> {
        let label = format!("store=\"{store}\"");
        // The gateway's /metrics merges every process's: ask the processes.
        for (name, p) in self.procs.iter().filter(|(n, _)| n.as_str() != "gateway") {
            let url = format!("http://127.0.0.1:{}/metrics", p.port);
            let Ok(response) = self.client.get(&url).send().await else {
                continue;
            };
            let Ok(text) = response.text().await else {
                continue;
            };
            let active = text.lines().any(|l| {
                l.starts_with("relay_active{") && l.contains(&label) && l.trim_end().ends_with(" 1")
            });
            if active {
                return Some(name.clone());
            }
        }
        None
    }

    /// Waits (up to `limit`) until a process other than `not` holds the active
    /// relay of `store`, and returns it (`not = ""`: any process).
    pub async fn relay_taken_over(&self, store: &str, not: &str, limit: Duration) -> String {
        let start = std::time::Instant::now();
        loop {
            match self.active_relay(store).await {
                Some(holder) if holder != not => return holder,
                _ => {}
            }
            assert!(
                start.elapsed() < limit,
                "no process took the {store} relay over within {limit:?} after {not} died"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts a killed process again on its port.
    pub async fn restart(&mut self, name: &str) {
        let (services, port) = {
            let p = &self.procs[name];
            (p.service.clone(), p.port)
        };
        self.spawn(name, &services, port).await;
        self.wait_healthy(name).await;
    }

    pub fn schema(&self, service: &str) -> String {
        format!("{}_{service}", self.namespace)
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.gateway));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = res.status();
        let text = res.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call("GET", path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", path, Some(body), &[]).await
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
        let uuid: uuid::Uuid = id.parse().unwrap();
        let sql = format!(
            "SELECT count(*) FROM \"{}\".catalog WHERE product_id = $1",
            self.schema("order")
        );
        for _ in 0..200 {
            let n: i64 = sqlx::query_scalar(&sql)
                .bind(uuid)
                .fetch_one(&self.pool)
                .await
                .unwrap_or(0);
            if n == 1 {
                // Every order instance follows the table within 50 ms.
                tokio::time::sleep(Duration::from_millis(150)).await;
                return id;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the order service never learnt product {id}");
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

    /// Places an order with an idempotency key, retrying (same key) until it
    /// is accepted: the gateway answers 5xx while a service is down.
    pub async fn order_retrying(
        &self,
        key: &str,
        email: &str,
        items: &[(&str, i64)],
        token: &str,
    ) -> String {
        place_retrying(&self.client, &self.gateway, key, email, items, token).await
    }

    /// Waits until the order is Completed or Cancelled; its view.
    pub async fn finished(&self, id: &str) -> Value {
        for _ in 0..240 {
            if let Ok(res) = self
                .client
                .get(format!(
                    "{}/api/orders/{id}?wait_terminal_ms=1000",
                    self.gateway
                ))
                .send()
                .await
            {
                if res.status() == StatusCode::OK {
                    let v: Value = res.json().await.unwrap();
                    if matches!(v["status"].as_str(), Some("Completed" | "Cancelled")) {
                        return v;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("order {id} never finished: see {}", self.logs.display());
    }

    /// The subjects the SMTP server received, counted.
    pub fn mail(&self) -> HashMap<String, usize> {
        let text = std::fs::read_to_string(&self.mail_log).unwrap();
        let mut counts = HashMap::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            *counts.entry(line.to_owned()).or_insert(0) += 1;
        }
        counts
    }

    /// Waits until the SMTP server received `subject` (up to 30 s).
    pub async fn wait_mail(&self, subject: &str) -> usize {
        for _ in 0..300 {
            if let Some(n) = self.mail().get(subject) {
                return *n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        0
    }

    /// Payment authorisations per order (from the payment service's store).
    pub async fn payments_per_order(&self) -> Vec<(String, i64)> {
        sqlx::query_as(&format!(
            "SELECT stream_id, count(*) FROM \"{}\".events WHERE event_type = 'PaymentSucceeded' GROUP BY stream_id",
            self.schema("payment")
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Checks the invariants after a run: every order terminal, stock adds
    /// up per product, no payment taken twice, one email per order and kind.
    /// Returns (completed, cancelled).
    pub async fn check_invariants(
        &self,
        products: &[(String, u64)],
        orders: &[(String, Vec<(usize, i64)>)],
    ) -> (usize, usize) {
        let mut sold = vec![0u64; products.len()];
        let (mut completed, mut cancelled) = (0, 0);
        let mut finals = Vec::new();
        for (id, lines) in orders {
            let v = self.finished(id).await;
            match v["status"].as_str() {
                Some("Completed") => {
                    completed += 1;
                    for (p, q) in lines {
                        sold[*p] += *q as u64;
                    }
                }
                _ => cancelled += 1,
            }
            finals.push((id.clone(), v["status"].as_str().unwrap().to_owned()));
        }
        // Stock settles once every compensation ran: poll until it adds up.
        for (i, (pid, initial)) in products.iter().enumerate() {
            let mut last = Value::Null;
            let mut ok = false;
            for _ in 0..200 {
                let (_, v) = self.get(&format!("/api/products/{pid}")).await;
                let available = v["available"].as_u64().unwrap_or(0);
                let reserved = v["reserved"].as_u64().unwrap_or(u64::MAX / 2);
                if reserved == 0 && available + sold[i] == *initial {
                    ok = true;
                    break;
                }
                last = v;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                ok,
                "stock of {pid} does not add up: initial {initial}, sold {}, now {last}",
                sold[i]
            );
        }
        for (stream, n) in self.payments_per_order().await {
            assert_eq!(n, 1, "payment {stream} was taken {n} times");
        }
        // One email per order and kind.
        for (id, status) in &finals {
            let kind = if status == "Completed" {
                "OrderConfirmed"
            } else {
                "OrderCancelled"
            };
            let subject = format!("Order {id}: {kind}");
            let n = self.wait_mail(&subject).await;
            assert_eq!(n, 1, "{subject} was sent {n} times");
        }
        for (subject, n) in self.mail() {
            assert_eq!(n, 1, "{subject} was sent {n} times");
        }
        (completed, cancelled)
    }

    /// Stops every process and drops the test's schemas and queues.
    pub async fn stop(mut self) {
        for p in self.procs.values_mut() {
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
        }
        let _ = self.smtp.start_kill();
        for service in [
            "order",
            "inventory",
            "payment",
            "notification",
            "query",
            "query_rm",
        ] {
            let _ = sqlx::query(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema(service)
            ))
            .execute(&self.pool)
            .await;
        }
        if let Ok(bus) = es_rabbit::RabbitBus::connect(
            es_rabbit::RabbitConfig::new(amqp_url()).with_prefix(format!("{}.", self.namespace)),
        )
        .await
        {
            for group in orders::system::groups::ALL {
                // The retry queue is named after the deployment's retry delay.
                let subscription = es_core::Subscription::new(group, Vec::<String>::new())
                    .with_retry_delay(orders::distributed::RETRY_DELAY);
                let _ = bus.delete_group(&subscription).await;
            }
            bus.close().await;
        }
        // The query service's cache keys live under `<namespace>:`.
        if let Ok(client) = redis::Client::open(redis_url().as_str()) {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{}:*", self.namespace))
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _: redis::RedisResult<()> =
                        redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
                }
            }
        }
    }
}

async fn redis_check() {
    let url = redis_url();
    let client =
        redis::Client::open(url.as_str()).unwrap_or_else(|e| panic!("Redis URL {url}: {e}"));
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis at {url} is not answering: {e}"));
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("Redis at {url}: {e}"));
}

/// Places an order with an idempotency key, retrying (same key) until it is
/// accepted: the gateway answers 5xx while a service is down.
pub async fn place_retrying(
    client: &reqwest::Client,
    gateway: &str,
    key: &str,
    email: &str,
    items: &[(&str, i64)],
    token: &str,
) -> String {
    let items: Vec<Value> = items
        .iter()
        .map(|(p, q)| json!({"product_id": p, "quantity": q}))
        .collect();
    let body = json!({"customer_email": email, "items": items, "payment": {"card_token": token}});
    for _ in 0..1200 {
        let res = client
            .post(format!("{gateway}/api/orders"))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await;
        if let Ok(res) = res {
            let status = res.status();
            if status == StatusCode::ACCEPTED {
                let v: Value = res.json().await.unwrap();
                return v["order_id"].as_str().unwrap().to_owned();
            }
            assert!(
                status.is_server_error(),
                "placing {key} answered {status}: {:?}",
                res.text().await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("order {key} was never accepted");
}

/// Places `n` orders over `products` from `concurrency` clients, each with a
/// key, retrying until accepted. Returns (order id, lines by product index).
pub async fn place_many(
    client: reqwest::Client,
    gateway: String,
    products: Vec<(String, u64)>,
    n: usize,
    concurrency: usize,
    tag: String,
) -> Vec<(String, Vec<(usize, i64)>)> {
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(|i| {
            let pid = i % products.len();
            let q = (i % 3) as i64 + 1;
            let token = if i % 10 == 9 { "tok_decline" } else { "tok_ok" };
            let key = format!("{tag}-{i}");
            let email = format!("c{}@example.com", i % 7);
            let product = products[pid].0.clone();
            let (client, gateway) = (client.clone(), gateway.clone());
            async move {
                let id =
                    place_retrying(&client, &gateway, &key, &email, &[(&product, q)], token).await;
                (id, vec![(pid, q)])
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}
