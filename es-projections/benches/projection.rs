//! Projection throughput into a PostgreSQL table (events/s) and the time to
//! rebuild a read model from 1,000,000 events, against the PostgreSQL event
//! store. A bench binary (CI does not run it):
//!
//! ```text
//! cargo bench -p es-projections --bench projection
//! ```
//!
//! `DATABASE_URL` names the database; `BENCH_REBUILD_EVENTS` (default
//! 1000000), `BENCH_THROUGHPUT_EVENTS` (default 200000) and
//! `BENCH_SINGLE_EVENTS` (default 3000: batches of one event, as a runner
//! following a quiet log commits them) the sizes; `BENCH_SINGLE_ONLY=1`
//! stops after the batches of one. The
//! events are seeded with one bulk `INSERT ... SELECT generate_series` per
//! 100,000 rows; the benchmark's schemas are dropped at the end. Every timed
//! run's model is checked against the log (each event counted once, every
//! amount summed) before its figure is printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use es_core::EventStore;
use es_postgres::PgEventStore;
use es_projections::doc_support::{bulk_seed, Balances};
use es_projections::postgres::{
    self, PgProjectionRunner, RebuildOptions, RebuildProgress, RebuildReport,
};
use es_projections::RunnerOptions;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Every10Percent(std::sync::atomic::AtomicU64);

impl RebuildProgress for Every10Percent {
    fn start(&self, total: u64) {
        eprintln!("rebuild: replaying {total} events");
    }
    fn progress(&self, done: u64, total: u64) {
        let decile = done * 10 / total.max(1);
        if decile > self.0.swap(decile, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("rebuild: {done}/{total}");
        }
    }
    fn finish(&self, report: &RebuildReport) {
        eprintln!("rebuild: done in {:.1?}", report.elapsed);
    }
}

async fn drop_schemas(pool: &sqlx::PgPool, names: &[String]) {
    for name in names {
        for suffix in ["", "__rebuild", "__old"] {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}{suffix}\" CASCADE"))
                .execute(pool)
                .await;
        }
    }
}

/// Checks a run's model against the log's events up to `upto` (all of them
/// when `None`): every `Deposited` event counted once and every amount
/// summed (what the runners promise, verified on the run being timed).
async fn verify_model(
    pool: &sqlx::PgPool,
    schema: &str,
    model: &str,
    upto: Option<es_core::Position>,
) -> Result<(), Box<dyn std::error::Error>> {
    let upto = upto.map_or((i64::MAX, i64::MAX), |p| {
        (
            i64::try_from(p.major()).unwrap_or(i64::MAX),
            i64::try_from(p.minor()).unwrap_or(i64::MAX),
        )
    });
    let (want_events, want_total): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), coalesce(sum((payload->>'amount')::bigint), 0)::bigint \
         FROM \"{schema}\".events WHERE event_type = 'Deposited' \
         AND (transaction_id, global_position) <= ($1, $2)"
    ))
    .bind(upto.0)
    .bind(upto.1)
    .fetch_one(pool)
    .await?;
    let (events, total): (i64, i64) = sqlx::query_as(&format!(
        "SELECT coalesce(sum(events), 0)::bigint, coalesce(sum(total), 0)::bigint \
         FROM \"{model}\".balances"
    ))
    .fetch_one(pool)
    .await?;
    if (events, total) != (want_events, want_total) {
        return Err(format!(
            "model {model} is wrong: {events} events summing to {total}, \
             the log has {want_events} summing to {want_total}"
        )
        .into());
    }
    Ok(())
}

/// Where the timed runs read from and write to.
struct Run<'a> {
    pool: &'a sqlx::PgPool,
    schema: &'a str,
    store: &'a Arc<dyn EventStore>,
}

