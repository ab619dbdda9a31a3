//! The bank's demo: opens three accounts, makes one transfer that completes
//! and one to a frozen account that is refunded, and logs the balances.
//!
//! `cargo run -p bank` runs it in memory;
//! `cargo run -p bank -- --postgres URL --rabbit URL` on PostgreSQL and
//! RabbitMQ (or set `BANK_POSTGRES` and `BANK_RABBIT`).

use bank::{Bank, Error};
use clap::Parser;
use es::prelude::RabbitConfig;

/// Where to run.
#[derive(Debug, Parser)]
struct Args {
    /// PostgreSQL URL (with --rabbit); in memory without.
    #[arg(long, env = "BANK_POSTGRES", requires = "rabbit")]
    postgres: Option<String>,
    /// RabbitMQ URL (with --postgres).
    #[arg(long, env = "BANK_RABBIT", requires = "postgres")]
    rabbit: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let bank = match Args::parse() {
        Args {
            postgres: Some(postgres),
            rabbit: Some(rabbit),
        } => Bank::production(&postgres, RabbitConfig::new(rabbit), "bank").await?,
        _ => Bank::embedded().await?,
    };
    let (alice, bob, carol) = (
        bank.open(false).await?,
        bank.open(false).await?,
        bank.open(true).await?,
    );
    bank.deposit(alice, 10_000).await?;
    bank.withdraw(alice, 1_000).await?;
    let paid = bank.transfer(alice, bob, 3_000).await?;
    let refunded = bank.transfer(alice, carol, 2_000).await?;
    for transfer in [paid, refunded] {
        let moved = bank.settled(transfer).await?;
        tracing::info!(%transfer, moved, "transfer settled");
    }
    for (name, account) in [("alice", alice), ("bob", bob), ("carol", carol)] {
        tracing::info!(name, balance = bank.balance(account).await?, "balance");
    }
    bank.stop().await;
    Ok(())
}
