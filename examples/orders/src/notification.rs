//! The notification service: one message per order and kind, whatever the
//! redeliveries. On the embedded default the sink records what would be sent
//! and logs it.

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use es_core::{Delivery, EventCodec, Inbox, Message, MessageHandler, Outcome};
use uuid::Uuid;

use crate::messages::{message_enum, NotificationKind};

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

/// Where notifications go.
#[async_trait]
pub trait NotificationSink: Send + Sync + std::fmt::Debug + 'static {
    /// Sends one.
    async fn send(&self, notification: SentNotification) -> Result<(), crate::Error>;
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
    async fn send(&self, notification: SentNotification) -> Result<(), crate::Error> {
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

    /// Handles a notification command: sends it unless this order and kind
    /// was already notified.
    pub async fn handle_command(&self, message: &Message) -> Outcome {
        let NotificationCommandMessage::NotifyCustomer(c) =
            match EventCodec::<NotificationCommandMessage>::new().decode_parts(
                &message.message_type,
                message.schema_version,
                &message.payload,
            ) {
                Ok(c) => c,
                Err(e) => return Outcome::dead_letter(e),
            };
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
        if let Err(e) = self
            .sink
            .send(SentNotification {
                order_id: c.order_id,
                email: c.email,
                kind: c.kind,
                body,
            })
            .await
        {
            // At most once: the claim stays, so this one is reported, not resent.
            tracing::error!(error = %e, "notification could not be sent");
            return Outcome::dead_letter(e);
        }
        metrics::counter!("notifications_sent_total", "kind" => c.kind.as_str()).increment(1);
        Outcome::Ack
    }
}

/// The message handler feeding notification commands to the service.
#[derive(Debug, Clone)]
pub struct NotificationHandler(pub Arc<NotificationService>);

#[async_trait]
impl MessageHandler for NotificationHandler {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        self.0.handle_command(&delivery.message).await
    }
}
