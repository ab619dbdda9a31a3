//! The PostgreSQL runner against a real PostgreSQL (DATABASE_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use es_core::{EventStore, InMemoryEventStore, Position};
use es_projections::postgres::{
    load_checkpoint, projection_lag, wait_for_checkpoint, CheckpointWatcher, PgProjectionRunner,
};
use es_projections::{Error, OnError, RunState, RunnerOptions};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(30);

fn runner(
    pool: &sqlx::PgPool,
    schema: &str,
    model: &str,
    store: &InMemoryEventStore,
    projection: &Arc<Ledger>,
    options: RunnerOptions,
) -> PgProjectionRunner<Ledger> {
    PgProjectionRunner::new(
        pool.clone(),
        schema,
        model,
        Arc::new(store.clone()),
        Arc::clone(projection),
    )
    .unwrap()
    .with_options(options.backoff(Duration::from_millis(10), Duration::from_millis(100)))
    .with_leader_check(Duration::from_millis(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_commit_with_their_checkpoint_and_skip_other_types() {
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    seed(&store, 500, 7).await;
    append(&store, "acct-0", vec![noise()]).await;
    let ledger = Ledger::new("ledger");
    let handle = runner(
        &pool,
        &schema,
        &model,
        &store,
        &ledger,
        RunnerOptions::default().batch_size(64),
    )
    .spawn();
    let head = store.head().await.unwrap();
    handle.wait_for(head, WAIT).await.unwrap();
    assert_eq!(
        load_checkpoint(&pool, &schema, "ledger").await.unwrap(),
        Some(head)
    );
    assert_eq!(ledger_counts(&pool, &model).await, (500, 500));
    let total: i64 = balances(&pool, &model).await.iter().map(|b| b.1).sum();
    assert_eq!(total, (1..=500).sum::<i64>());
    // Live events too.
    let at = append(&store, "acct-1", vec![deposit(1000)]).await;
    handle.wait_for(at, WAIT).await.unwrap();
    assert_eq!(ledger_counts(&pool, &model).await, (501, 501));
    assert!(handle.lag().await.unwrap().is_caught_up());
    handle.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model]).await;
}

/// Kills the runner task in the middle of a batch (rows already written in
/// its open transaction), several times, restarting it each time: every
/// event ends up applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_mid_batch_loses_nothing_and_doubles_nothing() {
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    let head = seed(&store, 1_000, 13).await;
    let ledger = Ledger::new("ledger");
    // Crash points count applies since each restart: the first event of a
    // batch, its middle, its last, and after some committed batches.
    for crash_at in [37u64, 250, 101, 100, 199] {
        let before = ledger.applies.load(Ordering::SeqCst);
        ledger.hang_at.store(crash_at, Ordering::SeqCst);
        let r = runner(
            &pool,
            &schema,
            &model,
            &store,
            &ledger,
            RunnerOptions::default().batch_size(100),
        );
        let (_stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(async move { r.run(stop).await });
        tokio::time::timeout(WAIT, ledger.reached.notified())
            .await
            .expect("the runner reached the crash point");
        task.abort();
        let _ = task.await;
        assert!(ledger.applies.load(Ordering::SeqCst) > before);
        // Committed so far: a whole number of batches, each exactly once.
        let (rows, distinct) = ledger_counts(&pool, &model).await;
        assert_eq!(rows, distinct, "an event was applied twice");
        let checkpoint = load_checkpoint(&pool, &schema, "ledger")
            .await
            .unwrap()
            .unwrap_or(Position::START);
        let upto = store
            .read_all(Position::START, 10_000)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.position <= checkpoint)
            .count();
        assert_eq!(rows as usize, upto, "model and checkpoint disagree");
        // Applies counted in memory include the rolled-back ones.
        ledger.applies.store(0, Ordering::SeqCst);
    }
    ledger.hang_at.store(u64::MAX, Ordering::SeqCst);
    let handle = runner(
        &pool,
        &schema,
        &model,
        &store,
        &ledger,
        RunnerOptions::default().batch_size(100),
    )
    .spawn();
    handle.wait_for(head, WAIT).await.unwrap();
    assert_eq!(ledger_counts(&pool, &model).await, (1_000, 1_000));
    let total: i64 = balances(&pool, &model).await.iter().map(|b| b.1).sum();
    assert_eq!(total, (1..=1000).sum::<i64>());
    handle.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_event_stops_the_runner_with_its_position_and_rolls_its_batch_back() {
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    let good = seed(&store, 10, 2).await;
    let bad = append(&store, "acct-9", vec![deposit(-5)]).await;
    let after = append(&store, "acct-9", vec![deposit(5)]).await;
    let ledger = Ledger::new("ledger");
    // One batch holds everything: the good events roll back with it...
    let handle = runner(
        &pool,
        &schema,
        &model,
        &store,
        &ledger,
        RunnerOptions::default().batch_size(100),
    )
    .spawn();
    let err = handle.wait_for(after, WAIT).await.unwrap_err();
    let Error::Failed { source, .. } = &err else {
        panic!("{err}")
    };
    let Error::Apply {
        position,
        projection,
        ..
    } = &**source
    else {
        panic!("{source}")
    };
    assert_eq!((*position, projection.as_str()), (bad, "ledger"));
    assert!(source.to_string().contains(&bad.to_string()));
    assert_eq!(
        load_checkpoint(&pool, &schema, "ledger").await.unwrap(),
        None
    );
    assert_eq!(ledger_counts(&pool, &model).await, (0, 0));
    assert!(matches!(handle.state(), RunState::Failed(_)));
    // ...and with batches of one, the checkpoint stops right before it.
    let handle = runner(
        &pool,
        &schema,
        &model,
        &store,
        &ledger,
        RunnerOptions::default().batch_size(1),
    )
    .spawn();
    assert!(handle.wait_for(after, WAIT).await.is_err());
    assert_eq!(
        load_checkpoint(&pool, &schema, "ledger").await.unwrap(),
        Some(good)
    );
    assert_eq!(ledger_counts(&pool, &model).await, (10, 10));
    cleanup(&pool, &[&schema, &model]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_policy_records_the_event_in_the_batch_transaction_and_goes_on() {
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    seed(&store, 20, 3).await;
    let bad = append(&store, "acct-9", vec![deposit(-5)]).await;
    let after = seed(&store, 20, 3).await;
    let ledger = Ledger::new("ledger");
    let handle = runner(
        &pool,
        &schema,
        &model,
        &store,
        &ledger,
        RunnerOptions::default()
            .batch_size(16)
            .on_error(OnError::DeadLetter),
    )
    .spawn();
    handle.wait_for(after, WAIT).await.unwrap();
    // The failed event's ledger row was rolled back with its savepoint-less
    // batch and the batch replayed without it.
    assert_eq!(ledger_counts(&pool, &model).await, (40, 40));
    let rows: Vec<(String, i64, i64, String)> = sqlx::query_as(&format!(
        "SELECT projection, major, minor, error FROM \"{schema}\".projection_dead_letters"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "ledger");
    assert_eq!(Position::new(rows[0].1 as u64, rows[0].2 as u64), bad);
    assert!(rows[0].3.contains("negative deposit"), "{rows:?}");
    assert_eq!(handle.dead_letters().len(), 1);
    handle.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_per_projection_and_a_standby_takes_over() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("es_projections=info")
        .with_test_writer()
        .try_init();
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    let first = seed(&store, 100, 5).await;
    let ledger = Ledger::new("ledger");
    let a = runner(
        &pool,
        &schema,
        &model,
        &store,
        &ledger,
        RunnerOptions::default().batch_size(10),
    )
    .spawn();
    a.wait_for(first, WAIT).await.unwrap();
    let b = runner(
        &pool,
        &schema,
        &model,
        &store,
        &ledger,
        RunnerOptions::default().batch_size(10),
    )
    .spawn();
    let second = seed(&store, 100, 5).await;
    a.wait_for(second, WAIT).await.unwrap();
    // B is a standby: it has not moved.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(b.state(), RunState::Starting), "{:?}", b.state());
    assert_eq!(b.position(), Position::START);
    a.stop().await.unwrap();
    let third = seed(&store, 100, 5).await;
    b.wait_for(third, WAIT).await.unwrap();
    assert_eq!(ledger_counts(&pool, &model).await, (300, 300));
    b.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model]).await;
}

/// Runners that both believe they lead (no leader election here, as with a
/// lock lost unnoticed) cannot apply a batch twice: each batch's checkpoint
/// compare-and-set fences the loser, which rolls back and goes on from the
/// winner's checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_fence_stops_concurrent_writers_from_applying_twice() {
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    let head = seed(&store, 600, 7).await;
    let ledger = Ledger::new("ledger");
    let handles: Vec<_> = [7usize, 11, 13]
        .into_iter()
        .map(|batch| {
            runner(
                &pool,
                &schema,
                &model,
                &store,
                &ledger,
                RunnerOptions::default().batch_size(batch),
            )
            .with_leader_election(false)
            .spawn()
        })
        .collect();
    for h in &handles {
        h.wait_for(head, WAIT).await.unwrap();
    }
    let more = seed(&store, 100, 7).await;
    for h in &handles {
        h.wait_for(more, WAIT).await.unwrap();
    }
    assert_eq!(ledger_counts(&pool, &model).await, (700, 700));
    let total: i64 = balances(&pool, &model).await.iter().map(|b| b.1).sum();
    assert_eq!(total, (1..=600).sum::<i64>() + (1..=100).sum::<i64>());
    for h in handles {
        h.stop().await.unwrap();
    }
    cleanup(&pool, &[&schema, &model]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_position_works_from_another_process() {
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    let ledger = Ledger::new("ledger");
    es_projections::postgres::migrate(&pool, &schema)
        .await
        .unwrap();
    let watcher = CheckpointWatcher::start(pool.clone(), &schema)
        .await
        .unwrap();
    let at = seed(&store, 50, 3).await;
    // Not running yet: both waits time out, saying where the projection is.
    let err = watcher
        .wait_for("ledger", at, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { reached, .. } if reached == Position::START),
        "{err}"
    );
    assert!(matches!(
        wait_for_checkpoint(&pool, &schema, "ledger", at, Duration::from_millis(100)).await,
        Err(Error::Timeout { .. })
    ));
    let lag = projection_lag(&pool, &schema, "ledger", &store, 1_000)
        .await
        .unwrap();
    assert_eq!((lag.events, lag.events_capped), (50, false));
    let waiting = {
        let watcher = watcher.clone();
        tokio::spawn(async move { watcher.wait_for("ledger", at, WAIT).await })
    };
    let handle = runner(
        &pool,
        &schema,
        &model,
        &store,
        &ledger,
        RunnerOptions::default().batch_size(8),
    )
    .spawn();
    waiting.await.unwrap().unwrap();
    assert_eq!(ledger_counts(&pool, &model).await, (50, 50));
    let later = seed(&store, 5, 3).await;
    wait_for_checkpoint(&pool, &schema, "ledger", later, WAIT)
        .await
        .unwrap();
    watcher.wait_for("ledger", later, WAIT).await.unwrap();
    assert_eq!(ledger_counts(&pool, &model).await, (55, 55));
    let lag = projection_lag(&pool, &schema, "ledger", &store, 1_000)
        .await
        .unwrap();
    assert!(lag.is_caught_up(), "{lag:?}");
    handle.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model]).await;
}

