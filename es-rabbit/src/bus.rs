//! [`RabbitBus`]: es-core's [`EventBus`] over RabbitMQ.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Confirmation, PublisherConfirm};
use metrics::SharedString;
use tracing::{field, Instrument};

use es_core::{
    BusError, CancellationToken, DeadLetter, EventBus, Message, MessageHandler, Subscription,
    SubscriptionHandle,
};

use crate::codec::{self, header_int, header_str};
use crate::connection::{Connector, Live};
use crate::consumer::ConsumerTask;
use crate::error::bounded;
use crate::telemetry;
use crate::topology::{
    short, validate, Topology, ATTEMPT_HEADER, DEAD_LETTER_GROUP_HEADER, DEAD_LETTER_REASON_HEADER,
};
use crate::{Error, RabbitConfig, TraceParent};

/// es-core's [`EventBus`] on RabbitMQ: one connection (replaced with backoff
/// when it breaks), confirmed and pipelined publishing, and consumer groups
/// on quorum queues with delayed retry and dead letters. Cloning shares the
/// connection.
///
/// See the [crate documentation](crate) for the topology and the guarantees.
#[derive(Clone, Debug)]
pub struct RabbitBus {
    pub(crate) inner: Arc<Inner>,
    mandatory: bool,
    /// Topics published as mandatory even when `mandatory` is off.
    mandatory_topics: Arc<[Arc<str>]>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) connector: Connector,
    pub(crate) topology: Topology,
}

impl RabbitBus {
    /// Connects to the broker (failing fast when it cannot be reached).
    pub async fn connect(config: RabbitConfig) -> Result<Self, Error> {
        let bus = Self::lazy(config);
        bus.inner.connector.live().await?;
        Ok(bus)
    }

    /// A bus that connects on first use.
    pub fn lazy(config: RabbitConfig) -> Self {
        let mandatory = config.mandatory;
        let topology =
            Topology::new(config.prefix.clone()).with_queue_expires(config.queue_expires);
        Self {
            inner: Arc::new(Inner {
                connector: Connector::new(config),
                topology,
            }),
            mandatory,
            mandatory_topics: Arc::new([]),
        }
    }

    /// The same bus (same connection), publishing with `mandatory` on or off.
    #[must_use]
    pub fn with_mandatory(&self, mandatory: bool) -> Self {
        Self {
            mandatory,
            ..self.clone()
        }
    }

