//! The bank's demo: opens three accounts, makes one transfer that completes
//! and one to a frozen account that is refunded, and logs the balances.
//!
//! `cargo run -p bank` runs it in memory;
//! `cargo run -p bank -- --postgres URL --rabbit URL` on PostgreSQL and
//! RabbitMQ (or set `BANK_POSTGRES` and `BANK_RABBIT`).

use bank::{AccountCommand as C, Bank};
use clap::Parser;
use es::prelude::{App, RabbitConfig};
use tracing_subscriber::EnvFilter;
use uuid::Uuid;

/// Where to run: in memory, or on PostgreSQL and RabbitMQ.
#[derive(Debug, Parser)]
struct Args {
    /// PostgreSQL URL (with --rabbit).
    #[arg(long, env = "BANK_POSTGRES", requires = "rabbit")]
    postgres: Option<String>,
    /// RabbitMQ URL (with --postgres).
    #[arg(long, env = "BANK_RABBIT", requires = "postgres")]
    rabbit: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let args = Args::parse();
    let app = match (args.postgres, args.rabbit) {
        (Some(postgres), Some(rabbit)) => {
            es::production::connect("bank", &postgres, RabbitConfig::new(rabbit)).await?
        }
        _ => App::in_memory("bank"),
    };
    let bank = Bank::start(app).await?;
    let [alice, bob, carol] = [(); 3].map(|()| Uuid::now_v7());
    for (account, frozen) in [(alice, false), (bob, false), (carol, true)] {
        bank.execute(account, C::Open { frozen }).await?;
    }
    bank.execute(alice, C::Deposit { amount: 10_000 }).await?;
    for to in [bob, carol] {
        let transfer = bank.execute(alice, C::Send { to, amount: 3_000 }).await?;
        tracing::info!(%transfer, moved = bank.settled(transfer).await?, "transfer settled");
    }
    for (name, account) in [("alice", alice), ("bob", bob), ("carol", carol)] {
        tracing::info!(name, balance = bank.balance(account).await?, "balance");
    }
    bank.stop().await;
    Ok(())
}
