//! Rebuilds against a real PostgreSQL, with the PostgreSQL event store as the
//! log: a rebuild equals the incrementally built model, swaps atomically
//! while a live runner keeps applying and readers keep reading.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use es_core::{EventStore, InMemoryEventStore, Position};
use es_postgres::PgEventStore;
use es_projections::postgres::{
    load_checkpoint, rebuild, PgProjectionRunner, RebuildOptions, RebuildProgress, RebuildReport,
};
use es_projections::{Error, OnError, RunnerOptions};

const WAIT: Duration = Duration::from_secs(60);

fn runner(
    pool: &sqlx::PgPool,
    schema: &str,
    model: &str,
    store: &Arc<dyn EventStore>,
    projection: &Arc<Ledger>,
) -> PgProjectionRunner<Ledger> {
    PgProjectionRunner::new(
        pool.clone(),
        schema,
        model,
        Arc::clone(store),
        Arc::clone(projection),
    )
    .unwrap()
    .with_options(
        RunnerOptions::default()
            .batch_size(50)
            .backoff(Duration::from_millis(10), Duration::from_millis(100)),
    )
    .with_leader_check(Duration::from_millis(100))
}

/// What the balances must be, computed from the log itself.
async fn expected_balances(store: &dyn EventStore) -> Vec<(String, i64, i64)> {
    let mut totals = BTreeMap::<String, (i64, i64)>::new();
    let mut after = Position::START;
    loop {
        let page = store.read_all(after, 1_000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.position;
        for e in page.iter().filter(|e| &*e.event_type == "Deposited") {
            let amount = e.payload.to_value().unwrap()["amount"].as_i64().unwrap();
            let t = totals.entry(e.stream_id.to_string()).or_default();
            t.0 += amount;
            t.1 += 1;
        }
    }
    totals.into_iter().map(|(k, (t, n))| (k, t, n)).collect()
}

#[derive(Default)]
struct Recorded {
    total: AtomicU64,
    last: AtomicU64,
    finished: Mutex<Option<RebuildReport>>,
}

impl RebuildProgress for Recorded {
    fn start(&self, total: u64) {
        self.total.store(total, Ordering::SeqCst);
    }
    fn progress(&self, done: u64, _total: u64) {
        assert!(
            done >= self.last.load(Ordering::SeqCst),
            "progress went back"
        );
        self.last.store(done, Ordering::SeqCst);
    }
    fn finish(&self, report: &RebuildReport) {
        *self.finished.lock().unwrap() = Some(report.clone());
    }
}

async fn seed_pg(store: &dyn EventStore, rounds: u64, offset: u64) -> Position {
    let mut last = Position::START;
    for i in 0..rounds {
        let events = (0..10)
            .map(|j| deposit((offset + i * 10 + j) as i64 % 97 + 1))
            .collect();
        last = append(store, &format!("acct-{}", i % 9), events).await;
        if i % 7 == 0 {
            append(store, "noise-1", vec![noise()]).await;
        }
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_equals_the_incremental_model_and_swaps_under_live_writes_and_reads() {
    let (pool, schema, model) = fresh().await;
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::new(pool.clone(), schema.clone()));
    let ledger = Ledger::new("ledger");
    let first = seed_pg(&*store, 150, 0).await;
    let live = runner(&pool, &schema, &model, &store, &ledger).spawn();
    live.wait_for(first, WAIT).await.unwrap();
    let incremental = balances(&pool, &model).await;
    assert_eq!(incremental, expected_balances(&*store).await);

    // Readers of the live model, and writers to the log, during the rebuild.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pool, model, stop) = (pool.clone(), model.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let q = format!("SELECT count(*) FROM \"{model}\".balances");
                match sqlx::query_scalar::<_, i64>(&q).fetch_one(&pool).await {
                    Ok(n) if n > 0 => ok += 1,
                    Ok(n) => failed.push(format!("empty model: {n}")),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    let writer = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut last = Position::START;
            let mut round = 0;
            while !stop.load(Ordering::SeqCst) && round < 200 {
                last = seed_pg(&*store, 1, 10_000 + round).await;
                round += 1;
            }
            last
        })
    };
    let progress = Recorded::default();
    let report = rebuild(
        &runner(&pool, &schema, &model, &store, &ledger),
        &RebuildOptions {
            batch_size: 64,
            ..RebuildOptions::default()
        },
        &progress,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let last_written = writer.await.unwrap();
    let (reads, failures) = reader.await.unwrap();
    assert!(
        failures.is_empty(),
        "reads failed during the rebuild: {failures:?}"
    );
    assert!(reads > 0);

    assert!(report.events >= 150 * 10);
    assert!(progress.total.load(Ordering::SeqCst) >= 1_500);
    assert_eq!(progress.last.load(Ordering::SeqCst), report.events);
    assert_eq!(progress.finished.lock().unwrap().as_ref(), Some(&report));

    // The live runner goes on into the swapped-in model.
    let head = store.head().await.unwrap();
    assert!(head >= last_written);
    live.wait_for(head, WAIT).await.unwrap();
    assert_eq!(
        balances(&pool, &model).await,
        expected_balances(&*store).await
    );
    let (rows, distinct) = ledger_counts(&pool, &model).await;
    assert_eq!(rows, distinct);
    let deposits: i64 = expected_balances(&*store).await.iter().map(|b| b.2).sum();
    assert_eq!(rows, deposits);
    assert_eq!(
        load_checkpoint(&pool, &schema, "ledger").await.unwrap(),
        Some(head)
    );
    // The old model is gone; the shadow name is free again.
    let leftovers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname IN ($1, $2)")
            .bind(format!("{model}__old"))
            .bind(format!("{model}__rebuild"))
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(leftovers, 0);
    live.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_rebuild_creates_the_model_and_a_second_concurrent_one_is_refused() {
    let (pool, schema, model) = fresh().await;
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::new(pool.clone(), schema.clone()));
    let ledger = Ledger::new("ledger");
    let head = seed_pg(&*store, 30, 0).await;
    // Hold the rebuild lock as another process would.
    let held = es_postgres::LeaderLock::try_acquire(
        &pool,
        &format!("es-projections rebuild {schema}.ledger"),
    )
    .await
    .unwrap()
    .unwrap();
    let r = runner(&pool, &schema, &model, &store, &ledger);
    let refused = rebuild(
        &r,
        &RebuildOptions::default(),
        &es_projections::postgres::NoProgress,
    )
    .await;
    assert!(matches!(refused, Err(Error::Config { .. })), "{refused:?}");
    held.release().await.unwrap();
    let report = rebuild(
        &r,
        &RebuildOptions::default(),
        &es_projections::postgres::NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(report.position, head);
    assert_eq!(
        balances(&pool, &model).await,
        expected_balances(&*store).await
    );
    assert_eq!(
        load_checkpoint(&pool, &schema, "ledger").await.unwrap(),
        Some(head)
    );
    // A runner started now has nothing left to do.
    let live = r.spawn();
    live.wait_for(head, WAIT).await.unwrap();
    assert_eq!(ledger_counts(&pool, &model).await, (300, 300));
    live.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model]).await;
}

