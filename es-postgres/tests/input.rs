//! Bad input gets a typed error and writes nothing; an unreachable database
//! is `Unavailable`; migrations are idempotent and safe in parallel.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

use std::time::Duration;

use es_core::testing::conformance::{event, events, unique_stream, whole_log};
use es_core::{EventStore, ExpectedVersion, NewEvent, Payload, Position, StoreError, StreamId};
use es_postgres::{Error, PgConfig, PgEventStore};

async fn store() -> PgEventStore {
    es_postgres::testing::fresh_store()
        .await
        .with_read_wait(Duration::from_millis(20))
}

async fn assert_nothing_written(store: &PgEventStore, stream: &StreamId) {
    assert_eq!(store.stream_version(stream).await.unwrap(), 0);
    assert!(whole_log(store, Position::START).await.is_empty());
}

#[test]
fn stream_ids_are_checked() {
    let empty = StreamId::new("").unwrap_err();
    assert_eq!(empty.reason, "it is empty");
    let long = StreamId::new("x".repeat(201)).unwrap_err();
    assert!(matches!(
        StoreError::from(long),
        StoreError::InvalidStreamId(_)
    ));
    assert!(StreamId::new("x".repeat(200)).is_ok());
}

#[tokio::test]
async fn longest_stream_id_round_trips() {
    let store = store().await;
    let stream = StreamId::new(format!("s-{}", "é".repeat(99))).unwrap();
    store
        .append(&stream, ExpectedVersion::NoStream, events(0, 2))
        .await
        .unwrap();
    assert_eq!(
        store.read_stream(&stream, 1, 10).await.unwrap()[1].stream_id,
        stream
    );
}

#[tokio::test]
async fn batch_too_large() {
    let store = store().await.with_max_batch(10);
    let stream = unique_stream("big");
    let err = store
        .append(&stream, ExpectedVersion::Any, events(0, 11))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::BatchTooLarge { len: 11, max: 10 }),
        "{err}"
    );
    assert_nothing_written(&store, &stream).await;
    store
        .append(&stream, ExpectedVersion::Any, events(0, 10))
        .await
        .unwrap();
}

#[tokio::test]
async fn payload_that_is_not_json() {
    let store = store().await;
    let stream = unique_stream("json");
    for bad in ["{not json", "", "{\"a\":1} trailing", "[1,]"] {
        let mut batch = events(0, 3);
        batch[1].payload = Payload::from_trusted_json(bad);
        let bad_id = batch[1].event_id;
        let err = store
            .append(&stream, ExpectedVersion::Any, batch)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidPayload { event_id } if event_id == bad_id),
            "{bad:?}: {err}"
        );
    }
    assert_nothing_written(&store, &stream).await;
}

#[tokio::test]
async fn malformed_events() {
    let store = store().await;
    let stream = unique_stream("bad");
    let mut batch = events(0, 2);
    batch[1].event_type = "".into();
    let err = store
        .append(&stream, ExpectedVersion::Any, batch)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidEvent { .. }), "{err}");
    let e = event(1);
    let twice = vec![e.clone(), e];
    let err = store
        .append(&stream, ExpectedVersion::Any, twice)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidEvent { .. }), "{err}");
    let huge = NewEvent {
        schema_version: u32::MAX,
        ..event(2)
    };
    let err = store
        .append(&stream, ExpectedVersion::Any, vec![huge])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidEvent { .. }), "{err}");
    assert_nothing_written(&store, &stream).await;
}

