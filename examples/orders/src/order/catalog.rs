//! The order service's read model of the inventory's catalog, fed by product
//! events from the bus.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use es_core::{Delivery, EventCodec, MessageHandler, Outcome};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::inventory::ProductEvent;
use crate::Money;

/// A product as the order service knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Its name.
    pub name: String,
    /// Its price.
    pub price: Money,
}

/// The catalog read model.
#[derive(Debug, Default)]
pub struct Catalog {
    products: RwLock<HashMap<Uuid, CatalogEntry>>,
    changed: Notify,
    /// Signalled when a product is looked for and not known: a durable
    /// catalog reads its table then (another instance may have recorded it).
    missed: Notify,
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// A product, if known.
    pub fn get(&self, product_id: Uuid) -> Option<CatalogEntry> {
        self.products
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&product_id)
            .cloned()
    }

    /// A product, waiting up to `patience` for it to arrive (a product created
    /// a moment ago may still be on its way from the inventory).
    pub async fn get_or_wait(&self, product_id: Uuid, patience: Duration) -> Option<CatalogEntry> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let changed = self.changed.notified();
            if let Some(entry) = self.get(product_id) {
                return Some(entry);
            }
            self.missed.notify_one();
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.get(product_id);
            }
        }
    }

    /// Resolves when a product was looked for and not known (see
    /// [`Catalog::get_or_wait`]).
    pub async fn missed(&self) {
        self.missed.notified().await;
    }

    /// How many products are known.
    pub fn len(&self) -> usize {
        self.products
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no product is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a product.
    pub fn upsert(&self, product_id: Uuid, entry: CatalogEntry) {
        self.products
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(product_id, entry);
        self.changed.notify_waiters();
    }
}

/// Where a catalog entry is kept durably before the in-memory catalog
/// learns it (the order schema's catalog table, on PostgreSQL).
#[async_trait]
pub(crate) trait CatalogTable: Send + Sync + std::fmt::Debug + 'static {
    /// Records a product (idempotent).
    async fn insert(&self, product_id: Uuid, entry: &CatalogEntry) -> crate::Result<()>;
}

/// Feeds product events from the bus into a [`Catalog`], through its
/// durable table if it has one. Idempotent: a redelivered event writes the
/// same entry again.
#[derive(Debug, Clone)]
pub(crate) struct CatalogHandler {
    catalog: Arc<Catalog>,
    table: Option<Arc<dyn CatalogTable>>,
    codec: EventCodec<ProductEvent>,
}

impl CatalogHandler {
    /// Feeds `catalog`, writing each entry to `table` first when given,
    /// decoding through `codec`.
    pub(crate) fn new(
        catalog: Arc<Catalog>,
        table: Option<Arc<dyn CatalogTable>>,
        codec: EventCodec<ProductEvent>,
    ) -> Self {
        Self {
            catalog,
            table,
            codec,
        }
    }
}

#[async_trait]
impl MessageHandler for CatalogHandler {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let m = &delivery.message;
        match self
            .codec
            .decode_parts(&m.message_type, m.schema_version, &m.payload)
        {
            Ok(ProductEvent::ProductCreated(p)) => {
                let entry = CatalogEntry {
                    name: p.name,
                    price: p.price,
                };
                if let Some(table) = &self.table {
                    if let Err(error) = table.insert(p.product_id, &entry).await {
                        // A product the table refuses as such is
                        // dead-lettered at once; a database failure retried.
                        return error.outcome();
                    }
                }
                self.catalog.upsert(p.product_id, entry);
                Outcome::Ack
            }
            Ok(_) => Outcome::Ack,
            Err(e) => Outcome::dead_letter(e),
        }
    }
}
