//! The inventory service: owns the catalog's products and their stock, and
//! reserves, releases and commits stock for orders on the saga's command.

pub mod domain;
mod http;

use std::sync::Arc;

use async_trait::async_trait;
use std::time::Duration;

use es_core::{
    Aggregate, Loaded, Message, Metadata, Outcome, Repository, RepositoryError, RetryPolicy,
    StoreError, UnitOfWork,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

pub use domain::{
    Product, ProductCommand, ProductError, ProductEvent, Reservation, ReservationCommand,
    ReservationError, ReservationEvent, ReservationState,
};
pub use http::router;
pub(crate) use http::InventoryApi;

use crate::distributed::Owner;
use crate::messages::{message_enum, StockLine};
use crate::node::{Service, Wiring};
use crate::topology::groups;
use crate::{Error, Money, Result};
use es_core::command::{refusal_outcome, CommandService, Commands};

message_enum! {
    /// The commands the inventory service takes from the bus.
    pub enum InventoryCommandMessage {
        /// Reserve all lines or none.
        ReserveInventory,
        /// Give an order's held stock back (compensation).
        ReleaseInventory,
        /// Make an order's held stock sold.
        CommitInventory,
    }
}

/// A product as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProductView {
    /// The product.
    pub product_id: Uuid,
    /// Its name.
    pub name: String,
    /// Its price.
    #[schema(value_type = String, example = "12.50")]
    pub price: Money,
    /// Units that can be reserved.
    pub available: u64,
    /// Units held for orders.
    pub reserved: u64,
}

impl ProductView {
    fn of(product: &Product) -> Self {
        Self {
            product_id: product.id,
            name: product.name.clone(),
            price: product.price,
            available: product.available(),
            reserved: product.reserved,
        }
    }
}

/// Starts the inventory service in `w`: its commands, its routes, and
/// snapshots of its products.
pub(crate) async fn wire(w: &mut Wiring) -> Result<Arc<InventoryService>> {
    let store = w.backends.store(Service::Inventory).await?;
    let (snapshots, policy) = w.backends.snapshots(Service::Inventory).await?;
    let service = Arc::new(InventoryService::new(
        crate::repository(Arc::clone(&store), &w.backends.event_schema)
            .with_snapshots(snapshots, policy, 1),
        crate::repository(Arc::clone(&store), &w.backends.event_schema),
    ));
    w.consume(groups::INVENTORY, Arc::new(Commands(Arc::clone(&service))))
        .await?;
    w.serve(Owner::Inventory, router(Arc::clone(&service)));
    w.relay(Service::Inventory, &store);
    Ok(service)
}

/// The inventory service.
#[derive(Debug)]
pub struct InventoryService {
    products: Repository<Product>,
    reservations: Repository<Reservation>,
}

impl InventoryService {
    /// A service over these repositories.
    pub fn new(products: Repository<Product>, reservations: Repository<Reservation>) -> Self {
        Self {
            products,
            reservations,
        }
    }

    /// Adds a product to the catalog.
    pub async fn create_product(&self, name: &str, price: &str, stock: i64) -> Result<Uuid> {
        let name = crate::validate::required_text("name", name, 200)?;
        let name = name.as_str();
        let price: Money = price.parse().map_err(|e: crate::money::ParseMoneyError| {
            Error::validation("price", e.to_string())
        })?;
        if price == Money::ZERO {
            return Err(Error::validation("price", "must be more than 0"));
        }
        if !(0..=1_000_000_000).contains(&stock) {
            return Err(Error::validation(
                "stock",
                format!("must be between 0 and 1000000000, got {stock}"),
            ));
        }
        let product_id = Uuid::now_v7();
        let command = ProductCommand::Create {
            product_id,
            name: name.to_owned(),
            price,
            stock: u64::try_from(stock).unwrap_or_default(),
        };
        let metadata = Metadata::new().with_correlation_id(product_id);
        self.products
            .execute(product_id, command, &metadata)
            .await
            .map_err(|e| match e {
                RepositoryError::Rejected(e) => Error::Conflict {
                    message: e.to_string(),
                },
                e => Error::from_repository(e),
            })?;
        tracing::info!(%product_id, name, %price, stock, "product created");
        Ok(product_id)
    }