/// Spans (name, parent's name, fields) from every test of this binary,
/// through a global subscriber: the swap's catch-up runs on whichever worker
/// thread the rebuild is on.
type Spans = Mutex<Vec<(String, String, BTreeMap<String, String>)>>;

struct Capture(&'static Spans);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let parent = ctx
            .span(id)
            .and_then(|s| s.parent())
            .map_or_else(String::new, |p| p.name().to_owned());
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_owned(), parent, fields));
    }
}

fn spans() -> &'static Spans {
    use tracing_subscriber::layer::SubscriberExt;
    static SPANS: std::sync::OnceLock<&'static Spans> = std::sync::OnceLock::new();
    SPANS.get_or_init(|| {
        let spans: &'static Spans = Box::leak(Box::default());
        let subscriber = tracing_subscriber::registry()
            .with(Capture(spans))
            .with(tracing_subscriber::filter::LevelFilter::DEBUG);
        tracing::subscriber::set_global_default(subscriber).unwrap();
        spans
    })
}

/// Appends events once the replay has reached its target, and waits (on a
/// worker thread) until the live runner has applied them: the swap must then
/// apply them to the new model itself.
struct AppendAtTheEnd {
    store: InMemoryEventStore,
    live: es_projections::ProjectionHandle,
    fired: AtomicBool,
}