#[tokio::test]
async fn unreachable_database_is_unavailable() {
    let pool = PgConfig::from_url("postgres://postgres@127.0.0.1:1/postgres")
        .unwrap()
        .acquire_timeout(Duration::from_millis(500))
        .pool_lazy();
    let store = PgEventStore::new(pool, "es");
    let err = store
        .append(&unique_stream("x"), ExpectedVersion::Any, events(0, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(err.is_transient());
    let err = store.read_all(Position::START, 10).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    let err = PgConfig::from_url("postgres://postgres@127.0.0.1:1/postgres")
        .unwrap()
        .acquire_timeout(Duration::from_millis(500))
        .event_store()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
}

#[tokio::test]
async fn invalid_settings() {
    assert!(matches!(
        PgConfig::from_url("mysql://nope").unwrap_err(),
        Error::InvalidConfig { .. }
    ));
    let pool = es_postgres::testing::fresh_schema().await.0;
    for bad in ["", "Upper", "semi;colon", "a\"b", "pg_catalog"] {
        assert!(matches!(
            es_postgres::migrate(&pool, bad).await.unwrap_err(),
            Error::InvalidSchemaName { .. }
        ));
        assert!(PgEventStore::try_new(pool.clone(), bad).is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_in_parallel() {
    let (pool, _) = es_postgres::testing::fresh_schema().await;
    let schema = format!("m_{}", uuid::Uuid::new_v4().simple());
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            let schema = schema.clone();
            tokio::spawn(async move { es_postgres::migrate(&pool, &schema).await })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    es_postgres::migrate(&pool, &schema).await.unwrap();
    let versions: Vec<i32> = sqlx::query_scalar(&format!(
        "SELECT version FROM \"{schema}\".es_migrations ORDER BY version"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
    let store = PgEventStore::try_new(pool, schema).unwrap();
    store
        .append(&unique_stream("m"), ExpectedVersion::NoStream, events(0, 3))
        .await
        .unwrap();
}

/// Config from a URL with the pool settings applied, migrating on connect.
#[tokio::test]
async fn config_builds_a_migrated_store() {
    let schema = format!("c_{}", uuid::Uuid::new_v4().simple());
    let store = PgConfig::from_url(&es_postgres::testing::database_url())
        .unwrap()
        .schema(&schema)
        .max_connections(2)
        .statement_timeout(Some(Duration::from_secs(5)))
        .event_store()
        .await
        .unwrap();
    assert_eq!(store.schema(), schema);
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(timeout, "5s");
    let r = store
        .append(
            &unique_stream("c"),
            ExpectedVersion::NoStream,
            events(0, 100),
        )
        .await
        .unwrap();
    assert_eq!(r.stream_version, 100);
}

/// The store gives back the exact JSON text it was given (it only checks
/// that it is JSON), including escapes PostgreSQL's jsonb would refuse.
#[tokio::test]
async fn payload_text_round_trips_exactly() {
    let store = store().await;
    let stream = unique_stream("exact");
    let texts = [r#"{ "b": 1,  "a": [1, 2.50] }"#, r#""\u0000 nul""#, "[]"];
    let batch: Vec<NewEvent> = texts
        .iter()
        .map(|t| NewEvent {
            payload: Payload::from_json(*t).unwrap(),
            ..event(0)
        })
        .collect();
    store
        .append(&stream, ExpectedVersion::NoStream, batch)
        .await
        .unwrap();
    let back = store.read_stream(&stream, 1, 10).await.unwrap();
    let got: Vec<&str> = back.iter().map(|e| e.payload.as_str()).collect();
    assert_eq!(got, texts);
}

/// A store over a schema nobody migrated fails with `NotMigrated`, whose
/// message says to run `migrate`; after `migrate` it works.
#[tokio::test]
async fn an_unmigrated_schema_is_an_error_naming_migrate() {
    let (pool, _) = es_postgres::testing::fresh_schema().await;
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let store = PgEventStore::new(pool.clone(), schema.clone());
    let stream = unique_stream("unmigrated");
    let error = store
        .append(&stream, ExpectedVersion::Any, events(1, 1))
        .await
        .unwrap_err();
    let StoreError::Backend { source } = &error else {
        panic!("{error:?}");
    };
    assert!(
        matches!(
            source.downcast_ref::<Error>(),
            Some(Error::NotMigrated { .. })
        ),
        "{source:?}"
    );
    assert!(
        error.to_string().contains("es_postgres::migrate"),
        "{error}"
    );
    let read = store.read_stream(&stream, 1, 10).await.unwrap_err();
    assert!(read.to_string().contains("migrate"), "{read}");
    es_postgres::migrate(&pool, &schema).await.unwrap();
    store
        .append(&stream, ExpectedVersion::Any, events(1, 1))
        .await
        .unwrap();
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}
