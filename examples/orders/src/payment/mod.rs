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
use es_core::{Message, Metadata, Outcome, Repository};
use uuid::Uuid;

pub use domain::{
    GatewayAnswer, Payment, PaymentCommand, PaymentError, PaymentEvent, PaymentState,
};

use crate::messages::message_enum;
use crate::node::{Service, Wiring};
use crate::topology::groups;
use crate::Result;
use es_core::command::{outcome_of, recorded_outcome, CommandService, Commands};

message_enum! {
    /// The commands the payment service takes from the bus.
    pub enum PaymentCommandMessage {
        /// Charge the order's card.
        ProcessPayment,
        /// Refund the order's charge (compensation).
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
            Some(ms) => {
                GatewayBehaviour::ApproveAfter(Duration::from_millis(ms.min(MAX_GATEWAY_DELAY_MS)))
            }
            None => GatewayBehaviour::Answer(GatewayAnswer::Declined {
                reason: format!("unknown card token {other:?}"),
            }),
        },
    }
}

/// Starts the payment service in `w`: its commands.
pub(crate) async fn wire(w: &mut Wiring) -> Result<Arc<PaymentService>> {
    let store = w.backends.store(Service::Payment).await?;
    let service = Arc::new(PaymentService::new(crate::repository(
        Arc::clone(&store),
        &w.backends.event_schema,
    )));
    w.consume(groups::PAYMENT, Arc::new(Commands(Arc::clone(&service))))
        .await?;
    w.relay(Service::Payment, &store);
    Ok(service)
}

/// The longest `tok_delay_<ms>` the simulated gateway takes.
pub(crate) const MAX_GATEWAY_DELAY_MS: u64 = 5_000;

/// How long the service waits for the gateway before it gives up on the
/// call and lets the saga's payment deadline decide: well under the payment
/// window, so that a slow gateway never holds a handler for long.
pub(crate) const GATEWAY_TIMEOUT: Duration = Duration::from_secs(10);

/// Refuses a card token the simulated gateway would hold a handler too long
/// for (`tok_delay_<ms>` over [`MAX_GATEWAY_DELAY_MS`]).
///
/// # Errors
/// [`Error::Validation`](crate::Error::Validation) naming `payment.card_token`.
pub(crate) fn check_card_token(token: &str) -> Result<()> {
    if let Some(ms) = token.strip_prefix("tok_delay_") {
        match ms.parse::<u64>() {
            Ok(ms) if ms <= MAX_GATEWAY_DELAY_MS => {}
            _ => {
                return Err(crate::Error::validation(
                    "payment.card_token",
                    format!("tok_delay_<ms> takes 0 to {MAX_GATEWAY_DELAY_MS} ms"),
                ))
            }
        }
    }
    Ok(())
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
}

#[async_trait]
impl CommandService for PaymentService {
    type Command = PaymentCommandMessage;

    async fn execute(
        &self,
        command: Self::Command,
        message: &Message,
        metadata: &Metadata,
    ) -> Outcome {
        match command {
            PaymentCommandMessage::ProcessPayment(c) => {
                let answer = match gateway(&c.card_token, message.message_id) {
                    GatewayBehaviour::Answer(a) => a,
                    GatewayBehaviour::Silent => {
                        tracing::info!(order_id = %c.order_id, "the gateway does not answer");
                        return Outcome::Ack;
                    }
                    GatewayBehaviour::ApproveAfter(delay) => {
                        let call = tokio::time::sleep(delay);
                        if tokio::time::timeout(GATEWAY_TIMEOUT, call).await.is_err() {
                            tracing::warn!(order_id = %c.order_id, "the gateway timed out");
                            return Outcome::Ack;
                        }
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
                    .create_once(c.order_id, message.message_id, command, metadata)
                    .await;
                outcome_of(result, "payment")
            }
            PaymentCommandMessage::RefundPayment(c) => {
                let result = self
                    .payments
                    .execute_once(
                        c.order_id,
                        message.message_id,
                        PaymentCommand::Refund,
                        metadata,
                    )
                    .await;
                if let Ok(committed) = &result {
                    if !committed.events.is_empty() {
                        tracing::info!(order_id = %c.order_id, "payment refunded");
                        metrics::counter!("payments_refunded_total").increment(1);
                    }
                }
                // A refund with nothing to refund is recorded for the saga.
                recorded_outcome(&self.payments, c.order_id, message, metadata, result).await
            }
        }
    }
}
