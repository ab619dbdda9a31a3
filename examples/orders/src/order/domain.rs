//! The `Order` aggregate: pure decisions over an order's events.

use std::fmt;

use chrono::{DateTime, Utc};
use es_core::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::messages::{self, message_enum, OrderLine};
use crate::Money;

/// An order's status. Its JSON and display form is the variant's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Placed; stock not yet reserved.
    Pending,
    /// Stock reserved.
    InventoryConfirmed,
    /// Paid; waiting for completion.
    PaymentConfirmed,
    /// Done (terminal).
    Completed,
    /// Cancelled (terminal).
    Cancelled,
}

impl OrderStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::InventoryConfirmed,
        Self::PaymentConfirmed,
        Self::Completed,
        Self::Cancelled,
    ];

    /// The status's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::InventoryConfirmed => "InventoryConfirmed",
            Self::PaymentConfirmed => "PaymentConfirmed",
            Self::Completed => "Completed",
            Self::Cancelled => "Cancelled",
        }
    }

    /// Whether no transition leaves this status.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for OrderStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown status {s:?}: expected one of Pending, InventoryConfirmed, PaymentConfirmed, Completed, Cancelled")
            })
    }
}

message_enum! {
    /// The events of an order (stream category `order`).
    pub enum OrderEvent {
        /// The order was placed, priced from the catalog.
        #[event(version = 2)]
        OrderCreated,
        /// Stock confirmed.
        OrderInventoryConfirmed,
        /// The payment was confirmed.
        OrderPaymentConfirmed,
        /// The order completed.
        OrderCompleted,
        /// The order was cancelled.
        OrderCancelled,
    }
}

/// What is needed to place an order, already priced and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaceOrder {
    /// The order.
    pub order_id: Uuid,
    /// The customer's email address.
    pub customer_email: String,
    /// The priced lines.
    pub items: Vec<OrderLine>,
    /// The card token.
    pub card_token: String,
    /// The payment window, in milliseconds.
    pub payment_timeout_ms: u64,
    /// When it was placed.
    pub at: DateTime<Utc>,
}

/// The commands an order decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderCommand {
    /// Place the order.
    Place(PlaceOrder),
    /// Pending -> InventoryConfirmed.
    ConfirmInventory,
    /// InventoryConfirmed -> PaymentConfirmed.
    ConfirmPayment {
        /// The gateway's transaction.
        transaction_id: String,
    },
    /// PaymentConfirmed -> Completed.
    Complete {
        /// When it completed.
        at: DateTime<Utc>,
    },
    /// Any status but Completed (and Cancelled) -> Cancelled.
    Cancel {
        /// Why, for the customer.
        reason: String,
        /// Whether the customer asked.
        by_customer: bool,
        /// When it was cancelled.
        at: DateTime<Utc>,
    },
}

impl OrderCommand {
    /// The command's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Place(_) => "place",
            Self::ConfirmInventory => "confirm inventory",
            Self::ConfirmPayment { .. } => "confirm payment",
            Self::Complete { .. } => "complete",
            Self::Cancel { .. } => "cancel",
        }
    }
}

/// Why an order refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// The order already exists.
    #[error("order {0} already exists")]
    AlreadyExists(Uuid),
    /// The order does not exist.
    #[error("order not found")]
    NotFound,
    /// An order needs at least one line.
    #[error("an order needs at least one item")]
    Empty,
    /// A line's quantity is zero.
    #[error("item quantities must be at least 1")]
    ZeroQuantity,
    /// The total overflowed.
    #[error("the order total is too large")]
    TotalTooLarge,
    /// The order is another customer's.
    #[error("the order is another customer's")]
    OtherCustomer,
    /// The command is not allowed in the order's status.
    #[error("cannot {action} an order that is {status}")]
    IllegalTransition {
        /// The command.
        action: &'static str,
        /// The order's status.
        status: OrderStatus,
    },
}

