//! The leader lock: one holder at a time, failover when the holder's
//! connection dies.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

use std::time::Duration;

use es_postgres::lock::LeaderLock;

async fn pool() -> sqlx::PgPool {
    es_postgres::testing::fresh_schema().await.0
}

fn name() -> String {
    format!("leader-{}", uuid::Uuid::new_v4())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_at_a_time() {
    let pool = pool().await;
    let name = name();
    let first = LeaderLock::try_acquire(&pool, &name)
        .await
        .unwrap()
        .expect("free lock");
    assert!(LeaderLock::try_acquire(&pool, &name)
        .await
        .unwrap()
        .is_none());
    assert!(LeaderLock::try_acquire(&pool, "another")
        .await
        .unwrap()
        .is_some());

    let waiter = {
        let pool = pool.clone();
        let name = name.clone();
        tokio::spawn(async move {
            LeaderLock::new(name)
                .retry_interval(Duration::from_millis(20))
                .wait(&pool)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "acquired while held");
    first.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!second.is_lost());
    drop(second);
    // Dropping the guard frees the lock too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while LeaderLock::try_acquire(&pool, &name)
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drop did not free the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_is_reported_and_frees_the_lock() {
    let pool = pool().await;
    let name = name();
    let guard = LeaderLock::new(&name)
        .check_interval(Duration::from_millis(50), Duration::from_secs(2))
        .try_take(&pool)
        .await
        .unwrap()
        .unwrap();
    assert!(LeaderLock::try_acquire(&pool, &name)
        .await
        .unwrap()
        .is_none());
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
    let standby = tokio::time::timeout(Duration::from_secs(10), LeaderLock::acquire(&pool, &name))
        .await
        .unwrap()
        .unwrap();
    assert!(!standby.is_lost());
    standby.release().await.unwrap();
}
