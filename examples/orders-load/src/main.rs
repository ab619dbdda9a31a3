//! `orders-load`: drives the orders system and reports completed orders/s and
//! end-to-end latency percentiles.
//!
//! ```text
//! cargo run --release -p orders-load -- --orders 20000 --concurrency 256
//! cargo run --release -p orders-load -- --orders 20000 --concurrency 128 --target http://127.0.0.1:8080
//! cargo run --release -p orders-load -- --orders 5000 --rate 250 --concurrency 512 --target http://127.0.0.1:8080
//! ```
//!
//! Without `--target` it runs the embedded system in this process and drives
//! it through the services' own interface; with a target it drives a running
//! deployment over HTTP.

mod load;

use std::process::ExitCode;

use clap::Parser;

/// The same allocator as the `orders` binary, so that an in-process run
/// measures what `orders` serves (see docs/src/operations.md, "Memory
/// allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Generate load and report completed orders/s and latency percentiles.
#[derive(Debug, Parser)]
#[command(name = "orders-load", version)]
struct Cli {
    /// Orders to place.
    #[arg(long, env = "ORDERS_LOAD_ORDERS", default_value_t = 10_000)]
    orders: u64,
    /// Concurrent clients.
    #[arg(long, env = "ORDERS_LOAD_CONCURRENCY", default_value_t = 128)]
    concurrency: usize,
    /// Place orders at this many per second (an open loop; latency counts
    /// from when each order was due). Without it, as fast as the clients can.
    #[arg(long, env = "ORDERS_LOAD_RATE")]
    rate: Option<f64>,
    /// Products to spread orders over.
    #[arg(long, env = "ORDERS_LOAD_PRODUCTS", default_value_t = 100)]
    products: usize,
    /// A running system's base URL (e.g. http://127.0.0.1:8080); without it
    /// the system runs in process.
    #[arg(long, env = "ORDERS_LOAD_TARGET")]
    target: Option<String>,
    /// A bearer token for the target, when it requires one: an admin's
    /// (`orders token --role admin`), since the run creates products.
    #[arg(long, env = "ORDERS_LOAD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Consumers per subscription (embedded only).
    #[arg(long, env = "ORDERS_CONSUMERS", default_value_t = 16)]
    consumers: u16,
    /// Log as JSON lines.
    #[arg(long, env = "ORDERS_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings only unless RUST_LOG says otherwise: a line per order would
    // measure the terminal, not the system.
    let _log = orders::telemetry::init_tracing(cli.log_json, "warn", "orders-load");
    let options = load::LoadOptions {
        orders: cli.orders,
        concurrency: cli.concurrency,
        products: cli.products,
        target: cli.target,
        token: cli.token,
        consumers: cli.consumers,
        progress: true,
        rate: cli.rate,
    };
    match load::run(options).await {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "failed");
            ExitCode::FAILURE
        }
    }
}
