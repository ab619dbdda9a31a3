//! The payment service: a simulated card gateway with deterministic rules,
//! charging each order at most once and refunding on the saga's command.
//!
//! Card tokens: `tok_ok` is approved, `tok_decline` is declined, `tok_timeout`
//! never answers, `tok_delay_<ms>` is approved after `<ms>` milliseconds, and
//! any other token is declined as unknown.

pub mod domain;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use es_core::{Delivery, EventCodec, Message, MessageHandler, Outcome, Repository};
use uuid::Uuid;

pub use domain::{
    GatewayAnswer, Payment, PaymentCommand, PaymentError, PaymentEvent, PaymentState,
};

use crate::messages::message_enum;

message_enum! {
    /// The commands the payment service takes from the bus.
    pub enum PaymentCommandMessage {
        /// Charge.
        ProcessPayment,
        /// Refund.
        RefundPayment,
    }
}

/// What the simulated gateway does with a card token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayBehaviour {
    /// Answer at once.
    Answer(GatewayAnswer),
    /// Approve after a delay.
    ApproveAfter(Duration),
    /// Never answer.
    Silent,
}

/// The simulated gateway's rule for a token. The transaction id is derived
/// from the charge's message id, so a retried charge gets the same one.
pub fn gateway(card_token: &str, charge_id: Uuid) -> GatewayBehaviour {
    let approved = GatewayAnswer::Approved {
        transaction_id: format!("txn_{}", charge_id.simple()),
    };
    match card_token {
        "tok_ok" => GatewayBehaviour::Answer(approved),
        "tok_decline" => GatewayBehaviour::Answer(GatewayAnswer::Declined {
            reason: "card declined".into(),
        }),
        "tok_timeout" => GatewayBehaviour::Silent,
        other => match other
            .strip_prefix("tok_delay_")
            .and_then(|ms| ms.parse::<u64>().ok())
        {
            Some(ms) => GatewayBehaviour::ApproveAfter(Duration::from_millis(ms.min(600_000))),
            None => GatewayBehaviour::Answer(GatewayAnswer::Declined {
                reason: format!("unknown card token {other:?}"),
            }),
        },
    }
}

/// The payment service.
#[derive(Debug)]
pub struct PaymentService {
    payments: Repository<Payment>,
}

impl PaymentService {
    /// A service over this repository.
    pub fn new(payments: Repository<Payment>) -> Self {
        Self { payments }
    }

    /// An order's payment.
    pub async fn payment(&self, order_id: Uuid) -> Result<Payment, crate::Error> {
        self.payments
            .load(order_id)
            .await
            .map(|l| l.state)
            .map_err(crate::Error::from_repository)
    }

    /// Executes one of the saga's commands. Idempotent under redelivery.
    pub async fn handle_command(&self, message: &Message) -> Outcome {
        let command = match EventCodec::<PaymentCommandMessage>::new().decode_parts(
            &message.message_type,
            message.schema_version,
            &message.payload,
        ) {
            Ok(c) => c,
            Err(e) => return Outcome::dead_letter(e),
        };
        let metadata = message.metadata.caused_by(message.message_id);
        match command {
            PaymentCommandMessage::ProcessPayment(c) => {
                let answer = match gateway(&c.card_token, message.message_id) {
                    GatewayBehaviour::Answer(a) => a,
                    GatewayBehaviour::Silent => {
                        tracing::info!(order_id = %c.order_id, "the gateway does not answer");
                        return Outcome::Ack;
                    }
                    GatewayBehaviour::ApproveAfter(delay) => {
                        tokio::time::sleep(delay).await;
                        GatewayAnswer::Approved {
                            transaction_id: format!("txn_{}", message.message_id.simple()),
                        }
                    }
                };
                let command = PaymentCommand::Record {
                    order_id: c.order_id,
                    amount: c.amount,
                    answer,
                };
                let result = self
                    .payments
                    .create_once(c.order_id, message.message_id, command, &metadata)
                    .await;
                crate::outcome_of(result, "payment")
            }
            PaymentCommandMessage::RefundPayment(c) => {
                let result = self
                    .payments
                    .execute_once(
                        c.order_id,
                        message.message_id,
                        PaymentCommand::Refund,
                        &metadata,
                    )
                    .await;
                if let Ok(committed) = &result {
                    if !committed.events.is_empty() {
                        tracing::info!(order_id = %c.order_id, "payment refunded");
                        metrics::counter!("payments_refunded_total").increment(1);
                    }
                }
                crate::outcome_of(result, "payment")
            }
        }
    }
}

/// The message handler feeding the saga's commands to the payment service.
#[derive(Debug, Clone)]
pub struct PaymentCommandHandler(pub Arc<PaymentService>);

#[async_trait]
impl MessageHandler for PaymentCommandHandler {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        self.0.handle_command(&delivery.message).await
    }
}
