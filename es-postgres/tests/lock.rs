//! The leader lock: one holder at a time, failover when the holder's
//! connection dies.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use es_postgres::{PgLeaderLock, PgLeadership};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

async fn pool() -> sqlx::PgPool {
    es_postgres::testing::fresh_schema().await.0
}

fn name() -> String {
    format!("leader-{}", uuid::Uuid::new_v4())
}

/// `lock.wait(name)` on a task of its own: a waiting standby.
fn spawn_wait(lock: PgLeaderLock, name: &str) -> JoinHandle<es_postgres::Result<PgLeadership>> {
    let name = name.to_owned();
    tokio::spawn(async move { lock.wait(&name).await })
}

/// The standby's leadership, once it has the lock (within `limit`; `what`
/// names the failure).
async fn took(
    standby: JoinHandle<es_postgres::Result<PgLeadership>>,
    limit: Duration,
    what: &str,
) -> PgLeadership {
    tokio::time::timeout(limit, standby)
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_at_a_time() {
    let pool = pool().await;
    let name = name();
    let lock = PgLeaderLock::new(pool.clone());
    let first = lock.try_acquire(&name).await.unwrap().expect("free lock");
    assert!(lock.try_acquire(&name).await.unwrap().is_none());
    assert!(lock.try_acquire("another").await.unwrap().is_some());

    let waiter = spawn_wait(
        lock.clone().retry_interval(Duration::from_millis(20)),
        &name,
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "acquired while held");
    first.release().await.unwrap();
    let second = took(
        waiter,
        Duration::from_secs(10),
        "the standby took the freed lock",
    )
    .await;
    assert!(!second.is_lost());
    drop(second);
    // Dropping the leadership frees the lock too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while lock.try_acquire(&name).await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drop did not free the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The server processes of the sessions named `application`.
async fn sessions(pool: &sqlx::PgPool, application: &str) -> Vec<i32> {
    sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
        .bind(application)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A lock on `options`' database whose sessions carry an application name
/// of their own (returned beside it), retrying every `retry`: a standby
/// whose sessions a test can find and cut.
fn standby(options: PgConnectOptions, retry: Duration) -> (PgLeaderLock, String) {
    let application = format!("standby-{}", uuid::Uuid::new_v4().simple());
    let lock = PgLeaderLock::new(
        PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(options.application_name(&application)),
    )
    .retry_interval(retry);
    (lock, application)
}

/// The options of `pool`'s sessions.
fn options(pool: &sqlx::PgPool) -> PgConnectOptions {
    pool.connect_options().as_ref().clone()
}

/// Waits (up to 2 s) until the standby named `application` has asked for
/// the lock and found it held: its session idle after asking. Its server
/// process.
async fn asked(pool: &sqlx::PgPool, application: &str) -> i32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let asked: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
             AND state = 'idle' AND query LIKE '%pg_try_advisory_lock%'",
        )
        .bind(application)
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(pid) = asked {
            return pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby never asked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A standby asks for the lock on one session of its own, every retry
/// interval, and takes the lock on that session when it is freed; a session
/// that dies is replaced by a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_standby_keeps_one_session() {
    let pool = pool().await;
    let name = name();
    let lock = PgLeaderLock::new(pool.clone()).retry_interval(Duration::from_millis(10));
    let first = lock.try_acquire(&name).await.unwrap().expect("free lock");
    let (standby_lock, application) = standby(options(&pool), Duration::from_millis(10));
    let waiter = spawn_wait(standby_lock, &name);
    // Sessions the standby opened, seen over about 30 of its attempts.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let pids = sessions(&pool, &application).await;
        seen.extend(pids);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!waiter.is_finished(), "acquired while held");
    assert_eq!(seen.len(), 1, "sessions of the standby: {seen:?}");
    let old = *seen.first().unwrap();

    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(old)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let new = loop {
        let pids = sessions(&pool, &application).await;
        if let Some(&pid) = pids.iter().find(|&&pid| pid != old) {
            break pid;
        }
        assert!(tokio::time::Instant::now() < deadline, "no new session");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(!waiter.is_finished(), "acquired while held");

    first.release().await.unwrap();
    let second = took(
        waiter,
        Duration::from_secs(10),
        "the standby took the freed lock",
    )
    .await;
    assert_eq!(second.backend_pid(), new);
    second.release().await.unwrap();
}

/// A standby whose session died in its wait (a terminated backend, a
/// server restart) asks again on a new session in the same attempt: it
/// takes a lock freed meanwhile at its next attempt, not one retry interval
/// after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_whose_session_died_takes_a_freed_lock_at_its_next_attempt() {
    const RETRY: Duration = Duration::from_secs(3);
    let pool = pool().await;
    let name = name();
    let first = PgLeaderLock::new(pool.clone())
        .try_acquire(&name)
        .await
        .unwrap()
        .expect("free lock");
    let (standby_lock, application) = standby(options(&pool), RETRY);
    let waiter = spawn_wait(standby_lock, &name);
    // Its first attempt found the lock held; the session dies in the wait,
    // and the lock is freed.
    let old = asked(&pool, &application).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(old)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);
    first.release().await.unwrap();
    assert!(!waiter.is_finished(), "acquired before its next attempt");
    // The next attempt is one retry interval after the first; one more
    // would be two.
    let second = took(
        waiter,
        RETRY * 2 - Duration::from_millis(500),
        "the standby took the lock at its next attempt",
    )
    .await;
    assert_ne!(second.backend_pid(), old);
    second.release().await.unwrap();
}