    /// The same bus (same connection), publishing the messages of `topics`
    /// as mandatory even when [`with_mandatory(false)`](Self::with_mandatory)
    /// is in force: an event may have no queue bound yet, but a command that
    /// reaches no queue is lost, so its publish is a
    /// [`BusError::Unroutable`] instead.
    #[must_use]
    pub fn with_mandatory_topics<I, T>(&self, topics: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<Arc<str>>,
    {
        Self {
            mandatory_topics: topics.into_iter().map(Into::into).collect(),
            ..self.clone()
        }
    }

    /// Whether unroutable messages are errors (on every topic).
    pub fn mandatory(&self) -> bool {
        self.mandatory
    }

    /// Whether an unroutable `message` is an error.
    pub fn is_mandatory(&self, message: &Message) -> bool {
        self.mandatory || self.mandatory_topics.contains(&message.topic)
    }

    /// The names of the exchanges and queues.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The settings.
    pub fn config(&self) -> &RabbitConfig {
        &self.inner.connector.config
    }

    /// How many connections this bus has opened: 1 after the first connect,
    /// +1 for every reconnection.
    pub fn connections_opened(&self) -> u64 {
        self.inner.connector.generation()
    }

    /// Closes the current connection. Running consumers reconnect unless
    /// their subscriptions are stopped; the next publish reconnects.
    pub async fn close(&self) {
        self.inner.connector.close().await;
    }

    /// Messages ready in a group's work queue (not counting those being
    /// handled).
    pub async fn queue_depth(&self, group: &str) -> Result<u32, BusError> {
        let name = self.inner.topology.queue(group);
        self.passive_count(&name).await
    }

    /// Messages in a group's dead-letter queue.
    pub async fn dead_letter_depth(&self, group: &str) -> Result<u32, BusError> {
        let name = self.inner.topology.dead_letter_queue(group);
        self.passive_count(&name).await
    }

    /// Removes and returns up to `max` messages from a group's dead-letter
    /// queue (for inspection or manual replay).
    ///
    /// The messages are taken unacknowledged and acknowledged together once
    /// all are in hand: when a `basic.get` fails, or the call is dropped
    /// halfway, the broker puts back every message taken so far (a dead
    /// letter is often the last copy of a message).
    pub async fn take_dead_letters(
        &self,
        group: &str,
        max: usize,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let name = short(&self.inner.topology.dead_letter_queue(group))?;
        let live = self.inner.connector.live().await?;
        let channel = live
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        let mut last_tag = None;
        while out.len() < max {
            let got = match channel
                .basic_get(name.clone(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(got) => got,
                Err(error) => {
                    // Closing the channel returns what it took to the queue.
                    let _ = channel.close(200, "take failed".into()).await;
                    return Err(unavailable(error));
                }
            };
            let Some(got) = got else { break };
            last_tag = Some(got.delivery.delivery_tag);
            let delivery = got.delivery;
            let empty = FieldTable::default();
            let headers = delivery.properties.headers().as_ref().unwrap_or(&empty);
            // The consumer writes its reason in a header; a message the
            // broker dead-lettered itself has none.
            let reason = header_str(headers, DEAD_LETTER_REASON_HEADER)
                .unwrap_or_else(|| "dead-lettered by the broker".to_owned());
            let attempts = header_int(headers, ATTEMPT_HEADER)
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(0);
            let (message, _) = codec::decode(&delivery.properties, &delivery.data);
            out.push(DeadLetter {
                message: message.ok(),
                body: delivery.data,
                reason,
                attempts,
            });
        }
        if let Some(tag) = last_tag {
            let acked = channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await;
            if let Err(error) = acked {
                let _ = channel.close(200, "ack failed".into()).await;
                return Err(unavailable(error));
            }
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(out)
    }

    /// Deletes a group's work, retry and dead-letter queues (with the
    /// messages in them). For tests and decommissioning; consumers of the
    /// group stop receiving.
    pub async fn delete_group(&self, subscription: &Subscription) -> Result<(), BusError> {
        let topology = &self.inner.topology;
        let live = self.inner.connector.live().await?;
        let channel = live
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        for name in [
            topology.queue(&subscription.group),
            topology.retry_queue(subscription),
            topology.dead_letter_queue(&subscription.group),
        ] {
            channel
                .queue_delete(short(&name)?, QueueDeleteOptions::default())
                .await
                .map_err(unavailable)?;
        }
        let _ = channel.close(200, "deleted".into()).await;
        Ok(())
    }

    /// Deletes the topic exchanges of `topics` and the dead-letter exchange.
    /// For tests and decommissioning.
    pub async fn delete_exchanges(&self, topics: &[&str]) -> Result<(), BusError> {
        let topology = &self.inner.topology;
        let live = self.inner.connector.live().await?;
        let channel = live
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        let names = topics
            .iter()
            .map(|t| topology.exchange(t))
            .chain([topology.dead_letter_exchange()]);
        for name in names {
            channel
                .exchange_delete(short(&name)?, ExchangeDeleteOptions::default())
                .await
                .map_err(unavailable)?;
        }
        live.exchanges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        let _ = channel.close(200, "deleted".into()).await;
        Ok(())
    }

    async fn passive_count(&self, name: &str) -> Result<u32, BusError> {
        let live = self.inner.connector.live().await?;
        let channel = live
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        let queue = channel
            .queue_declare(
                short(name)?,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let _ = channel.close(200, "done".into()).await;
        Ok(queue.message_count())
    }

    /// Publishes `messages`, with confirms, straight into `group`'s work
    /// queue (the default exchange, routed by the queue's name) instead of
    /// to their topics' exchanges: only that group receives them. For
    /// replaying history to one consumer, such as a replica being filled;
    /// the group must be declared.
    ///
    /// # Errors
    /// As [`EventBus::publish`]; [`BusError::Unroutable`] when the group's
    /// queue does not exist.
    pub async fn publish_to_group(
        &self,
        group: &str,
        messages: &[Message],
    ) -> Result<(), BusError> {
        if messages.is_empty() {
            return Ok(());
        }
        let live = self.inner.connector.live().await?;
        let queue = self.inner.topology.queue(group);
        // Mandatory: a message for a queue that is not there is an error.
        self.with_mandatory(true)
            .publish_on_to(&live, messages, Some(&queue))
            .await
    }

    async fn publish_on(&self, live: &Live, messages: &[Message]) -> Result<(), BusError> {
        self.publish_on_to(live, messages, None).await
    }

    /// Publishes to the topics' exchanges, or with `queue` to that queue.
    async fn publish_on_to(
        &self,
        live: &Live,
        messages: &[Message],
        queue: Option<&str>,
    ) -> Result<(), BusError> {
        let topology = &self.inner.topology;
        // Exchange names per topic, declared once per connection (none when
        // publishing to a queue: the default exchange routes by its name).
        // With each, the `exchange` label of the published counter.
        let mut exchanges: Vec<(&str, lapin::types::ShortString, SharedString)> = Vec::new();
        let by_topic = if queue.is_none() { messages } else { &[] };
        for message in by_topic {
            if exchanges.iter().any(|(t, _, _)| *t == &*message.topic) {
                continue;
            }
            let exchange = topology.exchange(&message.topic);
            if !live.exchange_declared(&exchange) {
                topology
                    .declare_exchange(&live.publisher, &message.topic)
                    .await?;
                live.mark_exchange(exchange.clone());
            }
            let name = short(&exchange)?;
            exchanges.push((
                &message.topic,
                name,
                SharedString::from_shared(exchange.into()),
            ));
        }
        let default_exchange = SharedString::const_str(telemetry::DEFAULT_EXCHANGE);
        let window = self.inner.connector.config.confirm_window;
        let limit = self.inner.connector.config.operation_timeout;
        let mut pending: VecDeque<(usize, PublisherConfirm, SharedString)> =
            VecDeque::with_capacity(window);
        for (index, message) in messages.iter().enumerate() {
            let parent = message.metadata.traceparent;
            let span = tracing::info_span!(
                "es.rabbit.publish",
                message_id = %message.message_id,
                message_type = %message.message_type,
                topic = %message.topic,
                correlation_id = message.metadata.correlation_id.map(field::display),
                causation_id = message.metadata.causation_id.map(field::display),
                trace_id = field::Empty,
                span_id = field::Empty,
                parent_span_id = parent.map(|p| field::display(p.span_id())),
            );
            // The exported span's own context, else a span id of its own:
            // the consumer's span names it as its parent.
            let trace = es_core::otel::continue_trace(&span, parent)
                .unwrap_or_else(|| TraceParent::child_of(parent));
            span.record("trace_id", field::display(trace.trace_id()));
            span.record("span_id", field::display(trace.span_id()));
            let properties =
                codec::properties(message, &trace.to_string()).map_err(|e| BusError::Backend {
                    source: Box::new(e),
                })?;
            let (exchange, label) = exchanges
                .iter()
                .find(|(t, _, _)| *t == &*message.topic)
                .map_or_else(
                    || (Default::default(), default_exchange.clone()),
                    |(_, e, label)| (e.clone(), label.clone()),
                );
            let routing_key = match queue {
                Some(queue) => short(queue)?,
                None => short(&message.routing_key())?,
            };
            let options = BasicPublishOptions {
                mandatory: self.is_mandatory(message),
                ..BasicPublishOptions::default()
            };
            let publishing = live.publisher.basic_publish(
                exchange,
                routing_key,
                options,
                message.payload.as_str().as_bytes(),
                properties,
            );
            let confirm = bounded(limit, "basic.publish", publishing)
                .instrument(span)
                .await?;
            pending.push_back((index, confirm, label));
            if pending.len() >= window {
                if let Some((index, confirm, label)) = pending.pop_front() {
                    settle(limit, &messages[index], confirm, label).await?;
                }
            }
        }
        while let Some((index, confirm, label)) = pending.pop_front() {
            settle(limit, &messages[index], confirm, label).await?;
        }
        Ok(())
    }
}

/// Waits for a message's confirm; counts it as published, under the
/// exchange `label`, when the broker acked it.
async fn settle(
    limit: std::time::Duration,
    message: &Message,
    confirm: PublisherConfirm,
    label: SharedString,
) -> Result<(), BusError> {
    match bounded(limit, "publisher confirm", confirm).await? {
        Confirmation::Ack(None) => {
            metrics::counter!(telemetry::PUBLISHED, "exchange" => label).increment(1);
            Ok(())
        }
        Confirmation::Ack(Some(_returned)) => Err(BusError::Unroutable {
            message_id: message.message_id,
            routing_key: message.routing_key(),
        }),
        Confirmation::Nack(_) => Err(BusError::Nacked {
            message_id: message.message_id,
        }),
        Confirmation::NotRequested => Err(BusError::Backend {
            source: "publisher confirms are not enabled on the channel".into(),
        }),
    }
}

pub(crate) fn unavailable(source: lapin::Error) -> BusError {
    BusError::Unavailable {
        source: Box::new(Error::protocol(source)),
    }
}

#[async_trait]
impl EventBus for RabbitBus {
    async fn publish(&self, messages: &[Message]) -> Result<(), BusError> {
        if messages.is_empty() {
            return Ok(());
        }
        let live = self.inner.connector.live().await?;
        self.publish_on(&live, messages).await
    }

    async fn declare(&self, subscription: &Subscription) -> Result<(), BusError> {
        validate(subscription)?;
        let live = self.inner.connector.live().await?;
        let channel = live
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        let limit = self.inner.connector.config.operation_timeout;
        bounded(
            limit,
            "declare",
            self.inner.topology.declare(&channel, subscription),
        )
        .await?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn MessageHandler>,
    ) -> Result<SubscriptionHandle, BusError> {
        self.declare(&subscription).await?;
        let stop = CancellationToken::new();
        let task = ConsumerTask::new(Arc::clone(&self.inner), subscription, handler);
        let join = tokio::spawn(task.run(stop.clone()));
        Ok(SubscriptionHandle::new(stop, vec![join]))
    }
}

/// The headers of a copy of a delivered message that starts at `attempt`
/// (for a retry) or records why it was dead-lettered.
pub(crate) fn copy_headers(
    original: Option<&FieldTable>,
    attempt: u32,
    dead_letter: Option<(&str, &str)>,
) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(original) = original {
        for (key, value) in original {
            let k = key.as_str();
            if k == codec::DELIVERY_COUNT_HEADER
                || k.starts_with("x-death")
                || k.starts_with("x-first-death")
                || k.starts_with("x-last-death")
            {
                continue;
            }
            headers.insert(key.clone(), value.clone());
        }
    }
    headers.insert(
        ATTEMPT_HEADER.into(),
        lapin::types::AMQPValue::LongLongInt(i64::from(attempt)),
    );
    if let Some((group, reason)) = dead_letter {
        headers.insert(
            DEAD_LETTER_REASON_HEADER.into(),
            crate::topology::string(reason),
        );
        headers.insert(
            DEAD_LETTER_GROUP_HEADER.into(),
            crate::topology::string(group),
        );
    }
    headers
}
