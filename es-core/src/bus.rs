//! The message bus: confirmed publishing and subscriber groups whose handlers
//! answer ack, retry later, or dead-letter.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::{
    BoxError, CancellationToken, CodecError, DomainEvent, Metadata, Payload, RecordedEvent,
    StreamId,
};

/// A message on the bus: an event copied from the store, or a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique id; for an event, its event id. Consumers deduplicate by it.
    pub message_id: Uuid,
    /// The bounded context it belongs to (an exchange, for RabbitMQ).
    pub topic: Arc<str>,
    /// The stable type name of the payload.
    pub message_type: Arc<str>,
    /// The version of the payload's schema.
    pub schema_version: u32,
    /// The payload.
    pub payload: Payload,
    /// Correlation, causation, trace context and headers.
    pub metadata: Metadata,
    /// The stream whose event this message copies ([`Message::from_event`]
    /// sets it); `None` for a command and for anything not from a store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<StreamId>,
}

impl Message {
    /// The routing key: `<topic>.<message_type>`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.topic, self.message_type)
    }

    /// A copy of a recorded event, on `topic`, with the event id as message id.
    pub fn from_event(topic: impl Into<Arc<str>>, event: &RecordedEvent) -> Self {
        Self {
            message_id: event.event_id,
            topic: topic.into(),
            message_type: Arc::clone(&event.event_type),
            schema_version: event.schema_version,
            payload: event.payload.clone(),
            metadata: event.metadata.clone(),
            source: Some(event.stream_id.clone()),
        }
    }

    /// A typed message (an event or a command) with a fresh id.
    pub fn encode<M: DomainEvent>(
        topic: impl Into<Arc<str>>,
        message: &M,
        metadata: Metadata,
    ) -> Result<Self, CodecError> {
        let new = crate::EventCodec::<M>::new().encode(message, metadata)?;
        Ok(Self {
            message_id: new.event_id,
            topic: topic.into(),
            message_type: new.event_type,
            schema_version: new.schema_version,
            payload: new.payload,
            metadata: new.metadata,
            source: None,
        })
    }
}

/// Whether a RabbitMQ-style topic `pattern` matches a routing `key`: words are
/// separated by `.`, `*` matches exactly one word and `#` zero or more.
///
/// ```
/// use es_core::bus::topic_matches;
/// assert!(topic_matches("order.*", "order.OrderCreated"));
/// assert!(topic_matches("#", "payment.PaymentDeclined"));
/// assert!(topic_matches("order.#", "order"));
/// assert!(!topic_matches("order.*", "inventory.Reserved"));
/// ```
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    // Walks both word by word without allocating: it runs for every message,
    // group and binding on the in-process bus.
    fn go(mut p: std::str::Split<'_, char>, mut k: std::str::Split<'_, char>) -> bool {
        loop {
            match p.next() {
                None => return k.next().is_none(),
                Some("#") => loop {
                    // `#` takes zero words, then one more at each turn.
                    if go(p.clone(), k.clone()) {
                        return true;
                    }
                    if k.next().is_none() {
                        return false;
                    }
                },
                Some(word) => match k.next() {
                    Some(kw) if word == "*" || word == kw => {}
                    _ => return false,
                },
            }
        }
    }
    go(pattern.split('.'), key.split('.'))
}

/// A message handed to a handler.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Which attempt this is: 1 for the first delivery.
    pub attempt: u32,
}

/// A handler's answer to a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: remove the message.
    Ack,
    /// Failed for now: deliver again after the subscription's retry delay, until
    /// its attempts run out; then dead-letter.
    Retry {
        /// Why, for logs and the dead letter.
        reason: String,
    },
    /// Will never succeed: move to the dead letters with this reason.
    DeadLetter {
        /// Why, recorded with the dead letter.
        reason: String,
    },
}

impl Outcome {
    /// A retry with a reason.
    pub fn retry(reason: impl fmt::Display) -> Self {
        Self::Retry {
            reason: reason.to_string(),
        }
    }

    /// A dead letter with a reason.
    pub fn dead_letter(reason: impl fmt::Display) -> Self {
        Self::DeadLetter {
            reason: reason.to_string(),
        }
    }
}

/// A message a consumer group gave up on: its handler answered
/// [`Outcome::DeadLetter`], its attempts ran out, or (on a broker) it could
/// not be decoded. Both buses give dead letters back in this form: the
/// in-memory bus from
/// [`InMemoryBus::dead_letters`](crate::InMemoryBus::dead_letters), es-rabbit's
/// from its dead-letter queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message, when it could be decoded.
    pub message: Option<Message>,
    /// The message's payload as the bus carried it: all there is of a message
    /// that could not be decoded.
    pub body: Vec<u8>,
    /// Why it was given up on: the handler's reason, or the bus's.
    pub reason: String,
    /// Deliveries made before it was given up on (0 when the bus does not
    /// know).
    pub attempts: u32,
}

impl DeadLetter {
    /// A message given up on after `attempts` deliveries.
    pub fn new(message: Message, attempts: u32, reason: impl Into<String>) -> Self {
        Self {
            body: message.payload.as_str().as_bytes().to_vec(),
            message: Some(message),
            reason: reason.into(),
            attempts,
        }
    }

