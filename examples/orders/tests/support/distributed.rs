//! The distributed deployment: the orders system as separate OS processes
//! (the built `orders` binary) behind a gateway, over PostgreSQL, RabbitMQ
//! and Redis, with a real SMTP server (Python's aiosmtpd) recording every
//! email it receives.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use es_postgres::sqlx::{self, PgPool};
use serde_json::Value;
use tokio::process::{Child, Command};

use super::{until, Client, Deployment, Http, StatusCode};

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

/// The `orders serve` arguments of a deployment of its own (namespace
/// `<prefix>_<random>`) on the test backends, its queues expiring.
pub fn serve_args(prefix: &str) -> orders::distributed::ServeArgs {
    let mut args = orders::distributed::ServeArgs::defaults();
    args.namespace = format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    args.database_url = database_url();
    args.amqp_url = amqp_url();
    args.queue_expires_secs = Some(300);
    args
}

/// A port free now, below Linux's ephemeral range (32768 and up): a port the
/// kernel handed out for `:0` may meanwhile become the source port of an
/// outgoing connection (to PostgreSQL, say), and then the process restarted on
/// it cannot listen. Never the same port twice in one test binary.
fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
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

/// The services a process runs, its port, and the process while it runs.
struct Proc {
    services: String,
    port: u16,
    child: Option<Child>,
}

/// The deployment: one process per entry of the layout it started with,
/// plus a gateway and the SMTP server.
pub struct Cluster {
    pub namespace: String,
    pub pool: PgPool,
    http: Http,
    procs: Mutex<BTreeMap<String, Proc>>,
    smtp: Mutex<Option<Child>>,
    smtp_port: u16,
    mail_log: PathBuf,
    logs: PathBuf,
    payment_timeout: Duration,
    /// Environment variables every process gets besides the deployment's.
    env: Vec<(String, String)>,
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

/// The schemas a deployment's services create.
const SCHEMAS: [&str; 6] = [
    "order",
    "inventory",
    "payment",
    "notification",
    "query",
    "query_rm",
];

impl Cluster {
    /// Starts the SMTP server, `workers` (name -> service list) and a
    /// gateway, each its own process, and waits until all answer.
    pub async fn start(
        test: &str,
        workers: &[(&str, &str)],
        payment_timeout: Duration,
    ) -> Arc<Self> {
        Self::start_with_env(test, workers, payment_timeout, &[]).await
    }

