//! The Redis sink against a real Redis (REDIS_URL, default
//! redis://127.0.0.1:6379).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns may unwrap too

use std::sync::Arc;
use std::time::Duration;

use es_core::{
    EventStore, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, Payload, Projection,
    ProjectionError, RecordedEvent, StreamId,
};
use es_projections::{spawn_in_memory, RedisSink, Versioned};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn sink() -> RedisSink {
    let url = redis_url();
    let prefix = format!("esp-test:{}:", uuid::Uuid::new_v4().simple());
    RedisSink::connect(&url, &prefix)
        .await
        .unwrap_or_else(|e| panic!("Redis is not reachable at {url}: {e}"))
        .with_ttl(Duration::from_secs(600))
}

/// `clear` deletes every key under its prefix (tombstones too) and nothing
/// else, even when the prefix holds glob characters.
#[tokio::test]
async fn clear_deletes_the_prefix_and_only_it() {
    let url = redis_url();
    let base = format!("esp-test:{}:", uuid::Uuid::new_v4().simple());
    let connect = |prefix: String| {
        let url = url.clone();
        async move { RedisSink::connect(&url, &prefix).await.unwrap() }
    };
    let globby = connect(format!("{base}a*")).await;
    let neighbour = connect(format!("{base}ab")).await;
    for n in 0..1_200u64 {
        globby.put(&n.to_string(), 1, "x").await.unwrap();
    }
    globby.delete("tombstone", 3).await.unwrap();
    neighbour.put("k", 1, "kept").await.unwrap();

    assert_eq!(globby.clear().await.unwrap(), 1_201);
    assert_eq!(globby.get("7").await.unwrap(), None);
    assert_eq!(globby.version("tombstone").await.unwrap(), None);
    assert_eq!(neighbour.get("k").await.unwrap().unwrap().value, "kept");
    assert_eq!(globby.clear().await.unwrap(), 0);
    neighbour.clear().await.unwrap();
}

#[tokio::test]
async fn newer_versions_win_and_stale_or_replayed_writes_change_nothing() {
    let sink = sink().await;
    assert_eq!(sink.get("k").await.unwrap(), None);
    assert!(sink.put("k", 2, "two").await.unwrap());
    assert!(
        !sink.put("k", 1, "one").await.unwrap(),
        "stale write applied"
    );
    assert!(
        !sink.put("k", 2, "two again").await.unwrap(),
        "replay applied"
    );
    assert_eq!(
        sink.get("k").await.unwrap(),
        Some(Versioned {
            version: 2,
            value: "two".to_owned()
        })
    );
    assert!(sink.put("k", 5, "five").await.unwrap());
    // Deletion is guarded both ways.
    assert!(!sink.delete("k", 4).await.unwrap());
    assert!(sink.delete("k", 6).await.unwrap());
    assert_eq!(sink.get("k").await.unwrap(), None);
    assert_eq!(sink.version("k").await.unwrap(), Some(6));
    assert!(
        !sink.put("k", 5, "five").await.unwrap(),
        "a stale write resurrected a deleted key"
    );
    assert!(sink.put("k", 7, "seven").await.unwrap());
    assert_eq!(sink.get("k").await.unwrap().unwrap().value, "seven");
    // JSON helpers.
    assert!(sink
        .put_json("j", 1, &serde_json::json!({"status": "paid"}))
        .await
        .unwrap());
    let got: Versioned<serde_json::Value> = sink.get_json("j").await.unwrap().unwrap();
    assert_eq!(got.value["status"], "paid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_out_of_order_writers_leave_the_newest_value() {
    let sink = sink().await;
    for round in 0..20 {
        let key = format!("race-{round}");
        let mut versions: Vec<u64> = (1..=40).collect();
        fastrand::shuffle(&mut versions);
        let tasks: Vec<_> = versions
            .into_iter()
            .map(|v| {
                let (sink, key) = (sink.clone(), key.clone());
                tokio::spawn(async move { sink.put(&key, v, &format!("v{v}")).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            sink.get(&key).await.unwrap(),
            Some(Versioned {
                version: 40,
                value: "v40".to_owned()
            })
        );
    }
}

/// Keeps each stream's latest status in Redis, versioned by stream version.
struct StatusCache(RedisSink);

impl Projection for StatusCache {
    type Tx = ();
    fn name(&self) -> &str {
        "status-cache"
    }
    async fn apply(&self, _: &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
        self.0
            .put(
                event.stream_id.as_str(),
                event.stream_version,
                &event.event_type,
            )
            .await
            .map(|_| ())
            .map_err(|e| ProjectionError::storage("status-cache", e))
    }
}

/// An older part of the log replayed after newer values were written (a
/// runner restarted from an older checkpoint, a rolled-back batch applied
/// again, a second instance lagging behind) leaves the newer values: the
/// version guard refuses every stale write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_prefix_replayed_after_newer_values_leaves_the_cache_as_it_was() {
    let sink = sink().await;
    // The whole log, and each stream's history without its last event (the
    // same events at the same stream versions), as an older checkpoint saw it.
    let store = InMemoryEventStore::new();
    let prefix = InMemoryEventStore::new();
    let statuses = ["Placed", "Reserved", "Paid", "Shipped"];
    for order in 0..10 {
        let stream = StreamId::new(format!("order-{order}")).unwrap();
        let last = order % 4;
        for (i, status) in statuses[..=last].iter().enumerate() {
            let e = NewEvent::new(
                *status,
                1,
                Payload::from_json("{}").unwrap(),
                Metadata::new(),
            );
            if i < last {
                prefix
                    .append(&stream, ExpectedVersion::Any, vec![e.clone()])
                    .await
                    .unwrap();
            }
            store
                .append(&stream, ExpectedVersion::Any, vec![e])
                .await
                .unwrap();
        }
    }
    let projection = Arc::new(StatusCache(sink.clone()));
    let head = store.head().await.unwrap();
    let first = spawn_in_memory(Arc::new(store.clone()), Arc::clone(&projection));
    first.wait_for(head, Duration::from_secs(10)).await.unwrap();
    first.stop().await.unwrap();
    let mut before = Vec::new();
    for order in 0..10 {
        let got = sink.get(&format!("order-{order}")).await.unwrap().unwrap();
        assert_eq!(got.value, statuses[order % 4]);
        assert_eq!(got.version, (order % 4) as u64 + 1);
        before.push(got);
    }
    // The replay has teeth: an unguarded last-write-wins sink would end with
    // the prefix's last status, an older one, for these keys.
    let replayed = prefix
        .read_all(es_core::Position::START, 100)
        .await
        .unwrap();
    let mut last_write = std::collections::HashMap::new();
    for e in &replayed {
        last_write.insert(e.stream_id.to_string(), e.event_type.to_string());
    }
    let older = (0..10)
        .filter(|o| {
            last_write
                .get(&format!("order-{o}"))
                .is_some_and(|v| *v != before[*o].value)
        })
        .count();
    assert_eq!(older, 7, "{last_write:?}");

    let again = spawn_in_memory(Arc::new(prefix.clone()), projection);
    let prefix_head = prefix.head().await.unwrap();
    again
        .wait_for(prefix_head, Duration::from_secs(10))
        .await
        .unwrap();
    again.stop().await.unwrap();
    for (order, expected) in before.iter().enumerate() {
        let got = sink.get(&format!("order-{order}")).await.unwrap();
        assert_eq!(got.as_ref(), Some(expected), "order-{order}");
    }
}
