//! The set-based (`apply_batch`) path of the PostgreSQL runner, on the
//! PostgreSQL event store: same results as per-event, a failing batch falls
//! back to one event at a time, and a runner task aborted at random moments
//! neither loses nor doubles anything.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

mod common;

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

use common::{append, cleanup, fresh};
use es_core::{CancellationToken, EventStore, Metadata, NewEvent, Payload, Position};
use es_postgres::PgEventStore;
use es_projections::doc_support::{bulk_seed, Balances};
use es_projections::postgres::{load_checkpoint, PgProjectionRunner};
use es_projections::{Error, OnError, RunnerOptions};

const WAIT: Duration = Duration::from_secs(60);

/// (account, total, count) per account, straight from the events table.
async fn expected(pool: &sqlx::PgPool, schema: &str) -> Vec<(String, i64, i64)> {
    sqlx::query_as(&format!(
        "SELECT stream_id, sum((payload->>'amount')::bigint)::bigint, count(*) \
         FROM \"{schema}\".events WHERE event_type = 'Deposited' AND payload::jsonb ? 'amount' \
         GROUP BY stream_id ORDER BY stream_id"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn model(pool: &sqlx::PgPool, model: &str) -> Vec<(String, i64, i64)> {
    sqlx::query_as(&format!(
        "SELECT account, total, events FROM \"{model}\".balances ORDER BY account"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

fn runner(
    pool: &sqlx::PgPool,
    schema: &str,
    model: &str,
    store: &Arc<dyn EventStore>,
    batched: bool,
    options: RunnerOptions,
) -> PgProjectionRunner<Balances> {
    let projection = Balances {
        name: format!("balances_{batched}_{model}"),
        batched,
    };
    PgProjectionRunner::new(
        pool.clone(),
        schema,
        model,
        Arc::clone(store),
        Arc::new(projection),
    )
    .unwrap()
    .with_options(options.backoff(Duration::from_millis(10), Duration::from_millis(100)))
    .with_leader_check(Duration::from_millis(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_based_and_per_event_runs_build_the_same_model() {
    let (pool, schema, m) = fresh().await;
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::new(pool.clone(), schema.clone()));
    bulk_seed(&pool, &schema, 5_000, 37).await.unwrap();
    append(
        &*store,
        "other-1",
        vec![NewEvent::new(
            "Other",
            1,
            Payload::from_json("{}").unwrap(),
            Metadata::new(),
        )],
    )
    .await;
    let head = store.head().await.unwrap();
    let (m1, m2) = (format!("{m}_a"), format!("{m}_b"));
    let set_based = runner(
        &pool,
        &schema,
        &m1,
        &store,
        true,
        RunnerOptions::default().batch_size(333),
    )
    .spawn();
    let per_event = runner(
        &pool,
        &schema,
        &m2,
        &store,
        false,
        RunnerOptions::default().batch_size(333),
    )
    .spawn();
    set_based.wait_for(head, WAIT).await.unwrap();
    per_event.wait_for(head, WAIT).await.unwrap();
    let want = expected(&pool, &schema).await;
    assert_eq!(want.iter().map(|r| r.2).sum::<i64>(), 5_000);
    assert_eq!(model(&pool, &m1).await, want);
    assert_eq!(model(&pool, &m2).await, want);
    set_based.stop().await.unwrap();
    per_event.stop().await.unwrap();
    cleanup(&pool, &[&schema, &m1, &m2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_set_based_batch_falls_back_to_find_the_event() {
    let (pool, schema, m) = fresh().await;
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::new(pool.clone(), schema.clone()));
    bulk_seed(&pool, &schema, 500, 7).await.unwrap();
    let bad = append(
        &*store,
        "acct-3",
        vec![NewEvent::new(
            "Deposited",
            1,
            Payload::from_json("{}").unwrap(),
            Metadata::new(),
        )],
    )
    .await;
    bulk_seed(&pool, &schema, 500, 7).await.unwrap();
    let head = store.head().await.unwrap();

    // Dead-letter policy: the bad event is set aside, everything else lands.
    let (m1, m2) = (format!("{m}_a"), format!("{m}_b"));
    let h = runner(
        &pool,
        &schema,
        &m1,
        &store,
        true,
        RunnerOptions::default()
            .batch_size(200)
            .on_error(OnError::DeadLetter),
    )
    .spawn();
    h.wait_for(head, WAIT).await.unwrap();
    assert_eq!(model(&pool, &m1).await, expected(&pool, &schema).await);
    let letters = h.dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].position, bad);
    h.stop().await.unwrap();

    // Stop policy: the runner names the event; its batch is not committed.
    let h = runner(
        &pool,
        &schema,
        &m2,
        &store,
        true,
        RunnerOptions::default()
            .batch_size(200)
            .on_error(OnError::Stop),
    )
    .spawn();
    let err = h.wait_for(head, WAIT).await.unwrap_err();
    let Error::Failed { source, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(&**source, Error::Apply { position, .. } if *position == bad),
        "{source}"
    );
    let at = load_checkpoint(&pool, &schema, &format!("balances_true_{m2}"))
        .await
        .unwrap()
        .unwrap_or(Position::START);
    assert!(at < bad);
    let counted: i64 = model(&pool, &m2).await.iter().map(|r| r.2).sum();
    let before: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".events WHERE (transaction_id, global_position) <= ($1, $2)"
    ))
    .bind(at.major() as i64)
    .bind(at.minor() as i64)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(counted, before, "model and checkpoint disagree");
    cleanup(&pool, &[&schema, &m1, &m2]).await;
}

/// Aborts the runner task at pseudo-random moments (mid-batch, mid-commit,
/// between batches), restarting it each time; at the end every event is
/// counted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_based_runner_aborted_at_random_moments_loses_and_doubles_nothing() {
    let (pool, schema, m) = fresh().await;
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::new(pool.clone(), schema.clone()));
    bulk_seed(&pool, &schema, 30_000, 101).await.unwrap();
    let head = store.head().await.unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut moved = 0;
    // How long a run lasts before it is aborted. A slow machine may not
    // commit a batch within it: then it grows, so that some abort comes
    // after a commit wherever the test runs.
    let mut ceiling = 120;
    let mut rounds = 0;
    while rounds < 12 || (moved == 0 && rounds < 40) {
        rounds += 1;
        let before = load_checkpoint(&pool, &schema, &format!("balances_true_{m}"))
            .await
            .unwrap();
        let r = runner(
            &pool,
            &schema,
            &m,
            &store,
            true,
            RunnerOptions::default().batch_size(250),
        );
        let task = tokio::spawn(async move { r.run(CancellationToken::new()).await });
        tokio::time::sleep(Duration::from_millis(rng.u64(5..ceiling))).await;
        task.abort();
        let _ = task.await;
        if load_checkpoint(&pool, &schema, &format!("balances_true_{m}"))
            .await
            .unwrap()
            != before
        {
            moved += 1;
        } else {
            ceiling = (ceiling * 2).min(4_000);
        }
        // Whatever is committed matches its checkpoint exactly. (A COMMIT
        // the aborted task had already sent may still land: read the
        // checkpoint and the model in one statement, one snapshot.)
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1)")
                .bind(&m)
                .fetch_one(&pool)
                .await
                .unwrap();
        if exists {
            let (committed, counted): (i64, i64) = sqlx::query_as(&format!(
                "WITH c AS (SELECT coalesce(max(major), 0) AS major, coalesce(max(minor), 0) AS minor \
                            FROM \"{schema}\".checkpoints WHERE name = $1) \
                 SELECT (SELECT count(*) FROM \"{schema}\".events e, c \
                         WHERE (e.transaction_id, e.global_position) <= (c.major, c.minor)), \
                        (SELECT coalesce(sum(events), 0)::bigint FROM \"{m}\".balances)"
            ))
            .bind(format!("balances_true_{m}"))
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!(
                counted, committed,
                "model and checkpoint disagree after an abort"
            );
        }
    }
    assert!(
        moved > 0,
        "no abort came after a commit; the test proved little"
    );
    let h = runner(
        &pool,
        &schema,
        &m,
        &store,
        true,
        RunnerOptions::default().batch_size(250),
    )
    .spawn();
    h.wait_for(head, WAIT).await.unwrap();
    assert_eq!(model(&pool, &m).await, expected(&pool, &schema).await);
    h.stop().await.unwrap();
    cleanup(&pool, &[&schema, &m]).await;
}

/// A runner task cancelled while its batch waits for the checkpoint's
/// fence lock leaves nothing holding the lock: its pooled connection rolls
/// the transaction back once the lock is granted, and the next runner
/// reaches the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_cancelled_while_its_batch_waits_for_the_fence_leaves_it_free() {
    let (pool, schema, m) = fresh().await;
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::new(pool.clone(), schema.clone()));
    bulk_seed(&pool, &schema, 100, 7).await.unwrap();
    let head = store.head().await.unwrap();
    let fence: i64 = sqlx::query_scalar("SELECT hashtextextended($1, 0)")
        .bind(format!("es-projections fence {schema}.balances_true_{m}"))
        .fetch_one(&pool)
        .await
        .unwrap();
    // Another holder of the fence, in a transaction of its own.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(fence)
        .execute(&mut *holder)
        .await
        .unwrap();
    let r = runner(&pool, &schema, &m, &store, true, RunnerOptions::default());
    let task = tokio::spawn(async move { r.run(CancellationToken::new()).await });
    // The runner's batch waits for the fence...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE '%pg_advisory_xact_lock%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the runner never waited for the fence"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...and is cancelled there; then the other holder lets go.
    task.abort();
    let _ = task.await;
    holder.commit().await.unwrap();
    // The fence comes free: nothing keeps it once granted. The probe has a
    // session of its own: advisory locks are re-entrant, so a pooled
    // connection that held the fence would be granted it again.
    let mut probe = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(fence)
            .fetch_one(&mut probe)
            .await
            .unwrap();
        if free {
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(fence)
                .execute(&mut probe)
                .await
                .unwrap();
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cancelled batch's connection holds the fence"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let h = runner(&pool, &schema, &m, &store, true, RunnerOptions::default()).spawn();
    h.wait_for(head, WAIT).await.unwrap();
    assert_eq!(model(&pool, &m).await, expected(&pool, &schema).await);
    h.stop().await.unwrap();
    cleanup(&pool, &[&schema, &m]).await;
}