    /// Adds units to a product's stock.
    pub async fn restock(&self, product_id: Uuid, quantity: i64) -> Result<ProductView> {
        if !(1..=1_000_000_000).contains(&quantity) {
            return Err(Error::validation(
                "quantity",
                format!("must be between 1 and 1000000000, got {quantity}"),
            ));
        }
        let metadata = Metadata::new().with_correlation_id(product_id);
        let quantity = u64::try_from(quantity).unwrap_or_default();
        self.products
            .execute(product_id, ProductCommand::Restock { quantity }, &metadata)
            .await
            .map_err(|e| match e {
                RepositoryError::Rejected(ProductError::NotFound(_)) => Error::NotFound {
                    what: format!("product {product_id}"),
                },
                RepositoryError::Rejected(e) => Error::validation("quantity", e.to_string()),
                e => Error::from_repository(e),
            })?;
        self.product(product_id).await
    }

    /// A product's stock.
    pub async fn product(&self, product_id: Uuid) -> Result<ProductView> {
        let loaded = self
            .products
            .load(product_id)
            .await
            .map_err(Error::from_repository)?;
        if !loaded.state.exists {
            return Err(Error::NotFound {
                what: format!("product {product_id}"),
            });
        }
        Ok(ProductView::of(&loaded.state))
    }

    #[cfg(test)]
    async fn reservation(&self, order_id: Uuid) -> Result<Reservation> {
        let loaded = self
            .reservations
            .load(order_id)
            .await
            .map_err(Error::from_repository)?;
        Ok(domain::reservation_for(order_id, loaded.state))
    }

    /// A fresh unit and the order's reservation loaded in it (`fresh`: as a
    /// new one when it is not cached, unread; the write checks that guess).
    async fn unit_for(
        &self,
        order_id: Uuid,
        fresh: bool,
    ) -> Result<(UnitOfWork, Loaded<Reservation>)> {
        let mut unit = UnitOfWork::new(Arc::clone(self.reservations.store()));
        let loaded = if fresh {
            unit.load_or_new(&self.reservations, order_id).await
        } else {
            unit.load(&self.reservations, order_id).await
        };
        let mut loaded = loaded.map_err(Error::from_repository)?;
        loaded.state = domain::reservation_for(order_id, loaded.state);
        Ok((unit, loaded))
    }

