//! Test support (feature `testing`): a fresh, migrated schema per test.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// The database tests use: `DATABASE_URL`, or the local default.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A pool on [`database_url`] and a new, uniquely named, migrated schema.
///
/// # Panics
///
/// When the server cannot be reached or the migration fails, with the URL it
/// tried: tests fail, never skip, when PostgreSQL is absent.
pub async fn fresh_schema() -> (PgPool, String) {
    fresh_schema_with(8).await
}

/// [`fresh_schema`] with a pool of at most `max_connections`.
///
/// # Panics
///
/// As [`fresh_schema`].
pub async fn fresh_schema_with(max_connections: u32) -> (PgPool, String) {
    let url = database_url();
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .idle_timeout(Some(Duration::from_secs(30)))
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is not reachable at {url}: {e}"));
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    crate::migrate(&pool, &schema)
        .await
        .unwrap_or_else(|e| panic!("migrating schema {schema} at {url} failed: {e}"));
    (pool, schema)
}

/// A migrated [`crate::PgEventStore`] in a fresh schema.
///
/// Its read wait is 10 s: tests share the server with other sessions, and a
/// write transaction open elsewhere in the cluster holds the readable log back
/// (see [`crate::Holdback`]); waiting longer keeps read-your-writes checks
/// from failing because of someone else's transaction.
///
/// # Panics
///
/// As [`fresh_schema`].
pub async fn fresh_store() -> crate::PgEventStore {
    let (pool, schema) = fresh_schema().await;
    crate::PgEventStore::new(pool, schema).with_read_wait(std::time::Duration::from_secs(10))
}
