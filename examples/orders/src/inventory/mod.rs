//! The inventory service: owns the catalog's products and their stock, and
//! reserves, releases and commits stock for orders on the saga's command.

pub mod domain;
mod http;

use std::sync::Arc;

use async_trait::async_trait;
use es_core::{
    derived_id, Delivery, EventCodec, Message, MessageHandler, Metadata, Outcome, Repository,
    RepositoryError,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

pub use domain::{
    Product, ProductCommand, ProductError, ProductEvent, Reservation, ReservationCommand,
    ReservationError, ReservationEvent, ReservationState,
};
pub use http::{router, CreateProduct, InventoryApi, ProductCreatedBody, Restock};

use crate::messages::{message_enum, StockLine};
use crate::{Error, Money, Result};

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
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(Error::validation(
                "name",
                "a name of 1 to 200 characters is required",
            ));
        }
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

    /// Executes one of the saga's commands. Idempotent under redelivery.
    pub async fn handle_command(&self, message: &Message) -> Outcome {
        let command = match EventCodec::<InventoryCommandMessage>::new().decode_parts(
            &message.message_type,
            message.schema_version,
            &message.payload,
        ) {
            Ok(c) => c,
            Err(e) => return Outcome::dead_letter(e),
        };
        let metadata = message.metadata.caused_by(message.message_id);
        let result = match command {
            InventoryCommandMessage::ReserveInventory(c) => {
                self.reserve(c.order_id, &c.lines, message.message_id, &metadata)
                    .await
            }
            InventoryCommandMessage::ReleaseInventory(c) => {
                self.release(c.order_id, message.message_id, &metadata)
                    .await
            }
            InventoryCommandMessage::CommitInventory(c) => {
                self.commit(c.order_id, message.message_id, &metadata).await
            }
        };
        match result {
            Ok(()) => Outcome::Ack,
            Err(e) => Outcome::retry(e),
        }
    }

    async fn reservation(&self, order_id: Uuid) -> Result<Reservation> {
        let loaded = self
            .reservations
            .load(order_id)
            .await
            .map_err(Error::from_repository)?;
        Ok(domain::reservation_for(order_id, loaded.state))
    }

    async fn record(
        &self,
        order_id: Uuid,
        cause: Uuid,
        command: ReservationCommand,
        metadata: &Metadata,
    ) -> Result<std::result::Result<(), ReservationError>> {
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
            Ok(_) => Ok(Ok(())),
            Err(RepositoryError::Rejected(e)) => Ok(Err(e)),
            Err(e) => Err(Error::from_repository(e)),
        }
    }

    async fn reserve(
        &self,
        order_id: Uuid,
        lines: &[StockLine],
        cause: Uuid,
        metadata: &Metadata,
    ) -> Result<()> {
        if self.reservation(order_id).await?.state != ReservationState::Open {
            return Ok(());
        }
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
        match failure {
            Some(reason) => {
                self.give_back(order_id, lines, metadata).await?;
                tracing::info!(%order_id, %reason, "reservation failed");
                let _ = self
                    .record(
                        order_id,
                        cause,
                        ReservationCommand::RecordFailed(reason),
                        metadata,
                    )
                    .await?;
            }
            None => {
                let recorded = self
                    .record(
                        order_id,
                        cause,
                        ReservationCommand::RecordReserved(lines.to_vec()),
                        metadata,
                    )
                    .await?;
                if recorded == Err(ReservationError::AlreadyReleased) {
                    // Released while we were reserving: give it all back.
                    self.give_back(order_id, lines, metadata).await?;
                }
            }
        }
        Ok(())
    }

    async fn give_back(
        &self,
        order_id: Uuid,
        lines: &[StockLine],
        metadata: &Metadata,
    ) -> Result<()> {
        for line in lines {
            match self
                .products
                .execute(
                    line.product_id,
                    ProductCommand::Release { order_id },
                    metadata,
                )
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
            self.give_back(order_id, &lines, metadata).await?;
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
            for line in lines {
                match self
                    .products
                    .execute(
                        line.product_id,
                        ProductCommand::Commit { order_id },
                        metadata,
                    )
                    .await
                {
                    Ok(_) | Err(RepositoryError::Rejected(_)) => {}
                    Err(e) => return Err(Error::from_repository(e)),
                }
            }
        }
        Ok(())
    }
}

/// The message handler feeding the saga's commands to the inventory service.
#[derive(Debug, Clone)]
pub struct InventoryCommandHandler(pub Arc<InventoryService>);

#[async_trait]
impl MessageHandler for InventoryCommandHandler {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        self.0.handle_command(&delivery.message).await
    }
}
