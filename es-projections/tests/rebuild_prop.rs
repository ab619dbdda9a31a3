//! Property: over random event histories, delivered to the runner in random
//! chunks with random batch sizes, restarts and dead letters, a rebuild from
//! position 0 gives exactly the model the incremental runs built.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use es_core::{EventStore, InMemoryEventStore};
use es_projections::postgres::{rebuild, NoProgress, PgProjectionRunner, RebuildOptions};
use es_projections::{OnError, RunnerOptions};
use proptest::prelude::*;

type Model = (Vec<(String, i64, i64)>, Vec<(uuid::Uuid, String, i64)>);

async fn model(pool: &sqlx::PgPool, schema: &str) -> Model {
    let ledger = sqlx::query_as(&format!(
        "SELECT event_id, account, amount FROM \"{schema}\".ledger ORDER BY event_id"
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    (balances(pool, schema).await, ledger)
}

#[derive(Debug, Clone)]
enum Step {
    /// Deposit `amount` (negative: the projection fails, a dead letter) on
    /// account `account`.
    Deposit {
        account: u8,
        amount: i64,
    },
    Noise,
    /// Let the runner catch up, with this batch size, then stop it.
    Run {
        batch: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0u8..5, -2i64..40).prop_map(|(account, amount)| Step::Deposit { account, amount }),
        1 => Just(Step::Noise),
        2 => (1usize..20).prop_map(|batch| Step::Run { batch }),
    ]
}

async fn check(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let (pool, schema, model_schema) = fresh().await;
    let store = InMemoryEventStore::new();
    let dyn_store: Arc<dyn EventStore> = Arc::new(store.clone());
    let ledger = Ledger::new("ledger");
    let make = |batch: usize| {
        PgProjectionRunner::new(
            pool.clone(),
            &schema,
            &model_schema,
            Arc::clone(&dyn_store),
            Arc::clone(&ledger),
        )
        .unwrap()
        .with_options(
            RunnerOptions::default()
                .batch_size(batch)
                .on_error(OnError::DeadLetter),
        )
        .with_leader_check(Duration::from_millis(50))
    };
    // At least one event, so the last run has created the model's tables
    // by the time it has handled the head.
    let mut steps = steps;
    steps.insert(
        0,
        Step::Deposit {
            account: 0,
            amount: 1,
        },
    );
    steps.push(Step::Run { batch: 7 });
    for step in steps {
        match step {
            Step::Deposit { account, amount } => {
                append(&store, &format!("acct-{account}"), vec![deposit(amount)]).await;
            }
            Step::Noise => {
                append(&store, "noise-1", vec![noise()]).await;
            }
            Step::Run { batch } => {
                let handle = make(batch).spawn();
                handle
                    .wait_for(store.head().await.unwrap(), Duration::from_secs(30))
                    .await
                    .unwrap();
                handle.stop().await.unwrap();
            }
        }
    }
    let incremental = model(&pool, &model_schema).await;
    let report = rebuild(
        &make(5),
        &RebuildOptions {
            batch_size: 3,
            on_error: OnError::DeadLetter,
            ..RebuildOptions::default()
        },
        &NoProgress,
    )
    .await
    .unwrap();
    let rebuilt = model(&pool, &model_schema).await;
    cleanup(&pool, &[&schema, &model_schema]).await;
    prop_assert_eq!(report.position, store.head().await.unwrap());
    prop_assert_eq!(rebuilt, incremental);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn a_rebuild_equals_the_incremental_model(steps in prop::collection::vec(step(), 0..80)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(check(steps))?;
    }
}
