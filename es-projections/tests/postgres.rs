//! The PostgreSQL runner against a real PostgreSQL (DATABASE_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use es_core::{CancellationToken, EventStore, InMemoryEventStore, Position};
use es_projections::doc_support::Balances;
use es_projections::postgres::{
    load_checkpoint, projection_lag, wait_for_checkpoint, CheckpointWatcher, PgProjectionRunner,
};
use es_projections::{Error, OnError, RunState, RunnerOptions};

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

/// `wait_for(START)` returns once the runner is set up: its read model's
/// tables exist and its checkpoint is loaded, even on an empty log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_start_returns_once_the_read_model_is_set_up() {
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    let ledger = Ledger::new("ledger");
    let handle = runner(
        &pool,
        &schema,
        &model,
        &store,
        &ledger,
        RunnerOptions::default(),
    )
    .spawn();
    handle.wait_for(Position::START, WAIT).await.unwrap();
    assert!(
        matches!(handle.state(), RunState::Running),
        "{:?}",
        handle.state()
    );
    assert_eq!(ledger_counts(&pool, &model).await, (0, 0));
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
        let task = tokio::spawn(async move { r.run(CancellationToken::new()).await });
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
        RunnerOptions::default()
            .batch_size(100)
            .on_error(OnError::Stop),
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
        RunnerOptions::default()
            .batch_size(1)
            .on_error(OnError::Stop),
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

/// Parked events replayed after a fix are applied once, in the replay's
/// transaction, beside a running runner; before the fix they stay parked and
/// the model is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_events_replayed_after_a_fix_are_applied_once() {
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    seed(&store, 20, 3).await;
    let first = append(&store, "acct-9", vec![deposit(-5)]).await;
    seed(&store, 20, 3).await;
    let second = append(&store, "acct-8", vec![deposit(-7)]).await;
    let after = seed(&store, 20, 3).await;
    let ledger = Ledger::new("ledger");
    let replayer = || {
        runner(
            &pool,
            &schema,
            &model,
            &store,
            &ledger,
            RunnerOptions::default(),
        )
    };
    let handle = replayer().spawn();
    handle.wait_for(after, WAIT).await.unwrap();
    let parked = es_projections::postgres::parked_events(&pool, &schema, "ledger", 10)
        .await
        .unwrap();
    let positions: Vec<Position> = parked.iter().map(|p| p.position).collect();
    assert_eq!(positions, vec![first, second]);
    assert!(parked[0].error.contains("negative deposit"), "{parked:?}");
    let before = balances(&pool, &model).await;
    assert_eq!(ledger_counts(&pool, &model).await, (60, 60));

    // Not fixed yet: both stay parked, and the ledger row each apply wrote
    // before refusing is rolled back with its savepoint.
    let report = replayer().replay_parked().await.unwrap();
    assert_eq!((report.applied, report.still_parked), (0, 2), "{report:?}");
    assert_eq!(ledger_counts(&pool, &model).await, (60, 60));
    assert_eq!(balances(&pool, &model).await, before);

    // Fixed: both are applied, once, and leave the dead letters.
    ledger.accept_negative.store(true, Ordering::SeqCst);
    let report = replayer().replay_parked().await.unwrap();
    assert_eq!((report.applied, report.still_parked), (2, 0), "{report:?}");
    assert_eq!(
        es_projections::postgres::parked_count(&pool, &schema, "ledger")
            .await
            .unwrap(),
        0
    );
    let again = replayer().replay_parked().await.unwrap();
    assert_eq!(again.applied, 0, "{again:?}");
    assert_eq!(ledger_counts(&pool, &model).await, (62, 62));
    let fixed = balances(&pool, &model).await;
    let total = |rows: &[(String, i64, i64)]| rows.iter().map(|r| r.1).sum::<i64>();
    assert_eq!(total(&fixed), total(&before) - 12);

    // The running runner goes on past the replay.
    let later = seed(&store, 10, 3).await;
    handle.wait_for(later, WAIT).await.unwrap();
    assert_eq!(ledger_counts(&pool, &model).await, (72, 72));
    handle.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model]).await;
}

/// Notes the amount of each deposit and reads the row back (`RETURNING *`):
/// its prepared statement's result type is the table's row type.
struct Notes;

/// A failure of the notes table: the storage's, never the event's.
fn notes_storage(e: sqlx::Error) -> es_core::ProjectionError {
    es_core::ProjectionError::storage("notes", e)
}

