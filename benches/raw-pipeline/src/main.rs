//! The raw pipeline baseline: the essential work of one order, done with raw
//! lapin and sqlx and nothing else.
//!
//! An order is a chain of `--hops` broker hops. Each hop is a persistent
//! message published with publisher confirms to a durable topic exchange,
//! routed to a durable quorum queue of its own, and delivered to a consumer
//! (manual acks, prefetch `--prefetch`, as many deliveries handled at once).
//! The consumer commits its share of the order's `--commits` single-row
//! INSERTs (each its own transaction), publishes the next hop and waits for
//! its confirm, then acks its delivery; the last hop's consumer completes the
//! order. `--concurrency` orders are in flight at once.
//!
//! It prints completed orders/s, the hops and commits per order as counted
//! (messages confirmed and delivered, rows in the table), and the latency of
//! an order's chain. It deletes its exchange, queues and table when it ends.
//!
//! ```text
//! cargo run --release --manifest-path benches/raw-pipeline/Cargo.toml -- \
//!     --hops 10 --commits 8 --orders 2000 --concurrency 128
//! ```
//!
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) and
//! `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`) say where.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::sync::oneshot;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "\
raw-pipeline: the essential work of an order (H broker hops, C PostgreSQL commits) with raw lapin and sqlx

usage: es-raw-pipeline-bench [options]
  --hops H          broker hops per order (default 10)
  --commits C       single-row commits per order, spread over the hops (default 8)
  --orders N        orders to run (default 2000)
  --concurrency K   orders in flight (default 128)
  --prefetch P      prefetch of each hop's consumer, and deliveries handled at once (default 64)
  --pg-pool S       PostgreSQL connections (default 16)
  --payload B       bytes in each message and each row (default 256)
  --explicit-tx     BEGIN; INSERT; COMMIT for each commit (default: one INSERT, autocommitted)
  --timeout-secs T  how long an order may take before it counts as failed (default 60)
