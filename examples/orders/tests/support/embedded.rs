//! The embedded deployment: the whole system in this process, its router
//! called in process (`oneshot`) or served on a real socket.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::Request;
use axum::Router;
use http_body_util::BodyExt;
use orders::payment::PaymentState;
use orders::{Config, System};
use serde_json::Value;
use tower::ServiceExt;

use super::{decode, Client, Deployment, Http, StatusCode};

pub struct Embedded {
    pub system: System,
    pub router: Router,
    payment_timeout: Duration,
    socket: Option<(Http, tokio::task::JoinHandle<()>)>,
}

impl Embedded {
    /// The system; with `socket`, its router served on a real socket, which
    /// every request then goes through.
    pub async fn start(config: Config, socket: bool) -> Arc<Self> {
        let payment_timeout = config.payment_timeout;
        let system = System::embedded(config).await.expect("system starts");
        let router = system.router();
        let socket = if socket {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let served = router.clone();
            let server = tokio::spawn(async move { axum::serve(listener, served).await.unwrap() });
            Some((Http::new(base), server))
        } else {
            None
        };
        Arc::new(Self {
            system,
            router,
            payment_timeout,
            socket,
        })
    }

    /// The system with this payment window.
    pub async fn with_timeout(payment_timeout: Duration) -> Arc<Self> {
        let config = Config {
            payment_timeout,
            ..Config::default()
        };
        Self::start(config, false).await
    }

    pub fn client(self: &Arc<Self>) -> Client {
        Client::new(self.clone())
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

    /// Checks that every event of every stream of the order carries a
    /// traceparent whose trace id is `trace`, and that the order's events
    /// span its services' streams; returns them.
    pub async fn one_trace(&self, order_id: &str, trace: &str) -> Vec<es_core::RecordedEvent> {
        let mine = self.order_events(order_id).await;
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
                tp.starts_with(&format!("00-{trace}-")),
                "{} in {} has traceparent {tp:?}",
                e.event_type,
                e.stream_id
            );
        }
        mine
    }

    /// How many messages were dead-lettered, over every group.
    pub fn dead_letters(&self) -> usize {
        orders::system::groups::ALL
            .iter()
            .map(|g| self.system.memory_bus().unwrap().dead_letters(g).len())
            .sum()
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if let Some((_, server)) = &self.socket {
            server.abort();
        }
    }
}

#[async_trait]
impl Deployment for Embedded {
    async fn send(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<(StatusCode, Value), String> {
        if let Some((http, _)) = &self.socket {
            return http.send(method, uri, headers, body).await;
        }
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .router
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        Ok((status, decode(&bytes)))
    }

    async fn await_product(&self, product_id: &str) {
        let known = self
            .system
            .orders
            .catalog()
            .get_or_wait(product_id.parse().unwrap(), Duration::from_secs(5))
            .await;
        assert!(
            known.is_some(),
            "the order service never learnt {product_id}"
        );
    }

    async fn sent(&self, order_id: &str) -> Vec<String> {
        self.system
            .sent
            .for_order(order_id.parse().unwrap())
            .into_iter()
            .map(|n| format!("{:?}", n.kind))
            .collect()
    }

    async fn payment_state(&self, order_id: &str) -> String {
        let payment = self
            .system
            .payments
            .payment(order_id.parse().unwrap())
            .await
            .unwrap();
        match payment.state {
            PaymentState::None => "None",
            PaymentState::Authorised { .. } => "Authorised",
            PaymentState::Declined => "Declined",
            PaymentState::Refunded => "Refunded",
        }
        .to_owned()
    }

    async fn written(&self) -> String {
        format!("{:?}", self.system.store().head().await.unwrap())
    }

    /// Waits until every queue is drained and nothing is in flight.
    async fn settle(&self) {
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

    fn payment_timeout(&self) -> Duration {
        self.payment_timeout
    }

    fn knows_the_head(&self) -> bool {
        true
    }

    fn behind_gateway(&self) -> bool {
        false
    }

    fn extra_metrics(&self) -> &'static [&'static str] {
        &[]
    }

    fn counted_metrics(&self) -> &'static [&'static str] {
        &[]
    }
}
