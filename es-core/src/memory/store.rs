use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::stream::BoxStream;
use tokio::sync::watch;
use uuid::Uuid;

use super::log::Log;
use super::sharded::ShardedMap;
use crate::catch_up::catch_up_then_live;
use crate::dcb::{AppendCondition, DcbStore, Query, QueryPage, Tag};
use crate::store::{validate_batch, validate_parts};
use crate::{
    AppendResult, CheckpointStore, EventStore, ExpectedVersion, Inbox, NewEvent, Position,
    RecordedEvent, Snapshot, SnapshotStore, StoreError, StreamAppend, StreamId,
};

/// An event store in process memory.
///
/// Positions are `(sequence, 0)` with the sequence counting from 1. Appends
/// take a write lock, so the log order is the commit order and subscribers can
/// never see a gap. Cloning shares the same store.
///
/// It is a [`DcbStore`] too: tags are indexed in memory, and a conditional
/// append checks its condition and writes under the same write lock.
#[derive(Clone, Debug)]
pub struct InMemoryEventStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: RwLock<State>,
    head: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    log: Log,
    /// Each stream's events, as indexes into the log.
    streams: ShardedMap<StreamId, Vec<usize>>,
    /// Where each event id is in the log.
    ids: ShardedMap<Uuid, usize>,
    /// The events carrying each tag, as indexes into the log (ascending).
    tags: HashMap<Tag, Vec<usize>>,
}

impl Default for InMemoryEventStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryEventStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                state: RwLock::new(State::default()),
                head: watch::Sender::new(0),
            }),
        }
    }

    /// How many events the store holds.
    pub fn len(&self) -> usize {
        self.read_state().log.len()
    }

    /// Whether the store holds no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.shared
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides every part, then writes them all under one lock, or none.
    fn write(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>, StoreError> {
        self.write_if(parts, None)
    }

    /// [`Self::write`], refused with [`StoreError::BoundaryMoved`] when an
    /// event matching `condition` is in the log after its marker. A replay
    /// (ids already stored) is decided as a replay, before the condition.
    fn write_if(
        &self,
        parts: Vec<StreamAppend>,
        condition: Option<&AppendCondition>,
    ) -> Result<Vec<AppendResult>, StoreError> {
        let mut state = self.write_state();
        if let Some(condition) = condition {
            let replay = parts
                .iter()
                .flat_map(|p| &p.events)
                .any(|e| state.ids.contains_key(&e.event_id));
            if !replay && state.moved(condition) {
                return Err(StoreError::BoundaryMoved {
                    stream: parts.first().map(|p| p.stream.clone()).ok_or_else(|| {
                        StoreError::Backend {
                            source: "a conditional append named no stream".into(),
                        }
                    })?,
                    after: condition.after,
                });
            }
        }
        let mut results: Vec<Option<AppendResult>> = Vec::with_capacity(parts.len());
        for part in &parts {
            let found = part
                .events
                .iter()
                .filter(|e| state.ids.contains_key(&e.event_id))
                .count();
            if found > 0 {
                results.push(Some(state.replayed(
                    &part.stream,
                    part.expected,
                    &part.events,
                    found,
                )?));
                continue;
            }
            let actual = state.version(&part.stream);
            if !part.expected.is_satisfied_by(actual) {
                return Err(StoreError::WrongExpectedVersion {
                    stream: part.stream.clone(),
                    expected: part.expected,
                    actual,
                });
            }
            results.push(part.events.is_empty().then_some(AppendResult {
                stream_version: actual,
                position: Position::START,
                written: false,
            }));
        }
        let recorded_at = Utc::now();
        let State {
            log,
            streams,
            ids,
            tags,
        } = &mut *state;
        let mut answers = Vec::with_capacity(parts.len());
        for (part, decided) in parts.into_iter().zip(results) {
            if let Some(decided) = decided {
                answers.push(decided);
                continue;
            }
            let indexes = streams.entry(part.stream.clone()).or_default();
            let mut version = indexes.len() as u64;
            for event in part.events {
                let index = log.len();
                version += 1;
                ids.insert(event.event_id, index);
                indexes.push(index);
                for tag in &event.tags {
                    tags.entry(tag.clone()).or_default().push(index);
                }
                log.push(RecordedEvent {
                    event_id: event.event_id,
                    stream_id: part.stream.clone(),
                    stream_version: version,
                    position: position_of(index),
                    event_type: event.event_type,
                    schema_version: event.schema_version,
                    payload: event.payload,
                    metadata: event.metadata,
                    recorded_at,
                    tags: event.tags,
                });
            }
            answers.push(AppendResult {
                stream_version: version,
                position: position_of(log.len() - 1),
                written: true,
            });
        }
        let head = log.len() as u64;
        // Subscribers are woken after the lock is released, so none of them
        // waits on it (nor this write on waking them). Two writes may get
        // here in either order: the head only moves forward.
        drop(state);
        self.shared.head.send_if_modified(|seen| {
            let newer = head > *seen;
            if newer {
                *seen = head;
            }
            newer
        });
        Ok(answers)
    }

    fn read_all_now(&self, after: Position, max_count: usize) -> Vec<RecordedEvent> {
        let state = self.read_state();
        let start = usize::try_from(after.major())
            .unwrap_or(usize::MAX)
            .min(state.log.len());
        state.log.copy_range(start, start.saturating_add(max_count))
    }
}