impl es_core::Projection for Notes {
    type Tx = sqlx::PgConnection;
    fn name(&self) -> &str {
        "notes"
    }
    fn accepts(&self, event_type: &str) -> bool {
        event_type == "Deposited"
    }
    async fn apply(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &es_core::RecordedEvent,
    ) -> Result<(), es_core::ProjectionError> {
        let amount = event.payload.to_value().unwrap()["amount"]
            .as_i64()
            .unwrap();
        sqlx::query("INSERT INTO notes (event_id, amount) VALUES ($1, $2) RETURNING *")
            .bind(event.event_id)
            .bind(amount)
            .fetch_one(&mut *tx)
            .await
            .map_err(notes_storage)?;
        Ok(())
    }
}

impl es_projections::postgres::PgProjection for Notes {
    async fn setup(&self, tx: &mut sqlx::PgConnection) -> Result<(), es_core::ProjectionError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS notes (event_id uuid PRIMARY KEY, amount bigint NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(notes_storage)?;
        Ok(())
    }
}

/// A column added to the read model while the runner runs changes the
/// result type of its prepared statements: PostgreSQL refuses the cached
/// plans, and the runner prepares them again and goes on instead of retrying
/// the same refusal for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_altered_under_a_running_runner_is_followed_after_it() {
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    let first = seed(&store, 20, 3).await;
    let runner = PgProjectionRunner::new(
        pool.clone(),
        &schema,
        &model,
        Arc::new(store.clone()),
        Arc::new(Notes),
    )
    .unwrap()
    .with_options(
        RunnerOptions::default()
            .batch_size(1)
            .backoff(Duration::from_millis(10), Duration::from_millis(100)),
    )
    .with_leader_check(Duration::from_millis(100));
    let handle = runner.spawn();
    handle.wait_for(first, WAIT).await.unwrap();
    sqlx::query(&format!(
        "ALTER TABLE \"{model}\".notes ADD COLUMN note text"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let after = seed(&store, 20, 3).await;
    handle.wait_for(after, WAIT).await.unwrap();
    let notes: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{model}\".notes"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(notes, 40);
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
    // B is a standby: it has not moved, and is not ready even for the start.
    let standby = b
        .wait_for(Position::START, Duration::from_millis(300))
        .await;
    assert!(matches!(standby, Err(Error::Timeout { .. })), "{standby:?}");
    assert!(matches!(b.state(), RunState::Starting), "{:?}", b.state());
    assert_eq!(b.position(), Position::START);
    a.stop().await.unwrap();
    let third = seed(&store, 100, 5).await;
    b.wait_for(third, WAIT).await.unwrap();
    assert_eq!(ledger_counts(&pool, &model).await, (300, 300));
    b.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model]).await;
}

/// Projections are independent: one stopping on a failing event leaves
/// another, in the same runner schema and on the same log, running and up to
/// date, live events included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_projection_failing_leaves_another_running_and_up_to_date() {
    let (pool, schema, model) = fresh().await;
    let other_model = format!("{model}_b");
    let store = InMemoryEventStore::new();
    let good = seed(&store, 30, 3).await;
    let bad = append(&store, "acct-9", vec![deposit(-5)]).await;
    let head = seed(&store, 30, 3).await;
    let ledger = Ledger::new("ledger");
    let failing = runner(
        &pool,
        &schema,
        &model,
        &store,
        &ledger,
        RunnerOptions::default()
            .batch_size(1)
            .on_error(OnError::Stop),
    )
    .spawn();
    let healthy = PgProjectionRunner::new(
        pool.clone(),
        &schema,
        &other_model,
        Arc::new(store.clone()),
        Arc::new(Balances {
            name: "balances".to_owned(),
            batched: true,
        }),
    )
    .unwrap()
    .with_leader_check(Duration::from_millis(100))
    .spawn();
    let err = failing.wait_for(head, WAIT).await.unwrap_err();
    let Error::Failed { source, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(&**source, Error::Apply { projection, position, .. }
            if projection == "ledger" && *position == bad),
        "{source}"
    );
    healthy.wait_for(head, WAIT).await.unwrap();
    // The other one keeps following the log after the failure.
    let later = seed(&store, 10, 3).await;
    healthy.wait_for(later, WAIT).await.unwrap();
    assert!(
        matches!(healthy.state(), RunState::Running),
        "{:?}",
        healthy.state()
    );
    let (total, events): (i64, i64) = sqlx::query_as(&format!(
        "SELECT sum(total)::bigint, sum(events)::bigint FROM \"{other_model}\".balances"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (total, events),
        (2 * (1..=30).sum::<i64>() - 5 + (1..=10).sum::<i64>(), 71)
    );
    assert_eq!(
        load_checkpoint(&pool, &schema, "balances").await.unwrap(),
        Some(later)
    );
    // The failed one stays where it stopped.
    assert!(matches!(failing.state(), RunState::Failed(_)));
    assert_eq!(
        load_checkpoint(&pool, &schema, "ledger").await.unwrap(),
        Some(good)
    );
    assert_eq!(ledger_counts(&pool, &model).await, (30, 30));
    healthy.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model, &other_model]).await;
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
    // Waiting past the checkpoint already committed waits for the next batch.
    let next = {
        let watcher = watcher.clone();
        tokio::spawn(async move { watcher.wait_past("ledger", at, WAIT).await })
    };
    assert!(matches!(
        watcher
            .wait_past("ledger", at, Duration::from_millis(100))
            .await,
        Err(Error::Timeout { reached, .. }) if reached == at
    ));
    let later = seed(&store, 5, 3).await;
    next.await.unwrap().unwrap();
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

