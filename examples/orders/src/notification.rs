//! The notification service: one message per order and kind, whatever the
//! redeliveries. On the embedded default the sink records what would be sent
//! and logs it.

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use es_core::{Inbox, Message, Metadata, Outcome};
use uuid::Uuid;

use crate::messages::{message_enum, NotificationKind};
use crate::node::{Service, Wiring};
use crate::topology::groups;
use crate::Result;
use es_core::command::{CommandService, Commands};

message_enum! {
    /// The commands the notification service takes from the bus.
    pub enum NotificationCommandMessage {
        /// Tell a customer.
        NotifyCustomer,
    }
}

/// A notification that was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentNotification {
    /// The order.
    pub order_id: Uuid,
    /// To whom.
    pub email: String,
    /// What about.
    pub kind: NotificationKind,
    /// The text.
    pub body: String,
}

/// Why a notification was not sent, as far as the sender can tell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// Certainly not handed over: the server refused it, or no connection
    /// could be made. `retry` says whether a later attempt may succeed (a
    /// connection refused or a 4xx answer) or not (a 5xx answer, a
    /// malformed address).
    #[error("not sent: {reason}")]
    NotSent {
        /// What went wrong.
        reason: String,
        /// Whether trying again later may succeed.
        retry: bool,
    },
    /// Perhaps handed over: the exchange broke off midway (a timeout, a
    /// connection lost). Not tried again, so never sent twice.
    #[error("perhaps sent: {0}")]
    Unknown(String),
}

/// Where notifications go.
#[async_trait]
pub trait NotificationSink: Send + Sync + std::fmt::Debug + 'static {
    /// Sends one.
    async fn send(&self, notification: SentNotification) -> Result<(), SendError>;
}

/// A sink that records and logs.
#[derive(Debug, Default)]
pub struct RecordingSink {
    sent: Mutex<Vec<SentNotification>>,
}

impl RecordingSink {
    /// Everything sent so far.
    pub fn sent(&self) -> Vec<SentNotification> {
        self.sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What was sent about an order.
    pub fn for_order(&self, order_id: Uuid) -> Vec<SentNotification> {
        self.sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|n| n.order_id == order_id)
            .cloned()
            .collect()
    }
}

#[async_trait]
impl NotificationSink for RecordingSink {
    async fn send(&self, notification: SentNotification) -> Result<(), SendError> {
        tracing::info!(
            order_id = %notification.order_id,
            to = %notification.email,
            kind = notification.kind.as_str(),
            body = %notification.body,
            "notification sent"
        );
        self.sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(notification);
        Ok(())
    }
}

const CONSUMER: &str = "notification";
const NAMESPACE: Uuid = Uuid::from_u128(0x8d2e_51c0_7a4b_4e19_b3f6_0a9c_2d5e_7f13);

/// Starts the notification service in `w`: its commands, deduplicated
/// through its inbox, sent through the deployment's mail sink.
pub(crate) async fn wire(w: &mut Wiring) -> Result<Arc<NotificationService>> {
    let inbox = w.backends.inbox(Service::Notification).await?;
    let service = Arc::new(NotificationService::new(inbox, w.backends.mail()?));
    w.consume(
        groups::NOTIFICATION,
        Arc::new(Commands(Arc::clone(&service))),
    )
    .await?;
    Ok(service)
}

/// The notification service.
pub struct NotificationService {
    inbox: Arc<dyn Inbox>,
    sink: Arc<dyn NotificationSink>,
}

impl std::fmt::Debug for NotificationService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotificationService")
            .field("sink", &self.sink)
            .finish_non_exhaustive()
    }
}

impl NotificationService {
    /// A service deduplicating through `inbox` and sending to `sink`.
    pub fn new(inbox: Arc<dyn Inbox>, sink: Arc<dyn NotificationSink>) -> Self {
        Self { inbox, sink }
    }
}

/// Handles a notification command: sends it unless this order and kind was
/// already notified.
///
/// The (order, kind) is claimed in the inbox before sending, so that
/// concurrent redeliveries send once. A send that certainly did not
/// happen gives the claim back and is retried (or, when retrying cannot
/// help, dead-lettered so that a replay sends it); one that perhaps
/// happened keeps the claim and is dead-lettered for a person to check:
/// at most once, never twice.
#[async_trait]
impl CommandService for NotificationService {
    type Command = NotificationCommandMessage;

