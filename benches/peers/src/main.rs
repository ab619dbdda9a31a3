//! es-postgres (through es-core's `Repository`) beside `postgres-es` +
//! `cqrs-es` (event-sourced, no snapshots), executing the same commands on
//! the same aggregate shape against the same database, measured alternately
//! in slices so load changes on the machine hit both alike.
//!
//! ```text
//! cargo run --release --manifest-path benches/peers/Cargo.toml
//! BENCH_SECS=6 cargo run --release --manifest-path benches/peers/Cargo.toml
//! ROUNDS=5 BENCH_ONLY=long cargo run --release --manifest-path benches/peers/Cargo.toml
//! BENCH_ONLY=dcb ROUNDS=3 cargo run --release --manifest-path benches/peers/Cargo.toml
//! ```
//!
//! `ROUNDS` repeats each measurement in alternated rounds and reports the
//! median round (default 1; 3 for `dcb`); `BENCH_ONLY` (`new`, `small`,
//! `batch`, `long`, `dcb`) picks scenarios. `long` also measures the floor
//! of its command, raw sqlx selecting the same rows and inserting one, in
//! the same slices: the most any store could reach there. `dcb` (see `dcb.rs`) is the
//! course-enrolment decision through es-core's `DecisionRunner`, through
//! aggregates, and through `disintegrate`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{CqrsFramework, EventEnvelope};
use es_core::{EventStore, Metadata, Repository, SnapshotPolicy};
use es_postgres::{PgEventStore, PgSnapshotStore};
use futures::future::BoxFuture;
use postgres_es::PostgresEventRepository;
use serde::{Deserialize, Serialize};
use sqlx::Row;

mod dcb;

// ---------- the shared domain: an order with items ----------

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Item {
    product_id: String,
    name: String,
    unit_price: String,
    quantity: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Created {
    order_id: String,
    customer_email: String,
    items: Vec<Item>,
    total: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum OrderEvent {
    OrderCreated(Created),
    ItemAdded(Item),
}

#[derive(Clone, Debug)]
enum OrderCommand {
    Create,
    AddItems(u32),
}

#[derive(Debug)]
struct Refused;
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("refused")
    }
}
impl std::error::Error for Refused {}

fn item() -> Item {
    Item {
        product_id: "5d0c".into(),
        name: "Walnut Desk".into(),
        unit_price: "199.99".into(),
        quantity: 2,
    }
}

fn created() -> Created {
    Created {
        order_id: "0b7a3c1e-6d0e-4b8e-9a57-2f1c6e9d4a11".into(),
        customer_email: "ada@example.com".into(),
        items: vec![item()],
        total: "399.98".into(),
    }
}

#[derive(Default, Debug, Serialize, Deserialize)]
struct Order {
    created: bool,
    items: u64,
    total_quantity: u64,
}

impl Order {
    fn decide(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, Refused> {
        match command {
            OrderCommand::Create if !self.created => Ok(vec![OrderEvent::OrderCreated(created())]),
            OrderCommand::Create => Err(Refused),
            OrderCommand::AddItems(n) => {
                Ok((0..n).map(|_| OrderEvent::ItemAdded(item())).collect())
            }
        }
    }

    fn evolve(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderCreated(c) => {
                self.created = true;
                self.items += c.items.len() as u64;
            }
            OrderEvent::ItemAdded(i) => {
                self.items += 1;
                self.total_quantity += u64::from(i.quantity);
            }
        }
    }
}

// es-core side.
impl es_core::DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::OrderCreated(_) => "OrderCreated",
            Self::ItemAdded(_) => "ItemAdded",
        }
    }
}

impl es_core::Aggregate for Order {
    type Event = OrderEvent;
    type Command = OrderCommand;
    type Error = Refused;
    const TYPE: &'static str = "order";
    fn apply(&mut self, event: &OrderEvent) {
        self.evolve(event);
    }
    fn handle(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, Refused> {
        self.decide(command)
    }
    fn creates(command: &OrderCommand) -> bool {
        matches!(command, OrderCommand::Create)
    }
}

// cqrs-es side: the same state and events.
impl cqrs_es::DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        es_core::DomainEvent::event_type(self).to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[derive(Default, Debug, Serialize, Deserialize)]
struct CqrsOrder(Order);

impl cqrs_es::Aggregate for CqrsOrder {
    const TYPE: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = Refused;
    type Services = ();

