//! The order saga: orchestrates inventory, payment, the order and the
//! notifications, and compensates on failure.
//!
//! The saga keeps the *facts* it has learnt (stock reserved, payment taken,
//! order cancelled, ...) and the *steps* it has issued, and after every input
//! decides, from the facts alone, which steps are due and not yet issued. That
//! makes it indifferent to the order its inputs arrive in and issues each step
//! (and so each compensation) at most once; the [`es_core::SagaManager`]
//! drops redelivered messages by id.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use es_core::{Delivery, MessageHandler, Metadata, Outcome, Reaction, Received, Saga, SagaHandler};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::messages::{self, message_enum, topics, NotificationKind, StockLine};
use crate::Money;

/// The saga's bus handler, timing each reaction (`saga_step_seconds`).
#[derive(Debug)]
pub(crate) struct TimedSaga(pub SagaHandler<OrderSaga>);

#[async_trait]
impl MessageHandler for TimedSaga {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let started = std::time::Instant::now();
        let outcome = self.0.handle(delivery).await;
        metrics::histogram!("saga_step_seconds", "input" => delivery.message.message_type.to_string())
            .record(started.elapsed().as_secs_f64());
        outcome
    }
}

/// The name of the payment deadline.
pub const PAYMENT_DEADLINE: &str = "payment";

message_enum! {
    /// The messages the saga reacts to.
    pub enum SagaInput {
        /// An order was placed: start.
        #[event(version = 2)]
        OrderCreated,
        /// The order's stock is confirmed: it may be marked paid.
        OrderInventoryConfirmed,
        /// The order is paid: complete it.
        OrderPaymentConfirmed,
        /// The order completed.
        OrderCompleted,
        /// The order was cancelled (by the customer or by the saga).
        OrderCancelled,
        /// Stock is held.
        InventoryReserved,
        /// Stock could not be held.
        InventoryReservationFailed,
        /// Payment authorised.
        PaymentSucceeded,
        /// Payment declined.
        PaymentDeclined,
        /// The inventory or the payment service refused a command of the
        /// saga: the order fails unless it is complete.
        CommandRefused,
    }
}

impl SagaInput {
    /// The order the input is about; `None` for a refusal, whose
    /// conversation (its correlation id) names the order.
    pub fn order_id(&self) -> Option<Uuid> {
        Some(match self {
            Self::OrderCreated(m) => m.order_id,
            Self::OrderInventoryConfirmed(m) => m.order_id,
            Self::OrderPaymentConfirmed(m) => m.order_id,
            Self::OrderCompleted(m) => m.order_id,
            Self::OrderCancelled(m) => m.order_id,
            Self::InventoryReserved(m) => m.order_id,
            Self::InventoryReservationFailed(m) => m.order_id,
            Self::PaymentSucceeded(m) => m.order_id,
            Self::PaymentDeclined(m) => m.order_id,
            Self::CommandRefused(_) => return None,
        })
    }
}

message_enum! {
    /// The commands the saga sends.
    pub enum SagaCommand {
        /// To inventory.
        ReserveInventory,
        /// To inventory.
        ReleaseInventory,
        /// To inventory.
        CommitInventory,
        /// To payment.
        ProcessPayment,
        /// To payment.
        RefundPayment,
        /// To the order.
        ConfirmOrderInventory,
        /// To the order.
        ConfirmOrderPayment,
        /// To the order.
        CompleteOrder,
        /// To the order.
        CancelOrder,
        /// To notification.
        NotifyCustomer,
    }
}

/// A step the saga issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Step {
    /// Reserve stock.
    Reserve,
    /// Confirm the order's stock and charge the card.
    ChargeCard,
    /// Confirm the order's payment.
    ConfirmPayment,
    /// Complete the order.
    Complete,
    /// Commit the stock.
    CommitStock,
    /// Tell the customer it is confirmed.
    NotifyConfirmed,
    /// Cancel the order.
    Cancel,
    /// Release the stock.
    Release,
    /// Refund the payment.
    Refund,
    /// Tell the customer it is cancelled.
    NotifyCancelled,
}

/// The saga's start: what it needs to know about the order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaStarted {
    /// The order.
    pub order_id: Uuid,
    /// The customer's email address.
    pub customer_email: String,
    /// What to reserve.
    pub lines: Vec<StockLine>,
    /// What to charge.
    pub total: Money,
    /// The card.
    pub card_token: String,
    /// The payment window.
    pub payment_timeout_ms: u64,
}