/// The leader's lock connection is killed (as a network failure would): the
/// leader notices, stops acting as leader, and a standby (or the old leader,
/// once it wins the lock again) finishes the work, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lock_connection_dies_steps_down_and_the_work_goes_on_once() {
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    let first = seed(&store, 100, 5).await;
    let ledger = Ledger::new("ledger");
    let options = RunnerOptions::default().batch_size(10);
    let a = runner(&pool, &schema, &model, &store, &ledger, options.clone()).spawn();
    a.wait_for(first, WAIT).await.unwrap();
    let b = runner(&pool, &schema, &model, &store, &ledger, options).spawn();
    // Kill the session holding the leader lock.
    let lock_name = format!("es-leader:es-projections:{schema}.ledger");
    let holders = || {
        sqlx::query_scalar::<_, i32>(
            "SELECT l.pid FROM pg_locks l \
             CROSS JOIN (SELECT hashtextextended($1, 0) AS k) key \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid = ((key.k >> 32) & 4294967295)::oid \
               AND l.objid = (key.k & 4294967295)::oid",
        )
        .bind(&lock_name)
        .fetch_all(&pool)
    };
    let old = holders().await.unwrap();
    assert_eq!(old.len(), 1, "exactly one session holds the lock");
    let (killed,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1)")
        .bind(old[0])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);
    // Someone takes the lock again, on a new session.
    let retaken = tokio::time::timeout(WAIT, async {
        loop {
            let now = holders().await.unwrap();
            if now.len() == 1 && now[0] != old[0] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(retaken.is_ok(), "the lock was not taken again");
    let second = seed(&store, 100, 5).await;
    // Whoever leads now catches up; the other stays a standby.
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            if a.position() >= second || b.position() >= second {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "nobody took over: a {:?}, b {:?}",
        a.state(),
        b.state()
    );
    assert_eq!(ledger_counts(&pool, &model).await, (200, 200));
    assert_eq!(
        load_checkpoint(&pool, &schema, "ledger").await.unwrap(),
        Some(second)
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model]).await;
}

#[tokio::test]
async fn upserts_are_version_guarded_and_bind_every_value_kind() {
    use es_projections::postgres::sink::{delete, Upsert, Value};
    let (pool, schema, model) = fresh().await;
    let mut conn = pool.acquire().await.unwrap();
    for sql in [
        format!("CREATE SCHEMA \"{model}\""),
        format!("SET search_path TO \"{model}\""),
        "CREATE TABLE orders (id text PRIMARY KEY, status text, cents bigint, paid boolean, \
         customer uuid, doc jsonb, at timestamptz, note text, version bigint NOT NULL)"
            .to_owned(),
    ] {
        sqlx::query(&sql).execute(&mut *conn).await.unwrap();
    }
    let row = |status: &str, version: u64| {
        Upsert::into("orders")
            .key("id", "o-1")
            .set("status", status)
            .set("cents", 1250_i64)
            .set("paid", true)
            .set("customer", uuid::Uuid::nil())
            .set("doc", serde_json::json!({"items": 2}))
            .set("at", chrono::DateTime::<chrono::Utc>::UNIX_EPOCH)
            .set("note", Value::Null)
            .version("version", version)
    };
    assert!(row("placed", 2).execute(&mut conn).await.unwrap());
    assert!(!row("stale", 1).execute(&mut conn).await.unwrap());
    assert!(!row("replayed", 2).execute(&mut conn).await.unwrap());
    const STATUS: &str = "SELECT status, version, paid, doc FROM orders WHERE id = 'o-1'";
    type Row = (String, i64, bool, serde_json::Value);
    let (s, v, paid, doc): Row = sqlx::query_as(STATUS).fetch_one(&mut *conn).await.unwrap();
    assert_eq!(
        (s.as_str(), v, paid, doc["items"].as_i64()),
        ("placed", 2, true, Some(2))
    );
    assert!(row("paid", 3).execute(&mut conn).await.unwrap());
    let now: Row = sqlx::query_as(STATUS).fetch_one(&mut *conn).await.unwrap();
    assert_eq!(now.0, "paid");
    // Identifiers are checked, never spliced raw.
    let bad = Upsert::into("orders; DROP TABLE orders")
        .key("id", "x")
        .execute(&mut conn)
        .await;
    assert!(matches!(bad, Err(Error::Config { .. })), "{bad:?}");
    assert_eq!(delete(&mut conn, "orders", "id", "o-1").await.unwrap(), 1);
    drop(conn);
    cleanup(&pool, &[&schema, &model]).await;
}
