//! A test store over the in-memory store that counts what is read (and what
//! its subscriptions deliver) and can let another writer sneak in before an
//! append.
#![allow(dead_code, clippy::unwrap_used)] // each test file uses a part

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use es_core::doc_support::counter::CounterEvent;
use es_core::{
    AppendResult, EventStore, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, Position,
    RecordedEvent, StoreError, StreamId,
};
use futures::stream::BoxStream;

/// A store that lets another writer sneak in before the next append, and
/// counts the events `read_stream` hands out.
pub(crate) struct Interloper {
    inner: InMemoryEventStore,
    pub(crate) armed: AtomicBool,
    /// Waits this long before every append.
    pub(crate) pause: Option<std::time::Duration>,
    /// Events handed out by `read_stream`.
    pub(crate) read: std::sync::atomic::AtomicU64,
    /// Calls of `read_stream`.
    pub(crate) reads: std::sync::atomic::AtomicU64,
    /// The version each `read_stream` call started from, in order.
    pub(crate) reads_from: std::sync::Mutex<Vec<u64>>,
    /// Events handed out by `subscribe_all` streams.
    pub(crate) delivered: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Interloper {
    /// `armed`: the next append is preceded by another writer's event;
    /// `pause`: every append waits this long first.
    pub(crate) fn new(armed: bool, pause: Option<std::time::Duration>) -> Self {
        Self {
            inner: InMemoryEventStore::new(),
            armed: AtomicBool::new(armed),
            pause,
            read: Default::default(),
            reads: Default::default(),
            reads_from: Default::default(),
            delivered: Default::default(),
        }
    }
}

#[async_trait]
impl EventStore for Interloper {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        if let Some(pause) = self.pause {
            tokio::time::sleep(pause).await;
        }
        if self.armed.swap(false, Ordering::SeqCst) {
            let sneaky = es_core::EventCodec::<CounterEvent>::new()
                .encode(&CounterEvent::Incremented { by: 100 }, Metadata::new())
                .unwrap();
            self.inner
                .append(stream, ExpectedVersion::Any, vec![sneaky])
                .await?;
        }
        self.inner.append(stream, expected, events).await
    }
    async fn append_streams(
        &self,
        parts: Vec<es_core::StreamAppend>,
    ) -> Result<Vec<AppendResult>, StoreError> {
        if let Some(pause) = self.pause {
            tokio::time::sleep(pause).await;
        }
        self.inner.append_streams(parts).await
    }
    async fn read_stream(
        &self,
        s: &StreamId,
        from: u64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.reads_from.lock().unwrap().push(from);
        let page = self.inner.read_stream(s, from, max).await?;
        self.read.fetch_add(page.len() as u64, Ordering::SeqCst);
        Ok(page)
    }
    async fn read_all(
        &self,
        after: Position,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_all(after, max).await
    }
    async fn stream_version(&self, s: &StreamId) -> Result<u64, StoreError> {
        self.inner.stream_version(s).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }
    fn subscribe_all(
        &self,
        after: Position,
    ) -> BoxStream<'static, Result<RecordedEvent, StoreError>> {
        use futures::StreamExt;
        let delivered = std::sync::Arc::clone(&self.delivered);
        self.inner
            .subscribe_all(after)
            .inspect(move |_| {
                delivered.fetch_add(1, Ordering::SeqCst);
            })
            .boxed()
    }
}
