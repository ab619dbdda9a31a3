//! The relay: moves events from the store's log to the bus, at least once and
//! in log order. The store is the outbox; nothing writes to both.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::bus::{BusError, EventBus, Message};
use crate::command::{CommandRefused, COMMAND_REFUSED};
use crate::saga::{CommandRecord, COMMAND_RECORD};
use crate::{CancellationToken, CheckpointStore, EventStore, Position, RecordedEvent, StoreError};

/// Maps a recorded event to the message the relay publishes, if any.
pub type Route = Arc<dyn Fn(&RecordedEvent) -> Option<Message> + Send + Sync>;

/// The default route: a saga's command records become the commands they
/// hold; refusal records ([`CommandRefused`]) become `CommandRefused`
/// messages on their stream's category; other `$`-records (deadlines) stay in
/// the store; every other event is published on the topic named by its
/// stream's category.
pub fn default_route(event: &RecordedEvent) -> Option<Message> {
    match &*event.event_type {
        COMMAND_REFUSED => Some(CommandRefused::message_from(event)),
        COMMAND_RECORD => match CommandRecord::message_from(event) {
            Ok(message) => Some(message),
            Err(error) => {
                tracing::error!(event_id = %event.event_id, %error, "malformed command record not relayed");
                None
            }
        },
        t if t.starts_with('$') => None,
        _ => Some(Message::from_event(event.stream_id.category(), event)),
    }
}

/// The [`default_route`], except that the state events of the given saga
/// types (streams `<saga type>-<id>`) stay in the store: a saga's state is its
/// own business, not a contract other services consume, and publishing it
/// costs a broker round trip per step. Its command records are still relayed.
///
/// ```
/// use es_core::relay::route_without_saga_state;
/// let route = route_without_saga_state(&["order_saga"]);
/// # let _ = route;
/// ```
pub fn route_without_saga_state(saga_types: &[&str]) -> Route {
    let private: Vec<String> = saga_types.iter().map(|t| (*t).to_owned()).collect();
    Arc::new(move |event: &RecordedEvent| {
        let internal = &*event.event_type != COMMAND_RECORD
            && private.iter().any(|t| t == event.stream_id.category());
        if internal {
            None
        } else {
            default_route(event)
        }
    })
}

/// Whether a routing key is bound, by topic and message type.
type BoundKeys = HashMap<Arc<str>, HashMap<Arc<str>, bool>>;

/// `route`, keeping only the messages some consumer is bound to: those
/// whose routing key matches one of `bindings` (topic patterns, as
/// [`Subscription`](crate::Subscription)s bind). A system that declares
/// every consumer's bindings up front publishes nothing nobody reads: each
/// publish costs a broker round trip and a confirm, while the events stay in
/// the store, where a consumer added later catches up from.
///
/// ```
/// use std::sync::Arc;
/// use es_core::relay::{default_route, only_bound};
/// let route = only_bound(Arc::new(default_route), ["order.*", "stock.StockLow"]);
/// # let _ = route;
/// ```
pub fn only_bound(route: Route, bindings: impl IntoIterator<Item = impl Into<String>>) -> Route {
    let bindings: Vec<String> = bindings.into_iter().map(Into::into).collect();
    // A log holds few distinct routing keys: each is matched once.
    let decided: RwLock<BoundKeys> = RwLock::default();
    Arc::new(move |event: &RecordedEvent| {
        let message = route(event)?;
        let known = decided
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&*message.topic)
            .and_then(|types| types.get(&*message.message_type).copied());
        let bound = known.unwrap_or_else(|| {
            let key = message.routing_key();
            let bound = bindings
                .iter()
                .any(|pattern| crate::bus::topic_matches(pattern, &key));
            decided
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(Arc::clone(&message.topic))
                .or_default()
                .insert(Arc::clone(&message.message_type), bound);
            bound
        });
        bound.then_some(message)
    })
}

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often a relay saves its checkpoint by default (see
/// [`Relay::with_checkpoint_every`]).
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Publishes the store's log to a bus, from a stored checkpoint.
///
/// Each batch is published with confirms, then the checkpoint advances past
/// it (saved at most every [`DEFAULT_CHECKPOINT_EVERY`], and when the relay
/// stops or falls idle). A crash republishes what was published since the
/// last save: delivery is at least once, and consumers deduplicate by
/// message id (the event id).
pub struct Relay {
    store: Arc<dyn EventStore>,
    bus: Arc<dyn EventBus>,
    checkpoints: Arc<dyn CheckpointStore>,
    name: String,
    batch_size: usize,
    route: Route,
    checkpoint_every: Duration,
    progress: watch::Sender<Position>,
    blocked: watch::Sender<Option<Blocked>>,
}

/// Why a relay is not moving: the batch it keeps publishing again was
/// refused. Read it from [`Relay::blocked`]; `None` there while batches are
/// confirmed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Blocked {
    /// The routing key of a message that must be delivered but reached no
    /// queue, when that is the cause: it heals only once someone binds a
    /// queue to it.
    pub unroutable: Option<String>,
    /// The last refusal.
    pub error: String,
    /// Attempts refused so far.
    pub attempts: u32,
}

