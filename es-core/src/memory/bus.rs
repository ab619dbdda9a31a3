use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::bus::{
    topic_matches, BusError, DeadLetter, Delivery, EventBus, Message, MessageHandler, Outcome,
    Subscription, SubscriptionHandle,
};
use crate::CancellationToken;

/// A message bus inside the process, with RabbitMQ's semantics: topic
/// bindings, one queue per consumer group shared by competing consumers,
/// delayed retry with an attempt limit, and dead letters. Cloning shares the
/// same bus.
#[derive(Clone, Debug, Default)]
pub struct InMemoryBus {
    groups: Arc<Mutex<Groups>>,
}

/// The groups, and the groups each routing key seen so far goes to.
#[derive(Debug, Default)]
struct Groups {
    by_name: HashMap<String, Arc<Group>>,
    /// Filled by `publish`, emptied whenever a group or a binding is added:
    /// matching every binding of every group for each message is most of the
    /// cost of publishing otherwise.
    /// Keyed by topic, then message type: a lookup borrows the message's
    /// names, with no routing key built per message.
    routes: HashMap<Arc<str>, HashMap<Arc<str>, Route, FastHash>, FastHash>,
    /// How many routes `routes` holds.
    route_count: usize,
}

type FastHash = foldhash::fast::RandomState;

/// The groups a routing key goes to.
type Route = Arc<[Arc<Group>]>;

/// The most routing keys whose groups are remembered at once.
const MAX_ROUTES: usize = 4096;

impl Groups {
    fn route(&mut self, message: &Message) -> Route {
        if let Some(groups) = self
            .routes
            .get(&*message.topic)
            .and_then(|types| types.get(&*message.message_type))
        {
            return Arc::clone(groups);
        }
        let key = message.routing_key();
        let groups: Route = self
            .by_name
            .values()
            .filter(|group| {
                group
                    .bindings
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .any(|b| topic_matches(b, &key))
            })
            .cloned()
            .collect();
        if self.route_count >= MAX_ROUTES {
            self.forget_routes();
        }
        self.routes
            .entry(Arc::clone(&message.topic))
            .or_default()
            .insert(Arc::clone(&message.message_type), Arc::clone(&groups));
        self.route_count += 1;
        groups
    }

    fn forget_routes(&mut self) {
        self.routes.clear();
        self.route_count = 0;
    }
}

#[derive(Debug)]
struct Group {
    bindings: Mutex<Vec<String>>,
    queue: Mutex<VecDeque<Delivery>>,
    ready: Notify,
    in_flight: std::sync::atomic::AtomicUsize,
    dead: Mutex<Vec<DeadLetter>>,
}

impl Group {
    fn push(&self, delivery: Delivery) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(delivery);
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<Delivery> {
        let next = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front();
        if next.is_some() {
            self.in_flight
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        next
    }
}

impl InMemoryBus {
    /// A bus with no groups.
    pub fn new() -> Self {
        Self::default()
    }

    fn group(&self, subscription: &Subscription) -> Arc<Group> {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        // A new group or binding changes where routing keys go.
        groups.forget_routes();
        let group = groups
            .by_name
            .entry(subscription.group.clone())
            .or_insert_with(|| {
                Arc::new(Group {
                    bindings: Mutex::new(Vec::new()),
                    queue: Mutex::new(VecDeque::new()),
                    ready: Notify::new(),
                    in_flight: std::sync::atomic::AtomicUsize::new(0),
                    dead: Mutex::new(Vec::new()),
                })
            })
            .clone();
        let mut bindings = group
            .bindings
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for binding in &subscription.bindings {
            if !bindings.contains(binding) {
                bindings.push(binding.clone());
            }
        }
        drop(bindings);
        group
    }

    /// Messages waiting in a group's queue plus those being handled.
    pub fn queue_depth(&self, group: &str) -> usize {
        let groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups.by_name.get(group).map_or(0, |g| {
            g.queue.lock().unwrap_or_else(PoisonError::into_inner).len()
                + g.in_flight.load(std::sync::atomic::Ordering::SeqCst)
        })
    }