/// A pool of its own whose sessions carry a unique application name (the
/// leader lock's session too: it is opened from the pool's options), so a
/// test can tell whose a session is, or kill them all as a dying process
/// would lose them.
async fn named_pool(tag: &str) -> (sqlx::PgPool, String) {
    let app = format!(
        "esp-{tag}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let options: sqlx::postgres::PgConnectOptions = database_url().parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.application_name(&app))
        .await
        .unwrap();
    (pool, app)
}

/// The sessions (pid, application name) holding the leader lock of
/// projection `ledger` in runner schema `schema`.
async fn lock_holders(pool: &sqlx::PgPool, schema: &str) -> Vec<(i32, String)> {
    sqlx::query_as(
        "SELECT l.pid, coalesce(a.application_name, '') FROM pg_locks l \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         CROSS JOIN (SELECT hashtextextended($1, 0) AS k) key \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
           AND l.classid = ((key.k >> 32) & 4294967295)::oid \
           AND l.objid = (key.k & 4294967295)::oid",
    )
    .bind(format!("es-leader:es-projections:{schema}.ledger"))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Waits until exactly one session holds the lock and `pick` accepts it.
async fn wait_for_holder(
    pool: &sqlx::PgPool,
    schema: &str,
    pick: impl Fn(&(i32, String)) -> bool,
) -> (i32, String) {
    tokio::time::timeout(WAIT, async {
        loop {
            let now = lock_holders(pool, schema).await;
            if now.len() == 1 && pick(&now[0]) {
                return now[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("nobody took the lock")
}

/// The leader dies abruptly in the middle of a batch, as its process being
/// killed would: its task is aborted and every session it had (the leader
/// lock's, and the one with the open batch transaction) is terminated,
/// without releasing anything. The standby waiting on its own pool takes the
/// lock, becomes the active runner, and catches up to the head, every event
/// applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_leader_that_died_mid_batch() {
    let (pool, schema, model) = fresh().await;
    let (pool_a, app_a) = named_pool("a").await;
    let (pool_b, app_b) = named_pool("b").await;
    let store = InMemoryEventStore::new();
    let first = seed(&store, 100, 5).await;
    let options = RunnerOptions::default().batch_size(10);
    // A commits the first 100 events, then hangs in its 105th apply, with
    // rows written in its open transaction.
    let ledger_a = Ledger::new("ledger");
    ledger_a.hang_at.store(105, Ordering::SeqCst);
    let a = runner(&pool_a, &schema, &model, &store, &ledger_a, options.clone());
    let task_a = tokio::spawn(async move { a.run(CancellationToken::new()).await });
    wait_for_checkpoint(&pool, &schema, "ledger", first, WAIT)
        .await
        .unwrap();
    let ledger_b = Ledger::new("ledger");
    let b = runner(&pool_b, &schema, &model, &store, &ledger_b, options).spawn();
    // B is a standby: not set up, not moving.
    let standby = b
        .wait_for(Position::START, Duration::from_millis(300))
        .await;
    assert!(matches!(standby, Err(Error::Timeout { .. })), "{standby:?}");
    assert!(matches!(b.state(), RunState::Starting), "{:?}", b.state());
    assert_eq!(lock_holders(&pool, &schema).await[0].1, app_a);
    let head = seed(&store, 50, 5).await;
    tokio::time::timeout(WAIT, ledger_a.reached.notified())
        .await
        .expect("A reached the middle of a batch");

    // A dies: every session of its process goes, and its task with them.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
         FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&app_a)
    .fetch_one(&pool)
    .await
    .unwrap();
    task_a.abort();
    let died = task_a.await;
    assert!(
        matches!(&died, Err(e) if e.is_cancelled()),
        "A ended by itself: {died:?}"
    );
    assert!(killed >= 2, "the lock's and the batch's sessions: {killed}");
    // A's open batch did not land: the model matches A's last checkpoint.
    let at_death = load_checkpoint(&pool, &schema, "ledger")
        .await
        .unwrap()
        .unwrap();
    let committed = store
        .read_all(Position::START, 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.position <= at_death)
        .count() as i64;
    assert!(committed < 150, "A had applied everything before dying");

    // B, specifically, becomes the active runner and catches up.
    let holder = wait_for_holder(&pool, &schema, |h| h.1 == app_b).await;
    b.wait_for(head, WAIT).await.unwrap();
    assert!(matches!(b.state(), RunState::Running), "{:?}", b.state());
    assert_eq!(b.position(), head);
    assert_eq!(lock_holders(&pool, &schema).await, vec![holder]);
    assert!(
        ledger_b.applies.load(Ordering::SeqCst) >= (150 - committed) as u64,
        "B did not apply what A left"
    );
    assert_eq!(ledger_counts(&pool, &model).await, (150, 150));
    let total: i64 = balances(&pool, &model).await.iter().map(|b| b.1).sum();
    assert_eq!(total, (1..=100).sum::<i64>() + (1..=50).sum::<i64>());
    assert_eq!(
        load_checkpoint(&pool, &schema, "ledger").await.unwrap(),
        Some(head)
    );
    b.stop().await.unwrap();
    pool_a.close().await;
    pool_b.close().await;
    cleanup(&pool, &[&schema, &model]).await;
}

/// The leader's lock connection is killed (as a network failure would): the
/// leader notices and stops acting as leader; whichever runner takes the
/// lock again (the standby, or the old leader winning it back) is the one
/// that runs and finishes the work, exactly once, while the other stays a
/// standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lock_connection_dies_steps_down_and_the_work_goes_on_once() {
    let (pool, schema, model) = fresh().await;
    let (pool_a, app_a) = named_pool("a").await;
    let (pool_b, app_b) = named_pool("b").await;
    let store = InMemoryEventStore::new();
    let first = seed(&store, 100, 5).await;
    let ledger = Ledger::new("ledger");
    let options = RunnerOptions::default().batch_size(10);
    let a = runner(&pool_a, &schema, &model, &store, &ledger, options.clone()).spawn();
    a.wait_for(first, WAIT).await.unwrap();
    let b = runner(&pool_b, &schema, &model, &store, &ledger, options).spawn();
    // Kill the session holding the leader lock: A's.
    let old = lock_holders(&pool, &schema).await;
    assert_eq!(old.len(), 1, "exactly one session holds the lock");
    assert_eq!(old[0].1, app_a);
    let (killed,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1)")
        .bind(old[0].0)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);
    // Someone takes the lock again, on a new session.
    let holder = wait_for_holder(&pool, &schema, |h| h.0 != old[0].0).await;
    let (leader, standby) = if holder.1 == app_a {
        (&a, &b)
    } else {
        assert_eq!(holder.1, app_b, "the lock is held by a stranger");
        (&b, &a)
    };
    // The other one is, or soon is, a standby: the old leader notices the
    // loss within its leader check (until then it may still commit a batch,
    // which the checkpoint fence keeps exactly-once).
    tokio::time::timeout(WAIT, async {
        while !matches!(standby.state(), RunState::Starting) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the old leader did not step down");
    let second = seed(&store, 100, 5).await;
    // The lock holder is the one that runs and catches up...
    leader.wait_for(second, WAIT).await.unwrap();
    assert!(
        matches!(leader.state(), RunState::Running),
        "{:?}",
        leader.state()
    );
    assert_eq!(leader.position(), second);
    // ...and the other one is a standby that has not moved.
    assert!(
        matches!(standby.state(), RunState::Starting),
        "{:?}",
        standby.state()
    );
    assert!(standby.position() <= first);
    assert_eq!(lock_holders(&pool, &schema).await, vec![holder]);
    assert_eq!(ledger_counts(&pool, &model).await, (200, 200));
    assert_eq!(
        load_checkpoint(&pool, &schema, "ledger").await.unwrap(),
        Some(second)
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    pool_a.close().await;
    pool_b.close().await;
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
