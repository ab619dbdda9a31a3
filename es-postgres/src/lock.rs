//! A single-active leader lock on a PostgreSQL advisory lock.
//!
//! The lock is a session-level advisory lock held on a dedicated connection
//! (not one of the pool's). PostgreSQL releases it when that connection ends,
//! so a crashed leader's lock frees itself. The held [`PgLeadership`] checks
//! its connection periodically; [`PgLeadership::lost`] resolves when the
//! connection is found dead, and the holder must stop acting as leader at
//! once. [`PgLeaderLock`] implements es-core's [`LeaderLock`], so the
//! leader-elected relay ([`es_core::LeaderRelay`]) runs on it.
//!
//! A network partition can leave the server believing the old session alive
//! for a while (until its TCP keepalive gives up) while the old leader
//! already saw its connection fail: the old leader stops first, but
//! failover can take that long.
//!
//! The other way round, two leaders can act at once for up to one check
//! interval: when the server ends the session first (a terminated backend,
//! a server restart), another process may take the lock before the old
//! leader's next check finds its connection dead. What a lock leads must
//! bear that overlap. The relay does: both publish, consumers deduplicate
//! by message id, and its checkpoint may step back, which repeats publishes
//! and loses none. The projection runner guards each batch with a
//! transaction lock and its checkpoint, so a batch is never applied twice.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use es_core::{CancellationToken, LeaderLock, Leadership, StoreError};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// Leader locks on `pool`'s database, one per name, with their polling
/// intervals. Implements [`LeaderLock`].
#[derive(Clone, Debug)]
pub struct PgLeaderLock {
    pool: PgPool,
    retry: Duration,
    check: Duration,
    check_timeout: Duration,
}

impl PgLeaderLock {
    /// Locks on `pool`'s database (each on a dedicated connection, not one
    /// of the pool's, which a waiting standby keeps between its attempts).
    /// Defaults: retry every 500 ms while waiting, check the connection
    /// every second with a 5 s timeout.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            retry: Duration::from_millis(500),
            check: Duration::from_secs(1),
            check_timeout: Duration::from_secs(5),
        }
    }

    /// How often [`PgLeaderLock::wait`] retries while another holder has
    /// the lock.
    #[must_use]
    pub fn retry_interval(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// How often the holder checks its connection, and how long a check (or
    /// a waiting standby's attempt) may take before the connection counts as
    /// dead.
    #[must_use]
    pub fn check_interval(mut self, every: Duration, timeout: Duration) -> Self {
        self.check = every;
        self.check_timeout = timeout;
        self
    }

    /// Waits, retrying, until the lock `name` is acquired. A waiting standby
    /// keeps one session and asks on it once per retry interval, rather
    /// than opening a session per attempt. When that session has died, or
    /// does not answer within the check timeout, the same attempt asks
    /// again on a new one; when the database cannot be
    /// reached, the next attempt does (logged), so a waiting standby
    /// survives a database restart and takes the lock no later for it.
    pub async fn wait(&self, name: &str) -> Result<PgLeadership> {
        let mut standby: Option<(PgConnection, i64)> = None;
        loop {
            let kept = standby.take();
            let was_kept = kept.is_some();
            match self.attempt(name, kept).await {
                Ok(Ok(leadership)) => return Ok(leadership),
                Ok(Err(conn)) => standby = Some(conn),
                Err(error) if error.is_transient() && was_kept => {
                    // The kept session died (a restart, a terminated
                    // backend) or stopped answering, which says nothing of
                    // the database now: ask at once on a new session rather
                    // than a retry interval later. If that fails too, wait
                    // as usual.
                    tracing::debug!(%error, lock = %name, "leader lock: the standby's session failed; asking on a new one");
                    continue;
                }
                Err(error) if error.is_transient() => {
                    tracing::warn!(%error, lock = %name, "leader lock: cannot reach the database; retrying");
                }
                Err(error) => return Err(error),
            }
            tokio::time::sleep(self.retry).await;
        }
    }

    /// Takes the lock `name` (any string; it is hashed to the advisory key)
    /// if it is free. A database that does not answer within the check
    /// timeout is [`Error::Unavailable`].
    pub async fn try_acquire(&self, name: &str) -> Result<Option<PgLeadership>> {
        match self.attempt(name, None).await? {
            Ok(leadership) => Ok(Some(leadership)),
            Err((conn, _)) => {
                let _ = conn.close().await;
                Ok(None)
            }
        }
    }

    /// One try for the lock `name`, on `session` (a standby's, kept from
    /// its last try) or a new one: the leadership, or the session back for
    /// the next try. A session that stops answering (a half-open
    /// connection) must not hold the caller forever: past the check timeout
    /// the try is given up and its session dropped, as a dead one is.
    async fn attempt(
        &self,
        name: &str,
        session: Option<(PgConnection, i64)>,
    ) -> Result<std::result::Result<PgLeadership, (PgConnection, i64)>> {
        let attempt = async {
            let (conn, key) = match session {
                Some(session) => session,
                None => self.connect(name).await?,
            };
            self.try_lock(conn, name, key).await
        };
        tokio::time::timeout(self.check_timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(no_answer()))
    }

    /// A dedicated session for the lock `name`, and the lock's key.
    async fn connect(&self, name: &str) -> Result<(PgConnection, i64)> {
        let mut conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
        let key: i64 = sqlx::query_scalar("SELECT hashtextextended($1, 0)")
            .bind(format!("es-leader:{name}"))
            .fetch_one(&mut conn)
            .await?;
        Ok((conn, key))
    }

    /// Tries the lock on `conn`: the leadership when it was free, else the
    /// session back (with the key) for the next attempt.
    async fn try_lock(
        &self,
        mut conn: PgConnection,
        name: &str,
        key: i64,
    ) -> Result<std::result::Result<PgLeadership, (PgConnection, i64)>> {
        let (taken, pid): (bool, i32) =
            sqlx::query_as("SELECT pg_try_advisory_lock($1), pg_backend_pid()")
                .bind(key)
                .fetch_one(&mut conn)
                .await?;
        if !taken {
            return Ok(Err((conn, key)));
        }
        tracing::info!(lock = %name, pid, "leader lock acquired");
        let conn = Arc::new(Mutex::new(Some(conn)));
        let lost = CancellationToken::new();
        let task = tokio::spawn(watch_connection(
            conn.clone(),
            lost.clone(),
            name.to_owned(),
            self.check,
            self.check_timeout,
        ));
        Ok(Ok(PgLeadership {
            name: name.to_owned(),
            key,
            backend_pid: pid,
            conn,
            lost,
            task,
        }))
    }
}

