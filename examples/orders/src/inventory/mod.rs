//! The inventory service: owns the catalog's products and their stock, and
//! reserves, releases and commits stock for orders on the saga's command.

pub mod domain;
mod http;

use std::sync::Arc;

use async_trait::async_trait;
use es_core::{derived_id, Message, Metadata, Outcome, Repository, RepositoryError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

pub use domain::{
    Product, ProductCommand, ProductError, ProductEvent, Reservation, ReservationCommand,
    ReservationError, ReservationEvent, ReservationState,
};
pub use http::{router, CreateProduct, InventoryApi, ProductCreatedBody, Restock};

use crate::distributed::Owner;
use crate::messages::{message_enum, StockLine};
use crate::node::{Service, Wiring};
use crate::topology::groups;
use crate::{CommandService, Error, Money, Result};

message_enum! {
    /// The commands the inventory service takes from the bus.
    pub enum InventoryCommandMessage {
        /// Reserve all lines or none.
        ReserveInventory,
        /// Release.
        ReleaseInventory,
        /// Commit.
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
        crate::repository(Arc::clone(&store)).with_snapshots(snapshots, policy, 1),
        crate::repository(Arc::clone(&store)),
    ));
    w.consume(
        groups::INVENTORY,
        Arc::new(crate::Commands(Arc::clone(&service))),
    )
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

    async fn reservation(&self, order_id: Uuid) -> Result<Reservation> {
        let loaded = self
            .reservations
            .load(order_id)
            .await
            .map_err(Error::from_repository)?;
        Ok(domain::reservation_for(order_id, loaded.state))
    }

    /// Records an outcome on the order's reservation. `Ok(Ok(true))` when
    /// this call wrote it; `Ok(Ok(false))` when nothing was written: the
    /// reservation already stood so, or `cause` had recorded an outcome
    /// before (another delivery of the same command, perhaps with another
    /// decision).
    async fn record(
        &self,
        order_id: Uuid,
        cause: Uuid,
        command: ReservationCommand,
        metadata: &Metadata,
    ) -> Result<std::result::Result<bool, ReservationError>> {
        let result = self
            .reservations
            .execute_with(order_id, metadata, Some(cause), |state: &Reservation| {
                es_core::Aggregate::handle(
                    &domain::reservation_for(order_id, state.clone()),
                    command.clone(),
                )
            })
            .await;
        match result {
            Ok(committed) => Ok(Ok(!committed.events.is_empty())),
            Err(RepositoryError::Rejected(e)) => Ok(Err(e)),
            Err(e) => Err(Error::from_repository(e)),
        }
    }

    /// Reserves every line or none, then records the outcome on the order's
    /// reservation. Safe under redelivery, concurrent duplicates and a
    /// release that overtakes it:
    ///
    /// - each product step runs at most once per delivery of the command
    ///   (`execute_once` with an id derived from the message), so a late
    ///   duplicate never re-reserves stock a commit or release already
    ///   settled;
    /// - the outcome is recorded before a failed attempt gives its stock
    ///   back, so a retry after a crash finds the stock it holds still held;
    /// - whenever the reservation is (or turns out to be) released or failed,
    ///   the stock of every line is given back: this covers a crash after
    ///   reserving and before recording, followed by a release.
    async fn reserve(
        &self,
        order_id: Uuid,
        lines: &[StockLine],
        cause: Uuid,
        metadata: &Metadata,
    ) -> Result<()> {
        match self.reservation(order_id).await?.state {
            ReservationState::Open => self.hold(order_id, lines, cause, metadata).await,
            ReservationState::Released(_) | ReservationState::Failed => {
                // Settled without this delivery's stock: nothing may stay held.
                self.each_product(lines, ProductCommand::Release { order_id }, metadata)
                    .await
            }
            ReservationState::Reserved(_) | ReservationState::Committed(_) => Ok(()),
        }
    }

    /// The part of [`Self::reserve`] after it found the reservation open:
    /// holds the stock of every line, or of none, and records the outcome.
    ///
    /// Another delivery of the same command may be running beside this one
    /// and may decide otherwise (it failed for want of stock that this one
    /// finds freed). The first outcome recorded stands; the later one is
    /// taken as a duplicate of its command id and not written. So unless
    /// this delivery wrote "reserved" itself, it reads the reservation as it
    /// now stands and gives its stock back when that is failed or released.
    async fn hold(
        &self,
        order_id: Uuid,
        lines: &[StockLine],
        cause: Uuid,
        metadata: &Metadata,
    ) -> Result<()> {
        let mut failure = None;
        for (i, line) in lines.iter().enumerate() {
            let command = ProductCommand::Reserve {
                order_id,
                quantity: line.quantity,
            };
            let step = derived_id(cause, "reserve", u32::try_from(i).unwrap_or(u32::MAX));
            match self
                .products
                .execute_once(line.product_id, step, command, metadata)
                .await
            {
                Ok(_) => {}
                Err(RepositoryError::Rejected(ProductError::NotFound(_))) => {
                    failure = Some(format!("product {} not found", line.product_id));
                    break;
                }
                Err(RepositoryError::Rejected(e)) => {
                    failure = Some(e.to_string());
                    break;
                }
                Err(e) => return Err(Error::from_repository(e)),
            }
        }
        let reserving = failure.is_none();
        let outcome = match failure {
            Some(reason) => {
                tracing::info!(%order_id, %reason, "reservation failed");
                ReservationCommand::RecordFailed(reason)
            }
            None => ReservationCommand::RecordReserved(lines.to_vec()),
        };
        match self.record(order_id, cause, outcome, metadata).await? {
            // This delivery's own "reserved": the stock it holds is the
            // reservation's.
            Ok(true) if reserving => return Ok(()),
            Ok(_) => {}
            Err(e) => tracing::info!(%order_id, error = %e, "reservation outcome not recorded"),
        }
        match self.reservation(order_id).await?.state {
            // Failed (now, or by another delivery) or released: give back
            // what this attempt holds.
            ReservationState::Failed | ReservationState::Released(_) => {
                self.each_product(lines, ProductCommand::Release { order_id }, metadata)
                    .await
            }
            // Another delivery of the same command reserved: the lines this
            // one reserved are its steps, so they are that reservation.
            _ => Ok(()),
        }
    }

    /// Executes `command` on the product of every line; a product that
    /// refuses it (already done) is passed over.
    async fn each_product(
        &self,
        lines: &[StockLine],
        command: ProductCommand,
        metadata: &Metadata,
    ) -> Result<()> {
        for line in lines {
            match self
                .products
                .execute(line.product_id, command.clone(), metadata)
                .await
            {
                Ok(_) | Err(RepositoryError::Rejected(_)) => {}
                Err(e) => return Err(Error::from_repository(e)),
            }
        }
        Ok(())
    }

    async fn release(&self, order_id: Uuid, cause: Uuid, metadata: &Metadata) -> Result<()> {
        if let Err(e) = self
            .record(order_id, cause, ReservationCommand::Release, metadata)
            .await?
        {
            tracing::warn!(%order_id, error = %e, "release refused");
            return Ok(());
        }
        if let ReservationState::Released(lines) = self.reservation(order_id).await?.state {
            self.each_product(&lines, ProductCommand::Release { order_id }, metadata)
                .await?;
        }
        Ok(())
    }

    async fn commit(&self, order_id: Uuid, cause: Uuid, metadata: &Metadata) -> Result<()> {
        if let Err(e) = self
            .record(order_id, cause, ReservationCommand::Commit, metadata)
            .await?
        {
            tracing::warn!(%order_id, error = %e, "commit refused");
            return Ok(());
        }
        if let ReservationState::Committed(lines) = self.reservation(order_id).await?.state {
            self.each_product(&lines, ProductCommand::Commit { order_id }, metadata)
                .await?;
        }
        Ok(())
    }
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
        let result = match command {
            InventoryCommandMessage::ReserveInventory(c) => {
                self.reserve(c.order_id, &c.lines, message.message_id, metadata)
                    .await
            }
            InventoryCommandMessage::ReleaseInventory(c) => {
                self.release(c.order_id, message.message_id, metadata).await
            }
            InventoryCommandMessage::CommitInventory(c) => {
                self.commit(c.order_id, message.message_id, metadata).await
            }
        };
        match result {
            Ok(()) => Outcome::Ack,
            Err(e) => Outcome::retry(e),
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

    /// The first delivery of a reserve command held the stock and died before
    /// recording it; the order was cancelled (released) meanwhile; the
    /// redelivered command must give the stock back.
    #[tokio::test]
    async fn a_redelivered_reserve_after_a_release_gives_the_stock_back() {
        let inventory = service();
        let product_id = inventory.create_product("Widget", "2.50", 5).await.unwrap();
        let order_id = Uuid::now_v7();
        let cause = Uuid::now_v7();
        let metadata = Metadata::new().with_correlation_id(order_id);
        let lines = [StockLine {
            product_id,
            quantity: 3,
        }];
        // The first attempt's product step, and nothing after it.
        inventory
            .products
            .execute_once(
                product_id,
                derived_id(cause, "reserve", 0),
                ProductCommand::Reserve {
                    order_id,
                    quantity: 3,
                },
                &metadata,
            )
            .await
            .unwrap();
        assert_eq!(inventory.product(product_id).await.unwrap().reserved, 3);

        inventory
            .release(order_id, Uuid::now_v7(), &metadata)
            .await
            .unwrap();
        inventory
            .reserve(order_id, &lines, cause, &metadata)
            .await
            .unwrap();

        let product = inventory.product(product_id).await.unwrap();
        assert_eq!((product.reserved, product.available), (0, 5));
        assert!(matches!(
            inventory.reservation(order_id).await.unwrap().state,
            ReservationState::Released(_)
        ));
    }

    /// Two deliveries of one reserve command run side by side and both find
    /// the reservation open. The first fails for want of stock and records
    /// the failure; stock is freed; the second then holds the line and its
    /// "reserved" is a duplicate of the recorded outcome. It must give the
    /// stock back: the order's saga saw the failure and will never release
    /// it. (Found as 3 units left reserved after a RabbitMQ restart, when the
    /// relay published a batch twice.)
    #[tokio::test]
    async fn a_concurrent_duplicate_that_finds_stock_after_the_failure_gives_it_back() {
        let inventory = service();
        let product_id = inventory.create_product("Widget", "1.00", 3).await.unwrap();
        let (order_id, other, cause) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let metadata = Metadata::new().with_correlation_id(order_id);
        let lines = [StockLine {
            product_id,
            quantity: 3,
        }];
        let hold_one = ProductCommand::Reserve {
            order_id: other,
            quantity: 1,
        };
        inventory
            .products
            .execute(product_id, hold_one, &metadata)
            .await
            .unwrap();

        // The first delivery, whole: fails and records it.
        inventory
            .reserve(order_id, &lines, cause, &metadata)
            .await
            .unwrap();
        assert_eq!(
            inventory.reservation(order_id).await.unwrap().state,
            ReservationState::Failed
        );
        let release_other = ProductCommand::Release { order_id: other };
        inventory
            .products
            .execute(product_id, release_other, &metadata)
            .await
            .unwrap();
        // The second, past its check of an open reservation.
        inventory
            .hold(order_id, &lines, cause, &metadata)
            .await
            .unwrap();

        let product = inventory.product(product_id).await.unwrap();
        assert_eq!((product.reserved, product.available), (0, 3));
        assert_eq!(
            inventory.reservation(order_id).await.unwrap().state,
            ReservationState::Failed
        );
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
