//! The inventory's aggregates: `Product` (stock with reservations per order)
//! and `Reservation` (the outcome of one order's reservation, across
//! products).

use std::collections::BTreeMap;

use es_core::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::messages::{self, message_enum, StockLine};
use crate::Money;

message_enum! {
    /// The events of a product (stream category `product`).
    pub enum ProductEvent {
        /// Added to the catalog.
        ProductCreated,
        /// Units added.
        ProductRestocked,
        /// Units reserved for an order.
        StockReserved,
        /// An order's units released.
        StockReleased,
        /// An order's units committed (shipped).
        StockCommitted,
    }
}

/// The commands a product decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProductCommand {
    /// Add the product.
    Create {
        /// Its id.
        product_id: Uuid,
        /// Its name.
        name: String,
        /// Its price.
        price: Money,
        /// Units on hand.
        stock: u64,
    },
    /// Add units.
    Restock {
        /// Units added (at least 1).
        quantity: u64,
    },
    /// Reserve units for an order; reserving again for the same order changes
    /// nothing.
    Reserve {
        /// The order.
        order_id: Uuid,
        /// Units (at least 1).
        quantity: u32,
    },
    /// Release an order's units (nothing when it holds none).
    Release {
        /// The order.
        order_id: Uuid,
    },
    /// Commit an order's units (nothing when it holds none).
    Commit {
        /// The order.
        order_id: Uuid,
    },
}

/// Why a product refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProductError {
    /// The product already exists.
    #[error("product already exists")]
    AlreadyExists,
    /// The product does not exist.
    #[error("product {0} not found")]
    NotFound(Uuid),
    /// Quantities must be at least 1.
    #[error("quantity must be at least 1")]
    ZeroQuantity,
    /// Not enough units are available.
    #[error("insufficient stock of {name}: {requested} requested, {available} available")]
    InsufficientStock {
        /// The product's name.
        name: String,
        /// Units asked for.
        requested: u64,
        /// Units available.
        available: u64,
    },
    /// The stock would overflow.
    #[error("stock too large")]
    TooLarge,
}

/// A product's state: units on hand and the reservations held against them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// Its id (nil before it exists).
    pub id: Uuid,
    /// Whether it exists.
    pub exists: bool,
    /// Its name.
    pub name: String,
    /// Its price.
    pub price: Money,
    /// Units on hand (reserved ones included).
    pub on_hand: u64,
    /// Units reserved, per order.
    pub reservations: BTreeMap<Uuid, u32>,
    /// The sum of `reservations`.
    pub reserved: u64,
}

impl Product {
    /// Units that can still be reserved.
    pub fn available(&self) -> u64 {
        self.on_hand.saturating_sub(self.reserved)
    }
}

impl Aggregate for Product {
    type Event = ProductEvent;
    type Command = ProductCommand;
    type Error = ProductError;
    const TYPE: &'static str = "product";

    fn apply(&mut self, event: &ProductEvent) {
        match event {
            ProductEvent::ProductCreated(e) => {
                self.id = e.product_id;
                self.exists = true;
                self.name.clone_from(&e.name);
                self.price = e.price;
                self.on_hand = e.stock;
            }
            ProductEvent::ProductRestocked(e) => self.on_hand += e.quantity,
            ProductEvent::StockReserved(e) => {
                self.reservations.insert(e.order_id, e.quantity);
                self.reserved += u64::from(e.quantity);
            }
            ProductEvent::StockReleased(e) => {
                if let Some(q) = self.reservations.remove(&e.order_id) {
                    self.reserved -= u64::from(q);
                }
            }
            ProductEvent::StockCommitted(e) => {
                if let Some(q) = self.reservations.remove(&e.order_id) {
                    self.reserved -= u64::from(q);
                    self.on_hand -= u64::from(q);
                }
            }
        }
    }

    fn handle(&self, command: ProductCommand) -> Result<Vec<ProductEvent>, ProductError> {
        if let ProductCommand::Create {
            product_id,
            name,
            price,
            stock,
        } = command
        {
            if self.exists {
                return Err(ProductError::AlreadyExists);
            }
            return Ok(vec![ProductEvent::ProductCreated(
                messages::ProductCreated {
                    product_id,
                    name,
                    price,
                    stock,
                },
            )]);
        }
        if !self.exists {
            return Err(ProductError::NotFound(self.id));
        }
        let product_id = self.id;
        match command {
            ProductCommand::Create { .. } => Err(ProductError::AlreadyExists),
            ProductCommand::Restock { quantity } => {
                if quantity == 0 {
                    return Err(ProductError::ZeroQuantity);
                }
                self.on_hand
                    .checked_add(quantity)
                    .filter(|n| *n <= 1_000_000_000_000)
                    .ok_or(ProductError::TooLarge)?;
                Ok(vec![ProductEvent::ProductRestocked(
                    messages::ProductRestocked {
                        product_id,
                        quantity,
                    },
                )])
            }
            ProductCommand::Reserve { order_id, quantity } => {
                if quantity == 0 {
                    return Err(ProductError::ZeroQuantity);
                }
                if self.reservations.contains_key(&order_id) {
                    return Ok(vec![]);
                }
                if u64::from(quantity) > self.available() {
                    return Err(ProductError::InsufficientStock {
                        name: self.name.clone(),
                        requested: u64::from(quantity),
                        available: self.available(),
                    });
                }
                Ok(vec![ProductEvent::StockReserved(messages::StockReserved {
                    product_id,
                    order_id,
                    quantity,
                })])
            }
            ProductCommand::Release { order_id } => Ok(self
                .reservations
                .get(&order_id)
                .map(|&quantity| {
                    ProductEvent::StockReleased(messages::StockReleased {
                        product_id,
                        order_id,
                        quantity,
                    })
                })
                .into_iter()
                .collect()),
            ProductCommand::Commit { order_id } => Ok(self
                .reservations
                .get(&order_id)
                .map(|&quantity| {
                    ProductEvent::StockCommitted(messages::StockCommitted {
                        product_id,
                        order_id,
                        quantity,
                    })
                })
                .into_iter()
                .collect()),
        }
    }
}