env: DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres)
     AMQP_URL     (default amqp://guest:guest@127.0.0.1:5672/%2f)";

/// The command line.
#[derive(Debug, Clone)]
struct Args {
    hops: u32,
    commits: u32,
    orders: u64,
    concurrency: usize,
    prefetch: u16,
    pg_pool: u32,
    payload: usize,
    explicit_tx: bool,
    timeout: Duration,
}

impl Args {
    fn parse() -> Result<Self, String> {
        let mut args = Self {
            hops: 10,
            commits: 8,
            orders: 2000,
            concurrency: 128,
            prefetch: 64,
            pg_pool: 16,
            payload: 256,
            explicit_tx: false,
            timeout: Duration::from_secs(60),
        };
        let mut words = std::env::args().skip(1);
        while let Some(word) = words.next() {
            let (flag, inline) = match word.split_once('=') {
                Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
                None => (word.clone(), None),
            };
            if flag == "--help" || flag == "-h" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            if flag == "--explicit-tx" {
                args.explicit_tx = true;
                continue;
            }
            let value = match inline {
                Some(value) => value,
                None => words
                    .next()
                    .ok_or_else(|| format!("{flag} needs a value"))?,
            };
            let bad = |e: std::num::ParseIntError| format!("{flag} {value}: {e}");
            match flag.as_str() {
                "--hops" => args.hops = value.parse().map_err(bad)?,
                "--commits" => args.commits = value.parse().map_err(bad)?,
                "--orders" => args.orders = value.parse().map_err(bad)?,
                "--concurrency" => args.concurrency = value.parse().map_err(bad)?,
                "--prefetch" => args.prefetch = value.parse().map_err(bad)?,
                "--pg-pool" => args.pg_pool = value.parse().map_err(bad)?,
                "--payload" => args.payload = value.parse().map_err(bad)?,
                "--timeout-secs" => args.timeout = Duration::from_secs(value.parse().map_err(bad)?),
                _ => return Err(format!("unknown option {flag}\n\n{USAGE}")),
            }
        }
        if args.hops == 0 || args.concurrency == 0 || args.prefetch == 0 || args.pg_pool == 0 {
            return Err(
                "--hops, --concurrency, --prefetch and --pg-pool must be at least 1".into(),
            );
        }
        // The order id travels in the message's first 8 bytes.
        args.payload = args.payload.max(8);
        Ok(args)
    }
}

/// How many of `commits` hop `hop` of `hops` does: spread evenly, the
/// remainder on the later hops, summing to `commits`.
fn commits_at(hop: u32, hops: u32, commits: u32) -> u32 {
    let share = |h: u32| (u64::from(commits) * u64::from(h) / u64::from(hops)) as u32;
    share(hop + 1) - share(hop)
}

/// What every consumer and driver shares.
struct Pipeline {
    pool: PgPool,
    /// The confirm channel every publish goes through.
    publisher: Channel,
    exchange: ShortString,
    insert: String,
    hops: u32,
    commits_per_hop: Vec<u32>,
    payload: usize,
    explicit_tx: bool,
    /// The drivers waiting for their orders' last hop.
    waiting: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
    published: AtomicU64,
    delivered: AtomicU64,
    committed: AtomicU64,
}

impl Pipeline {
    /// Publishes hop `hop` of `order` and waits for the broker's confirm.
    async fn publish(&self, hop: u32, order: u64) -> Result<(), BoxError> {
        let mut body = vec![0u8; self.payload];
        body[..8].copy_from_slice(&order.to_le_bytes());
        let confirm = self
            .publisher
            .basic_publish(
                self.exchange.clone(),
                ShortString::from(format!("hop.{hop}")),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => {
                self.published.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Confirmation::Ack(Some(_)) => Err(format!("hop {hop} was unroutable").into()),
            _ => Err(format!("hop {hop} was not confirmed").into()),
        }
    }

    /// Commits one row of `order`.
    async fn commit(&self, order: u64, hop: u32, step: u32) -> Result<(), BoxError> {
        let data = vec![b'x'; self.payload];
        let query = sqlx::query(&self.insert)
            .bind(order as i64)
            .bind(hop as i32)
            .bind(step as i32)
            .bind(data);
        let done = if self.explicit_tx {
            let mut tx = self.pool.begin().await?;
            let done = query.execute(&mut *tx).await?;
            tx.commit().await?;
            done
        } else {
            query.execute(&self.pool).await?
        };
        if done.rows_affected() != 1 {
            return Err("the INSERT wrote no row".into());
        }
        self.committed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Handles one delivery of hop `hop`: its commits, the next hop's
    /// publish, the ack; the last hop completes the order.
    async fn handle(&self, hop: u32, delivery: &Delivery) -> Result<u64, BoxError> {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let order = delivery
            .data
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or("a message without an order id")?;
        for step in 0..self.commits_per_hop[hop as usize] {
            self.commit(order, hop, step).await?;
        }
        if hop + 1 < self.hops {
            self.publish(hop + 1, order).await?;
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(order)
    }

    fn finish(&self, order: u64, ok: bool) {
        let waiter = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&order);
        if let Some(waiter) = waiter {
            let _ = waiter.send(ok);
        }
    }
}

/// The names of one run's exchange, queues and table.
#[derive(Debug, Clone)]
struct Names {
    exchange: String,
    queues: Vec<String>,
    table: String,
}

impl Names {
    fn new(hops: u32) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let run = format!("{:x}{:05x}", std::process::id(), nanos & 0xfffff);
        Self {
            exchange: format!("raw_pipeline.{run}"),
            queues: (0..hops)
                .map(|hop| format!("raw_pipeline.{run}.hop{hop}"))
                .collect(),
            table: format!("raw_pipeline_{run}"),
        }
    }
}

/// Declares the exchange, the queues (bound `hop.<i>`) and the table.
async fn declare(channel: &Channel, pool: &PgPool, names: &Names) -> Result<(), BoxError> {
    channel
        .exchange_declare(
            names.exchange.clone().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for (hop, queue) in names.queues.iter().enumerate() {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        // Gone within 30 minutes unused, should a run die before its cleanup.
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(1_800_000));
        channel
            .queue_declare(
                queue.clone().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await?;
        channel
            .queue_bind(
                queue.clone().into(),
                names.exchange.clone().into(),
                format!("hop.{hop}").into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    sqlx::query(&format!(
        "CREATE TABLE \"{}\" (id bigserial PRIMARY KEY, order_id bigint NOT NULL, \
         hop int NOT NULL, step int NOT NULL, data bytea NOT NULL, \
         created_at timestamptz NOT NULL DEFAULT now())",
        names.table
    ))
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes the queues, the exchange and the table (each attempted; the
/// first failure is returned).
async fn clean_up(connection: &Connection, pool: &PgPool, names: &Names) -> Result<(), BoxError> {
    let mut first: Option<BoxError> = None;
    match connection.create_channel().await {
        Ok(channel) => {
            for queue in &names.queues {
                if let Err(e) = channel
                    .queue_delete(queue.clone().into(), QueueDeleteOptions::default())
                    .await
                {
                    first.get_or_insert(Box::new(e));
                }
            }
            if let Err(e) = channel
                .exchange_delete(
                    names.exchange.clone().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await
            {
                first.get_or_insert(Box::new(e));
            }
            let _ = channel.close(200, "done".into()).await;
        }
        Err(e) => {
            first.get_or_insert(Box::new(e));
        }
    }
    if let Err(e) = sqlx::query(&format!("DROP TABLE IF EXISTS \"{}\"", names.table))
        .execute(pool)
        .await
    {
        first.get_or_insert(Box::new(e));
    }
    first.map_or(Ok(()), Err)
}

/// Starts hop `hop`'s consumer on a channel of its own.
async fn consume(
    connection: &Connection,
    pipeline: Arc<Pipeline>,
    queue: &str,
    hop: u32,
    prefetch: u16,
) -> Result<Channel, BoxError> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.to_owned().into(),
            format!("hop{hop}").into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(
        consumer.for_each_concurrent(usize::from(prefetch), move |delivery| {
            let pipeline = Arc::clone(&pipeline);
            async move {
                let Ok(delivery) = delivery else { return };
                match pipeline.handle(hop, &delivery).await {
                    Ok(order) => {
                        if hop + 1 == pipeline.hops {
                            pipeline.finish(order, true);
                        }
                    }
                    Err(error) => {
                        eprintln!("hop {hop}: {error}");
                        let _ = delivery
                            .acker
                            .reject(BasicRejectOptions { requeue: false })
                            .await;
                        if let Some(order) = delivery
                            .data
                            .get(..8)
                            .and_then(|b| b.try_into().ok())
                            .map(u64::from_le_bytes)
                        {
                            pipeline.finish(order, false);
                        }
                    }
                }
            }
        }),
    );
    Ok(channel)
}

/// What the load measured.
struct Report {
    completed: u64,
    failed: u64,
    elapsed: Duration,
    /// Microseconds, sorted.
    latencies: Vec<u64>,
}

/// Runs `args.orders` orders, `args.concurrency` at a time.
async fn drive(pipeline: &Arc<Pipeline>, args: &Args) -> Report {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut drivers = Vec::new();
    for _ in 0..args.concurrency {
        let (pipeline, next, total, limit) = (
            Arc::clone(pipeline),
            Arc::clone(&next),
            args.orders,
            args.timeout,
        );
        drivers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0u64;
            loop {
                let order = next.fetch_add(1, Ordering::Relaxed);
                if order >= total {
                    break;
                }
                let (done, wait) = oneshot::channel();
                pipeline
                    .waiting
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(order, done);
                let t0 = Instant::now();
                if let Err(error) = pipeline.publish(0, order).await {
                    eprintln!("order {order}: {error}");
                    pipeline.finish(order, false);
                }
                match tokio::time::timeout(limit, wait).await {
                    Ok(Ok(true)) => latencies.push(t0.elapsed().as_micros() as u64),
                    _ => {
                        failed += 1;
                        pipeline.finish(order, false);
                    }
                }
            }
            (latencies, failed)
        }));
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    for driver in drivers {
        match driver.await {
            Ok((l, f)) => {
                latencies.extend(l);
                failed += f;
            }
            Err(error) => eprintln!("a driver failed: {error}"),
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Report {
        completed: latencies.len() as u64,
        failed,
        elapsed,
        latencies,
    }
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

async fn run(
    args: &Args,
    connection: &Connection,
    pool: &PgPool,
    names: &Names,
) -> Result<(), BoxError> {
    let setup = connection.create_channel().await?;
    declare(&setup, pool, names).await?;
    let _ = setup.close(200, "declared".into()).await;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let commits_per_hop: Vec<u32> = (0..args.hops)
        .map(|hop| commits_at(hop, args.hops, args.commits))
        .collect();
    let pipeline = Arc::new(Pipeline {
        pool: pool.clone(),
        publisher,
        exchange: names.exchange.clone().into(),
        insert: format!(
            "INSERT INTO \"{}\" (order_id, hop, step, data) VALUES ($1, $2, $3, $4)",
            names.table
        ),
        hops: args.hops,
        commits_per_hop: commits_per_hop.clone(),
        payload: args.payload,
        explicit_tx: args.explicit_tx,
        waiting: Mutex::new(HashMap::new()),
        published: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        committed: AtomicU64::new(0),
    });
    let mut consumers = Vec::new();
    for (hop, queue) in names.queues.iter().enumerate() {
        consumers.push(
            consume(
                connection,
                Arc::clone(&pipeline),
                queue,
                hop as u32,
                args.prefetch,
            )
            .await?,
        );
    }
    println!(
        "raw pipeline (lapin + sqlx): {} hops, {} commits per order (per hop: {commits_per_hop:?}); \
         {} orders, {} in flight; prefetch {}; PostgreSQL pool {}; {} {}-byte rows",
        args.hops,
        args.commits,
        args.orders,
        args.concurrency,
        args.prefetch,
        args.pg_pool,
        if args.explicit_tx { "BEGIN/INSERT/COMMIT," } else { "autocommitted" },
        args.payload,
    );
    let report = drive(&pipeline, args).await;
    for channel in consumers {
        let _ = channel.close(200, "done".into()).await;
    }
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\"", names.table))
        .fetch_one(pool)
        .await?;
    let per = |n: u64| n as f64 / report.completed.max(1) as f64;
    let published = pipeline.published.load(Ordering::Relaxed);
    let delivered = pipeline.delivered.load(Ordering::Relaxed);
    let committed = pipeline.committed.load(Ordering::Relaxed);
    println!(
        "orders:            {} completed, {} failed",
        report.completed, report.failed
    );
    println!("elapsed:           {:.2} s", report.elapsed.as_secs_f64());
    println!(
        "orders/s:          {:.0}",
        report.completed as f64 / report.elapsed.as_secs_f64().max(1e-9)
    );
    println!(
        "per order:         {:.2} hops ({:.2} published and confirmed, {:.2} delivered), \
         {:.2} commits ({:.2} rows in the table)",
        per(delivered),
        per(published),
        per(delivered),
        per(committed),
        per(u64::try_from(rows).unwrap_or_default()),
    );
    println!(
        "latency (ms):      p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
        percentile(&report.latencies, 0.50),
        percentile(&report.latencies, 0.95),
        percentile(&report.latencies, 0.99),
        report.latencies.last().copied().unwrap_or_default() as f64 / 1000.0,
    );
    if report.failed > 0 {
        return Err(format!("{} orders failed", report.failed).into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = match Args::parse() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("{error}");
            return std::process::ExitCode::from(2);
        }
    };
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let pool = match PgPoolOptions::new()
        .max_connections(args.pg_pool)
        .connect(&database_url)
        .await
    {
        Ok(pool) => pool,
        Err(error) => {
            eprintln!("PostgreSQL at {database_url}: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let connection = match Connection::connect(&amqp_url, ConnectionProperties::default()).await {
        Ok(connection) => connection,
        Err(error) => {
            eprintln!("RabbitMQ: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let names = Names::new(args.hops);
    let outcome = tokio::select! {
        outcome = run(&args, &connection, &pool, &names) => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    let cleaned = clean_up(&connection, &pool, &names).await;
    let _ = connection.close(200, "done".into()).await;
    pool.close().await;
    let mut code = std::process::ExitCode::SUCCESS;
    if let Err(error) = outcome {
        eprintln!("raw pipeline: {error}");
        code = std::process::ExitCode::FAILURE;
    }
    if let Err(error) = cleaned {
        eprintln!(
            "cleaning up {} / {} / {}: {error}",
            names.exchange,
            names.queues.join(","),
            names.table
        );
        code = std::process::ExitCode::FAILURE;
    }
    code
}

#[cfg(test)]
mod tests {
    use super::commits_at;

    #[test]
    fn commits_spread_over_the_hops_add_up() {
        for (hops, commits) in [(10, 8), (17, 20), (1, 5), (4, 0), (3, 3)] {
            let spread: Vec<u32> = (0..hops).map(|h| commits_at(h, hops, commits)).collect();
            assert_eq!(spread.iter().sum::<u32>(), commits, "{spread:?}");
            assert!(spread.iter().max().unwrap() - spread.iter().min().unwrap() <= 1);
        }
    }
}