    /// A body that could not be decoded as a message.
    pub fn undecodable(body: Vec<u8>, attempts: u32, reason: impl Into<String>) -> Self {
        Self {
            message: None,
            body,
            reason: reason.into(),
            attempts,
        }
    }
}

/// What a subscriber does with each message. Object-safe.
#[async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    /// Handles one delivery. Must be idempotent: a message may be delivered
    /// more than once.
    async fn handle(&self, delivery: &Delivery) -> Outcome;
}

#[async_trait]
impl<F, Fut> MessageHandler for F
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Outcome> + Send,
{
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        self(delivery.clone()).await
    }
}

/// A consumer group: a durable queue bound to topic patterns, shared by every
/// consumer subscribed under the same group name (competing consumers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// The group's name (the queue's name).
    pub group: String,
    /// Topic patterns of routing keys (`<topic>.<message_type>`) to receive.
    pub bindings: Vec<String>,
    /// How many messages one consumer handles at once.
    pub prefetch: u16,
    /// Deliveries in all before a message that keeps failing is dead-lettered.
    pub max_attempts: u32,
    /// How long a message that asked to be retried waits.
    pub retry_delay: Duration,
}

impl Subscription {
    /// A group bound to `bindings`, with prefetch 16, 5 attempts and a 1 s
    /// retry delay.
    pub fn new(
        group: impl Into<String>,
        bindings: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            group: group.into(),
            bindings: bindings.into_iter().map(Into::into).collect(),
            prefetch: 16,
            max_attempts: 5,
            retry_delay: Duration::from_secs(1),
        }
    }

    /// Sets the prefetch.
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Sets the attempts before dead-lettering.
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Sets the retry delay.
    #[must_use]
    pub fn with_retry_delay(mut self, retry_delay: Duration) -> Self {
        self.retry_delay = retry_delay;
        self
    }
}

/// Why the bus refused or failed an operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The broker refused the message (a negative confirm).
    #[error("broker refused message {message_id}")]
    Nacked {
        /// The refused message.
        message_id: Uuid,
    },
    /// A mandatory message reached no queue.
    #[error("message {message_id} with routing key {routing_key} reached no queue")]
    Unroutable {
        /// The message.
        message_id: Uuid,
        /// Its routing key.
        routing_key: String,
    },
    /// The subscription's settings are unusable.
    #[error("invalid subscription {group}: {reason}")]
    InvalidSubscription {
        /// The group.
        group: String,
        /// What is wrong.
        reason: String,
    },
    /// The broker could not be reached; retry later.
    #[error("message bus unavailable: {source}")]
    Unavailable {
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// The bus was shut down.
    #[error("message bus closed")]
    Closed,
    /// Any other failure.
    #[error("message bus error: {source}")]
    Backend {
        /// The client's error.
        #[source]
        source: BoxError,
    },
}

/// A message bus. Object-safe: use it as `Arc<dyn EventBus>`.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Publishes messages. When it returns `Ok`, the bus has taken
    /// responsibility for every one of them (broker confirms received).
    async fn publish(&self, messages: &[Message]) -> Result<(), BusError>;

    /// Declares a group's queue and bindings without consuming, so that
    /// messages published from now on wait for its consumers. Idempotent.
    async fn declare(&self, subscription: &Subscription) -> Result<(), BusError>;

    /// Declares the group and starts consuming it with `handler` until the
    /// returned handle is stopped or dropped.
    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn MessageHandler>,
    ) -> Result<SubscriptionHandle, BusError>;
}

/// A running consumer. Dropping it stops consuming (messages in flight are
/// finished or returned to the queue); [`SubscriptionHandle::stop`] also waits
/// for that.
#[must_use = "the subscription stops when its handle is dropped"]
#[derive(Debug)]
pub struct SubscriptionHandle {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl SubscriptionHandle {
    /// A handle over consumer tasks that stop once `stop` is cancelled.
    pub fn new(stop: CancellationToken, tasks: Vec<JoinHandle<()>>) -> Self {
        Self { stop, tasks }
    }

    /// A token cancelled when the subscription must stop (a child of the
    /// subscription's own: cancelling it stops nothing else).
    pub fn stop_signal(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// Stops consuming and waits for the consumer tasks to finish.
    pub async fn stop(mut self) {
        self.stop.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }

    /// Keeps consuming until the process ends (the handle is forgotten).
    pub fn detach(self) {
        std::mem::forget(self);
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("a.b", "a.b"));
        assert!(!topic_matches("a.b", "a.c"));
        assert!(topic_matches("a.*", "a.x"));
        assert!(!topic_matches("a.*", "a.x.y"));
        assert!(!topic_matches("a.*", "a"));
        assert!(topic_matches("a.#", "a.x.y"));
        assert!(topic_matches("#.y", "a.x.y"));
        assert!(topic_matches("*.x.#", "a.x"));
        assert!(!topic_matches("*", "a.b"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("a.#.b", "a.b"));
        assert!(topic_matches("a.#.b", "a.x.y.b"));
        assert!(!topic_matches("a.#.b", "a.x.y"));
        assert!(topic_matches("#.#", "a"));
        assert!(!topic_matches("a", "a.b"));
    }
}