/// Something the saga learnt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fact {
    /// The order was placed.
    Started(SagaStarted),
    /// The stock is held.
    StockHeld,
    /// The stock could not be held.
    StockUnavailable {
        /// Why the stock could not be held.
        reason: String,
    },
    /// The payment was taken.
    PaymentTaken {
        /// The transaction.
        transaction_id: String,
        /// The amount.
        amount: Money,
    },
    /// The payment was refused.
    PaymentRefused {
        /// Why the payment was refused.
        reason: String,
    },
    /// No payment answer came in time.
    PaymentTimedOut,
    /// The order confirmed its stock.
    OrderStockConfirmed,
    /// The order is paid.
    OrderPaid,
    /// The order completed.
    OrderCompleted,
    /// The order was cancelled.
    OrderCancelled {
        /// Why the order was cancelled.
        reason: String,
    },
    /// A service refused one of the saga's commands.
    StepRefused {
        /// The refused command's type.
        command: String,
        /// Why the service refused it.
        reason: String,
    },
}

/// One reaction's change of state: what was learnt and which steps were
/// issued (one event per reaction keeps the saga's stream short).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advanced {
    /// What was learnt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learnt: Option<Fact>,
    /// Steps issued.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub issued: Vec<Step>,
}

/// The saga's own events (stream category `order_saga`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderSagaEvent {
    /// A reaction's change of state.
    Advanced(Advanced),
}

impl es_core::DomainEvent for OrderSagaEvent {
    const EVENT_TYPES: &'static [&'static str] = &["Advanced"];

    fn event_type(&self) -> &'static str {
        match self {
            Self::Advanced(_) => "Advanced",
        }
    }
}

/// The order saga's state: facts learnt and steps issued.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrderSaga {
    /// The order, once known (shared: every decision copies the state).
    pub started: Option<Arc<SagaStarted>>,
    /// Stock is held.
    pub stock_held: bool,
    /// Stock could not be held.
    pub stock_unavailable: Option<String>,
    /// The payment taken: transaction and amount.
    pub paid: Option<(String, Money)>,
    /// The payment refused.
    pub payment_refused: Option<String>,
    /// No payment answer in time.
    pub timed_out: bool,
    /// The order confirmed its stock.
    pub order_stock_confirmed: bool,
    /// The order is paid.
    pub order_paid: bool,
    /// The order completed.
    pub completed: bool,
    /// The order was cancelled, and why.
    pub cancelled: Option<String>,
    /// The first of its commands a service refused, and why.
    pub refused: Option<String>,
    /// Steps issued.
    pub issued: BTreeSet<Step>,
}

impl OrderSaga {
    /// Why the order is failing, if it is.
    pub fn failure(&self) -> Option<String> {
        if self.completed {
            return None;
        }
        if let Some(reason) = &self.cancelled {
            return Some(reason.clone());
        }
        if let Some(reason) = &self.stock_unavailable {
            return Some(format!("inventory unavailable: {reason}"));
        }
        if let Some(reason) = &self.payment_refused {
            return Some(format!("payment declined: {reason}"));
        }
        if let Some(refusal) = &self.refused {
            return Some(refusal.clone());
        }
        self.timed_out.then(|| "payment timed out".to_owned())
    }

    /// The steps due now and not yet issued.
    pub(crate) fn due_steps(&self) -> Vec<Step> {
        let mut due = Vec::new();
        if self.started.is_none() {
            return due;
        }
        let not = |s: Step| !self.issued.contains(&s);
        if self.completed {
            due.extend(
                [Step::CommitStock, Step::NotifyConfirmed]
                    .into_iter()
                    .filter(|s| not(*s)),
            );
            return due;
        }
        if self.failure().is_some() {
            if self.cancelled.is_none() && not(Step::Cancel) {
                due.push(Step::Cancel);
            }
            if self.issued.contains(&Step::Reserve)
                && self.stock_unavailable.is_none()
                && not(Step::Release)
            {
                due.push(Step::Release);
            }
            if self.paid.is_some() && not(Step::Refund) {
                due.push(Step::Refund);
            }
            if self.cancelled.is_some() && not(Step::NotifyCancelled) {
                due.push(Step::NotifyCancelled);
            }
            return due;
        }
        if not(Step::Reserve) {
            due.push(Step::Reserve);
        }
        if self.stock_held && not(Step::ChargeCard) {
            due.push(Step::ChargeCard);
        }
        // The order takes its transitions in sequence: it is marked paid only
        // once it has confirmed its stock, whatever order the answers arrive in.
        if self.paid.is_some()
            && self.issued.contains(&Step::ChargeCard)
            && self.order_stock_confirmed
            && not(Step::ConfirmPayment)
        {
            due.push(Step::ConfirmPayment);
        }
        if self.order_paid && not(Step::Complete) {
            due.push(Step::Complete);
        }
        due
    }