    /// The messages a group dead-lettered.
    pub fn dead_letters(&self, group: &str) -> Vec<DeadLetter> {
        let groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups.by_name.get(group).map_or_else(Vec::new, |g| {
            g.dead
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }
}

#[async_trait]
impl EventBus for InMemoryBus {
    async fn publish(&self, messages: &[Message]) -> Result<(), BusError> {
        let routes: Vec<Route> = {
            let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
            messages
                .iter()
                .map(|message| groups.route(message))
                .collect()
        };
        for (message, groups) in messages.iter().zip(routes) {
            for group in groups.iter() {
                group.push(Delivery {
                    message: message.clone(),
                    attempt: 1,
                });
            }
        }
        Ok(())
    }

    async fn declare(&self, subscription: &Subscription) -> Result<(), BusError> {
        validate(subscription)?;
        self.group(subscription);
        Ok(())
    }

    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn MessageHandler>,
    ) -> Result<SubscriptionHandle, BusError> {
        validate(&subscription)?;
        let group = self.group(&subscription);
        let stop = CancellationToken::new();
        let subscription = Arc::new(subscription);
        let tasks = (0..subscription.prefetch)
            .map(|_| {
                tokio::spawn(consume(
                    Arc::clone(&group),
                    Arc::clone(&subscription),
                    Arc::clone(&handler),
                    stop.clone(),
                ))
            })
            .collect();
        Ok(SubscriptionHandle::new(stop, tasks))
    }
}

fn validate(subscription: &Subscription) -> Result<(), BusError> {
    let invalid = |reason: &str| BusError::InvalidSubscription {
        group: subscription.group.clone(),
        reason: reason.to_owned(),
    };
    if subscription.group.is_empty() {
        return Err(invalid("the group name is empty"));
    }
    if subscription.bindings.is_empty() {
        return Err(invalid("it has no bindings"));
    }
    Ok(())
}

async fn consume(
    group: Arc<Group>,
    subscription: Arc<Subscription>,
    handler: Arc<dyn MessageHandler>,
    stop: CancellationToken,
) {
    loop {
        if stop.is_cancelled() {
            return;
        }
        let Some(delivery) = group.pop() else {
            tokio::select! {
                () = group.ready.notified() => {}
                () = stop.cancelled() => {}
            }
            continue;
        };
        // Pass a wake-up on: another consumer may take the next message.
        if !group
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
        {
            group.ready.notify_one();
        }
        let span = tracing::info_span!(
            "es.bus.handle",
            group = %subscription.group,
            message_type = %delivery.message.message_type,
            message_id = %delivery.message.message_id,
            attempt = delivery.attempt,
            correlation_id = delivery.message.metadata.correlation_id.map(tracing::field::display),
            causation_id = delivery.message.metadata.causation_id.map(tracing::field::display),
        );
        crate::otel::continue_trace(&span, delivery.message.metadata.traceparent);
        let outcome = AssertUnwindSafe(handler.handle(&delivery).instrument(span))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Outcome::retry("the handler panicked"));
        match outcome {
            Outcome::Ack => {}
            Outcome::Retry { reason } if delivery.attempt < subscription.max_attempts => {
                tracing::debug!(group = %subscription.group, %reason, attempt = delivery.attempt, "retrying later");
                let group = Arc::clone(&group);
                let delay = subscription.retry_delay;
                group
                    .in_flight
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    group.push(Delivery {
                        message: delivery.message,
                        attempt: delivery.attempt + 1,
                    });
                    group
                        .in_flight
                        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
            Outcome::Retry { reason } | Outcome::DeadLetter { reason } => {
                tracing::warn!(group = %subscription.group, %reason, message_id = %delivery.message.message_id, "dead-lettered");
                group
                    .dead
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(DeadLetter::new(delivery.message, delivery.attempt, reason));
            }
        }
        group
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Metadata, Payload};

    fn message(topic: &str, message_type: &str) -> Message {
        Message {
            message_id: uuid::Uuid::now_v7(),
            topic: topic.into(),
            message_type: message_type.into(),
            schema_version: 1,
            payload: Payload::from_json("{}").unwrap(),
            metadata: Metadata::new(),
            source: None,
        }
    }

    /// Dropping a handle stops its consumers, as `SubscriptionHandle` says:
    /// a message published afterwards stays in the queue.
    #[tokio::test]
    async fn a_dropped_handle_stops_its_consumers() {
        let bus = InMemoryBus::new();
        let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = Arc::clone(&handled);
        let handle = bus
            .subscribe(
                Subscription::new("g", ["t.*"]),
                Arc::new(move |_d: Delivery| {
                    let seen = Arc::clone(&seen);
                    async move {
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Outcome::Ack
                    }
                }),
            )
            .await
            .unwrap();
        drop(handle);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        bus.publish(&[message("t", "X")]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(handled.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(bus.queue_depth("g"), 1);
    }

    /// The routes remembered for a key are forgotten when a group or a
    /// binding is added: a later group gets what is published after it.
    #[tokio::test]
    async fn a_group_or_binding_added_after_a_key_was_routed_receives_it() {
        let bus = InMemoryBus::new();
        let first = Subscription::new("first", ["order.Created"]);
        bus.declare(&first).await.unwrap();
        bus.publish(&[message("order", "Created")]).await.unwrap();
        assert_eq!(bus.queue_depth("first"), 1);
        bus.declare(&Subscription::new("second", ["order.*"]))
            .await
            .unwrap();
        bus.publish(&[message("order", "Created"), message("order", "Paid")])
            .await
            .unwrap();
        assert_eq!(
            (bus.queue_depth("first"), bus.queue_depth("second")),
            (2, 2)
        );
        // A binding added to an existing group counts from then on.
        bus.declare(&Subscription::new("first", ["order.Paid"]))
            .await
            .unwrap();
        bus.publish(&[message("order", "Paid")]).await.unwrap();
        assert_eq!(
            (bus.queue_depth("first"), bus.queue_depth("second")),
            (3, 3)
        );
        // Unbound keys go nowhere.
        bus.publish(&[message("payment", "Paid")]).await.unwrap();
        assert_eq!(
            (bus.queue_depth("first"), bus.queue_depth("second")),
            (3, 3)
        );
    }
}
