//! The order service's catalog read model, durable in its schema: the
//! competing consumers of product events write a table, and every instance
//! of the order service follows the table into its in-memory [`Catalog`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use es_core::CancellationToken;
use es_postgres::sqlx::{self, PgPool};
use uuid::Uuid;

use crate::order::{Catalog, CatalogEntry, CatalogTable};
use crate::{Error, Money, Result};

/// How often the table is read when no lookup misses.
const REFRESH: Duration = Duration::from_secs(5);

/// The catalog table and the in-memory catalog that follows it.
#[derive(Debug, Clone)]
pub(crate) struct PgCatalog {
    pool: PgPool,
    table: String,
    catalog: Arc<Catalog>,
}

impl PgCatalog {
    /// Creates the table in `schema` (idempotent), loads it, and reads it
    /// again whenever a product is looked for and not known (and every 5 s
    /// in case) until `stop` is cancelled.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub(crate) async fn start(pool: PgPool, schema: &str, stop: CancellationToken) -> Result<Self> {
        let table = format!("\"{schema}\".catalog");
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('orders:catalog-table', 0))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (product_id uuid PRIMARY KEY, name text NOT NULL, price text NOT NULL)"
        ))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let this = Self {
            pool,
            table,
            catalog: Arc::new(Catalog::new()),
        };
        this.refresh().await?;
        let follower = this.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = follower.catalog.missed() => {}
                    () = tokio::time::sleep(REFRESH) => {}
                }
                if let Err(error) = follower.refresh().await {
                    tracing::debug!(%error, "catalog refresh failed");
                }
            }
        });
        Ok(this)
    }

    /// The in-memory catalog the order service prices from.
    pub(crate) fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.catalog)
    }

    async fn refresh(&self) -> Result<()> {
        let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.table))
            .fetch_one(&self.pool)
            .await?;
        if usize::try_from(count).unwrap_or(0) == self.catalog.len() {
            return Ok(());
        }
        let rows: Vec<(Uuid, String, String)> = sqlx::query_as(&format!(
            "SELECT product_id, name, price FROM {}",
            self.table
        ))
        .fetch_all(&self.pool)
        .await?;
        for (id, name, price) in rows {
            if self.catalog.get(id).is_none() {
                if let Ok(price) = price.parse::<Money>() {
                    self.catalog.upsert(id, CatalogEntry { name, price });
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl CatalogTable for PgCatalog {
    async fn insert(&self, product_id: Uuid, entry: &CatalogEntry) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO {} (product_id, name, price) VALUES ($1, $2, $3) ON CONFLICT (product_id) DO NOTHING",
            self.table
        ))
        .bind(product_id)
        .bind(&entry.name)
        .bind(entry.price.to_string())
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if super::is_data_exception(&e) {
                Error::validation("name", format!("PostgreSQL refuses the product: {e}"))
            } else {
                Error::Database(e)
            }
        })?;
        Ok(())
    }
}