    fn fact(&self, input: &SagaInput) -> Option<Fact> {
        Some(match input {
            SagaInput::OrderCreated(m) => {
                if self.started.is_some() {
                    return None;
                }
                Fact::Started(SagaStarted {
                    order_id: m.order_id,
                    customer_email: m.customer_email.clone(),
                    lines: m
                        .items
                        .iter()
                        .map(|l| StockLine {
                            product_id: l.product_id,
                            quantity: l.quantity,
                        })
                        .collect(),
                    total: m.total,
                    card_token: m.card_token.clone(),
                    payment_timeout_ms: m.payment_timeout_ms,
                })
            }
            SagaInput::InventoryReserved(_) if !self.stock_held => Fact::StockHeld,
            SagaInput::InventoryReservationFailed(m) if self.stock_unavailable.is_none() => {
                Fact::StockUnavailable {
                    reason: m.reason.clone(),
                }
            }
            SagaInput::PaymentSucceeded(m) if self.paid.is_none() => Fact::PaymentTaken {
                transaction_id: m.transaction_id.clone(),
                amount: m.amount,
            },
            SagaInput::PaymentDeclined(m) if self.payment_refused.is_none() => {
                Fact::PaymentRefused {
                    reason: m.reason.clone(),
                }
            }
            SagaInput::OrderInventoryConfirmed(_) if !self.order_stock_confirmed => {
                Fact::OrderStockConfirmed
            }
            SagaInput::OrderPaymentConfirmed(_) if !self.order_paid => Fact::OrderPaid,
            SagaInput::OrderCompleted(_) if !self.completed => Fact::OrderCompleted,
            SagaInput::OrderCancelled(m) if self.cancelled.is_none() => Fact::OrderCancelled {
                reason: m.reason.clone(),
            },
            SagaInput::CommandRefused(r) if self.refused.is_none() => Fact::StepRefused {
                command: r.command_type.clone(),
                reason: r.reason.clone(),
            },
            _ => return None,
        })
    }

    fn learn(&mut self, fact: &Fact) {
        match fact {
            Fact::Started(s) => self.started = Some(Arc::new(s.clone())),
            Fact::StockHeld => self.stock_held = true,
            Fact::StockUnavailable { reason } => self.stock_unavailable = Some(reason.clone()),
            Fact::PaymentTaken {
                transaction_id,
                amount,
            } => self.paid = Some((transaction_id.clone(), *amount)),
            Fact::PaymentRefused { reason } => self.payment_refused = Some(reason.clone()),
            Fact::PaymentTimedOut => self.timed_out = true,
            Fact::OrderStockConfirmed => self.order_stock_confirmed = true,
            Fact::OrderPaid => self.order_paid = true,
            Fact::OrderCompleted => self.completed = true,
            Fact::OrderCancelled { reason } => self.cancelled = Some(reason.clone()),
            Fact::StepRefused { command, reason } => {
                self.refused = Some(format!("{command} refused: {reason}"));
            }
        }
    }