/// An order's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Order {
    /// The order's id (nil before it exists).
    pub id: Uuid,
    /// Its status (`None` before it exists).
    pub status: Option<OrderStatus>,
    /// The customer's email address.
    pub customer_email: String,
    /// The total.
    pub total: Money,
    /// The transaction that paid it.
    pub transaction_id: Option<String>,
}

impl Order {
    fn transition(
        &self,
        action: &'static str,
        from: OrderStatus,
        event: OrderEvent,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        match self.status {
            None => Err(OrderError::NotFound),
            Some(status) if status == from => Ok(vec![event]),
            Some(status) => Err(OrderError::IllegalTransition { action, status }),
        }
    }
}

impl Aggregate for Order {
    type Event = OrderEvent;
    type Command = OrderCommand;
    type Error = OrderError;
    const TYPE: &'static str = "order";

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderCreated(e) => {
                self.id = e.order_id;
                self.status = Some(OrderStatus::Pending);
                self.customer_email.clone_from(&e.customer_email);
                self.total = e.total;
            }
            OrderEvent::OrderInventoryConfirmed(_) => {
                self.status = Some(OrderStatus::InventoryConfirmed);
            }
            OrderEvent::OrderPaymentConfirmed(e) => {
                self.status = Some(OrderStatus::PaymentConfirmed);
                self.transaction_id = Some(e.transaction_id.clone());
            }
            OrderEvent::OrderCompleted(_) => self.status = Some(OrderStatus::Completed),
            OrderEvent::OrderCancelled(_) => self.status = Some(OrderStatus::Cancelled),
        }
    }

    fn handle(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        let action = command.name();
        match command {
            OrderCommand::Place(place) => {
                if self.status.is_some() {
                    return Err(OrderError::AlreadyExists(self.id));
                }
                if place.items.is_empty() {
                    return Err(OrderError::Empty);
                }
                let mut total = Money::ZERO;
                for line in &place.items {
                    if line.quantity == 0 {
                        return Err(OrderError::ZeroQuantity);
                    }
                    total = line
                        .unit_price
                        .checked_mul(u64::from(line.quantity))
                        .and_then(|l| total.checked_add(l))
                        .ok_or(OrderError::TotalTooLarge)?;
                }
                Ok(vec![OrderEvent::OrderCreated(messages::OrderCreated {
                    order_id: place.order_id,
                    customer_email: place.customer_email,
                    items: place.items,
                    total,
                    card_token: place.card_token,
                    payment_timeout_ms: place.payment_timeout_ms,
                    placed_at: place.at,
                })])
            }
            OrderCommand::ConfirmInventory => self.transition(
                action,
                OrderStatus::Pending,
                OrderEvent::OrderInventoryConfirmed(messages::OrderInventoryConfirmed {
                    order_id: self.id,
                }),
            ),
            OrderCommand::ConfirmPayment { transaction_id } => self.transition(
                action,
                OrderStatus::InventoryConfirmed,
                OrderEvent::OrderPaymentConfirmed(messages::OrderPaymentConfirmed {
                    order_id: self.id,
                    transaction_id,
                }),
            ),
            OrderCommand::Complete { at } => self.transition(
                action,
                OrderStatus::PaymentConfirmed,
                OrderEvent::OrderCompleted(messages::OrderCompleted {
                    order_id: self.id,
                    customer_email: self.customer_email.clone(),
                    completed_at: at,
                }),
            ),
            OrderCommand::Cancel {
                reason,
                by_customer,
                at,
            } => match self.status {
                None => Err(OrderError::NotFound),
                Some(status) if status.is_terminal() => {
                    Err(OrderError::IllegalTransition { action, status })
                }
                Some(_) => Ok(vec![OrderEvent::OrderCancelled(messages::OrderCancelled {
                    order_id: self.id,
                    customer_email: self.customer_email.clone(),
                    reason,
                    by_customer,
                    cancelled_at: at,
                })]),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn place() -> OrderCommand {
        OrderCommand::Place(PlaceOrder {
            order_id: Uuid::from_u128(7),
            customer_email: "a@b.c".into(),
            items: vec![
                OrderLine {
                    product_id: Uuid::from_u128(1),
                    product_name: "Widget".into(),
                    unit_price: Money::from_minor(1250),
                    quantity: 2,
                },
                OrderLine {
                    product_id: Uuid::from_u128(2),
                    product_name: "Gadget".into(),
                    unit_price: Money::from_minor(99),
                    quantity: 1,
                },
            ],
            card_token: "tok_ok".into(),
            payment_timeout_ms: 30_000,
            at: DateTime::<Utc>::UNIX_EPOCH,
        })
    }

    fn run(
        commands: impl IntoIterator<Item = OrderCommand>,
    ) -> (Order, Vec<Result<(), OrderError>>) {
        let mut order = Order::default();
        let mut results = Vec::new();
        for c in commands {
            match order.handle(c) {
                Ok(events) => {
                    for e in &events {
                        order.apply(e);
                    }
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        (order, results)
    }

    #[test]
    fn total_is_exact() {
        let (order, _) = run([place()]);
        assert_eq!(order.total.to_string(), "25.99");
        assert_eq!(order.status, Some(OrderStatus::Pending));
    }

    #[test]
    fn happy_path_and_illegal_transitions() {
        let at = DateTime::<Utc>::UNIX_EPOCH;
        let (order, results) = run([
            place(),
            OrderCommand::ConfirmInventory,
            OrderCommand::ConfirmPayment {
                transaction_id: "t".into(),
            },
            OrderCommand::Complete { at },
            OrderCommand::Cancel {
                reason: "x".into(),
                by_customer: true,
                at,
            },
        ]);
        assert_eq!(order.status, Some(OrderStatus::Completed));
        assert!(results[..4].iter().all(Result::is_ok));
        assert_eq!(
            results[4],
            Err(OrderError::IllegalTransition {
                action: "cancel",
                status: OrderStatus::Completed
            })
        );
        let (_, results) = run([place(), OrderCommand::Complete { at }]);
        assert!(matches!(
            results[1],
            Err(OrderError::IllegalTransition { .. })
        ));
        let (_, results) = run([OrderCommand::ConfirmInventory]);
        assert_eq!(results[0], Err(OrderError::NotFound));
    }

    fn any_command() -> impl Strategy<Value = OrderCommand> {
        let at = DateTime::<Utc>::UNIX_EPOCH;
        prop_oneof![
            Just(place()),
            Just(OrderCommand::ConfirmInventory),
            Just(OrderCommand::ConfirmPayment {
                transaction_id: "t".into()
            }),
            Just(OrderCommand::Complete { at }),
            Just(OrderCommand::Cancel {
                reason: "r".into(),
                by_customer: false,
                at
            }),
        ]
    }

    fn allowed(from: Option<OrderStatus>, to: OrderStatus) -> bool {
        use OrderStatus::*;
        matches!(
            (from, to),
            (None, Pending)
                | (Some(Pending), InventoryConfirmed)
                | (Some(InventoryConfirmed), PaymentConfirmed)
                | (Some(PaymentConfirmed), Completed)
                | (
                    Some(Pending | InventoryConfirmed | PaymentConfirmed),
                    Cancelled
                )
        )
    }

    proptest! {
        #[test]
        fn only_allowed_transitions(commands in proptest::collection::vec(any_command(), 0..20)) {
            let mut order = Order::default();
            for command in commands {
                let before = order.status;
                if let Ok(events) = order.handle(command) {
                    prop_assert_eq!(events.len(), 1);
                    order.apply(&events[0]);
                    let after = order.status.unwrap();
                    prop_assert!(allowed(before, after), "{:?} -> {:?}", before, after);
                }
                // Terminal statuses are never left.
                if let Some(s) = before {
                    if s.is_terminal() { prop_assert_eq!(order.status, Some(s)); }
                }
            }
        }
    }
}
