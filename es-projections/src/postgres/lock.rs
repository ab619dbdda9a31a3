//! One active runner per projection across processes: a PostgreSQL
//! session-level advisory lock held on a dedicated connection.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

use crate::Error;

/// The leadership of one name, held as long as this value and its
/// connection live.
///
/// The lock is a session-level advisory lock keyed by a hash of the name. When
/// the holder's process dies, its connection closes and PostgreSQL releases
/// the lock, so a standby waiting in [`LeaderLock::acquire`] takes over.
/// Correctness does not rest on the lock alone: every batch also checks its
/// checkpoint with a compare-and-set (see the [module docs](super)), so a
/// leader that lost its lock without noticing rolls back instead of applying
/// a batch twice.
#[derive(Debug)]
pub struct LeaderLock {
    conn: Option<PoolConnection<Postgres>>,
    key: String,
}

impl LeaderLock {
    /// Tries once to take the lock for `name`.
    ///
    /// # Errors
    /// [`Error::Database`] when PostgreSQL fails.
    pub async fn try_acquire(pool: &PgPool, name: &str) -> Result<Option<Self>, Error> {
        let key = format!("es_projections:{name}");
        let mut conn = pool.acquire().await.map_err(|e| Error::db(name, e))?;
        let (got,): (bool,) =
            sqlx::query_as("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(&key)
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| Error::db(name, e))?;
        Ok(got.then(|| Self {
            conn: Some(conn),
            key,
        }))
    }

    /// Waits for the lock for `name`, trying every `retry`.
    ///
    /// # Errors
    /// [`Error::Database`] when PostgreSQL fails.
    pub async fn acquire(pool: &PgPool, name: &str, retry: Duration) -> Result<Self, Error> {
        loop {
            if let Some(lock) = Self::try_acquire(pool, name).await? {
                return Ok(lock);
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Resolves when the lock is lost: its connection stopped answering.
    /// Checks every `every`.
    pub async fn lost(&mut self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            let alive = tokio::time::timeout(every.max(Duration::from_secs(1)), async {
                sqlx::query("SELECT 1").execute(&mut **conn).await.is_ok()
            })
            .await
            .unwrap_or(false);
            if !alive {
                // The session is gone or stuck: its lock cannot be trusted.
                if let Some(conn) = self.conn.take() {
                    drop(conn.detach());
                }
                return;
            }
        }
    }

    /// Releases the lock.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let released = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                .bind(&self.key)
                .execute(&mut *conn)
                .await;
            if released.is_err() {
                // Close the session so the lock cannot outlive us.
                drop(conn.detach());
            }
        }
    }
}

impl Drop for LeaderLock {
    fn drop(&mut self) {
        // A connection returned to the pool would keep the session lock:
        // close it instead.
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}
