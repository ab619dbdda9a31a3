//! The whole pipeline under many concurrent transfers, on the embedded and
//! on the production backends, held to the same invariants by the same body.

use std::sync::Arc;

use es_tests::embedded::Embedded;
use es_tests::pipeline::{exercise, Backend, Summary, Workload};
use es_tests::production::Production;

/// 200 transfers among 20 accounts (3 of them frozen, so that credits are
/// refused and transfers compensated), all asked for at once.
async fn two_hundred_transfers(backend: Arc<dyn Backend>) -> Summary {
    let seed = fastrand::u64(..);
    eprintln!("workload seed {seed}");
    let workload = Workload::random(seed, 20, 3, 200);
    let summary = exercise(backend, &workload, |_| async {}).await;
    assert_eq!(
        summary.completed + summary.compensated + summary.refused,
        200,
        "{summary:?}"
    );
    // The workload exercises every path: debits refused, credits refused
    // (and compensated), transfers completed.
    assert!(summary.completed > 0, "{summary:?}");
    assert!(summary.compensated > 0, "{summary:?}");
    assert!(summary.refused > 0, "{summary:?}");
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_pipeline_keeps_every_invariant() {
    two_hundred_transfers(Embedded::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_pipeline_keeps_every_invariant() {
    two_hundred_transfers(Production::start("pipeline").await).await;
}