    /// Commits `unit`: `Ok(true)` when written (or nothing to write),
    /// `Ok(false)` after a wait when a concurrent writer moved one of its
    /// aggregates on (decide again), an error when the store failed or the
    /// retries ran out.
    async fn settle(unit: UnitOfWork, attempt: u32) -> Result<bool> {
        match unit.commit().await {
            Ok(_) => Ok(true),
            Err(
                StoreError::WrongExpectedVersion { .. } | StoreError::IdempotencyConflict { .. },
            ) if attempt < UNIT_RETRY.max_attempts => {
                tokio::time::sleep(UNIT_RETRY.backoff(attempt)).await;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reserves every line or none, in one atomic write of the order's
    /// reservation and its products: stock is never held without the
    /// reservation that holds it. A reservation already decided (by an
    /// earlier delivery, or released before the reserve arrived) is left as
    /// it is, so redeliveries and late duplicates change nothing.
    async fn reserve(
        &self,
        order_id: Uuid,
        lines: &[StockLine],
        cause: Uuid,
        metadata: &Metadata,
    ) -> Result<()> {
        let lines = merged(lines);
        for attempt in 1.. {
            let (mut unit, reservation) = self.unit_for(order_id, attempt == 1).await?;
            if reservation.state.state != ReservationState::Open {
                unit.keep(&self.reservations, order_id, reservation)
                    .map_err(Error::from_repository)?;
            } else {
                let mut products = Vec::with_capacity(lines.len());
                let mut failure = None;
                for line in &lines {
                    let product = unit
                        .load(&self.products, line.product_id)
                        .await
                        .map_err(Error::from_repository)?;
                    let check = product.state.handle(ProductCommand::Reserve {
                        order_id,
                        quantity: line.quantity,
                    });
                    if let (Err(e), None) = (check, &failure) {
                        failure = Some(match e {
                            ProductError::NotFound(_) => {
                                format!("product {} not found", line.product_id)
                            }
                            e => e.to_string(),
                        });
                    }
                    products.push(product);
                }
                let outcome = match &failure {
                    Some(reason) => {
                        tracing::info!(%order_id, reason = ?reason.to_string(), "reservation failed");
                        ReservationCommand::RecordFailed(reason.clone())
                    }
                    None => ReservationCommand::RecordReserved(lines.clone()),
                };
                for (line, product) in lines.iter().zip(products) {
                    if failure.is_some() {
                        unit.keep(&self.products, line.product_id, product)
                            .map_err(Error::from_repository)?;
                        continue;
                    }
                    let command = ProductCommand::Reserve {
                        order_id,
                        quantity: line.quantity,
                    };
                    unit.decide(
                        &self.products,
                        line.product_id,
                        product,
                        command,
                        cause,
                        metadata,
                    )
                    .map_err(Error::from_repository)?
                    .map_err(|e| Error::caused("a checked reserve was refused", e))?;
                }
                let recorded = unit
                    .decide(
                        &self.reservations,
                        order_id,
                        reservation,
                        outcome,
                        cause,
                        metadata,
                    )
                    .map_err(Error::from_repository)?;
                if let Err(e) = recorded {
                    tracing::info!(%order_id, error = %e, "reservation outcome not recorded");
                }
            }
            if Self::settle(unit, attempt).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Releases the reservation and gives its stock back, in one write; why
    /// the reservation refused, when it did.
    async fn release(
        &self,
        order_id: Uuid,
        cause: Uuid,
        metadata: &Metadata,
    ) -> Result<Option<ReservationError>> {
        self.settle_lines(order_id, cause, metadata, ReservationCommand::Release)
            .await
    }

    /// Commits the reservation and its stock, in one write; why the
    /// reservation refused, when it did.
    async fn commit(
        &self,
        order_id: Uuid,
        cause: Uuid,
        metadata: &Metadata,
    ) -> Result<Option<ReservationError>> {
        self.settle_lines(order_id, cause, metadata, ReservationCommand::Commit)
            .await
    }

    /// Releases or commits: the reservation's event and, when it held
    /// stock, the same step on each of its products, as one write.
    async fn settle_lines(
        &self,
        order_id: Uuid,
        cause: Uuid,
        metadata: &Metadata,
        command: ReservationCommand,
    ) -> Result<Option<ReservationError>> {
        for attempt in 1.. {
            let mut refused = None;
            let (mut unit, reservation) = self.unit_for(order_id, false).await?;
            let held = match &reservation.state.state {
                ReservationState::Reserved(lines) => lines.clone(),
                _ => Vec::new(),
            };
            let decided = unit
                .decide(
                    &self.reservations,
                    order_id,
                    reservation,
                    command.clone(),
                    cause,
                    metadata,
                )
                .map_err(Error::from_repository)?;
            match decided {
                Ok(events) if !events.is_empty() => {
                    for line in &held {
                        let product = unit
                            .load(&self.products, line.product_id)
                            .await
                            .map_err(Error::from_repository)?;
                        let step = match command {
                            ReservationCommand::Commit => ProductCommand::Commit { order_id },
                            _ => ProductCommand::Release { order_id },
                        };
                        // A product that refuses (nothing held for the
                        // order) is passed over.
                        let _ = unit
                            .decide(
                                &self.products,
                                line.product_id,
                                product,
                                step,
                                cause,
                                metadata,
                            )
                            .map_err(Error::from_repository)?;
                    }
                }
                Ok(_) => {}
                Err(e) => refused = Some(e),
            }
            if Self::settle(unit, attempt).await? {
                return Ok(refused);
            }
        }
        Ok(None)
    }
}

/// The retries of a unit whose aggregates moved on: many quick, short ones,
/// as for a popular product raced for by many orders at once.
const UNIT_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 64,
    base_delay: Duration::from_micros(200),
    max_delay: Duration::from_millis(20),
};

/// One line per product: the quantities of a product's lines added up.
fn merged(lines: &[StockLine]) -> Vec<StockLine> {
    let mut merged: Vec<StockLine> = Vec::with_capacity(lines.len());
    for line in lines {
        match merged.iter_mut().find(|l| l.product_id == line.product_id) {
            Some(l) => l.quantity = l.quantity.saturating_add(line.quantity),
            None => merged.push(*line),
        }
    }
    merged
}

#[async_trait]
impl CommandService for InventoryService {
    type Command = InventoryCommandMessage;

    async fn execute(
        &self,
        command: Self::Command,
        message: &Message,
        metadata: &Metadata,
    ) -> Outcome {
        let (order_id, result) = match command {
            InventoryCommandMessage::ReserveInventory(c) => {
                let reserved = self.reserve(c.order_id, &c.lines, message.message_id, metadata);
                (c.order_id, reserved.await.map(|()| None))
            }
            InventoryCommandMessage::ReleaseInventory(c) => {
                let released = self.release(c.order_id, message.message_id, metadata);
                (c.order_id, released.await)
            }
            InventoryCommandMessage::CommitInventory(c) => {
                let committed = self.commit(c.order_id, message.message_id, metadata);
                (c.order_id, committed.await)
            }
        };
        match result {
            Ok(None) => Outcome::Ack,
            // The saga that sent it learns of the refusal, and compensates.
            Ok(Some(reason)) => {
                refusal_outcome(&self.reservations, order_id, message, metadata, &reason).await
            }
            Err(e) => e.outcome(),
        }
    }
}

#[cfg(test)]
mod tests {
    use es_core::InMemoryEventStore;

    use super::*;

    fn service() -> InventoryService {
        let store: Arc<dyn es_core::EventStore> = Arc::new(InMemoryEventStore::new());
        InventoryService::new(Repository::new(Arc::clone(&store)), Repository::new(store))
    }

    /// A commit with nothing reserved is refused, and the refusal is
    /// recorded once, in the order's conversation, for the saga.
    #[tokio::test]
    async fn a_refused_command_is_recorded_once_for_the_saga() {
        let inventory = service();
        let order_id = Uuid::now_v7();
        let commit =
            InventoryCommandMessage::CommitInventory(crate::messages::CommitInventory { order_id });
        let metadata = Metadata::new().with_correlation_id(order_id);
        let message = Message::encode(
            crate::messages::topics::INVENTORY_COMMANDS,
            &commit,
            metadata.clone(),
        )
        .unwrap();
        let caused = metadata.caused_by(message.message_id);
        for _ in 0..2 {
            let outcome = inventory.execute(commit.clone(), &message, &caused).await;
            assert_eq!(outcome, Outcome::Ack);
        }
        let stream = inventory.reservations.stream_id(order_id).unwrap();
        let store = inventory.reservations.store();
        let recorded = store.read_stream(&stream, 0, 10).await.unwrap();
        assert_eq!(recorded.len(), 1, "{recorded:?}");
        let published = es_core::relay::default_route(&recorded[0]).unwrap();
        assert_eq!(published.routing_key(), "inventory.CommandRefused");
        assert_eq!(published.metadata.correlation_id, Some(order_id));
        let refused: es_core::CommandRefused =
            serde_json::from_str(published.payload.as_str()).unwrap();
        assert_eq!(refused.command_type, "CommitInventory");
        assert_eq!(refused.reason, ReservationError::NotReserved.to_string());
    }

    /// A release that overtakes its reserve settles the reservation: the
    /// reserve that arrives after it holds nothing.
    #[tokio::test]
    async fn a_reserve_that_arrives_after_its_release_holds_nothing() {
        let inventory = service();
        let product_id = inventory.create_product("Widget", "2.50", 5).await.unwrap();
        let order_id = Uuid::now_v7();
        let metadata = Metadata::new().with_correlation_id(order_id);
        let lines = [StockLine {
            product_id,
            quantity: 3,
        }];
        inventory
            .release(order_id, Uuid::now_v7(), &metadata)
            .await
            .unwrap();
        inventory
            .reserve(order_id, &lines, Uuid::now_v7(), &metadata)
            .await
            .unwrap();
        let product = inventory.product(product_id).await.unwrap();
        assert_eq!((product.reserved, product.available), (0, 5));
        assert!(matches!(
            inventory.reservation(order_id).await.unwrap().state,
            ReservationState::Released(_)
        ));
    }

    /// A reserve fails for want of stock; stock is freed; the same command
    /// delivered again finds the reservation failed and holds nothing (the
    /// order's saga saw the failure and will never release it).
    #[tokio::test]
    async fn a_redelivered_reserve_after_its_failure_holds_nothing() {
        let inventory = service();
        let product_id = inventory.create_product("Widget", "1.00", 3).await.unwrap();
        let (order_id, other, cause) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let metadata = Metadata::new().with_correlation_id(order_id);
        let lines = |quantity| {
            [StockLine {
                product_id,
                quantity,
            }]
        };
        inventory
            .reserve(other, &lines(1), Uuid::now_v7(), &metadata)
            .await
            .unwrap();
        inventory
            .reserve(order_id, &lines(3), cause, &metadata)
            .await
            .unwrap();
        assert_eq!(
            inventory.reservation(order_id).await.unwrap().state,
            ReservationState::Failed
        );
        inventory
            .release(other, Uuid::now_v7(), &metadata)
            .await
            .unwrap();
        inventory
            .reserve(order_id, &lines(3), cause, &metadata)
            .await
            .unwrap();
        let product = inventory.product(product_id).await.unwrap();
        assert_eq!((product.reserved, product.available), (0, 3));
        assert_eq!(
            inventory.reservation(order_id).await.unwrap().state,
            ReservationState::Failed
        );
    }

    /// Many orders race for scarce stock, each command delivered twice at
    /// once: no unit is oversold, every reservation is decided once, and the
    /// stock held is exactly what the reserved reservations hold; committing
    /// them all ships exactly that.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_reservations_never_oversell_and_hold_what_they_record() {
        let inventory = Arc::new(service());
        let product_id = inventory
            .create_product("Scarce", "1.00", 10)
            .await
            .unwrap();
        let orders: Vec<(Uuid, Uuid)> = (0..12).map(|_| (Uuid::now_v7(), Uuid::now_v7())).collect();
        let mut tasks = Vec::new();
        for &(order_id, cause) in &orders {
            for _ in 0..2 {
                let inventory = Arc::clone(&inventory);
                tasks.push(tokio::spawn(async move {
                    let lines = [StockLine {
                        product_id,
                        quantity: 2,
                    }];
                    let metadata = Metadata::new().with_correlation_id(order_id);
                    inventory
                        .reserve(order_id, &lines, cause, &metadata)
                        .await
                        .unwrap();
                }));
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        let mut reserved = 0;
        for &(order_id, _) in &orders {
            match inventory.reservation(order_id).await.unwrap().state {
                ReservationState::Reserved(lines) => reserved += lines[0].quantity,
                ReservationState::Failed => {}
                other => panic!("{other:?}"),
            }
        }
        let product = inventory.product(product_id).await.unwrap();
        assert_eq!(reserved, 10, "the stock is taken by whole reservations");
        assert_eq!(product.reserved, u64::from(reserved));
        for &(order_id, _) in &orders {
            let metadata = Metadata::new().with_correlation_id(order_id);
            inventory
                .commit(order_id, Uuid::now_v7(), &metadata)
                .await
                .unwrap();
        }
        let product = inventory.product(product_id).await.unwrap();
        assert_eq!((product.reserved, product.available), (0, 0));
    }

    /// A reservation that fails on its second line records the failure and
    /// holds nothing; a redelivery of the same command changes nothing.
    #[tokio::test]
    async fn a_failed_reservation_holds_nothing_even_when_redelivered() {
        let inventory = service();
        let plenty = inventory
            .create_product("Plenty", "1.00", 10)
            .await
            .unwrap();
        let scarce = inventory.create_product("Scarce", "1.00", 1).await.unwrap();
        let order_id = Uuid::now_v7();
        let cause = Uuid::now_v7();
        let metadata = Metadata::new().with_correlation_id(order_id);
        let lines = [
            StockLine {
                product_id: plenty,
                quantity: 4,
            },
            StockLine {
                product_id: scarce,
                quantity: 2,
            },
        ];
        for _ in 0..2 {
            inventory
                .reserve(order_id, &lines, cause, &metadata)
                .await
                .unwrap();
            assert_eq!(
                inventory.reservation(order_id).await.unwrap().state,
                ReservationState::Failed
            );
            assert_eq!(inventory.product(plenty).await.unwrap().reserved, 0);
            assert_eq!(inventory.product(scarce).await.unwrap().reserved, 0);
        }
    }
}