impl Run<'_> {
    /// How long a new runner of the `Balances` projection `name`, writing to
    /// `model` in batches of `batch`, takes to reach `until`; stopped then.
    async fn timed(
        &self,
        model: &str,
        name: &str,
        batched: bool,
        batch: usize,
        until: es_core::Position,
    ) -> Result<Duration, Box<dyn std::error::Error>> {
        let runner = PgProjectionRunner::new(
            self.pool.clone(),
            self.schema,
            model,
            Arc::clone(self.store),
            Arc::new(Balances {
                name: name.to_owned(),
                batched,
            }),
        )?
        .with_options(RunnerOptions::default().batch_size(batch));
        let started = Instant::now();
        let handle = runner.spawn();
        handle.wait_for(until, Duration::from_secs(3_600)).await?;
        let elapsed = started.elapsed();
        handle.stop().await?;
        Ok(elapsed)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let rebuild_events = env_u64("BENCH_REBUILD_EVENTS", 1_000_000);
    let throughput_events = env_u64("BENCH_THROUGHPUT_EVENTS", 200_000);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let schema = format!("bench_es_{}", &id[..8]);
    let mut schemas = vec![schema.clone()];
    postgres::migrate(&pool, &schema).await?;
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::new(pool.clone(), schema.clone()));

    println!(
        "## es-projections bench ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let started = Instant::now();
    let total = bulk_seed(&pool, &schema, throughput_events, 1_000).await?;
    println!("seeded {total} events in {:.2?}", started.elapsed());
    let head = store.head().await?;
    let run = Run {
        pool: &pool,
        schema: &schema,
        store: &store,
    };

    // One event per batch: what each transaction costs besides its event.
    let single = env_u64("BENCH_SINGLE_EVENTS", 3_000).min(total);
    let single_at = store
        .read_all(es_core::Position::START, usize::try_from(single)?)
        .await?
        .last()
        .map_or(es_core::Position::START, |e| e.position);
    for batched in [false, true] {
        let mode = if batched { "set-based" } else { "per-event" };
        let model = format!("bench_m_{}_{}_single", &id[..8], u8::from(batched));
        schemas.push(model.clone());
        let name = format!("balances_{}_single", u8::from(batched));
        let elapsed = run.timed(&model, &name, batched, 1, single_at).await?;
        // The runner went on past `single_at` until stopped: the model
        // holds the events up to its checkpoint.
        let at = postgres::load_checkpoint(&pool, &schema, &name).await?;
        verify_model(&pool, &schema, &model, at).await?;
        println!(
            "throughput, {mode}, batch     1: {single} events in {elapsed:.2?} = {:.0} events/s ({:.0} µs per batch)",
            single as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1e6 / single as f64
        );
    }
    if std::env::var("BENCH_SINGLE_ONLY").is_ok_and(|v| v == "1") {
        drop_schemas(&pool, &schemas).await;
        return Ok(());
    }

    for (batched, batch) in [
        (false, 100usize),
        (false, 1_000),
        (true, 100),
        (true, 1_000),
        (true, 5_000),
    ] {
        let mode = if batched { "set-based" } else { "per-event" };
        let model = format!("bench_m_{}_{}_{batch}", &id[..8], u8::from(batched));
        schemas.push(model.clone());
        let name = format!("balances_{}_{batch}", u8::from(batched));
        let elapsed = run.timed(&model, &name, batched, batch, head).await?;
        verify_model(&pool, &schema, &model, None).await?;
        println!(
            "throughput, {mode}, batch {batch:>5}: {total} events in {elapsed:.2?} = {:.0} events/s",
            total as f64 / elapsed.as_secs_f64()
        );
    }

    let more = rebuild_events.saturating_sub(total);
    let started = Instant::now();
    let total = bulk_seed(&pool, &schema, more, 1_000).await?;
    println!("seeded up to {total} events in {:.2?}", started.elapsed());
    for batched in [true, false] {
        let mode = if batched { "set-based" } else { "per-event" };
        let model = format!("bench_m_{}_rebuild_{}", &id[..8], u8::from(batched));
        schemas.push(model.clone());
        let projection = Balances {
            name: format!("balances_rebuild_{}", u8::from(batched)),
            batched,
        };
        let runner = PgProjectionRunner::new(
            pool.clone(),
            &schema,
            &model,
            Arc::clone(&store),
            Arc::new(projection),
        )?;
        let batch = 2_000;
        let options = RebuildOptions {
            batch_size: batch,
            total_events: Some(total),
            ..RebuildOptions::default()
        };
        let report = postgres::rebuild(&runner, &options, &Every10Percent::default()).await?;
        verify_model(&pool, &schema, &model, None).await?;
        println!(
            "rebuild, {mode}, batch {batch}: {} events in {:.2?} = {:.0} events/s",
            report.events,
            report.elapsed,
            report.events as f64 / report.elapsed.as_secs_f64()
        );
    }
    drop_schemas(&pool, &schemas).await;
    Ok(())
}