#[async_trait]
impl LeaderLock for PgLeaderLock {
    async fn acquire(&self, name: &str) -> Result<Box<dyn Leadership>, StoreError> {
        Ok(Box::new(self.wait(name).await?))
    }
}

/// A lock session that did not answer within the check timeout.
fn no_answer() -> Error {
    Error::Unavailable {
        source: sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the lock's session did not answer within the check timeout",
        )),
    }
}

async fn watch_connection(
    conn: Arc<Mutex<Option<PgConnection>>>,
    lost: CancellationToken,
    name: String,
    every: Duration,
    timeout: Duration,
) {
    // However this task ends (a dead connection, a panic, an abort), nobody
    // checks the lock any more: it counts as lost.
    let _lost_when_ended = lost.clone().drop_guard();
    loop {
        tokio::time::sleep(every).await;
        let mut slot = conn.lock().await;
        let Some(c) = slot.as_mut() else {
            return;
        };
        let alive = matches!(
            tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&mut *c)).await,
            Ok(Ok(_))
        );
        if !alive {
            // Drop the connection: if the server still has it, closing the
            // socket ends the session and frees the lock.
            *slot = None;
            tracing::warn!(lock = %name, "leader lock lost: its connection is dead");
            lost.cancel();
            return;
        }
    }
}

/// Proof of holding a [`PgLeaderLock`]. Dropping it frees the lock (the
/// dedicated connection closes); [`PgLeadership::release`] frees it
/// explicitly.
#[derive(Debug)]
pub struct PgLeadership {
    name: String,
    key: i64,
    backend_pid: i32,
    conn: Arc<Mutex<Option<PgConnection>>>,
    lost: CancellationToken,
    task: JoinHandle<()>,
}

impl PgLeadership {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server process id of the connection holding the lock (for
    /// monitoring, or to terminate it in a failover drill).
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// Whether the lock's connection has been found dead.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Resolves when the lock's connection is found dead: the lock may now
    /// be held by another process, so stop acting as leader.
    pub async fn lost(&self) {
        self.lost.cancelled().await;
    }

    /// Frees the lock and closes its connection.
    pub async fn release(self) -> Result<()> {
        self.task.abort();
        let conn = self.conn.lock().await.take();
        if let Some(mut conn) = conn {
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(self.key)
                .execute(&mut conn)
                .await?;
            conn.close().await?;
        }
        tracing::info!(lock = %self.name, "leader lock released");
        Ok(())
    }
}

#[async_trait]
impl Leadership for PgLeadership {
    async fn lost(&mut self) {
        Self::lost(self).await;
    }
}

impl Drop for PgLeadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}
