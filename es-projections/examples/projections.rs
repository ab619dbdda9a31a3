//! A command line for the demo `balances` projection over an es-postgres
//! schema: seed events, run the projection, show its lag, rebuild it with a
//! progress bar.
//!
//! ```text
//! cargo run -p es-projections --example projections -- seed --events 100000
//! cargo run -p es-projections --example projections -- run --until-caught-up
//! cargo run -p es-projections --example projections -- rebuild
//! cargo run -p es-projections --example projections -- lag
//! ```
//!
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! names the database; `--schema` the es-postgres schema (default
//! `es_demo`), `--model` the read model's schema (default `balances_model`).

use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use es_core::EventStore;
use es_postgres::PgEventStore;
use es_projections::cli::ProgressBarReporter;
use es_projections::doc_support::{bulk_seed, Balances};
use es_projections::postgres::{self, load_checkpoint, PgProjectionRunner, RebuildOptions};
use es_projections::RunnerOptions;

#[derive(Parser)]
#[command(about = "Run, inspect and rebuild the demo balances projection")]
struct Args {
    /// The database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The es-postgres schema holding the events and checkpoints.
    #[arg(long, default_value = "es_demo")]
    schema: String,
    /// The schema holding the read model.
    #[arg(long, default_value = "balances_model")]
    model: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bulk-insert demo events.
    Seed {
        /// How many.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
    },
    /// Run the projection (as leader, or standby behind another instance).
    Run {
        /// Stop once the projection has caught up with the head of the log.
        #[arg(long)]
        until_caught_up: bool,
    },
    /// Rebuild the read model from position 0 and swap it in.
    Rebuild,
    /// Show the checkpoint and the lag.
    Lag,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&args.database_url)
        .await?;
    postgres::migrate(&pool, &args.schema).await?;
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::new(pool.clone(), args.schema.clone()));
    let runner = PgProjectionRunner::new(
        pool.clone(),
        &args.schema,
        &args.model,
        Arc::clone(&store),
        Arc::new(Balances::default()),
    )?
    .with_options(RunnerOptions::default().batch_size(1_000));
    match args.command {
        Command::Seed { events } => {
            let total = bulk_seed(&pool, &args.schema, events, 1_000).await?;
            println!("seeded {events} events; the log holds {total}");
        }
        Command::Run { until_caught_up } => {
            let handle = runner.spawn();
            if until_caught_up {
                let head = store.head().await?;
                handle
                    .wait_for(head, Duration::from_secs(24 * 3600))
                    .await?;
                println!("caught up at {}", handle.position());
                handle.stop().await?;
            } else {
                tokio::signal::ctrl_c().await?;
                handle.stop().await?;
            }
        }
        Command::Rebuild => {
            let (count,): (i64,) =
                sqlx::query_as(&format!("SELECT count(*) FROM \"{}\".events", args.schema))
                    .fetch_one(&pool)
                    .await?;
            let options = RebuildOptions {
                total_events: Some(u64::try_from(count)?),
                ..RebuildOptions::default()
            };
            let report = postgres::rebuild(&runner, &options, &ProgressBarReporter::new()).await?;
            println!("{report:?}");
        }
        Command::Lag => {
            let at = load_checkpoint(&pool, &args.schema, "balances").await?;
            let lag = postgres::projection_lag(&pool, &args.schema, "balances", &*store, 1_000_000)
                .await?;
            println!(
                "checkpoint {}, head {}, behind by {} events ({:.1}s)",
                at.map_or_else(|| "none".to_owned(), |p| p.to_string()),
                store.head().await?,
                lag.events,
                lag.seconds
            );
        }
    }
    Ok(())
}