/// A TCP proxy to the database whose connections can be frozen: a frozen
/// connection stays open and forwards nothing, as a network partition
/// leaves a session half-open. Connections opened after a freeze forward,
/// unless every connection is frozen.
struct FreezingProxy {
    port: u16,
    /// Connections opened before the last freeze are frozen.
    freezes: Arc<AtomicU64>,
}

/// A connection opened while every connection is frozen: never forwards.
const FROZEN_AT_BIRTH: u64 = u64::MAX;

impl FreezingProxy {
    async fn start(to: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let freezes = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&freezes);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let now = seen.load(Ordering::SeqCst);
                let born = if now == FROZEN_AT_BIRTH { now - 1 } else { now };
                let server = TcpStream::connect(&to).await.unwrap();
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(forward(client_read, server_write, Arc::clone(&seen), born));
                tokio::spawn(forward(server_read, client_write, Arc::clone(&seen), born));
            }
        });
        Self { port, freezes }
    }

    /// Freezes the connections open now.
    fn freeze(&self) {
        self.freezes.fetch_add(1, Ordering::SeqCst);
    }

    /// Freezes every connection, those opened later too.
    fn freeze_all(&self) {
        self.freezes.store(FROZEN_AT_BIRTH, Ordering::SeqCst);
    }
}

async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    freezes: Arc<AtomicU64>,
    born: u64,
) {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if freezes.load(Ordering::SeqCst) != born {
            // Frozen: both ends stay open, nothing goes through.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A standby whose session stops answering (half-open: the server never
/// sees the question) gives it up after the check timeout and asks on a
/// new session, rather than waiting for an answer forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_whose_session_stops_answering_asks_on_a_new_one() {
    let pool = pool().await;
    let name = name();
    let first = PgLeaderLock::new(pool.clone())
        .try_acquire(&name)
        .await
        .unwrap()
        .expect("free lock");
    let direct = options(&pool);
    let proxy = FreezingProxy::start(format!("{}:{}", direct.get_host(), direct.get_port())).await;
    let (standby_lock, application) = standby(
        direct.host("127.0.0.1").port(proxy.port),
        Duration::from_millis(100),
    );
    let standby_lock = standby_lock.check_interval(Duration::from_secs(1), Duration::from_secs(1));
    let waiter = spawn_wait(standby_lock, &name);
    let old = asked(&pool, &application).await;
    proxy.freeze();
    first.release().await.unwrap();
    let second = took(
        waiter,
        Duration::from_secs(10),
        "the standby gave up its frozen session and took the lock",
    )
    .await;
    assert_ne!(second.backend_pid(), old);
    second.release().await.unwrap();
}

/// Taking a lock from a database that does not answer (every connection
/// half-open) fails as unavailable after the check timeout rather than
/// waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taking_a_lock_from_a_database_that_does_not_answer_fails_in_time() {
    let pool = pool().await;
    let direct = options(&pool);
    let proxy = FreezingProxy::start(format!("{}:{}", direct.get_host(), direct.get_port())).await;
    proxy.freeze_all();
    let (lock, _) = standby(
        direct.host("127.0.0.1").port(proxy.port),
        Duration::from_millis(100),
    );
    let lock = lock.check_interval(Duration::from_secs(1), Duration::from_secs(1));
    let outcome = tokio::time::timeout(Duration::from_secs(10), lock.try_acquire(&name()))
        .await
        .expect("try_acquire gave up within the check timeout");
    match outcome {
        Err(error) => assert!(error.is_transient(), "{error}"),
        Ok(held) => panic!("took the lock through a frozen connection: {held:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_is_reported_and_frees_the_lock() {
    let pool = pool().await;
    let name = name();
    let lock = PgLeaderLock::new(pool.clone())
        .check_interval(Duration::from_millis(50), Duration::from_secs(2));
    let guard = lock.try_acquire(&name).await.unwrap().unwrap();
    assert!(lock.try_acquire(&name).await.unwrap().is_none());
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(guard.backend_pid())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);
    tokio::time::timeout(Duration::from_secs(10), guard.lost())
        .await
        .expect("loss not reported");
    assert!(guard.is_lost());
    let standby = tokio::time::timeout(Duration::from_secs(10), lock.wait(&name))
        .await
        .unwrap()
        .unwrap();
    assert!(!standby.is_lost());
    standby.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_an_es_core_leader_lock_a_terminated_session_is_a_lost_leadership() {
    use es_core::LeaderLock;

    let pool = pool().await;
    let name = name();
    let lock = PgLeaderLock::new(pool.clone())
        .check_interval(Duration::from_millis(50), Duration::from_secs(2));
    let mut leadership = lock.acquire(&name).await.unwrap();
    let second = lock.try_acquire(&name).await.unwrap();
    assert!(second.is_none(), "held through the trait");
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
           AND ((classid::int8 << 32) | objid::int8) = hashtextextended($1, 0)",
    )
    .bind(format!("es-leader:{name}"))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    tokio::time::timeout(Duration::from_secs(10), leadership.lost())
        .await
        .expect("loss reported through the trait");
    drop(leadership);
    let again = tokio::time::timeout(Duration::from_secs(10), lock.acquire(&name)).await;
    assert!(again.unwrap().is_ok());
}