impl Blocked {
    fn of(error: &BusError, attempts: u32) -> Self {
        Self {
            unroutable: match error {
                BusError::Unroutable { routing_key, .. } => Some(routing_key.clone()),
                _ => None,
            },
            error: error.to_string(),
            attempts,
        }
    }
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("name", &self.name)
            .field("batch_size", &self.batch_size)
            .field("position", &*self.progress.borrow())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay named `name` (its checkpoint's name), with batches of up to 256
    /// messages and the [`default_route`].
    pub fn new(
        name: impl Into<String>,
        store: Arc<dyn EventStore>,
        bus: Arc<dyn EventBus>,
        checkpoints: Arc<dyn CheckpointStore>,
    ) -> Self {
        Self {
            store,
            bus,
            checkpoints,
            name: name.into(),
            batch_size: 256,
            route: Arc::new(default_route),
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            progress: watch::Sender::new(Position::START),
            blocked: watch::Sender::new(None),
        }
    }

    /// Publishes batches of up to `batch_size` messages.
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Saves the checkpoint at most once per `interval` (and when the relay
    /// stops or falls idle) instead of after every batch: under load the
    /// checkpoint costs one write per interval, not one per batch. A crash
    /// republishes at most the batches of the last interval, which
    /// consumers deduplicate as any redelivery. Zero saves after every
    /// batch.
    #[must_use]
    pub fn with_checkpoint_every(mut self, interval: Duration) -> Self {
        self.checkpoint_every = interval;
        self
    }

    /// Routes events with `route` instead of the default.
    #[must_use]
    pub fn with_route(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// The position the relay has published up to, as it changes.
    pub fn progress(&self) -> watch::Receiver<Position> {
        self.progress.subscribe()
    }

    /// Whether the relay is held up by a batch the bus keeps refusing, and
    /// why, as it changes. A message that must be delivered but that no
    /// queue receives ([`BusError::Unroutable`]) holds the relay until a
    /// queue is bound: the relay logs it once as an error, with the routing
    /// key, and reports it here for health checks and gauges.
    pub fn blocked(&self) -> watch::Receiver<Option<Blocked>> {
        self.blocked.subscribe()
    }

    /// Runs until `stop` is cancelled. Bus failures are retried with backoff
    /// (the batch is published again); a failing store subscription is
    /// reopened from the checkpoint.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::sync::Arc;
    /// use es_core::{CancellationToken, InMemoryBus, InMemoryCheckpointStore, InMemoryEventStore, Relay};
    ///
    /// let relay = Relay::new(
    ///     "orders-relay",
    ///     Arc::new(InMemoryEventStore::new()),
    ///     Arc::new(InMemoryBus::new()),
    ///     Arc::new(InMemoryCheckpointStore::new()),
    /// );
    /// let stop = CancellationToken::new();
    /// let running = tokio::spawn({
    ///     let stop = stop.clone();
    ///     async move { relay.run(stop).await }
    /// });
    /// // At shutdown:
    /// stop.cancel();
    /// running.await.unwrap().unwrap();
    /// # });
    /// ```
    pub async fn run(&self, stop: CancellationToken) -> Result<(), RelayError> {
        let mut position = self
            .checkpoints
            .load(&self.name)
            .await?
            .unwrap_or(Position::START);
        self.progress.send_replace(position);
        // The position published but not yet saved, and when the last save
        // was.
        let mut unsaved: Option<Position> = None;
        let mut saved_at = Instant::now();
        'subscribe: loop {
            let mut log = self
                .store
                .subscribe_all(position)
                .ready_chunks(self.batch_size);
            loop {
                let due = saved_at + self.checkpoint_every;
                let batch = tokio::select! {
                    () = stop.cancelled() => {
                        self.flush(&mut unsaved).await;
                        return Ok(());
                    }
                    // Idle with a position not saved: save it now.
                    () = tokio::time::sleep_until(due), if unsaved.is_some() => {
                        self.flush(&mut unsaved).await;
                        saved_at = Instant::now();
                        continue;
                    }
                    batch = log.next() => batch,
                };
                if stop.is_cancelled() {
                    self.flush(&mut unsaved).await;
                    return Ok(());
                }
                let Some(batch) = batch else {
                    self.flush(&mut unsaved).await;
                    return Ok(());
                };
                let mut events = Vec::with_capacity(batch.len());
                let mut failed = None;
                for item in batch {
                    match item {
                        Ok(event) => events.push(event),
                        Err(error) => failed = Some(error),
                    }
                }
                if let Some(last) = events.last() {
                    let last = last.position;
                    let messages: Vec<Message> =
                        events.iter().filter_map(|e| (self.route)(e)).collect();
                    self.publish(&messages, &stop, &mut unsaved).await;
                    if stop.is_cancelled() {
                        self.flush(&mut unsaved).await;
                        return Ok(());
                    }
                    position = last;
                    self.progress.send_replace(position);
                    unsaved = Some(position);
                    if saved_at.elapsed() >= self.checkpoint_every {
                        self.flush(&mut unsaved).await;
                        saved_at = Instant::now();
                    }
                }
                if let Some(error) = failed {
                    tracing::warn!(relay = %self.name, %error, "store subscription failed; resubscribing");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'subscribe;
                }
            }
        }
    }

    /// Publishes `messages`, again and again while the bus refuses them;
    /// the position published before them is saved while it waits.
    async fn publish(
        &self,
        messages: &[Message],
        stop: &CancellationToken,
        unsaved: &mut Option<Position>,
    ) {
        if messages.is_empty() {
            return;
        }
        let span =
            tracing::info_span!("es.relay.publish", relay = %self.name, messages = messages.len());
        crate::otel::continue_batch(&span, messages.iter().map(|m| m.metadata.traceparent));
        let mut delay = Duration::from_millis(50);
        let mut refused = 0u32;
        loop {
            match self.bus.publish(messages).instrument(span.clone()).await {
                Ok(()) => {
                    if refused > 0 {
                        tracing::info!(relay = %self.name, attempts = refused, "the bus takes the relay's messages again");
                        self.blocked.send_replace(None);
                    }
                    return;
                }
                Err(error) => {
                    refused += 1;
                    self.flush(unsaved).await;
                    let blocked = Blocked::of(&error, refused);
                    let changed = self
                        .blocked
                        .borrow()
                        .as_ref()
                        .is_none_or(|b| b.unroutable != blocked.unroutable);
                    if changed {
                        log_publish_failure(&self.name, &error);
                    } else {
                        tracing::debug!(relay = %self.name, %error, attempts = refused, "publish refused again; retrying");
                    }
                    self.blocked.send_replace(Some(blocked));
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Saves the position published but not yet saved, if any.
    async fn flush(&self, unsaved: &mut Option<Position>) {
        let Some(position) = unsaved.take() else {
            return;
        };
        // A checkpoint that fails to save only means republishing later.
        if let Err(error) = self.checkpoints.save(&self.name, position).await {
            tracing::warn!(relay = %self.name, %error, "checkpoint not saved");
        }
    }
}

/// Logs the first refusal of a blocking episode (and a change of its
/// cause); the retries that follow are logged at debug level.
fn log_publish_failure(relay: &str, error: &BusError) {
    match error {
        // No queue takes a message that must be delivered: that does not heal
        // by waiting, someone has to bind a queue.
        BusError::Unroutable { routing_key, .. } => {
            tracing::error!(
                relay,
                routing_key = %routing_key,
                %error,
                "the relay is blocked: no queue is bound to this routing key, and the message \
                 must be delivered. Declare the consumer group that takes it (subscribe it, or \
                 declare the topology before starting the relay), or publish this topic without \
                 `mandatory`; the relay retries until then"
            );
        }
        _ => tracing::warn!(relay, %error, "publish failed; retrying"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Metadata, Payload, Position, StreamId};

    fn recorded(stream: &str, event_type: &str, payload: Payload) -> RecordedEvent {
        RecordedEvent {
            event_id: uuid::Uuid::now_v7(),
            stream_id: StreamId::new(stream).unwrap(),
            stream_version: 1,
            position: Position::new(1, 0),
            event_type: event_type.into(),
            schema_version: 1,
            payload,
            metadata: Metadata::new(),
            recorded_at: chrono::Utc::now(),
            tags: Default::default(),
        }
    }

    /// Counts the saves of a checkpoint store.
    #[derive(Default)]
    struct CountingCheckpoints {
        inner: crate::InMemoryCheckpointStore,
        saves: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl CheckpointStore for CountingCheckpoints {
        async fn load(&self, name: &str) -> Result<Option<Position>, StoreError> {
            self.inner.load(name).await
        }
        async fn save(&self, name: &str, position: Position) -> Result<(), StoreError> {
            self.saves.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.save(name, position).await
        }
    }

    /// Many batches within one interval cost one checkpoint write, and the
    /// relay that falls idle, or stops, has saved the last position.
    #[tokio::test(start_paused = true)]
    async fn the_checkpoint_is_saved_once_per_interval_and_when_idle() {
        use crate::{EventStore, ExpectedVersion, InMemoryBus, InMemoryEventStore, NewEvent};
        let store = Arc::new(InMemoryEventStore::new());
        let checkpoints = Arc::new(CountingCheckpoints::default());
        let relay = Relay::new(
            "r",
            store.clone(),
            Arc::new(InMemoryBus::new()),
            checkpoints.clone(),
        )
        .with_batch_size(1)
        .with_checkpoint_every(Duration::from_secs(1));
        let stop = CancellationToken::new();
        let mut progress = relay.progress();
        let running = tokio::spawn({
            let stop = stop.clone();
            async move { relay.run(stop).await }
        });
        let stream = StreamId::new("s-1").unwrap();
        for _ in 0..20 {
            let event = NewEvent::new("E", 1, Payload::from_json("{}").unwrap(), Metadata::new());
            store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .unwrap();
        }
        let head = store.head().await.unwrap();
        progress.wait_for(|p| *p == head).await.unwrap();
        let saves = checkpoints.saves.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            saves <= 1,
            "{saves} saves for 20 batches within one interval"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(checkpoints.inner.load("r").await.unwrap(), Some(head));
        stop.cancel();
        running.await.unwrap().unwrap();
        assert_eq!(checkpoints.inner.load("r").await.unwrap(), Some(head));
    }

    /// A bus on which no queue receives messages until `bound` is set.
    struct UnboundBus {
        inner: crate::InMemoryBus,
        bound: std::sync::atomic::AtomicBool,
        refused: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl EventBus for UnboundBus {
        async fn publish(&self, messages: &[Message]) -> Result<(), BusError> {
            if !self.bound.load(std::sync::atomic::Ordering::SeqCst) {
                self.refused
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return Err(BusError::Unroutable {
                    message_id: messages[0].message_id,
                    routing_key: messages[0].routing_key(),
                });
            }
            self.inner.publish(messages).await
        }
        async fn declare(&self, subscription: &crate::bus::Subscription) -> Result<(), BusError> {
            self.inner.declare(subscription).await
        }
        async fn subscribe(
            &self,
            subscription: crate::bus::Subscription,
            handler: Arc<dyn crate::bus::MessageHandler>,
        ) -> Result<crate::bus::SubscriptionHandle, BusError> {
            self.inner.subscribe(subscription, handler).await
        }
    }

    /// A message no queue receives holds the relay and says so, with its
    /// routing key, until a queue is bound; then the relay moves on and
    /// reports that it does.
    #[tokio::test(start_paused = true)]
    async fn an_unroutable_message_blocks_the_relay_visibly_until_a_queue_is_bound() {
        use crate::{EventStore, ExpectedVersion, InMemoryEventStore, NewEvent};
        let store = Arc::new(InMemoryEventStore::new());
        let bus = Arc::new(UnboundBus {
            inner: crate::InMemoryBus::new(),
            bound: false.into(),
            refused: 0.into(),
        });
        let relay = Relay::new(
            "r",
            store.clone(),
            bus.clone(),
            Arc::new(crate::InMemoryCheckpointStore::new()),
        );
        let mut blocked = relay.blocked();
        let mut progress = relay.progress();
        assert_eq!(*blocked.borrow(), None);
        let stop = CancellationToken::new();
        let running = tokio::spawn({
            let stop = stop.clone();
            async move { relay.run(stop).await }
        });
        let event = NewEvent::new(
            "Opened",
            1,
            Payload::from_json("{}").unwrap(),
            Metadata::new(),
        );
        store
            .append(
                &StreamId::new("account-1").unwrap(),
                ExpectedVersion::Any,
                vec![event],
            )
            .await
            .unwrap();
        blocked.wait_for(Option::is_some).await.unwrap();
        let first = blocked.borrow_and_update().clone().unwrap();
        assert_eq!(first.unroutable.as_deref(), Some("account.Opened"));
        // It keeps retrying, with backoff, while nothing is bound.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let refused = bus.refused.load(std::sync::atomic::Ordering::SeqCst);
        assert!((4..=12).contains(&refused), "{refused} attempts in 10 s");
        assert!(blocked.borrow().as_ref().unwrap().attempts >= 4);
        assert_eq!(*progress.borrow_and_update(), Position::START);
        // A queue is bound: the relay publishes and is no longer blocked.
        bus.bound.store(true, std::sync::atomic::Ordering::SeqCst);
        blocked.wait_for(Option::is_none).await.unwrap();
        let head = store.head().await.unwrap();
        progress.wait_for(|p| *p == head).await.unwrap();
        stop.cancel();
        running.await.unwrap().unwrap();
    }

    #[test]
    fn saga_state_stays_and_everything_else_is_routed_as_by_default() {
        let route = route_without_saga_state(&["order_saga"]);
        let empty = || Payload::from_json("{}").unwrap();
        assert!(route(&recorded("order_saga-1", "Advanced", empty())).is_none());
        assert!(route(&recorded("order_saga-1", "$deadline", empty())).is_none());
        // The saga's command records are still relayed, as their commands.
        let command = CommandRecord {
            topic: "payment_commands".into(),
            command_type: "ChargeCard".into(),
            schema_version: 1,
            payload: empty(),
        };
        let record = recorded(
            "order_saga-1",
            COMMAND_RECORD,
            Payload::from_value(&command).unwrap(),
        );
        let message = route(&record).unwrap();
        assert_eq!(
            (&*message.topic, &*message.message_type, message.message_id),
            ("payment_commands", "ChargeCard", record.event_id)
        );
        let order = route(&recorded("order-1", "OrderCreated", empty())).unwrap();
        assert_eq!(&*order.topic, "order");
        // Another saga type is not private.
        assert!(route(&recorded("other_saga-1", "Advanced", empty())).is_some());
    }

    #[test]
    fn only_what_a_consumer_is_bound_to_is_published() {
        let route = only_bound(Arc::new(default_route), ["order.*", "stock.StockLow"]);
        let empty = || Payload::from_json("{}").unwrap();
        let published = |stream: &str, event_type: &str| {
            route(&recorded(stream, event_type, empty())).map(|m| m.routing_key())
        };
        assert_eq!(
            published("order-1", "OrderCreated").as_deref(),
            Some("order.OrderCreated")
        );
        assert_eq!(
            published("stock-1", "StockLow").as_deref(),
            Some("stock.StockLow")
        );
        assert_eq!(published("stock-1", "StockCounted"), None);
        assert_eq!(published("payment-1", "PaymentTaken"), None);
        // What the inner route keeps back stays back.
        assert_eq!(published("order-1", "$deadline"), None);
    }
}
