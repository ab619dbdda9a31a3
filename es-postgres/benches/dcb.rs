//! What dynamic consistency boundaries cost on PostgreSQL: a tagged append
//! beside an untagged one, and a decision (read by query, then a
//! conditional append) on its own boundary, alternated in slices in one run
//! against one database.
//!
//! ```text
//! cargo bench -p es-postgres --bench dcb            # 3 s per measurement
//! BENCH_SECS=5 cargo bench -p es-postgres --bench dcb
//! ```
//!
//! Prints one markdown table row per measurement.

#![allow(clippy::unwrap_used, missing_docs)] // a benchmark binary: panics are its error report

mod timing;

use es_core::{
    AppendCondition, DcbStore, EventStore, ExpectedVersion, Metadata, NewEvent, Payload, Position,
    Query, QueryItem, StreamId, Tag,
};
use es_postgres::PgEventStore;
use timing::{pair, secs};
use uuid::Uuid;

const PAYLOAD: &str = r#"{"coupon":"SPRING","customer":"0b7a3c1e-6d0e-4b8e-9a57-2f1c6e9d4a11"}"#;

fn new_event() -> NewEvent {
    NewEvent::new(
        "CouponRedeemed",
        1,
        Payload::from_trusted_json(PAYLOAD),
        Metadata::new(),
    )
}

fn stream() -> StreamId {
    StreamId::new(format!("redemption-{}", Uuid::now_v7().simple())).unwrap()
}

fn tag(kind: &str) -> Tag {
    Tag::of(kind, Uuid::now_v7().simple()).unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (pool, schema) = es_postgres::testing::fresh_schema_with(40).await;
    let store = PgEventStore::new(pool.clone(), schema.clone());
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .unwrap();
    println!(
        "schema {schema}, PostgreSQL {version}, {} s per measurement",
        secs().as_secs_f64()
    );
    println!();
    println!("| measurement | result | beside |");
    println!("|---|---|---|");

    for c in [1usize, 8, 32] {
        let s = store.clone();
        let tagged = move || {
            let s = s.clone();
            let e = new_event().tagged(tag("coupon")).tagged(tag("customer"));
            async move {
                s.append(&stream(), ExpectedVersion::NoStream, vec![e])
                    .await
                    .unwrap();
            }
        };
        let s = store.clone();
        let plain = move || {
            let s = s.clone();
            let e = new_event();
            async move {
                s.append(&stream(), ExpectedVersion::NoStream, vec![e])
                    .await
                    .unwrap();
            }
        };
        let (tagged, plain) = pair(c, tagged, plain).await;
        println!(
            "| append, 1 event with 2 tags, {c} writers | {tagged:.0} events/s | untagged {plain:.0} events/s ({:.2}x) |",
            tagged / plain
        );
    }

    for c in [1usize, 8, 32] {
        let s = store.clone();
        let decide = move || {
            let s = s.clone();
            async move {
                let (coupon, customer) = (tag("coupon"), tag("customer"));
                let query = Query::from(
                    QueryItem::tagged(coupon.clone())
                        .and_tag(customer.clone())
                        .of_types(["CouponRedeemed"]),
                );
                let page = s.read(&query, Position::START, 100).await.unwrap();
                assert!(page.events.is_empty());
                s.append_if(
                    &stream(),
                    vec![new_event().tagged(coupon).tagged(customer)],
                    AppendCondition::after(query, page.marker),
                )
                .await
                .unwrap();
            }
        };
        let s = store.clone();
        let load = move || {
            let s = s.clone();
            async move {
                let stream = stream();
                assert_eq!(s.stream_version(&stream).await.unwrap(), 0);
                s.append(&stream, ExpectedVersion::NoStream, vec![new_event()])
                    .await
                    .unwrap();
            }
        };
        let (decided, loaded) = pair(c, decide, load).await;
        println!(
            "| decision (read by query + append_if), disjoint boundaries, {c} writers | {decided:.0} decisions/s | version read + append {loaded:.0}/s ({:.2}x) |",
            decided / loaded
        );
    }
}