    async fn handle(
        &mut self,
        command: OrderCommand,
        _services: &(),
        sink: &cqrs_es::event_sink::EventSink<Self>,
    ) -> Result<(), Refused> {
        for event in self.0.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: OrderEvent) {
        self.0.evolve(&event);
    }
}

struct NoQuery;
#[allow(dead_code)]
fn _unused(_: EventEnvelope<CqrsOrder>) {}

type Cqrs = CqrsFramework<CqrsOrder, PersistedEventStore<PostgresEventRepository, CqrsOrder>>;

// ---------- harness ----------

fn secs() -> Duration {
    Duration::from_secs_f64(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    )
}

/// One side of a measurement: an operation a worker (its index given) runs
/// in a loop.
type Side = Arc<dyn Fn(usize) -> BoxFuture<'static, ()> + Send + Sync>;

fn side<F, Fut>(op: F) -> Side
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |worker| Box::pin(op(worker)))
}

async fn run_for(concurrency: usize, time: Duration, op: &Side) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + time;
    let tasks: Vec<_> = (0..concurrency)
        .map(|worker| {
            let op = op.clone();
            let count = count.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    op(worker).await;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("worker panicked");
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// How many alternated rounds each measurement takes (`ROUNDS`, default 1).
fn rounds() -> usize {
    std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Whether the scenario `name` runs: `BENCH_ONLY` (a comma-separated list of
/// `new`, `small`, `batch`, `long`, `dcb`) names the scenarios to run, all
/// when unset.
fn enabled(name: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only.split(',').any(|o| o.trim() == name))
}

/// Alternates `sides` in three slices each, `ROUNDS` times; returns their
/// ops/s in the round whose ratio of the first side to the second is the
/// median, after printing each round's ratios of every other side to the
/// second when there are several rounds.
async fn alternate(concurrency: usize, sides: &[Side]) -> Vec<f64> {
    for op in sides {
        run_for(concurrency, Duration::from_millis(200), op).await;
    }
    let slice = secs() / 3;
    let mut results: Vec<Vec<f64>> = Vec::new();
    for _ in 0..rounds() {
        let mut sums = vec![0.0; sides.len()];
        for _ in 0..3 {
            for (sum, op) in sums.iter_mut().zip(sides) {
                *sum += run_for(concurrency, slice, op).await / 3.0;
            }
        }
        results.push(sums);
    }
    if results.len() > 1 {
        for i in (0..sides.len()).filter(|&i| i != 1) {
            let ratios: Vec<String> = results
                .iter()
                .map(|r| format!("{:.2}", r[i] / r[1]))
                .collect();
            println!(
                "| (per-round ratios of side {} to side 2, {concurrency} clients: {}) | | | |",
                i + 1,
                ratios.join(", ")
            );
        }
    }
    results.sort_by(|x, y| (x[0] / x[1]).total_cmp(&(y[0] / y[1])));
    results.swap_remove(results.len() / 2)
}

/// [`alternate`] of two sides.
async fn pair<F, Fut, G, Gut>(concurrency: usize, a: F, b: G) -> (f64, f64)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    G: Fn(usize) -> Gut + Send + Sync + 'static,
    Gut: Future<Output = ()> + Send + 'static,
{
    let rates = alternate(concurrency, &[side(a), side(b)]).await;
    (rates[0], rates[1])
}

fn report(name: &str, ours: f64, theirs: f64, unit: &str) {
    println!(
        "| {name} | {ours:.0} {unit} | {theirs:.0} {unit} | {:.2}x |",
        ours / theirs
    );
}

/// One bench operation on our side: `AddItems(1)` on worker `w`'s next
/// aggregate of `ids` through `repo`.
async fn add_one(repo: Arc<Repository<Order>>, ids: Arc<Rotation>, meta: Metadata, w: usize) {
    repo.execute(ids.next(w), OrderCommand::AddItems(1), &meta)
        .await
        .expect("ours");
}

/// How many aggregates each worker of the 1,000-event scenario turns over:
/// a run of 5 rounds adds about 1,500 commands per worker, so each
/// aggregate stays near 1,000 events (about 1,200 at the end) rather than
/// growing to 2,500.
const LONG_AGGREGATES_PER_WORKER: usize = 8;

/// Aggregates handed to each worker in turn: worker `w` has its own
/// `per_worker` of them, so no two workers ever write the same one.
struct Rotation {
    ids: Vec<String>,
    per_worker: usize,
    turns: Vec<AtomicU64>,
}

impl Rotation {
    fn new(workers: usize, per_worker: usize) -> Self {
        Self {
            ids: (0..workers * per_worker).map(|_| id()).collect(),
            per_worker,
            turns: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn next(&self, worker: usize) -> &str {
        let turn = self.turns[worker].fetch_add(1, Ordering::Relaxed) as usize;
        &self.ids[worker * self.per_worker + turn % self.per_worker]
    }
}

/// Aggregate ids created beforehand, handed out in turn (round and round).
struct Pool {
    ids: Vec<String>,
    next: AtomicU64,
}

impl Pool {
    fn new(size: usize) -> Self {
        Self {
            ids: (0..size).map(|_| id()).collect(),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        self.ids[turn % self.ids.len()].clone()
    }
}

/// Runs `create` once for every id of `ids`, 32 at a time.
async fn seed_pool<F, Fut>(ids: &[String], create: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = ()>,
{
    use futures::StreamExt;
    futures::stream::iter(ids.iter().cloned().map(create))
        .buffer_unordered(32)
        .collect::<()>()
        .await;
}

fn id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn main() {
    // disintegrate-postgres builds sqlx with TLS, and sqlx then negotiates
    // TLS with a server that offers it (`sslmode=prefer`): every connection
    // of the bench would pay for it, unlike before that dependency. Plain
    // connections, as before, unless PGSSLMODE says otherwise; set before
    // the runtime starts any thread.
    if std::env::var_os("PGSSLMODE").is_none() {
        std::env::set_var("PGSSLMODE", "disable");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run());
}

async fn run() {
    let (pool, schema) = es_postgres::testing::fresh_schema_with(40).await;
    // postgres-es's tables (its db/init.sql), in the same schema.
    sqlx::raw_sql(&format!(
        "CREATE TABLE \"{schema}\".cqrs_events (
            aggregate_type text NOT NULL, aggregate_id text NOT NULL,
            sequence bigint CHECK (sequence >= 0) NOT NULL,
            event_type text NOT NULL, event_version text NOT NULL,
            payload json NOT NULL, metadata json NOT NULL,
            PRIMARY KEY (aggregate_type, aggregate_id, sequence));
         CREATE TABLE \"{schema}\".cqrs_snapshots (
            aggregate_type text NOT NULL, aggregate_id text NOT NULL,
            last_sequence bigint CHECK (last_sequence >= 0) NOT NULL,
            current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
            payload json NOT NULL,
            PRIMARY KEY (aggregate_type, aggregate_id, last_sequence));"
    ))
    .execute(&pool)
    .await
    .expect("create postgres-es tables");

    let store = PgEventStore::new(pool.clone(), schema.clone());
    let dyn_store: Arc<dyn EventStore> = Arc::new(store.clone());
    let repo = Arc::new(Repository::<Order>::new(dyn_store.clone()));
    let snap_repo = Arc::new(Repository::<Order>::new(dyn_store.clone()).with_snapshots(
        Arc::new(PgSnapshotStore::new(pool.clone(), &schema)),
        SnapshotPolicy::Every(100),
        1,
    ));
    let cached_repo = Arc::new(Repository::<Order>::new(dyn_store.clone()).with_state_cache(1_000));
    let events_table = format!("\"{schema}\".cqrs_events");
    let snapshots_table = format!("\"{schema}\".cqrs_snapshots");
    let cqrs_repo =
        PostgresEventRepository::new(pool.clone()).with_tables(&events_table, &snapshots_table);
    let cqrs: Arc<Cqrs> = Arc::new(CqrsFramework::new(
        PersistedEventStore::new_event_store(cqrs_repo),
        vec![],
        (),
    ));
    let _ = NoQuery;

    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .expect("version");
    println!(
        "PostgreSQL {version}; schema {schema}; {} s per side per measurement",
        secs().as_secs_f64()
    );
    if ["new", "small", "batch", "long"].iter().any(|s| enabled(s)) {
        println!();
        println!("| command | es-postgres + Repository | postgres-es + cqrs-es | ratio |");
        println!("|---|---|---|---|");
    }
    let meta = Metadata::new();

    // 1. A command creating a new aggregate (load: empty; one event), through
    // `execute` (the aggregate says `Create` creates it, so it appends
    // expecting no stream without reading; cqrs-es reads the empty stream
    // first) and through `create` (which always assumes a new stream).
    for (how, create) in [("execute", false), ("create", true)] {
        if !enabled("new") {
            break;
        }
        for c in [1usize, 8, 32] {
            let (r, m) = (repo.clone(), meta.clone());
            let ours = move |_w: usize| {
                let (r, m) = (r.clone(), m.clone());
                async move {
                    if create {
                        r.create(id(), OrderCommand::Create, &m).await
                    } else {
                        r.execute(id(), OrderCommand::Create, &m).await
                    }
                    .expect("ours");
                }
            };
            let q = cqrs.clone();
            let theirs = move |_w: usize| {
                let q = q.clone();
                async move {
                    q.execute(&id(), OrderCommand::Create)
                        .await
                        .expect("cqrs-es");
                }
            };
            let (o, t) = pair(c, ours, theirs).await;
            report(
                &format!("new aggregate, 1 event, `Repository::{how}`, {c} clients"),
                o,
                t,
                "cmd/s",
            );
        }
    }

    // 1b. A one-event command on an existing small aggregate (created just
    //    before, one to a few events), the common case of a command: ours
    //    through a repository with a state cache (decided on the cached state,
    //    appended expecting its version, nothing read), theirs through
    //    cqrs-es (load, then the append in a transaction). Each call takes
    //    the next aggregate of a pool created beforehand, so neither side's
    //    aggregates grow long.
    let pool_size: usize = if enabled("small") {
        std::env::var("BENCH_POOL")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20_000)
    } else {
        1
    };
    let small_repo =
        Arc::new(Repository::<Order>::new(dyn_store.clone()).with_state_cache(2 * pool_size));
    let ours_pool = Arc::new(Pool::new(pool_size));
    let theirs_pool = Arc::new(Pool::new(pool_size));
    seed_pool(&ours_pool.ids, |id| {
        let (r, m) = (small_repo.clone(), meta.clone());
        async move {
            r.create(id, OrderCommand::Create, &m)
                .await
                .expect("seed ours");
        }
    })
    .await;
    seed_pool(&theirs_pool.ids, |id| {
        let q = cqrs.clone();
        async move {
            q.execute(&id, OrderCommand::Create)
                .await
                .expect("seed cqrs-es");
        }
    })
    .await;
    for c in [1usize, 8, 32] {
        if !enabled("small") {
            break;
        }
        let (r, m, pool) = (small_repo.clone(), meta.clone(), ours_pool.clone());
        let ours = move |_w: usize| {
            let (r, m) = (r.clone(), m.clone());
            let id = pool.next();
            async move {
                r.execute(id, OrderCommand::AddItems(1), &m)
                    .await
                    .expect("ours");
            }
        };
        let (q, pool) = (cqrs.clone(), theirs_pool.clone());
        let theirs = move |_w: usize| {
            let q = q.clone();
            let id = pool.next();
            async move {
                q.execute(&id, OrderCommand::AddItems(1))
                    .await
                    .expect("cqrs-es");
            }
        };
        let (o, t) = pair(c, ours, theirs).await;
        report(
            &format!("1-event command on a small existing aggregate, state cache, {c} clients"),
            o,
            t,
            "cmd/s",
        );
    }

    // 2. A command producing 100 events on a new aggregate.
    for c in [1usize, 8] {
        if !enabled("batch") {
            break;
        }
        let (r, m) = (repo.clone(), meta.clone());
        let ours = move |_w: usize| {
            let (r, m) = (r.clone(), m.clone());
            async move {
                r.execute(id(), OrderCommand::AddItems(100), &m)
                    .await
                    .expect("ours");
            }
        };
        let q = cqrs.clone();
        let theirs = move |_w: usize| {
            let q = q.clone();
            async move {
                q.execute(&id(), OrderCommand::AddItems(100))
                    .await
                    .expect("cqrs-es");
            }
        };
        let (o, t) = pair(c, ours, theirs).await;
        report(
            &format!("100-event command, {c} clients"),
            o * 100.0,
            t * 100.0,
            "events/s",
        );
    }

    // 3. A one-event command on an aggregate of 1,000 events (load 1,000,
    //    decide, append 1), each client turning over aggregates of its own.
    for c in [1usize, 8] {
        if !enabled("long") {
            break;
        }
        let ours_ids = Arc::new(Rotation::new(c, LONG_AGGREGATES_PER_WORKER));
        let theirs_ids = Arc::new(Rotation::new(c, LONG_AGGREGATES_PER_WORKER));
        for (ours_id, theirs_id) in ours_ids.ids.iter().zip(&theirs_ids.ids) {
            for _ in 0..10 {
                repo.execute(ours_id, OrderCommand::AddItems(100), &meta)
                    .await
                    .expect("seed ours");
                cqrs.execute(theirs_id, OrderCommand::AddItems(100))
                    .await
                    .expect("seed cqrs-es");
            }
        }
        let (r, m, ids) = (repo.clone(), meta.clone(), ours_ids.clone());
        let ours = move |w: usize| add_one(r.clone(), ids.clone(), m.clone(), w);
        let (q, ids) = (cqrs.clone(), theirs_ids.clone());
        let theirs = move |w: usize| {
            let (q, ids) = (q.clone(), ids.clone());
            async move {
                q.execute(ids.next(w), OrderCommand::AddItems(1))
                    .await
                    .expect("cqrs-es");
            }
        };
        // The floor: what the database and the protocol alone cost for such a
        // command, raw sqlx on copies of our streams: the replay's SELECT
        // (rows fetched, not decoded) and one autocommitted INSERT.
        let floor_ids = Arc::new(Rotation::new(c, LONG_AGGREGATES_PER_WORKER));
        for (from, to) in ours_ids.ids.iter().zip(&floor_ids.ids) {
            sqlx::query(&format!(
                "INSERT INTO \"{schema}\".events (stream_id, stream_version, event_id,
                     event_type, schema_version, payload, metadata)
                 SELECT $2, stream_version, gen_random_uuid(), event_type, schema_version,
                        payload, metadata
                   FROM \"{schema}\".events WHERE tenant = '' AND stream_id = $1"
            ))
            .bind(format!("order-{from}"))
            .bind(format!("floor-{to}"))
            .execute(&pool)
            .await
            .expect("seed the floor's streams");
        }
        let select = format!(
            "SELECT event_id, stream_version, event_type, schema_version, payload
               FROM \"{schema}\".events WHERE tenant = '' AND stream_id = $1
              ORDER BY stream_version"
        );
        let insert = format!(
            "INSERT INTO \"{schema}\".events (stream_id, stream_version, event_id,
                 event_type, schema_version, payload, metadata)
             VALUES ($1, $2, $3, 'ItemAdded', 1, $4::json, '{{}}')"
        );
        let item_json = serde_json::to_string(&OrderEvent::ItemAdded(item())).expect("json");
        let statements = Arc::new((select, insert, item_json));
        let (p, ids) = (pool.clone(), floor_ids.clone());
        let floor = move |w: usize| {
            let (p, stream) = (p.clone(), format!("floor-{}", ids.next(w)));
            let statements = statements.clone();
            async move {
                let (select, insert, item_json) = &*statements;
                let rows = sqlx::query(select)
                    .bind(&stream)
                    .fetch_all(&p)
                    .await
                    .expect("floor select");
                let last: i64 = rows.last().map_or(0, |row| row.get(1));
                sqlx::query(insert)
                    .bind(&stream)
                    .bind(last + 1)
                    .bind(uuid::Uuid::now_v7())
                    .bind(item_json)
                    .execute(&p)
                    .await
                    .expect("floor insert");
            }
        };
        let rates = alternate(c, &[side(ours), side(theirs.clone()), side(floor)]).await;
        let (o, t, f) = (rates[0], rates[1], rates[2]);
        report(
            &format!("1-event command on a 1,000-event aggregate, no snapshots, {c} clients"),
            o,
            t,
            "cmd/s",
        );
        report(
            &format!(
                "floor: raw sqlx, the same rows selected (not decoded) and one INSERT, {c} clients"
            ),
            f,
            t,
            "cmd/s",
        );
        println!("| (es-postgres / floor: {:.2}x) | | | |", o / f);
        if c == 1 {
            let snap_ids = Arc::new(Rotation::new(1, LONG_AGGREGATES_PER_WORKER));
            for snap_id in &snap_ids.ids {
                for _ in 0..10 {
                    snap_repo
                        .execute(snap_id, OrderCommand::AddItems(100), &meta)
                        .await
                        .expect("seed");
                }
            }
            let (r, m, ids) = (snap_repo.clone(), meta.clone(), snap_ids.clone());
            let ours_snap = move |w: usize| add_one(r.clone(), ids.clone(), m.clone(), w);
            let (o, t) = pair(1, ours_snap, theirs.clone()).await;
            report(
                "same, es-postgres with snapshots every 100 vs postgres-es without, 1 client",
                o,
                t,
                "cmd/s",
            );
        }
        // The same aggregates through a repository with a state cache: after
        // the first command each one reads only the (empty) tail.
        let (r, m, ids) = (cached_repo.clone(), meta.clone(), ours_ids.clone());
        let ours_cached = move |w: usize| add_one(r.clone(), ids.clone(), m.clone(), w);
        let (o, t) = pair(c, ours_cached, theirs).await;
        report(
            &format!(
                "same, es-postgres with a state cache vs postgres-es without snapshots, {c} clients"
            ),
            o,
            t,
            "cmd/s",
        );
    }

    // 4. The course-enrolment decision (DCB), its own tables (see `dcb.rs`).
    if enabled("dcb") {
        dcb::run(&pool, &schema, &store).await;
    }
    let _ = store;
}
