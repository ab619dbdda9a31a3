//! The messaging topology, in one table: which consumer group each service
//! runs, what each group is bound to, how its deliveries are retried, and
//! what each store's relay publishes. Both deployments read it; every
//! process of the distributed one declares every group at start-up, so that
//! no event is published before the queues of its consumers exist.

use std::time::Duration;

use es_core::relay::{only_bound, route_without_saga_state, Route};
use es_core::{Aggregate, CommandRefused, Saga, Subscription};

use crate::messages::topics;
use crate::order::Order;
use crate::saga::OrderSaga;

/// Subscription group names.
pub mod groups {
    /// The saga's inputs.
    pub const SAGA: &str = "order_saga";
    /// The order service's commands from the bus (the saga's own are
    /// executed in its write; this takes any other sender's).
    pub const ORDER: &str = "order_service";
    /// The order service's catalog read model.
    pub(crate) const CATALOG: &str = "order_catalog";
    /// The inventory's commands.
    pub const INVENTORY: &str = "inventory_service";
    /// The payment service's commands.
    pub const PAYMENT: &str = "payment_service";
    /// The notification service's commands.
    pub(crate) const NOTIFICATION: &str = "notification_service";
    /// The query service's replica of the order events (the distributed
    /// deployment; in one process the query service follows the store).
    pub const QUERY: &str = "order_query";
    /// Every group.
    pub const ALL: [&str; 7] = [
        SAGA,
        ORDER,
        CATALOG,
        INVENTORY,
        PAYMENT,
        NOTIFICATION,
        QUERY,
    ];
}

/// The saga's inputs among the order's events (the names of [`OrderSaga`]'s
/// input variants). The saga lives with the orders and takes these in the
/// write that appends them, not from the bus.
pub(crate) const SAGA_ORDER_INPUTS: [&str; 5] = [
    "OrderCreated",
    "OrderInventoryConfirmed",
    "OrderPaymentConfirmed",
    "OrderCompleted",
    "OrderCancelled",
];

/// The saga's inputs from the bus, as `<topic>.<message type>` (the names of
/// [`OrderSaga`]'s input variants).
const SAGA_INPUTS: [(&str, &str); 6] = [
    (topics::INVENTORY, "InventoryReserved"),
    (topics::INVENTORY, "InventoryReservationFailed"),
    (topics::INVENTORY, CommandRefused::MESSAGE_TYPE),
    (topics::PAYMENT, "PaymentSucceeded"),
    (topics::PAYMENT, "PaymentDeclined"),
    (topics::PAYMENT, CommandRefused::MESSAGE_TYPE),
];

/// What a group is bound to (AMQP topic patterns).
pub(crate) fn bindings(group: &str) -> Vec<String> {
    let every = |topic: &str| vec![format!("{topic}.*")];
    match group {
        groups::SAGA => SAGA_INPUTS
            .iter()
            .map(|(topic, kind)| format!("{topic}.{kind}"))
            .collect(),
        groups::ORDER => every(topics::ORDER_COMMANDS),
        groups::CATALOG => vec![format!("{}.ProductCreated", topics::PRODUCT)],
        groups::INVENTORY => every(topics::INVENTORY_COMMANDS),
        groups::PAYMENT => every(topics::PAYMENT_COMMANDS),
        groups::NOTIFICATION => every(topics::NOTIFICATION_COMMANDS),
        groups::QUERY => every(topics::ORDER),
        _ => Vec::new(),
    }
}

/// How a deployment delivers: concurrent deliveries per group, attempts
/// before a message is set aside, and the wait between attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Deliveries each subscription handles at once.
    pub prefetch: u16,
    /// Attempts before a message goes to the dead letters.
    pub max_attempts: u32,
    /// The wait before a failed message is delivered again.
    pub retry_delay: Duration,
}

impl Delivery {
    /// In process: quick retries, since nothing is far away.
    pub(crate) const EMBEDDED: Self = Self {
        prefetch: 16,
        max_attempts: 50,
        retry_delay: Duration::from_millis(20),
    };

    /// Over PostgreSQL and RabbitMQ: PostgreSQL may be away for a while, so
    /// a message keeps being retried for about two minutes before it is set
    /// aside (RabbitMQ's retry queues are named after the delay).
    pub(crate) const DISTRIBUTED: Self = Self {
        prefetch: 32,
        max_attempts: 600,
        retry_delay: Duration::from_millis(200),
    };
}

/// The subscription of `group` with `delivery`'s settings.
pub(crate) fn subscription(group: &str, delivery: Delivery) -> Subscription {
    Subscription::new(group, bindings(group))
        .with_prefetch(delivery.prefetch)
        .with_max_attempts(delivery.max_attempts)
        .with_retry_delay(delivery.retry_delay)
}

/// What a store's relay publishes: what some group of this table is bound
/// to, never the saga's own state (its command records are relayed). The
/// events nobody consumes (a product's stock movements, say) stay in the
/// store. With `with_source`, the order events also carry where they stand
/// in the order store, for the query service's replica.
pub(crate) fn relay_route(with_source: bool) -> Route {
    let route = route_without_saga_state(&[<OrderSaga as Saga>::TYPE]);
    let route = if with_source {
        es_core::replica::with_source(route, &[<Order as Aggregate>::TYPE])
    } else {
        route
    };
    only_bound(route, groups::ALL.into_iter().flat_map(bindings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_is_bound_and_the_saga_to_each_of_its_inputs() {
        for group in groups::ALL {
            assert!(!bindings(group).is_empty(), "{group}");
        }
        let saga = bindings(groups::SAGA);
        assert_eq!(saga.len(), SAGA_INPUTS.len());
        assert!(saga.contains(&format!("{}.PaymentDeclined", topics::PAYMENT)));
        assert!(bindings("nobody").is_empty());
    }

    #[test]
    fn the_relay_publishes_only_what_a_group_consumes() {
        let route = relay_route(false);
        let published = |stream: &str, event_type: &str| {
            let event = es_core::RecordedEvent {
                event_id: uuid::Uuid::now_v7(),
                stream_id: es_core::StreamId::new(stream).unwrap(),
                stream_version: 1,
                position: es_core::Position::new(1, 0),
                event_type: event_type.into(),
                schema_version: 1,
                payload: es_core::Payload::from_json("{}").unwrap(),
                metadata: es_core::Metadata::new(),
                recorded_at: chrono::Utc::now(),
                tags: Default::default(),
            };
            route(&event).is_some()
        };
        assert!(published("inventory-1", "InventoryReserved"));
        assert!(published("product-1", "ProductCreated"));
        assert!(published("order-1", "OrderCreated"));
        // Stock movements and a reservation's end concern no other service.
        assert!(!published("product-1", "StockReserved"));
        assert!(!published("inventory-1", "InventoryCommitted"));
        assert!(!published("order_saga-1", "Advanced"));
    }
}