message_enum! {
    /// The events of one order's reservation (stream category `inventory`).
    pub enum ReservationEvent {
        /// Every line reserved.
        InventoryReserved,
        /// Not every line could be reserved; none is held.
        InventoryReservationFailed,
        /// Released (or refused in advance).
        InventoryReleased,
        /// The held stock was sold: the reservation is final.
        InventoryCommitted,
    }
}

/// Where an order's reservation stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ReservationState {
    /// Nothing decided yet.
    #[default]
    Open,
    /// Every line is held.
    Reserved(Vec<StockLine>),
    /// It failed; nothing is held.
    Failed,
    /// Released; what was held (if anything) is to be given back.
    Released(Vec<StockLine>),
    /// Sold: the lines taken from stock.
    Committed(Vec<StockLine>),
}

/// The commands a reservation decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReservationCommand {
    /// Record that every line is held.
    RecordReserved(Vec<StockLine>),
    /// Record that the reservation failed.
    RecordFailed(String),
    /// Give the held stock back (compensation).
    Release,
    /// Make the held stock sold.
    Commit,
}

/// Why a reservation refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReservationError {
    /// It was released before the stock was recorded as held: give it back.
    #[error("the reservation was released before it was made")]
    AlreadyReleased,
    /// It is committed: it cannot be released.
    #[error("the reservation is already committed")]
    AlreadyCommitted,
    /// Nothing is held to commit.
    #[error("nothing is reserved to commit")]
    NotReserved,
    /// It was recorded as failed (by an earlier delivery of the same
    /// command): stock held since must be given back.
    #[error("the reservation already failed")]
    AlreadyFailed,
}

/// One order's reservation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reservation {
    /// The order.
    pub order_id: Uuid,
    /// Where it stands.
    pub state: ReservationState,
}

impl Aggregate for Reservation {
    type Event = ReservationEvent;
    type Command = ReservationCommand;
    type Error = ReservationError;
    const TYPE: &'static str = "inventory";

    fn apply(&mut self, event: &ReservationEvent) {
        let previous = std::mem::take(&mut self.state);
        self.state = match event {
            ReservationEvent::InventoryReserved(e) => {
                self.order_id = e.order_id;
                ReservationState::Reserved(e.lines.clone())
            }
            ReservationEvent::InventoryReservationFailed(e) => {
                self.order_id = e.order_id;
                ReservationState::Failed
            }
            ReservationEvent::InventoryReleased(e) => {
                self.order_id = e.order_id;
                match previous {
                    ReservationState::Reserved(lines) => ReservationState::Released(lines),
                    _ => ReservationState::Released(Vec::new()),
                }
            }
            ReservationEvent::InventoryCommitted(e) => {
                self.order_id = e.order_id;
                match previous {
                    ReservationState::Reserved(lines) => ReservationState::Committed(lines),
                    other => other,
                }
            }
        };
    }

    fn handle(
        &self,
        command: ReservationCommand,
    ) -> Result<Vec<ReservationEvent>, ReservationError> {
        let order_id = self.order_id;
        match (command, &self.state) {
            (ReservationCommand::RecordReserved(lines), ReservationState::Open) => {
                Ok(vec![ReservationEvent::InventoryReserved(
                    messages::InventoryReserved { order_id, lines },
                )])
            }
            (ReservationCommand::RecordReserved(_), ReservationState::Released(_)) => {
                Err(ReservationError::AlreadyReleased)
            }
            (ReservationCommand::RecordReserved(_), ReservationState::Failed) => {
                Err(ReservationError::AlreadyFailed)
            }
            (ReservationCommand::RecordFailed(reason), ReservationState::Open) => {
                Ok(vec![ReservationEvent::InventoryReservationFailed(
                    messages::InventoryReservationFailed { order_id, reason },
                )])
            }
            (
                ReservationCommand::Release,
                ReservationState::Open | ReservationState::Reserved(_),
            ) => Ok(vec![ReservationEvent::InventoryReleased(
                messages::InventoryReleased { order_id },
            )]),
            (ReservationCommand::Release, ReservationState::Committed(_)) => {
                Err(ReservationError::AlreadyCommitted)
            }
            (ReservationCommand::Commit, ReservationState::Reserved(_)) => {
                Ok(vec![ReservationEvent::InventoryCommitted(
                    messages::InventoryCommitted { order_id },
                )])
            }
            (ReservationCommand::Commit, ReservationState::Committed(_)) => Ok(vec![]),
            (ReservationCommand::Commit, _) => Err(ReservationError::NotReserved),
            // Anything else was already decided: nothing changes.
            _ => Ok(vec![]),
        }
    }
}

