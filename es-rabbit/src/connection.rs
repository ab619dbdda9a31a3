//! One broker connection per bus, replaced when it breaks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use es_core::CancellationToken;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};

use crate::error::{bounded, redact};
use crate::{Error, RabbitConfig};

/// A live connection with its publishing channel (in confirm mode).
pub(crate) struct Live {
    pub(crate) connection: Connection,
    pub(crate) publisher: Channel,
    /// Which connection this is: 1 for the first, +1 per reconnect.
    pub(crate) generation: u64,
    /// Topic exchanges already declared on this connection.
    pub(crate) exchanges: Mutex<HashSet<String>>,
}

impl Live {
    pub(crate) fn healthy(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }

    pub(crate) fn exchange_declared(&self, name: &str) -> bool {
        self.exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(name)
    }

    pub(crate) fn mark_exchange(&self, name: String) {
        self.exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name);
    }

    /// Opens a channel in confirm mode, within `limit`.
    pub(crate) async fn confirm_channel(&self, limit: Duration) -> Result<Channel, Error> {
        bounded(limit, "open channel", async {
            let channel = self.connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        })
        .await
    }
}

/// Hands out the current connection, reconnecting when it is gone.
pub(crate) struct Connector {
    pub(crate) config: RabbitConfig,
    current: tokio::sync::Mutex<Option<Arc<Live>>>,
    generations: AtomicU64,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("url", &redact(&self.config.url))
            .field("generation", &self.generations.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Connector {
    pub(crate) fn new(config: RabbitConfig) -> Self {
        Self {
            config,
            current: tokio::sync::Mutex::new(None),
            generations: AtomicU64::new(0),
        }
    }

    /// The number of connections opened so far.
    pub(crate) fn generation(&self) -> u64 {
        self.generations.load(Ordering::SeqCst)
    }

    /// The current connection if it is healthy, else a new one (one attempt).
    pub(crate) async fn live(&self) -> Result<Arc<Live>, Error> {
        let mut current = self.current.lock().await;
        if let Some(live) = current.as_ref() {
            if live.healthy() {
                return Ok(Arc::clone(live));
            }
        }
        if let Some(old) = current.take() {
            tracing::info!(
                generation = old.generation,
                "RabbitMQ connection lost; reconnecting"
            );
        }
        let limit = self.config.operation_timeout;
        let live = match tokio::time::timeout(limit, self.connect()).await {
            Ok(live) => Arc::new(live?),
            Err(_) => {
                return Err(Error::Timeout {
                    operation: "connect",
                })
            }
        };
        *current = Some(Arc::clone(&live));
        Ok(live)
    }

    /// Like [`Connector::live`], retrying with exponential backoff (and
    /// jitter) until it succeeds; `None` when `stop` is cancelled first.
    pub(crate) async fn live_with_backoff(&self, stop: &CancellationToken) -> Option<Arc<Live>> {
        let mut delay = self.config.reconnect_min;
        loop {
            if stop.is_cancelled() {
                return None;
            }
            match self.live().await {
                Ok(live) => return Some(live),
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?delay, "cannot connect to RabbitMQ");
                }
            }
            let jitter = Duration::from_millis(fastrand::u64(0..=delay.as_millis() as u64 / 4 + 1));
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(delay + jitter) => {}
            }
            delay = (delay * 2).min(self.config.reconnect_max);
        }
    }

    /// Closes the current connection (consumers reconnect unless stopped).
    pub(crate) async fn close(&self) {
        let live = self.current.lock().await.take();
        if let Some(live) = live {
            let _ = live
                .connection
                .close(200, "closed by es-rabbit".into())
                .await;
        }
    }

    async fn connect(&self) -> Result<Live, Error> {
        let unavailable = |source| Error::Unavailable {
            url: redact(&self.config.url),
            source,
        };
        let next = self.generations.load(Ordering::SeqCst) + 1;
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("{}#{next}", self.config.connection_name).into());
        let connection = Connection::connect(&self.config.url, properties)
            .await
            .map_err(unavailable)?;
        let publisher = connection.create_channel().await.map_err(unavailable)?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        let generation = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::debug!(generation, "connected to RabbitMQ");
        Ok(Live {
            connection,
            publisher,
            generation,
            exchanges: Mutex::new(HashSet::new()),
        })
    }
}
