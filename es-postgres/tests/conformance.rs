//! es-core's backend conformance suite against PostgreSQL, one fresh schema
//! per check (so the checks run in parallel).

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

use std::sync::Arc;

use es_core::testing::conformance;
use es_core::EventStore;

async fn store() -> Arc<dyn EventStore> {
    Arc::new(es_postgres::testing::fresh_store().await)
}

macro_rules! checks {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            conformance::$name(store().await).await;
        }
    )*};
}

checks!(
    append_and_read_stream,
    read_stream_events_match_read_stream,
    expected_version_rules,
    conflict_writes_nothing,
    invalid_batch_writes_nothing,
    empty_append_checks_the_version,
    idempotent_reappend,
    idempotency_conflicts,
    event_ids_are_unique_across_streams,
    envelope_round_trips,
    read_all_in_order,
    subscribe_catches_up_then_goes_live,
    concurrent_appenders_race_on_one_stream,
    subscriber_sees_concurrent_writers_in_order,
    multi_stream_writes_are_atomic,
);

/// The whole suite through `run_all`, all checks sharing one schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_on_one_schema() {
    let shared = es_postgres::testing::fresh_store().await;
    conformance::run_all(|| {
        let store = shared.clone();
        async move { Arc::new(store) as Arc<dyn EventStore> }
    })
    .await;
}
