//! The consumer loop of one subscription: consume with manual acks and
//! bounded prefetch, hand deliveries to the handler, settle them by its
//! outcome, and reconnect with backoff when the connection or channel breaks.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation};
use metrics::SharedString;
use tokio::sync::{mpsc, Notify};
use tracing::{field, Instrument};

use es_core::{CancellationToken, Delivery, MessageHandler, Outcome, Subscription};

use crate::acks::{ack_in_batches, Tag};
use crate::bus::{copy_headers, Inner};
use crate::codec;
use crate::connection::Live;
use crate::error::bounded;
use crate::telemetry;
use crate::topology::short;
use crate::{Error, TraceParent};

pub(crate) struct ConsumerTask {
    inner: Arc<Inner>,
    subscription: Subscription,
    handler: Arc<dyn MessageHandler>,
    queue: String,
    retry_queue: String,
    dead_letter_exchange: String,
    /// The `group` label of the counters.
    label: SharedString,
}

/// How a delivery is settled.
enum Settle {
    /// Acknowledge it: handled, or its copy for a retry or a dead letter
    /// confirmed.
    Ack,
    /// Return it to the queue (a republish failed) with `basic.reject`,
    /// which the broker counts towards the delivery limit (since RabbitMQ
    /// 4.3 a `basic.nack` no longer does, and a message whose republish
    /// keeps failing would come back for ever).
    Requeue,
}

impl ConsumerTask {
    pub(crate) fn new(
        inner: Arc<Inner>,
        subscription: Subscription,
        handler: Arc<dyn MessageHandler>,
    ) -> Self {
        let topology = &inner.topology;
        let queue = topology.queue(&subscription.group);
        let retry_queue = topology.retry_queue(&subscription);
        let dead_letter_exchange = topology.dead_letter_exchange();
        let label = SharedString::from_shared(Arc::from(subscription.group.as_str()));
        Self {
            inner,
            subscription,
            handler,
            queue,
            retry_queue,
            dead_letter_exchange,
            label,
        }
    }