impl RebuildProgress for AppendAtTheEnd {
    fn start(&self, _: u64) {}
    fn progress(&self, done: u64, total: u64) {
        if done < total || self.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        let events: Vec<_> = (0..50).map(|i| deposit(1_000 + i)).collect();
        let at = futures::executor::block_on(append(&self.store, "acct-late", events));
        let deadline = std::time::Instant::now() + WAIT;
        while self.live.position() < at && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            self.live.position() >= at,
            "the live runner did not apply the late events"
        );
    }
    fn finish(&self, _: &RebuildReport) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn the_swap_applies_what_the_live_runner_committed_after_the_replay() {
    let spans = spans();
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    let dyn_store: Arc<dyn EventStore> = Arc::new(store.clone());
    let ledger = Ledger::new("ledger");
    let first = seed(&store, 300, 7).await;
    let live = runner(&pool, &schema, &model, &dyn_store, &ledger).spawn();
    live.wait_for(first, WAIT).await.unwrap();
    let progress = AppendAtTheEnd {
        store: store.clone(),
        live: live.clone(),
        fired: AtomicBool::new(false),
    };
    let report = rebuild(
        &runner(&pool, &schema, &model, &dyn_store, &ledger),
        &RebuildOptions {
            batch_size: 100,
            keep_old: true,
            ..RebuildOptions::default()
        },
        &progress,
    )
    .await
    .unwrap();
    assert!(progress.fired.load(Ordering::SeqCst));
    assert_eq!(report.events, 300);
    assert_eq!(report.caught_up_in_swap, 50);
    let head = store.head().await.unwrap();
    assert_eq!(report.position, head);
    assert_eq!(
        balances(&pool, &model).await,
        expected_balances(&store).await
    );
    assert_eq!(ledger_counts(&pool, &model).await, (350, 350));
    // Each event the swap applied has its span, with its ids, in the
    // catch-up's span.
    let late = store
        .read_stream(&es_core::StreamId::new("acct-late").unwrap(), 1, 100)
        .await
        .unwrap();
    assert_eq!(late.len(), 50);
    {
        let spans = spans.lock().unwrap();
        for event in &late {
            let step = spans
                .iter()
                .find(|(name, parent, f)| {
                    name == "projection.apply"
                        && parent == "projection.rebuild.catch_up"
                        && f["event_id"] == event.event_id.to_string()
                })
                .unwrap_or_else(|| panic!("no catch-up span for {}", event.position));
            assert_eq!(step.2["projection"], "ledger");
            assert_eq!(
                step.2["correlation_id"],
                event.metadata.correlation_id.unwrap().to_string()
            );
            assert_eq!(
                step.2["causation_id"],
                event.metadata.causation_id.unwrap().to_string()
            );
        }
    }
    // keep_old: the replaced model is still there, as it was.
    assert_eq!(
        ledger_counts(&pool, &format!("{model}__old")).await,
        (350, 350)
    );
    // And the live runner goes on into the new model.
    let more = seed(&store, 10, 7).await;
    live.wait_for(more, WAIT).await.unwrap();
    assert_eq!(ledger_counts(&pool, &model).await, (360, 360));
    live.stop().await.unwrap();
    cleanup(&pool, &[&schema, &model]).await;
}

/// A rebuild's failures and dead letters name the projection itself, not the
/// rebuild's own checkpoint (`<name>#rebuild`), and that checkpoint is gone
/// once the new model is swapped in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_names_its_projection_and_leaves_no_checkpoint_of_its_own() {
    let (pool, schema, model) = fresh().await;
    let store = InMemoryEventStore::new();
    let dyn_store: Arc<dyn EventStore> = Arc::new(store.clone());
    let ledger = Ledger::new("ledger");
    seed(&store, 20, 3).await;
    let bad = append(&store, "acct-9", vec![deposit(-5)]).await;
    let head = seed(&store, 20, 3).await;
    let r = runner(&pool, &schema, &model, &dyn_store, &ledger);
    let options = RebuildOptions {
        batch_size: 8,
        ..RebuildOptions::default()
    };
    // Stop: the error names the projection and the event.
    let err = rebuild(&r, &options, &es_projections::postgres::NoProgress)
        .await
        .unwrap_err();
    let Error::Apply {
        projection,
        position,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!((projection.as_str(), *position), ("ledger", bad));
    assert!(!err.to_string().contains("#rebuild"), "{err}");
    // Dead letters: recorded under the projection's name.
    let options = RebuildOptions {
        on_error: OnError::DeadLetter,
        ..options
    };
    let report = rebuild(&r, &options, &es_projections::postgres::NoProgress)
        .await
        .unwrap();
    assert_eq!((report.dead_letters, report.position), (1, head));
    let letters: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT projection, major, minor FROM \"{schema}\".projection_dead_letters"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        letters,
        vec![("ledger".to_owned(), bad.major() as i64, bad.minor() as i64)]
    );
    assert_eq!(ledger_counts(&pool, &model).await, (40, 40));
    // Only the projection's own checkpoint is left.
    let names: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT name FROM \"{schema}\".checkpoints ORDER BY name"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(names, vec!["ledger".to_owned()]);
    assert_eq!(
        load_checkpoint(&pool, &schema, "ledger").await.unwrap(),
        Some(head)
    );
    cleanup(&pool, &[&schema, &model]).await;
}
