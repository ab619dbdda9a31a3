//! The `Payment` aggregate: one per order, authorised at most once, refunded
//! at most once.

use es_core::Aggregate;
use uuid::Uuid;

use crate::messages::{self, message_enum};
use crate::Money;

message_enum! {
    /// The events of an order's payment (stream category `payment`).
    pub enum PaymentEvent {
        /// The card gateway authorised the charge.
        PaymentSucceeded,
        /// The card gateway declined the charge.
        PaymentDeclined,
        /// The charge was refunded (compensation).
        PaymentRefunded,
    }
}

/// What the gateway answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayAnswer {
    /// Approved, with its transaction id.
    Approved {
        /// The transaction.
        transaction_id: String,
    },
    /// The gateway declined the charge.
    Declined {
        /// The gateway's reason.
        reason: String,
    },
}

/// The commands a payment decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaymentCommand {
    /// Record the gateway's answer to a charge (only the first counts).
    Record {
        /// The order.
        order_id: Uuid,
        /// The amount.
        amount: Money,
        /// The answer.
        answer: GatewayAnswer,
    },
    /// Refund an authorised payment (nothing when already refunded).
    Refund,
}

/// Why a payment refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PaymentError {
    /// There is no authorised payment to refund.
    #[error("no authorised payment to refund")]
    NothingToRefund,
}

/// Where an order's payment stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PaymentState {
    /// Not charged.
    #[default]
    None,
    /// The charge went through.
    Authorised {
        /// The transaction.
        transaction_id: String,
        /// The amount.
        amount: Money,
    },
    /// The gateway declined the charge.
    Declined,
    /// The charge was refunded.
    Refunded,
}

/// An order's payment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payment {
    /// The order.
    pub order_id: Uuid,
    /// Where it stands.
    pub state: PaymentState,
}

impl Aggregate for Payment {
    type Event = PaymentEvent;
    type Command = PaymentCommand;
    type Error = PaymentError;
    const TYPE: &'static str = "payment";

    fn apply(&mut self, event: &PaymentEvent) {
        match event {
            PaymentEvent::PaymentSucceeded(e) => {
                self.order_id = e.order_id;
                self.state = PaymentState::Authorised {
                    transaction_id: e.transaction_id.clone(),
                    amount: e.amount,
                };
            }
            PaymentEvent::PaymentDeclined(e) => {
                self.order_id = e.order_id;
                self.state = PaymentState::Declined;
            }
            PaymentEvent::PaymentRefunded(_) => self.state = PaymentState::Refunded,
        }
    }

    fn handle(&self, command: PaymentCommand) -> Result<Vec<PaymentEvent>, PaymentError> {
        match command {
            PaymentCommand::Record {
                order_id,
                amount,
                answer,
            } => {
                if self.state != PaymentState::None {
                    return Ok(vec![]);
                }
                Ok(vec![match answer {
                    GatewayAnswer::Approved { transaction_id } => {
                        PaymentEvent::PaymentSucceeded(messages::PaymentSucceeded {
                            order_id,
                            transaction_id,
                            amount,
                        })
                    }
                    GatewayAnswer::Declined { reason } => {
                        PaymentEvent::PaymentDeclined(messages::PaymentDeclined {
                            order_id,
                            reason,
                        })
                    }
                }])
            }
            PaymentCommand::Refund => match &self.state {
                PaymentState::Authorised {
                    transaction_id,
                    amount,
                } => Ok(vec![PaymentEvent::PaymentRefunded(
                    messages::PaymentRefunded {
                        order_id: self.order_id,
                        transaction_id: transaction_id.clone(),
                        amount: *amount,
                    },
                )]),
                PaymentState::Refunded => Ok(vec![]),
                PaymentState::None | PaymentState::Declined => Err(PaymentError::NothingToRefund),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn authorised_once_refunded_once(ops in proptest::collection::vec(0u8..3, 0..20)) {
            let mut p = Payment::default();
            let (mut charges, mut refunds) = (0, 0);
            for op in ops {
                let command = match op {
                    0 => PaymentCommand::Record { order_id: Uuid::from_u128(1), amount: Money::from_minor(5), answer: GatewayAnswer::Approved { transaction_id: "t".into() } },
                    1 => PaymentCommand::Record { order_id: Uuid::from_u128(1), amount: Money::from_minor(5), answer: GatewayAnswer::Declined { reason: "no".into() } },
                    _ => PaymentCommand::Refund,
                };
                if let Ok(events) = p.handle(command) {
                    for e in &events {
                        match e {
                            PaymentEvent::PaymentSucceeded(_) | PaymentEvent::PaymentDeclined(_) => charges += 1,
                            PaymentEvent::PaymentRefunded(_) => refunds += 1,
                        }
                        p.apply(e);
                    }
                }
            }
            prop_assert!(charges <= 1);
            prop_assert!(refunds <= 1);
            prop_assert!(refunds <= charges);
        }
    }
}