    pub(crate) async fn run(self, stop: CancellationToken) {
        let min = self.inner.connector.config.reconnect_min;
        let max = self.inner.connector.config.reconnect_max;
        let mut delay = min;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let Some(live) = self.inner.connector.live_with_backoff(&stop).await else {
                return;
            };
            match self.consume(&live, &stop).await {
                Ok(Flow::Stopped) => return,
                Ok(Flow::Consumed) => delay = min,
                Ok(Flow::Idle) => {}
                Err(error) => {
                    tracing::warn!(group = %self.subscription.group, %error, generation = live.generation, "consumer failed; reconnecting");
                }
            }
            drop(live);
            let jitter = Duration::from_millis(fastrand::u64(0..=delay.as_millis() as u64 / 4 + 1));
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(delay + jitter) => {}
            }
            delay = (delay * 2).min(max);
        }
    }

    fn limit(&self) -> Duration {
        self.inner.connector.config.operation_timeout
    }

    async fn consume(&self, live: &Live, stop: &CancellationToken) -> Result<Flow, Error> {
        let limit = self.limit();
        let channel = live.confirm_channel(limit).await?;
        bounded(
            limit,
            "declare",
            self.inner.topology.declare(&channel, &self.subscription),
        )
        .await?;
        bounded(
            limit,
            "basic.qos",
            channel.basic_qos(self.subscription.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let consumer = bounded(
            limit,
            "basic.consume",
            channel.basic_consume(
                short(&self.queue)?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        tracing::debug!(group = %self.subscription.group, generation = live.generation, "consuming");
        // Turns false as soon as the channel is known to be gone: deliveries
        // still being handled then are not settled (their tags belong to the
        // dead channel); the broker redelivers them.
        let current = AtomicBool::new(true);
        // Signalled when the deliveries end: the channel is gone, or a stop
        // was asked for.
        let ended_deliveries = Notify::new();
        let stopped = stop.cancelled();
        // A watchdog: should the client not end the delivery stream when the
        // connection dies, end it here.
        let dead = async {
            while channel.status().connected() && live.connection.status().connected() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tracing::warn!(group = %self.subscription.group, "consumer channel is gone");
        };
        let ended = async move {
            futures::pin_mut!(stopped, dead);
            futures::future::select(stopped, dead).await;
        };
        let consumed = AtomicBool::new(false);
        // Handled deliveries are acked in batches (see `acks`), by tags
        // reported in delivery order as they arrive, before handling.
        let (tags, reported) = mpsc::unbounded_channel();
        let acks = ack_in_batches(&channel, reported, limit, self.label.clone());
        let drained = async {
            let tags = tags;
            consumer
                .take_until(Box::pin(ended))
                .chain(futures::stream::poll_fn(|_| {
                    ended_deliveries.notify_one();
                    std::task::Poll::Ready(None)
                }))
                .for_each_concurrent(usize::from(self.subscription.prefetch), |item| {
                    if let Ok(delivery) = &item {
                        let _ = tags.send(Tag::Delivered(delivery.delivery_tag));
                    }
                    let (tags, current, consumed, channel) = (&tags, &current, &consumed, &channel);
                    async move {
                        match item {
                            Ok(delivery) => {
                                consumed.store(true, Ordering::Relaxed);
                                self.handle(channel, current, tags, delivery).await;
                            }
                            Err(error) => {
                                current.store(false, Ordering::SeqCst);
                                tracing::warn!(group = %self.subscription.group, %error, "consumer channel closed");
                            }
                        }
                    }
                })
                .await;
        };
        // Once the channel is gone, handlers still running can settle
        // nothing (the broker redelivers their messages), yet the loop waits
        // for them before it reconnects: one handler stuck on a dead socket
        // would hold up the whole subscription. They get the operation
        // limit to finish, then are dropped where they stand, as a crash
        // would leave them; a graceful stop still waits for every one.
        let abandoned = async {
            ended_deliveries.notified().await;
            if stop.is_cancelled() {
                return std::future::pending().await;
            }
            tokio::time::sleep(limit).await;
        };
        tokio::select! {
            ((), ()) = async { tokio::join!(drained, acks) } => {}
            () = abandoned => {
                tracing::warn!(group = %self.subscription.group, limit = ?limit, "handlers still running after the channel went; dropped unsettled");
            }
        }
        current.store(false, Ordering::SeqCst);
        if stop.is_cancelled() {
            let _ = bounded(
                limit,
                "close",
                channel.close(200, "consumer stopped".into()),
            )
            .await;
            return Ok(Flow::Stopped);
        }
        let _ = bounded(
            limit,
            "close",
            channel.close(200, "consumer restarting".into()),
        )
        .await;
        Ok(if consumed.load(Ordering::Relaxed) {
            Flow::Consumed
        } else {
            Flow::Idle
        })
    }

    async fn handle(
        &self,
        channel: &Channel,
        current: &AtomicBool,
        tags: &mpsc::UnboundedSender<Tag>,
        delivery: AmqpDelivery,
    ) {
        let group = &self.subscription.group;
        let max = self.subscription.max_attempts;
        let (decoded, attempt) = codec::decode(&delivery.properties, &delivery.data);
        let message = match decoded {
            Ok(message) => message,
            Err(error) => {
                let reason = format!("undecodable message: {error}");
                tracing::warn!(%group, %reason, "dead-lettering");
                let settle = self.dead_letter(channel, &delivery, attempt, &reason).await;
                return self.settle(current, tags, &delivery, settle).await;
            }
        };
        if attempt > max {
            let reason = format!("gave up after {} attempts", attempt - 1);
            tracing::warn!(%group, message_id = %message.message_id, %reason, "dead-lettering");
            let settle = self
                .dead_letter(channel, &delivery, attempt - 1, &reason)
                .await;
            return self.settle(current, tags, &delivery, settle).await;
        }
        let parent = message.metadata.traceparent;
        let span = tracing::info_span!(
            "es.rabbit.consume",
            group = %group,
            message_id = %message.message_id,
            message_type = %message.message_type,
            attempt,
            correlation_id = message.metadata.correlation_id.map(field::display),
            causation_id = message.metadata.causation_id.map(field::display),
            trace_id = field::Empty,
            span_id = field::Empty,
            parent_span_id = parent.map(|p| field::display(p.span_id())),
        );
        // The exported span's own context, else a span id of its own.
        let trace = es_core::otel::continue_trace(&span, parent)
            .unwrap_or_else(|| TraceParent::child_of(parent));
        span.record("trace_id", field::display(trace.trace_id()));
        span.record("span_id", field::display(trace.span_id()));
        let message_id = message.message_id;
        let es_delivery = Delivery { message, attempt };
        metrics::counter!(telemetry::DELIVERED, "group" => self.label.clone()).increment(1);
        let outcome = AssertUnwindSafe(self.handler.handle(&es_delivery).instrument(span.clone()))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Outcome::retry("the handler panicked"));
        let settle = match outcome {
            Outcome::Ack => Settle::Ack,
            Outcome::Retry { reason } if attempt < max => {
                tracing::debug!(parent: &span, %reason, "retrying later");
                self.retry(channel, &delivery, attempt + 1).await
            }
            Outcome::Retry { reason } | Outcome::DeadLetter { reason } => {
                tracing::warn!(parent: &span, %message_id, %reason, "dead-lettering");
                self.dead_letter(channel, &delivery, attempt, &reason).await
            }
        };
        self.settle(current, tags, &delivery, settle).await;
    }

    /// Settles a delivery: an ack goes to the batched acks; a requeue is
    /// sent at once ([`requeue`]).
    async fn settle(
        &self,
        current: &AtomicBool,
        tags: &mpsc::UnboundedSender<Tag>,
        delivery: &AmqpDelivery,
        settle: Settle,
    ) {
        let tag = delivery.delivery_tag;
        let reported = match settle {
            Settle::Ack => Tag::Done(tag),
            Settle::Requeue => {
                requeue(self.limit(), current, delivery).await;
                Tag::Settled(tag)
            }
        };
        let _ = tags.send(reported);
    }

    /// Publishes a copy that starts at `attempt` to the retry queue, from
    /// which it returns to the work queue after the retry delay.
    async fn retry(&self, channel: &Channel, delivery: &AmqpDelivery, attempt: u32) -> Settle {
        let headers = copy_headers(delivery.properties.headers().as_ref(), attempt, None);
        let settle = self
            .republish(channel, delivery, "", &self.retry_queue, headers)
            .await;
        if matches!(settle, Settle::Ack) {
            metrics::counter!(telemetry::RETRIED, "group" => self.label.clone()).increment(1);
        }
        settle
    }

    /// Publishes a copy, with the reason, to the dead-letter queue.
    async fn dead_letter(
        &self,
        channel: &Channel,
        delivery: &AmqpDelivery,
        attempts: u32,
        reason: &str,
    ) -> Settle {
        let headers = copy_headers(
            delivery.properties.headers().as_ref(),
            attempts,
            Some((&self.subscription.group, reason)),
        );
        let settle = self
            .republish(
                channel,
                delivery,
                &self.dead_letter_exchange,
                &self.queue,
                headers,
            )
            .await;
        if matches!(settle, Settle::Ack) {
            metrics::counter!(telemetry::DEAD_LETTERED, "group" => self.label.clone()).increment(1);
        }
        settle
    }

    async fn republish(
        &self,
        channel: &Channel,
        delivery: &AmqpDelivery,
        exchange: &str,
        routing_key: &str,
        headers: FieldTable,
    ) -> Settle {
        let properties = delivery.properties.clone().with_headers(headers);
        let result = bounded(self.limit(), "republish", async {
            let confirm = channel
                .basic_publish(
                    short(exchange)?,
                    short(routing_key)?,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &delivery.data,
                    properties,
                )
                .await?;
            Ok::<_, Error>(confirm.await?)
        })
        .await;
        match result {
            Ok(Confirmation::Ack(None)) => Settle::Ack,
            Ok(other) => {
                tracing::warn!(group = %self.subscription.group, confirmation = ?other.is_ack(), routing_key, "republish not confirmed; returning the message to the queue");
                Settle::Requeue
            }
            Err(error) => {
                tracing::warn!(group = %self.subscription.group, %error, routing_key, "republish failed; returning the message to the queue");
                Settle::Requeue
            }
        }
    }
}

enum Flow {
    Stopped,
    Consumed,
    Idle,
}

/// Returns a delivery to its queue with `basic.reject`, unless its channel
/// has been replaced or closed since: a tag is only ever used on the channel
/// that delivered it.
async fn requeue(limit: Duration, current: &AtomicBool, delivery: &AmqpDelivery) {
    if !current.load(Ordering::SeqCst) || !delivery.acker.usable() {
        tracing::debug!(
            delivery_tag = delivery.delivery_tag,
            "channel gone; leaving the delivery to be redelivered"
        );
        return;
    }
    let rejected = bounded(
        limit,
        "basic.reject",
        delivery.acker.reject(BasicRejectOptions { requeue: true }),
    )
    .await;
    if let Err(error) = rejected {
        tracing::debug!(%error, delivery_tag = delivery.delivery_tag, "rejecting failed; it will be redelivered");
    }
}
