//! The published language: the events and commands the services exchange on
//! the bus. Each is a plain struct; the per-service enums wrap them in
//! variants of the same name, so a message's type name is its struct's name.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Money;

/// Topic names: event topics are the stream categories the relay publishes
/// on; command topics are where the saga sends commands.
pub mod topics {
    /// Order events (stream category `order`).
    pub const ORDER: &str = "order";
    /// Product events (stream category `product`).
    pub const PRODUCT: &str = "product";
    /// Inventory reservation events (stream category `inventory`).
    pub const INVENTORY: &str = "inventory";
    /// Payment events (stream category `payment`).
    pub const PAYMENT: &str = "payment";
    /// Commands for the order service.
    pub const ORDER_COMMANDS: &str = "order_commands";
    /// Commands for the inventory service.
    pub const INVENTORY_COMMANDS: &str = "inventory_commands";
    /// Commands for the payment service.
    pub const PAYMENT_COMMANDS: &str = "payment_commands";
    /// Commands for the notification service.
    pub const NOTIFICATION_COMMANDS: &str = "notification_commands";
    /// Every command topic: a command must reach its service's queue, so the
    /// relays publish these as mandatory.
    pub(crate) const COMMANDS: [&str; 4] = [
        ORDER_COMMANDS,
        INVENTORY_COMMANDS,
        PAYMENT_COMMANDS,
        NOTIFICATION_COMMANDS,
    ];
}

/// Declares an enum of newtype variants named like their payload structs,
/// deriving [`es_core::DomainEvent`] (type names are serde's: the variant
/// names).
macro_rules! message_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(
            Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, es_core::DomainEvent,
        )]
        #[event(crate = "es_core")]
        $vis enum $name {
            $($(#[$vmeta])* $variant($crate::messages::$variant)),+
        }
    };
}
pub(crate) use message_enum;

/// A command the receiving service refused, as the relay publishes its
/// record (`<category>.CommandRefused`): the saga that sent it compensates.
pub use es_core::CommandRefused;

/// One line of an order, priced from the catalog when it was placed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The product.
    pub product_id: Uuid,
    /// Its name when the order was placed.
    pub product_name: String,
    /// Its price when the order was placed.
    pub unit_price: Money,
    /// How many.
    pub quantity: u32,
}

/// A quantity of one product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLine {
    /// The product.
    pub product_id: Uuid,
    /// How many.
    pub quantity: u32,
}

/// An order was placed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_email: String,
    /// What was ordered, priced.
    pub items: Vec<OrderLine>,
    /// The sum of the lines.
    pub total: Money,
    /// The card token to charge.
    pub card_token: String,
    /// How long payment may take once stock is reserved, in milliseconds.
    pub payment_timeout_ms: u64,
    /// When it was placed (schema version 2; version 1 named it
    /// `created_at`).
    pub placed_at: DateTime<Utc>,
}

/// The order's stock was confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderInventoryConfirmed {
    /// The order.
    pub order_id: Uuid,
}

/// The order's payment was confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPaymentConfirmed {
    /// The order.
    pub order_id: Uuid,
    /// The gateway's transaction.
    pub transaction_id: String,
}

/// The order completed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCompleted {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_email: String,
    /// When it completed.
    pub completed_at: DateTime<Utc>,
}

/// The order was cancelled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_email: String,
    /// Why the order is cancelled, for the customer.
    pub reason: String,
    /// Whether the customer asked for it.
    pub by_customer: bool,
    /// When it was cancelled.
    pub cancelled_at: DateTime<Utc>,
}

/// A product was added to the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductCreated {
    /// The product.
    pub product_id: Uuid,
    /// Its name.
    pub name: String,
    /// Its price.
    pub price: Money,
    /// Units on hand.
    pub stock: u64,
}

/// Units were added to a product's stock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductRestocked {
    /// The product.
    pub product_id: Uuid,
    /// Units added.
    pub quantity: u64,
}

/// Units of a product were reserved for an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReserved {
    /// The product.
    pub product_id: Uuid,
    /// The order.
    pub order_id: Uuid,
    /// Units reserved.
    pub quantity: u32,
}

/// An order's reservation of a product was released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReleased {
    /// The product.
    pub product_id: Uuid,
    /// The order.
    pub order_id: Uuid,
    /// Units released.
    pub quantity: u32,
}

/// An order's reservation of a product was committed (the units left).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockCommitted {
    /// The product.
    pub product_id: Uuid,
    /// The order.
    pub order_id: Uuid,
    /// Units committed.
    pub quantity: u32,
}

/// Every line of an order is reserved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReserved {
    /// The order.
    pub order_id: Uuid,
    /// What is reserved.
    pub lines: Vec<StockLine>,
}

/// An order's lines could not all be reserved; none is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReservationFailed {
    /// The order.
    pub order_id: Uuid,
    /// Which line could not be held, for the saga and the customer.
    pub reason: String,
}

/// An order's reservation was released (or refused in advance).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReleased {
    /// The order.
    pub order_id: Uuid,
}

/// An order's reserved stock was committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryCommitted {
    /// The order.
    pub order_id: Uuid,
}

/// The gateway authorised the payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentSucceeded {
    /// The order.
    pub order_id: Uuid,
    /// The gateway's transaction.
    pub transaction_id: String,
    /// The amount.
    pub amount: Money,
}

/// The gateway declined the payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentDeclined {
    /// The order.
    pub order_id: Uuid,
    /// The gateway's reason.
    pub reason: String,
}

/// An authorised payment was refunded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    /// The order.
    pub order_id: Uuid,
    /// The refunded transaction.
    pub transaction_id: String,
    /// The amount.
    pub amount: Money,
}

/// Command: reserve every line of an order, or none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveInventory {
    /// The order.
    pub order_id: Uuid,
    /// What to reserve.
    pub lines: Vec<StockLine>,
}

/// Command: release an order's reservation (also before it is made).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInventory {
    /// The order.
    pub order_id: Uuid,
}

/// Command: commit an order's reservation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitInventory {
    /// The order.
    pub order_id: Uuid,
}

/// Command: charge the order's card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessPayment {
    /// The order.
    pub order_id: Uuid,
    /// How much.
    pub amount: Money,
    /// The card token.
    pub card_token: String,
}

/// Command: refund the order's payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundPayment {
    /// The order.
    pub order_id: Uuid,
}

/// Command: mark the order's stock confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmOrderInventory {
    /// The order.
    pub order_id: Uuid,
}

/// Command: mark the order paid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmOrderPayment {
    /// The order.
    pub order_id: Uuid,
    /// The gateway's transaction.
    pub transaction_id: String,
}

/// Command: complete the order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteOrder {
    /// The order.
    pub order_id: Uuid,
}

/// Command: cancel the order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOrder {
    /// The order.
    pub order_id: Uuid,
    /// Why, for the customer.
    pub reason: String,
}

/// What a notification tells the customer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NotificationKind {
    /// The order completed.
    OrderConfirmed,
    /// The order was cancelled.
    OrderCancelled,
}

impl NotificationKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrderConfirmed => "OrderConfirmed",
            Self::OrderCancelled => "OrderCancelled",
        }
    }
}

/// Command: tell the customer about their order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyCustomer {
    /// The order.
    pub order_id: Uuid,
    /// To whom.
    pub email: String,
    /// What about.
    pub kind: NotificationKind,
    /// Why (for cancellations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
