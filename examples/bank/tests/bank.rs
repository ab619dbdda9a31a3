//! The bank end to end: on the embedded backends always, and on PostgreSQL
//! and RabbitMQ (`DATABASE_URL`, `AMQP_URL`, loopback defaults), which must
//! be there: the test fails, naming the URLs, when they are not.

#![allow(clippy::unwrap_used)] // tests panic on failure

use bank::{AccountCommand as C, AccountError, Bank};
use std::time::Duration;
use uuid::Uuid;

use es::prelude::{App, RabbitConfig};
use es::RepositoryError;

/// Two transfers (one completed, one refunded because the receiver is
/// frozen) and the refusals the owners see at once; the balances add up.
async fn transfers_settle_and_refusals_are_compensated(bank: Bank) {
    let [alice, bob, carol] = [(); 3].map(|()| Uuid::now_v7());
    for (account, frozen) in [(alice, false), (bob, false), (carol, true)] {
        bank.execute(account, C::Open { frozen }).await.unwrap();
    }
    bank.execute(alice, C::Deposit { amount: 10_000 })
        .await
        .unwrap();
    bank.execute(alice, C::Withdraw { amount: 1_000 })
        .await
        .unwrap();
    let refused = |result: Result<_, RepositoryError<AccountError>>| match result {
        Err(RepositoryError::Rejected(e)) => e,
        other => panic!("{other:?}"),
    };
    let overdraw = bank.execute(alice, C::Withdraw { amount: 100_000 }).await;
    assert_eq!(refused(overdraw), AccountError::Insufficient);
    let frozen = bank.execute(carol, C::Deposit { amount: 5 }).await;
    assert_eq!(refused(frozen), AccountError::Frozen);
    let nothing = bank.execute(alice, C::Deposit { amount: 0 }).await;
    assert_eq!(refused(nothing), AccountError::Invalid);
    let twice = bank.execute(bob, C::Open { frozen: false }).await;
    assert_eq!(refused(twice), AccountError::AlreadyOpen);

    let send = |to, amount| C::Send { to, amount };
    let paid = bank.execute(alice, send(bob, 3_000)).await.unwrap();
    let bounced = bank.execute(alice, send(carol, 2_000)).await.unwrap();
    assert!(bank.settled(paid).await.unwrap());
    assert!(!bank.settled(bounced).await.unwrap());
    // To an account that does not exist: refused, refunded.
    let nobody = Uuid::now_v7();
    let nowhere = bank.execute(bob, send(nobody, 100)).await.unwrap();
    assert!(!bank.settled(nowhere).await.unwrap());
    assert_eq!(bank.balance(alice).await.unwrap(), 6_000);
    assert_eq!(bank.balance(bob).await.unwrap(), 3_000);
    assert_eq!(bank.balance(nobody).await.unwrap(), 0);
    assert_eq!(bank.balance(carol).await.unwrap(), 0);
    bank.stop().await;
}

#[tokio::test]
async fn embedded() {
    let bank = Bank::start(App::in_memory("bank")).await.unwrap();
    transfers_settle_and_refusals_are_compensated(bank).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_rabbitmq() {
    let env = |name: &str, default: &str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_owned())
    };
    let postgres = env(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let rabbit = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    // A fresh schema and queue prefix per run.
    let namespace = format!("bank_{}", Uuid::now_v7().simple());
    // Queues left by a failed run go after ten idle minutes.
    let config = RabbitConfig::new(&rabbit).with_queue_expires(Some(Duration::from_secs(600)));
    let app = es::production::connect(&namespace, &postgres, config)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {} and RabbitMQ at {} are required: {e}",
                es::redact_url(&postgres),
                es::redact_url(&rabbit)
            )
        });
    let bank = Bank::start(app).await.unwrap();
    transfers_settle_and_refusals_are_compensated(bank).await;
    let pool = es::postgres::sqlx::PgPool::connect(&postgres)
        .await
        .unwrap();
    es::postgres::sqlx::query(&format!("DROP SCHEMA {namespace} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}