fn position_of(index: usize) -> Position {
    Position::new(index as u64 + 1, 0)
}

/// The index of the first event after `after`.
fn first_after(after: Position) -> usize {
    usize::try_from(after.major()).unwrap_or(usize::MAX)
}

impl State {
    /// The indexes of events matching `query` from index `from` on, in log
    /// order, at most `max`.
    fn matching(&self, query: &Query, from: usize, max: usize) -> Vec<usize> {
        let mut found: Vec<usize> = Vec::new();
        for item in query.items() {
            let Some(indexes) = self.tags.get(item.first_tag()) else {
                continue;
            };
            let start = indexes.partition_point(|&i| i < from);
            found.extend(
                indexes[start..]
                    .iter()
                    .copied()
                    .filter(|&i| {
                        let event = &self.log[i];
                        item.matches(&event.event_type, &event.tags)
                    })
                    .take(max),
            );
        }
        found.sort_unstable();
        found.dedup();
        found.truncate(max);
        found
    }

    /// Whether an event matching the condition is in the log after its
    /// marker.
    fn moved(&self, condition: &AppendCondition) -> bool {
        let from = condition.after.map_or(0, first_after);
        !self
            .matching(&condition.fail_if_events_match, from, 1)
            .is_empty()
    }

    fn version(&self, stream: &StreamId) -> u64 {
        self.streams.get(stream).map_or(0, |s| s.len() as u64)
    }

    /// Decides an append whose events (some or all) are already stored: an
    /// idempotent success, a version conflict, or an idempotency conflict.
    fn replayed(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        found: usize,
    ) -> Result<AppendResult, StoreError> {
        let conflict = |event_id, reason| StoreError::IdempotencyConflict {
            stream: stream.clone(),
            event_id,
            reason,
        };
        if found != events.len() {
            let first_new = events
                .iter()
                .find(|e| !self.ids.contains_key(&e.event_id))
                .map_or(events[0].event_id, |e| e.event_id);
            return Err(conflict(
                first_new,
                "only part of the batch is already stored",
            ));
        }
        let first = &self.log[self.ids[&events[0].event_id]];
        if &first.stream_id != stream {
            return Err(conflict(
                first.event_id,
                "the event id is stored in another stream",
            ));
        }
        let start = first.stream_version;
        let fits = match expected {
            ExpectedVersion::Any | ExpectedVersion::StreamExists => true,
            ExpectedVersion::NoStream => start == 1,
            ExpectedVersion::Exact(v) => start == v + 1,
        };
        if !fits {
            return Err(StoreError::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: self.version(stream),
            });
        }
        let mut last = first;
        for (offset, event) in (0u64..).zip(events) {
            let stored = &self.log[self.ids[&event.event_id]];
            if &stored.stream_id != stream || stored.stream_version != start + offset {
                return Err(conflict(
                    event.event_id,
                    "the batch is stored at other positions",
                ));
            }
            if stored.event_type != event.event_type
                || stored.schema_version != event.schema_version
                || !stored.payload.json_eq(&event.payload)
            {
                return Err(conflict(
                    event.event_id,
                    "the stored event has another type or payload",
                ));
            }
            last = stored;
        }
        Ok(AppendResult {
            stream_version: last.stream_version,
            position: last.position,
            written: false,
        })
    }
}

#[async_trait]
impl EventStore for InMemoryEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        validate_batch(&events)?;
        let mut results = self.write(vec![StreamAppend::new(stream.clone(), expected, events)])?;
        results.pop().ok_or_else(|| StoreError::Backend {
            source: "an append answered nothing".into(),
        })
    }

    async fn append_streams(
        &self,
        parts: Vec<StreamAppend>,
    ) -> Result<Vec<AppendResult>, StoreError> {
        validate_parts(&parts)?;
        self.write(parts)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let state = self.read_state();
        let Some(indexes) = state.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let start = usize::try_from(from_version.max(1) - 1)
            .unwrap_or(usize::MAX)
            .min(indexes.len());
        let end = start.saturating_add(max_count).min(indexes.len());
        Ok(indexes[start..end]
            .iter()
            .map(|&i| state.log[i].clone())
            .collect())
    }

    async fn read_all(
        &self,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        Ok(self.read_all_now(after, max_count))
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, StoreError> {
        Ok(self.read_state().version(stream))
    }

    async fn head(&self) -> Result<Position, StoreError> {
        let len = self.read_state().log.len();
        Ok(if len == 0 {
            Position::START
        } else {
            position_of(len - 1)
        })
    }

    fn subscribe_all(
        &self,
        after: Position,
    ) -> BoxStream<'static, Result<RecordedEvent, StoreError>> {
        let store = self.clone();
        catch_up_then_live(
            after,
            1_000,
            Duration::from_secs(1),
            self.shared.head.subscribe(),
            move |after, max| {
                let page = store.read_all_now(after, max);
                async move { Ok(page) }
            },
        )
    }
}

