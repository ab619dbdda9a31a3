//! Shared helpers for the integration tests (a real RabbitMQ at `AMQP_URL`,
//! default 127.0.0.1:5672).
// Test support: a panic is the failure report we want.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use es_core::{
    Delivery, InMemoryInbox, Inbox, Message, MessageHandler, Metadata, Outcome, Payload,
};
use es_rabbit::{RabbitBus, RabbitConfig};
use uuid::Uuid;

/// A config with a unique prefix (so tests never share exchanges or queues)
/// and the prefix as connection name (so a test can cut only its own
/// connections).
pub fn config(test: &str) -> RabbitConfig {
    // Logs when RUST_LOG asks for them.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let prefix = format!("t-{test}-{}.", &Uuid::new_v4().simple().to_string()[..8]);
    RabbitConfig::from_env()
        .with_connection_name(prefix.clone())
        .with_prefix(prefix)
        .with_reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        // A test that panics before deleting its queues leaves none behind.
        .with_queue_expires(Some(Duration::from_secs(1800)))
}

/// Connects, failing with the URL tried when the broker is absent.
pub async fn bus(config: RabbitConfig) -> RabbitBus {
    let url = config.url.clone();
    match RabbitBus::connect(config).await {
        Ok(bus) => bus,
        Err(error) => panic!("RabbitMQ is required at {url} (set AMQP_URL): {error}"),
    }
}

pub fn message(topic: &str, message_type: &str, n: u64) -> Message {
    Message {
        message_id: Uuid::now_v7(),
        topic: topic.into(),
        message_type: message_type.into(),
        schema_version: 1,
        payload: Payload::from_json(format!(r#"{{"n":{n}}}"#)).unwrap(),
        metadata: Metadata::new().with_correlation_id(Uuid::now_v7()),
        source: None,
    }
}

/// Waits (polling) until `check` is true; panics with `what` after `limit`.
/// The limit only turns a hang into a failure: it is generous on purpose.
pub async fn eventually<F: FnMut() -> bool>(what: &str, limit: Duration, mut check: F) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A handler that applies each message id once (through an inbox) and counts
/// both applications and deliveries.
#[derive(Clone, Default)]
pub struct Counter {
    pub inbox: Arc<InMemoryInbox>,
    pub applied: Arc<Mutex<HashMap<Uuid, u32>>>,
    pub deliveries: Arc<Mutex<u64>>,
}

impl Counter {
    pub fn applied_count(&self) -> usize {
        self.applied.lock().unwrap().len()
    }
    pub fn applied_twice(&self) -> usize {
        self.applied
            .lock()
            .unwrap()
            .values()
            .filter(|&&n| n > 1)
            .count()
    }
    pub fn deliveries(&self) -> u64 {
        *self.deliveries.lock().unwrap()
    }
}

#[async_trait::async_trait]
impl MessageHandler for Counter {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        *self.deliveries.lock().unwrap() += 1;
        match self
            .inbox
            .record("counter", delivery.message.message_id)
            .await
        {
            Ok(true) => {
                *self
                    .applied
                    .lock()
                    .unwrap()
                    .entry(delivery.message.message_id)
                    .or_default() += 1;
                Outcome::Ack
            }
            Ok(false) => Outcome::Ack,
            Err(error) => Outcome::retry(error),
        }
    }
}

/// Runs `rabbitmqctl` with `args`, returning stdout; panics when it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Closes every broker connection whose name starts with `name` (this test's
/// connections only), returning how many were closed.
pub fn close_connections(name: &str) -> usize {
    let table = rabbitmqctl(&["list_connections", "pid", "client_properties", "-q"]);
    let mut closed = 0;
    for line in table.lines() {
        let Some((pid, props)) = line.split_once('\t') else {
            continue;
        };
        if props.contains(name) {
            rabbitmqctl(&[
                "close_connection",
                pid.trim(),
                "es-rabbit test: connection cut",
            ]);
            closed += 1;
        }
    }
    closed
}

/// While alive, RabbitMQ's application is stopped; dropping it starts it
/// again and waits until the broker answers, even when the test panicked.
pub struct BrokerStopped;

impl BrokerStopped {
    pub fn stop() -> Self {
        rabbitmqctl(&["stop_app"]);
        Self
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        start_broker();
    }
}

pub fn start_broker() {
    let _ = Command::new("rabbitmqctl").arg("start_app").output();
    let _ = Command::new("rabbitmqctl")
        .args(["await_startup", "--timeout", "60"])
        .output();
    let addr = std::env::var("AMQP_URL")
        .ok()
        .and_then(|u| {
            u.split('@')
                .nth(1)
                .map(|h| h.split('/').next().unwrap_or(h).to_owned())
        })
        .unwrap_or_else(|| "127.0.0.1:5672".to_owned());
    let start = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() && start.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Deletes every queue and exchange under the bus's prefix (tests leave
/// nothing behind on the shared broker when they pass).
pub async fn cleanup(bus: &RabbitBus) {
    let prefix = bus.topology().prefix().to_owned();
    assert!(
        prefix.starts_with("t-"),
        "only test prefixes are cleaned up"
    );
    let list = |what: &str| -> Vec<String> {
        let json = rabbitmqctl(&[what, "name", "--formatter", "json", "-q"]);
        let rows: Vec<serde_json::Value> = serde_json::from_str(json.trim()).unwrap_or_default();
        rows.iter()
            .filter_map(|r| r["name"].as_str())
            .filter(|n| n.starts_with(&prefix))
            .map(str::to_owned)
            .collect()
    };
    let conn =
        lapin::Connection::connect(&bus.config().url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for queue in list("list_queues") {
        ch.queue_delete(
            queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    }
    for exchange in list("list_exchanges") {
        ch.exchange_delete(
            exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    }
    let _ = conn.close(200, "cleaned up".into()).await;
}