/// A reservation for a given order id (the aggregate learns its id from its
/// first event; commands on a fresh one need it set).
pub fn reservation_for(order_id: Uuid, mut loaded: Reservation) -> Reservation {
    if loaded.order_id.is_nil() {
        loaded.order_id = order_id;
    }
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn created(stock: u64) -> Product {
        let mut p = Product::default();
        for e in p
            .handle(ProductCommand::Create {
                product_id: Uuid::from_u128(1),
                name: "Widget".into(),
                price: Money::from_minor(100),
                stock,
            })
            .unwrap()
        {
            p.apply(&e);
        }
        p
    }

    #[derive(Clone, Debug)]
    enum Op {
        Reserve(u8, u32),
        Release(u8),
        Commit(u8),
        Restock(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, 0u32..5).prop_map(|(o, q)| Op::Reserve(o, q)),
            (0u8..6).prop_map(Op::Release),
            (0u8..6).prop_map(Op::Commit),
            (0u64..3).prop_map(Op::Restock),
        ]
    }

    proptest! {
        #[test]
        fn stock_is_never_negative_and_reservations_add_up(
            stock in 0u64..10,
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            let mut p = created(stock);
            let mut shipped = 0u64;
            let mut restocked = 0u64;
            for op in ops {
                let command = match op {
                    Op::Reserve(o, q) => ProductCommand::Reserve { order_id: Uuid::from_u128(o.into()), quantity: q },
                    Op::Release(o) => ProductCommand::Release { order_id: Uuid::from_u128(o.into()) },
                    Op::Commit(o) => ProductCommand::Commit { order_id: Uuid::from_u128(o.into()) },
                    Op::Restock(q) => ProductCommand::Restock { quantity: q },
                };
                let before = p.clone();
                match p.handle(command.clone()) {
                    Ok(events) => for e in &events {
                        match e {
                            ProductEvent::StockCommitted(c) => shipped += u64::from(c.quantity),
                            ProductEvent::ProductRestocked(r) => restocked += r.quantity,
                            _ => {}
                        }
                        p.apply(e);
                    },
                    Err(ProductError::InsufficientStock { requested, available, .. }) => {
                        prop_assert!(requested > available);
                        prop_assert_eq!(&p, &before);
                    }
                    Err(_) => prop_assert_eq!(&p, &before),
                }
                prop_assert!(p.reserved <= p.on_hand, "reserved {} > on hand {}", p.reserved, p.on_hand);
                prop_assert_eq!(p.reserved, p.reservations.values().map(|q| u64::from(*q)).sum::<u64>());
                prop_assert_eq!(p.on_hand + shipped, stock + restocked);
            }
        }
    }

    #[test]
    fn reserve_is_idempotent_per_order() {
        let mut p = created(5);
        let order_id = Uuid::from_u128(9);
        let events = p
            .handle(ProductCommand::Reserve {
                order_id,
                quantity: 3,
            })
            .unwrap();
        p.apply(&events[0]);
        assert!(p
            .handle(ProductCommand::Reserve {
                order_id,
                quantity: 3
            })
            .unwrap()
            .is_empty());
        assert!(matches!(
            p.handle(ProductCommand::Reserve {
                order_id: Uuid::from_u128(10),
                quantity: 3
            }),
            Err(ProductError::InsufficientStock { available: 2, .. })
        ));
    }

    #[test]
    fn release_before_reserve_refuses_the_reservation() {
        let order_id = Uuid::from_u128(3);
        let mut r = reservation_for(order_id, Reservation::default());
        for e in r.handle(ReservationCommand::Release).unwrap() {
            r.apply(&e);
        }
        assert_eq!(
            r.handle(ReservationCommand::RecordReserved(vec![])),
            Err(ReservationError::AlreadyReleased)
        );
        assert!(r.handle(ReservationCommand::Release).unwrap().is_empty());
    }

    #[test]
    fn a_failed_reservation_refuses_a_late_success() {
        let order_id = Uuid::from_u128(4);
        let mut r = reservation_for(order_id, Reservation::default());
        for e in r
            .handle(ReservationCommand::RecordFailed("out of stock".into()))
            .unwrap()
        {
            r.apply(&e);
        }
        assert_eq!(
            r.handle(ReservationCommand::RecordReserved(vec![])),
            Err(ReservationError::AlreadyFailed)
        );
    }
}