#[async_trait]
impl DcbStore for InMemoryEventStore {
    async fn read(
        &self,
        query: &Query,
        after: Position,
        max_count: usize,
    ) -> Result<QueryPage, StoreError> {
        Ok(self.read_query_now(query, after, max_count))
    }

    async fn append_if(
        &self,
        stream: &StreamId,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<AppendResult, StoreError> {
        validate_batch(&events)?;
        let part = StreamAppend::new(stream.clone(), ExpectedVersion::Any, events);
        let mut results = self.write_if(vec![part], Some(&condition))?;
        results.pop().ok_or_else(|| StoreError::Backend {
            source: "an append answered nothing".into(),
        })
    }

    fn subscribe(
        &self,
        query: Query,
        after: Position,
    ) -> BoxStream<'static, Result<RecordedEvent, StoreError>> {
        let store = self.clone();
        catch_up_then_live(
            after,
            1_000,
            Duration::from_secs(1),
            self.shared.head.subscribe(),
            move |after, max| {
                let page = store.read_query_now(&query, after, max).events;
                async move { Ok(page) }
            },
        )
    }
}

impl InMemoryEventStore {
    fn read_query_now(&self, query: &Query, after: Position, max_count: usize) -> QueryPage {
        let state = self.read_state();
        let indexes = state.matching(query, first_after(after), max_count);
        let events: Vec<RecordedEvent> = indexes.iter().map(|&i| state.log[i].clone()).collect();
        let marker = match events.last() {
            Some(last) if events.len() >= max_count => last.position,
            _ => {
                let len = state.log.len();
                let head = if len == 0 {
                    Position::START
                } else {
                    position_of(len - 1)
                };
                head.max(after)
            }
        };
        QueryPage { events, marker }
    }
}

/// Snapshots in process memory. Cloning shares the same store.
#[derive(Clone, Debug, Default)]
pub struct InMemorySnapshotStore {
    snapshots: Arc<Mutex<HashMap<StreamId, Snapshot>>>,
}

impl InMemorySnapshotStore {
    /// An empty snapshot store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl SnapshotStore for InMemorySnapshotStore {
    async fn save(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let mut snapshots = self
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let newer = snapshots
            .get(&snapshot.stream_id)
            .is_none_or(|old| old.version <= snapshot.version);
        if newer {
            snapshots.insert(snapshot.stream_id.clone(), snapshot);
        }
        Ok(())
    }

    async fn load(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        Ok(self
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(stream)
            .cloned())
    }
}

/// Checkpoints in process memory. Cloning shares the same store.
#[derive(Clone, Debug, Default)]
pub struct InMemoryCheckpointStore {
    positions: Arc<Mutex<HashMap<String, Position>>>,
}

impl InMemoryCheckpointStore {
    /// An empty checkpoint store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl CheckpointStore for InMemoryCheckpointStore {
    async fn load(&self, name: &str) -> Result<Option<Position>, StoreError> {
        Ok(self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .copied())
    }

    async fn save(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), position);
        Ok(())
    }
}

/// Processed message ids in process memory. Cloning shares the same inbox.
#[derive(Clone, Debug, Default)]
pub struct InMemoryInbox {
    seen: Arc<Mutex<HashSet<(String, Uuid)>>>,
}

impl InMemoryInbox {
    /// An empty inbox.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Inbox for InMemoryInbox {
    async fn record(&self, consumer: &str, message_id: Uuid) -> Result<bool, StoreError> {
        Ok(self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((consumer.to_owned(), message_id)))
    }

    async fn contains(&self, consumer: &str, message_id: Uuid) -> Result<bool, StoreError> {
        Ok(self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(consumer.to_owned(), message_id)))
    }

    async fn forget(&self, consumer: &str, message_id: Uuid) -> Result<bool, StoreError> {
        Ok(self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(consumer.to_owned(), message_id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_inbox_records_once_per_consumer_until_forgotten() {
        let inbox = InMemoryInbox::new();
        let id = Uuid::now_v7();
        assert!(inbox.record("c", id).await.unwrap());
        assert!(!inbox.record("c", id).await.unwrap());
        assert!(inbox.record("other", id).await.unwrap());
        assert!(inbox.forget("c", id).await.unwrap());
        assert!(!inbox.forget("c", id).await.unwrap());
        assert!(!inbox.contains("c", id).await.unwrap());
        assert!(inbox.contains("other", id).await.unwrap());
        assert!(inbox.record("c", id).await.unwrap());
    }
}
