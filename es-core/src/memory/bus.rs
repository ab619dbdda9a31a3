use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use crate::bus::{
    topic_matches, BusError, Delivery, EventBus, Message, MessageHandler, Outcome, Subscription,
    SubscriptionHandle,
};

/// A message that was given up on, with the reason.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The message.
    pub message: Message,
    /// Deliveries made.
    pub attempts: u32,
    /// Why it was dead-lettered.
    pub reason: String,
}

/// A message bus inside the process, with RabbitMQ's semantics: topic
/// bindings, one queue per consumer group shared by competing consumers,
/// delayed retry with an attempt limit, and dead letters. Cloning shares the
/// same bus.
#[derive(Clone, Debug, Default)]
pub struct InMemoryBus {
    groups: Arc<Mutex<HashMap<String, Arc<Group>>>>,
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
        let group = groups
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
        groups.get(group).map_or(0, |g| {
            g.queue.lock().unwrap_or_else(PoisonError::into_inner).len()
                + g.in_flight.load(std::sync::atomic::Ordering::SeqCst)
        })
    }

    /// The messages a group dead-lettered.
    pub fn dead_letters(&self, group: &str) -> Vec<DeadLetter> {
        let groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups.get(group).map_or_else(Vec::new, |g| {
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
        let groups: Vec<Arc<Group>> = self
            .groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for message in messages {
            let key = message.routing_key();
            for group in &groups {
                let bound = group
                    .bindings
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .any(|b| topic_matches(b, &key));
                if bound {
                    group.push(Delivery {
                        message: message.clone(),
                        attempt: 1,
                    });
                }
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
        let (stop, stopped) = watch::channel(false);
        let subscription = Arc::new(subscription);
        let tasks = (0..subscription.prefetch)
            .map(|_| {
                tokio::spawn(consume(
                    Arc::clone(&group),
                    Arc::clone(&subscription),
                    Arc::clone(&handler),
                    stopped.clone(),
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
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        if *stopped.borrow() {
            return;
        }
        let Some(delivery) = group.pop() else {
            tokio::select! {
                () = group.ready.notified() => {}
                _ = stopped.changed() => {}
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
                    .push(DeadLetter {
                        attempts: delivery.attempt,
                        message: delivery.message,
                        reason,
                    });
            }
        }
        group
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