    /// As [`Cluster::start`], every process with `env` set too.
    pub async fn start_with_env(
        test: &str,
        workers: &[(&str, &str)],
        payment_timeout: Duration,
        env: &[(&str, &str)],
    ) -> Arc<Self> {
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
        let gateway_port = free_port();
        let cluster = Self {
            namespace,
            pool,
            http: Http::new(format!("http://127.0.0.1:{gateway_port}")),
            procs: Mutex::new(BTreeMap::new()),
            smtp: Mutex::new(Some(smtp)),
            smtp_port,
            mail_log,
            logs,
            payment_timeout,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        for (name, services) in workers {
            cluster.spawn(name, services, free_port());
        }
        for (name, _) in workers {
            cluster.wait_healthy(name).await;
        }
        cluster.spawn("gateway", "gateway", gateway_port);
        cluster.wait_healthy("gateway").await;
        Arc::new(cluster)
    }

    pub fn client(self: &Arc<Self>) -> Client {
        Client::new(self.clone())
    }

    fn urls(&self, service: &str) -> String {
        self.procs
            .lock()
            .unwrap()
            .values()
            .filter(|p| p.services.split(',').any(|s| s == service))
            .map(|p| format!("http://127.0.0.1:{}", p.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&self, name: &str, services: &str, port: u16) {
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
            .args([
                "--payment-timeout",
                &format!("{}ms", self.payment_timeout.as_millis()),
            ])
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
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("the orders binary starts");
        self.procs.lock().unwrap().insert(
            name.to_owned(),
            Proc {
                services: services.to_owned(),
                port,
                child: Some(child),
            },
        );
    }

    fn port(&self, name: &str) -> u16 {
        self.procs.lock().unwrap()[name].port
    }

    /// GETs `path` from the process `name` itself (not through the gateway).
    pub async fn process_get(&self, name: &str, path: &str) -> (StatusCode, String) {
        let port = self.port(name);
        let response = self
            .http
            .client
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.text().await.unwrap())
    }

    pub async fn wait_healthy(&self, name: &str) {
        let port = self.port(name);
        for _ in 0..600 {
            if let Ok(r) = self
                .http
                .client
                .get(format!("http://127.0.0.1:{port}/health"))
                .send()
                .await
            {
                if r.status().is_success() {
                    return;
                }
            }
            let exited = self
                .procs
                .lock()
                .unwrap()
                .get_mut(name)
                .and_then(|p| p.child.as_mut())
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
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
    pub async fn kill(&self, name: &str) {
        let child = self
            .procs
            .lock()
            .unwrap()
            .get_mut(name)
            .unwrap()
            .child
            .take();
        if let Some(mut child) = child {
            child.start_kill().unwrap();
            let _ = child.wait().await;
        }
    }

    /// Starts a killed process again on its port.
    pub async fn restart(&self, name: &str) {
        let (services, port) = {
            let procs = self.procs.lock().unwrap();
            (procs[name].services.clone(), procs[name].port)
        };
        self.spawn(name, &services, port);
        self.wait_healthy(name).await;
    }

    /// The process whose relay of `store` is the active one, from each
    /// process's own `/metrics` (`relay_active{store=...} 1`).
    pub async fn active_relay(&self, store: &str) -> Option<String> {
        let label = format!("store=\"{store}\"");
        // The gateway's /metrics merges every process's: ask the processes.
        let ports: Vec<(String, u16)> = self
            .procs
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n.as_str() != "gateway")
            .map(|(n, p)| (n.clone(), p.port))
            .collect();
        for (name, port) in ports {
            let url = format!("http://127.0.0.1:{port}/metrics");
            let Ok(response) = self.http.client.get(&url).send().await else {
                continue;
            };
            let Ok(text) = response.text().await else {
                continue;
            };
            let active = text.lines().any(|l| {
                l.starts_with("relay_active{") && l.contains(&label) && l.trim_end().ends_with(" 1")
            });
            if active {
                return Some(name);
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

    pub fn schema(&self, service: &str) -> String {
        format!("{}_{service}", self.namespace)
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

    /// Checks that the SMTP server received each subject once.
    pub fn one_email_each(&self) {
        for (subject, n) in self.mail() {
            assert_eq!(n, 1, "{subject} was sent {n} times");
        }
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

    /// What every service's store holds about the order `id`: each event
    /// whose stream or payload names it, in the order each store recorded
    /// them, with its stream. A failure's report.
    pub async fn trail(&self, id: &str) -> String {
        let mut out = String::new();
        for service in ["order", "inventory", "payment", "notification", "query"] {
            let schema = self.schema(service);
            let rows: Result<Vec<(String, String, String)>, _> = sqlx::query_as(&format!(
                "SELECT stream_id, event_type, recorded_at::text FROM \"{schema}\".events \
                 WHERE stream_id LIKE '%' || $1 || '%' OR payload::text LIKE '%' || $1 || '%' \
                 ORDER BY transaction_id, global_position"
            ))
            .bind(id)
            .fetch_all(&self.pool)
            .await;
            out.push_str(&format!("{schema}:\n"));
            match rows {
                Ok(rows) => {
                    for (stream, event_type, at) in rows {
                        out.push_str(&format!("  {at}  {stream}  {event_type}\n"));
                    }
                }
                Err(error) => out.push_str(&format!("  (unreadable: {error})\n")),
            }
        }
        out
    }

    /// Checks the invariants after a run: every order terminal, stock adds
    /// up per product, no payment taken twice, one email per order and kind.
    /// Returns (completed, cancelled).
    pub async fn check_invariants(
        self: &Arc<Self>,
        products: &[(String, u64)],
        orders: &[(String, Vec<(usize, i64)>)],
    ) -> (usize, usize) {
        let c = self.client();
        let mut sold = vec![0u64; products.len()];
        let (mut completed, mut cancelled) = (0, 0);
        let mut finals = Vec::new();
        for (id, lines) in orders {
            let v = match c.finished_within(id, Duration::from_secs(60)).await {
                Ok(v) => v,
                Err(last) => panic!(
                    "order {id} never finished; its last view: {last}\n{}\nthe processes' logs: {}",
                    self.trail(id).await,
                    self.logs.display()
                ),
            };
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
        // Stock settles once every compensation ran.
        for (i, (pid, initial)) in products.iter().enumerate() {
            assert!(sold[i] <= *initial, "{pid}: {} sold of {initial}", sold[i]);
            c.stock_is(pid, initial - sold[i], 0).await;
        }
        for (stream, n) in self.payments_per_order().await {
            assert_eq!(n, 1, "payment {stream} was taken {n} times");
        }
        // One email per order and kind.
        c.settle().await;
        for (id, status) in &finals {
            let kind = if status == "Completed" {
                "OrderConfirmed"
            } else {
                "OrderCancelled"
            };
            assert_eq!(c.wait_emails(id).await, [kind], "the emails of {id}");
        }
        self.one_email_each();
        (completed, cancelled)
    }

    /// Stops every process and drops the test's schemas and queues.
    pub async fn stop(&self) {
        let names: Vec<String> = self.procs.lock().unwrap().keys().cloned().collect();
        for name in names {
            self.kill(&name).await;
        }
        if let Some(mut smtp) = self.smtp.lock().unwrap().take() {
            let _ = smtp.start_kill();
        }
        for service in SCHEMAS {
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
            delete_groups(&bus).await;
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

/// Deletes every group's queues (the retry queue is named after the
/// deployment's retry delay).
pub async fn delete_groups(bus: &es_rabbit::RabbitBus) {
    for group in orders::system::groups::ALL {
        let subscription = es_core::Subscription::new(group, Vec::<String>::new())
            .with_retry_delay(orders::distributed::RETRY_DELAY);
        let _ = bus.delete_group(&subscription).await;
    }
}

#[async_trait]
impl Deployment for Cluster {
    async fn send(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<(StatusCode, Value), String> {
        self.http.send(method, uri, headers, body).await
    }

    /// Waits until the order service's catalog table holds the product.
    async fn await_product(&self, product_id: &str) {
        let uuid: uuid::Uuid = product_id.parse().unwrap();
        let sql = &format!(
            "SELECT count(*) FROM \"{}\".catalog WHERE product_id = $1",
            self.schema("order")
        );
        let pool = &self.pool;
        let count = move || async move {
            let n: Result<i64, _> = sqlx::query_scalar(sql).bind(uuid).fetch_one(pool).await;
            n.unwrap_or(0)
        };
        let n = until(200, 50, count, |n| *n == 1).await;
        assert_eq!(n, 1, "the order service never learnt product {product_id}");
        // Every order instance follows the table within 50 ms.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    /// From the subjects the SMTP server received (`Order <id>: <kind>`).
    async fn sent(&self, order_id: &str) -> Vec<String> {
        let text = std::fs::read_to_string(&self.mail_log).unwrap();
        let prefix = format!("Order {order_id}: ");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(str::to_owned)
            .collect()
    }

    /// From the last event of the order's payment stream.
    async fn payment_state(&self, order_id: &str) -> String {
        let last: Option<String> = sqlx::query_scalar(&format!(
            "SELECT event_type FROM \"{}\".events WHERE stream_id = $1 ORDER BY stream_version DESC LIMIT 1",
            self.schema("payment")
        ))
        .bind(format!("payment-{order_id}"))
        .fetch_optional(&self.pool)
        .await
        .unwrap();
        match last.as_deref() {
            None => "None",
            Some("PaymentSucceeded") => "Authorised",
            Some("PaymentDeclined") => "Declined",
            Some("PaymentRefunded") => "Refunded",
            Some(other) => panic!("unknown payment event {other}"),
        }
        .to_owned()
    }

    /// The number of events in each service's store.
    async fn written(&self) -> String {
        let mut counts = Vec::new();
        for service in SCHEMAS {
            let n: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM \"{}\".events",
                self.schema(service)
            ))
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1);
            counts.push(format!("{service}={n}"));
        }
        counts.join(",")
    }

    /// Waits (up to 30 s) until no service's store has grown for 300 ms.
    async fn settle(&self) {
        let mut last = self.written().await;
        let mut quiet = 0;
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.written().await;
            if now == last {
                quiet += 1;
                if quiet >= 3 {
                    return;
                }
            } else {
                quiet = 0;
                last = now;
            }
        }
    }

    fn payment_timeout(&self) -> Duration {
        self.payment_timeout
    }

    fn knows_the_head(&self) -> bool {
        false
    }

    fn behind_gateway(&self) -> bool {
        true
    }

    fn extra_metrics(&self) -> &'static [&'static str] {
        &[
            "bus_queue_depth",
            "relay_lag_events",
            "projection_lag_events",
            "gateway_request_seconds",
        ]
    }

    fn counted_metrics(&self) -> &'static [&'static str] {
        // es-rabbit's counters, from the processes behind the gateway: the
        // order process publishes (its relay) and consumes (the saga).
        &["es_rabbit_published_total", "es_rabbit_delivered_total"]
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

/// Places `n` orders over `products` from `concurrency` clients, each with a
/// key, retrying until accepted. Returns (order id, lines by product index).
pub async fn place_many(
    client: Client,
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
            let client = client.clone();
            async move {
                let id = client
                    .place_retrying(&key, &email, &[(&product, q)], token)
                    .await;
                (id, vec![(pid, q)])
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Creates `n` products named `<name> <i>` at `price` with `stock` units
/// each; returns (product id, initial stock) pairs.
pub async fn products(
    client: &Client,
    name: &str,
    price: &str,
    n: usize,
    stock: u64,
) -> Vec<(String, u64)> {
    let mut made = Vec::new();
    for i in 0..n {
        let id = client
            .product(&format!("{name} {i}"), price, stock as i64)
            .await;
        made.push((id, stock));
    }
    made
}
