//! Property tests: random interleavings of transfers, redeliveries (a
//! delivery handled twice) and restarts (relay, consumers, projection),
//! each run settled and held to the pipeline's invariants. Many cases on the
//! embedded backends, a few on the production ones.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use es_tests::embedded::Embedded;
use es_tests::pipeline::{AccountSpec, Backend, Pipeline, TransferSpec, Workload};
use es_tests::production::Production;
use proptest::prelude::*;
use uuid::Uuid;

/// The accounts of every case: the first is frozen.
const ACCOUNTS: usize = 5;

#[derive(Clone, Debug)]
enum Op {
    /// Ask for a transfer (`to` is an offset from `from`, never 0).
    Transfer { from: usize, to: usize, amount: i64 },
    /// Abort the relay and start it again.
    RestartRelay,
    /// Kill the consumers between commit and ack, and start them again.
    KillConsumers,
    /// Stop the projection's runner and start it again.
    RestartProjection,
    /// From now on, handle this percentage of deliveries twice.
    Redeliver(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..ACCOUNTS, 1..ACCOUNTS, 1..=250i64)
            .prop_map(|(from, to, amount)| Op::Transfer { from, to, amount }),
        1 => Just(Op::RestartRelay),
        1 => Just(Op::KillConsumers),
        1 => Just(Op::RestartProjection),
        1 => (0..=60u32).prop_map(Op::Redeliver),
    ]
}

/// Runs `ops` in order on `backend` (each transfer's request awaited, its
/// saga not), settles, and checks the invariants.
async fn run(backend: Arc<dyn Backend>, ops: Vec<Op>) {
    let accounts: Vec<AccountSpec> = (0..ACCOUNTS)
        .map(|i| AccountSpec {
            id: Uuid::new_v4(),
            initial: 300,
            frozen: i == 0,
        })
        .collect();
    let transfers: Vec<TransferSpec> = ops
        .iter()
        .filter_map(|op| match *op {
            Op::Transfer { from, to, amount } => Some(TransferSpec {
                id: Uuid::new_v4(),
                from,
                to: (from + to) % ACCOUNTS,
                amount,
            }),
            _ => None,
        })
        .collect();
    let workload = Workload {
        accounts,
        transfers,
    };
    let pipeline = Pipeline::start(backend).await;
    pipeline.open(&workload).await;
    let mut next = workload.transfers.iter();
    for op in &ops {
        match op {
            Op::Transfer { .. } => {
                let transfer = next.next().expect("one spec per transfer op");
                pipeline.request(&workload, transfer).await;
            }
            Op::RestartRelay => {
                pipeline.kill_relay().await;
                pipeline.start_relay();
            }
            Op::KillConsumers => {
                pipeline.kill_consumers(1, Duration::from_millis(50)).await;
                pipeline.start_consumers().await;
            }
            Op::RestartProjection => pipeline.restart_projection().await,
            Op::Redeliver(percent) => pipeline
                .faults
                .duplicate_percent
                .store(*percent, Ordering::SeqCst),
        }
    }
    pipeline.settle(&workload).await;
    let summary = pipeline.check(&workload).await;
    assert_eq!(
        summary.completed + summary.compensated + summary.refused,
        workload.transfers.len()
    );
    pipeline.shutdown().await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn embedded_interleavings_keep_every_invariant(ops in prop::collection::vec(op(), 1..40)) {
        runtime().block_on(run(Embedded::new(), ops));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, max_shrink_iters: 8, ..ProptestConfig::default() })]

    #[test]
    fn production_interleavings_keep_every_invariant(ops in prop::collection::vec(op(), 1..25)) {
        runtime().block_on(async {
            run(Production::start("prop").await, ops).await;
        });
    }
}