    /// Learns `fact`, then issues every step now due, as one state event.
    fn decide(
        &self,
        fact: Option<Fact>,
        now: DateTime<Utc>,
    ) -> Reaction<OrderSagaEvent, SagaCommand> {
        let mut next = self.clone();
        if let Some(fact) = &fact {
            next.learn(fact);
        }
        // Nothing is due before the order is known.
        let steps = next.due_steps();
        next.issued.extend(steps.iter().copied());
        let mut reaction = Reaction::none();
        let mut advanced = Advanced {
            learnt: fact,
            issued: Vec::new(),
        };
        let Some(started) = next.started.as_deref() else {
            if advanced.learnt.is_some() {
                reaction = reaction.event(OrderSagaEvent::Advanced(advanced));
            }
            return reaction;
        };
        let order_id = started.order_id;
        let deadline_pending = self.issued.contains(&Step::ChargeCard)
            && self.paid.is_none()
            && self.payment_refused.is_none()
            && !self.timed_out;
        for &step in &steps {
            reaction = match step {
                Step::Reserve => reaction.send(
                    topics::INVENTORY_COMMANDS,
                    SagaCommand::ReserveInventory(messages::ReserveInventory {
                        order_id,
                        lines: started.lines.clone(),
                    }),
                ),
                Step::ChargeCard => {
                    let timeout = chrono::Duration::milliseconds(
                        i64::try_from(started.payment_timeout_ms).unwrap_or(i64::MAX / 2),
                    );
                    reaction
                        .send(
                            topics::ORDER_COMMANDS,
                            SagaCommand::ConfirmOrderInventory(messages::ConfirmOrderInventory {
                                order_id,
                            }),
                        )
                        .send(
                            topics::PAYMENT_COMMANDS,
                            SagaCommand::ProcessPayment(messages::ProcessPayment {
                                order_id,
                                amount: started.total,
                                card_token: started.card_token.clone(),
                            }),
                        )
                        .deadline(PAYMENT_DEADLINE, now + timeout)
                }
                Step::ConfirmPayment => reaction.send(
                    topics::ORDER_COMMANDS,
                    SagaCommand::ConfirmOrderPayment(messages::ConfirmOrderPayment {
                        order_id,
                        transaction_id: next.paid.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
                    }),
                ),
                Step::Complete => reaction.send(
                    topics::ORDER_COMMANDS,
                    SagaCommand::CompleteOrder(messages::CompleteOrder { order_id }),
                ),
                Step::CommitStock => reaction.send(
                    topics::INVENTORY_COMMANDS,
                    SagaCommand::CommitInventory(messages::CommitInventory { order_id }),
                ),
                Step::NotifyConfirmed => reaction.send(
                    topics::NOTIFICATION_COMMANDS,
                    SagaCommand::NotifyCustomer(messages::NotifyCustomer {
                        order_id,
                        email: started.customer_email.clone(),
                        kind: NotificationKind::OrderConfirmed,
                        reason: None,
                    }),
                ),
                Step::Cancel => reaction.send(
                    topics::ORDER_COMMANDS,
                    SagaCommand::CancelOrder(messages::CancelOrder {
                        order_id,
                        reason: next.failure().unwrap_or_default(),
                    }),
                ),
                Step::Release => reaction.send(
                    topics::INVENTORY_COMMANDS,
                    SagaCommand::ReleaseInventory(messages::ReleaseInventory { order_id }),
                ),
                Step::Refund => reaction.send(
                    topics::PAYMENT_COMMANDS,
                    SagaCommand::RefundPayment(messages::RefundPayment { order_id }),
                ),
                Step::NotifyCancelled => reaction.send(
                    topics::NOTIFICATION_COMMANDS,
                    SagaCommand::NotifyCustomer(messages::NotifyCustomer {
                        order_id,
                        email: started.customer_email.clone(),
                        kind: NotificationKind::OrderCancelled,
                        reason: next.cancelled.clone(),
                    }),
                ),
            };
        }
        // The payment window closes once the payment's outcome is known or the
        // order is failing for another reason.
        let still_waiting = next.issued.contains(&Step::ChargeCard)
            && next.paid.is_none()
            && next.payment_refused.is_none()
            && !next.timed_out
            && next.failure().is_none()
            && !next.completed;
        if deadline_pending && !still_waiting {
            reaction = reaction.cancel(PAYMENT_DEADLINE);
        }
        advanced.issued = steps;
        if advanced.learnt.is_some() || !advanced.issued.is_empty() {
            reaction
                .events
                .insert(0, OrderSagaEvent::Advanced(advanced));
        }
        reaction
    }
}

impl Saga for OrderSaga {
    type Event = OrderSagaEvent;
    type Input = SagaInput;
    type Command = SagaCommand;
    const TYPE: &'static str = "order_saga";

    fn saga_id(input: &SagaInput, metadata: &Metadata) -> Option<Uuid> {
        input.order_id().or(metadata.correlation_id)
    }

    fn apply(&mut self, event: &OrderSagaEvent) {
        match event {
            OrderSagaEvent::Advanced(a) => {
                if let Some(fact) = &a.learnt {
                    self.learn(fact);
                }
                self.issued.extend(a.issued.iter().copied());
            }
        }
    }

    fn react(
        &self,
        input: &SagaInput,
        received: Received<'_>,
    ) -> Reaction<OrderSagaEvent, SagaCommand> {
        self.decide(self.fact(input), received.now)
    }

    fn on_deadline(&self, name: &str, now: DateTime<Utc>) -> Reaction<OrderSagaEvent, SagaCommand> {
        if name != PAYMENT_DEADLINE
            || self.paid.is_some()
            || self.payment_refused.is_some()
            || self.timed_out
            || self.completed
        {
            return Reaction::none();
        }
        self.decide(Some(Fact::PaymentTimedOut), now)
    }
}