    async fn execute(&self, command: Self::Command, _: &Message, _: &Metadata) -> Outcome {
        let NotificationCommandMessage::NotifyCustomer(c) = command;
        let key = Uuid::new_v5(
            &NAMESPACE,
            format!("{}:{}", c.order_id, c.kind.as_str()).as_bytes(),
        );
        // Claim the (order, kind) first: concurrent redeliveries send once.
        match self.inbox.record(CONSUMER, key).await {
            Ok(false) => return Outcome::Ack,
            Ok(true) => {}
            Err(e) => return Outcome::retry(e),
        }
        let body = match c.kind {
            NotificationKind::OrderConfirmed => format!("Your order {} is confirmed.", c.order_id),
            NotificationKind::OrderCancelled => format!(
                "Your order {} was cancelled: {}.",
                c.order_id,
                c.reason.as_deref().unwrap_or("no reason given")
            ),
        };
        let sent = self
            .sink
            .send(SentNotification {
                order_id: c.order_id,
                email: c.email,
                kind: c.kind,
                body,
            })
            .await;
        match sent {
            Ok(()) => {}
            Err(SendError::NotSent { reason, retry }) => {
                if let Err(e) = self.inbox.forget(CONSUMER, key).await {
                    tracing::error!(order_id = %c.order_id, ?reason, error = %e, "notification not sent, and its claim could not be given back");
                    return Outcome::dead_letter(format!("{reason}; the claim stays: {e}"));
                }
                tracing::warn!(order_id = %c.order_id, ?reason, retry, "notification not sent");
                return if retry {
                    Outcome::retry(reason)
                } else {
                    Outcome::dead_letter(reason)
                };
            }
            Err(e @ SendError::Unknown(_)) => {
                // At most once: the claim stays, so this one is reported, not resent.
                tracing::error!(order_id = %c.order_id, error = %e, "notification perhaps not sent");
                return Outcome::dead_letter(e);
            }
        }
        metrics::counter!("notifications_sent_total", "kind" => c.kind.as_str()).increment(1);
        Outcome::Ack
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use es_core::{InMemoryInbox, Metadata};

    use super::*;
    use crate::messages::{topics, NotifyCustomer};

    /// A sink that answers with the failures it was given, in turn, then
    /// sends.
    #[derive(Debug, Default)]
    struct FlakySink {
        failures: Mutex<VecDeque<SendError>>,
        sent: RecordingSink,
    }

    #[async_trait]
    impl NotificationSink for FlakySink {
        async fn send(&self, notification: SentNotification) -> Result<(), SendError> {
            let failure = self
                .failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            match failure {
                Some(failure) => Err(failure),
                None => self.sent.send(notification).await,
            }
        }
    }

    async fn handle(service: &Arc<NotificationService>, message: &Message) -> Outcome {
        use es_core::MessageHandler;
        let delivery = es_core::Delivery {
            message: message.clone(),
            attempt: 1,
        };
        Commands(Arc::clone(service)).handle(&delivery).await
    }

    fn service(
        failures: impl IntoIterator<Item = SendError>,
    ) -> (Arc<NotificationService>, Arc<FlakySink>) {
        let sink = Arc::new(FlakySink {
            failures: Mutex::new(failures.into_iter().collect()),
            sent: RecordingSink::default(),
        });
        let inbox: Arc<dyn Inbox> = Arc::new(InMemoryInbox::new());
        (
            Arc::new(NotificationService::new(inbox, Arc::clone(&sink) as _)),
            sink,
        )
    }

    fn command() -> Message {
        let notify = NotificationCommandMessage::NotifyCustomer(NotifyCustomer {
            order_id: Uuid::now_v7(),
            email: "ada@example.com".into(),
            kind: NotificationKind::OrderConfirmed,
            reason: None,
        });
        Message::encode(topics::NOTIFICATION_COMMANDS, &notify, Metadata::new()).unwrap()
    }

    #[tokio::test]
    async fn a_send_that_certainly_failed_is_retried_and_sent_once() {
        let refused = SendError::NotSent {
            reason: "connection refused".into(),
            retry: true,
        };
        let (service, sink) = service([refused]);
        let message = command();
        assert!(matches!(
            handle(&service, &message).await,
            Outcome::Retry { .. }
        ));
        assert!(sink.sent.sent().is_empty());
        assert_eq!(handle(&service, &message).await, Outcome::Ack);
        assert_eq!(handle(&service, &message).await, Outcome::Ack);
        assert_eq!(sink.sent.sent().len(), 1);
    }

    #[tokio::test]
    async fn a_refused_send_is_dead_lettered_and_a_replay_sends_it() {
        let refused = SendError::NotSent {
            reason: "550 mailbox unavailable".into(),
            retry: false,
        };
        let (service, sink) = service([refused]);
        let message = command();
        assert!(matches!(
            handle(&service, &message).await,
            Outcome::DeadLetter { .. }
        ));
        assert_eq!(handle(&service, &message).await, Outcome::Ack);
        assert_eq!(sink.sent.sent().len(), 1);
    }

    #[tokio::test]
    async fn a_send_that_perhaps_happened_is_never_repeated() {
        let (service, sink) = service([SendError::Unknown("timed out after DATA".into())]);
        let message = command();
        assert!(matches!(
            handle(&service, &message).await,
            Outcome::DeadLetter { .. }
        ));
        assert_eq!(handle(&service, &message).await, Outcome::Ack);
        assert!(sink.sent.sent().is_empty());
    }
}
