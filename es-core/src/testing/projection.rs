use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};

use crate::{
    Checkpoint, DomainEvent, EventCodec, Metadata, Position, Projection, ProjectionError,
    RecordedEvent, StreamId,
};

/// Records domain events as a store would: versions from 1 on `stream`,
/// positions `(first_position + i, 0)`, now as the recorded time.
///
/// # Panics
/// When an event does not encode (a test fixture bug).
pub fn recorded<E: DomainEvent>(
    stream: &StreamId,
    first_position: u64,
    events: impl IntoIterator<Item = E>,
) -> Vec<RecordedEvent> {
    recorded_at(stream, first_position, Utc::now(), events)
}

/// Like [`recorded`], at a given time.
///
/// # Panics
/// When an event does not encode (a test fixture bug).
pub fn recorded_at<E: DomainEvent>(
    stream: &StreamId,
    first_position: u64,
    at: DateTime<Utc>,
    events: impl IntoIterator<Item = E>,
) -> Vec<RecordedEvent> {
    record(stream, 1, first_position, at, events)
}

/// Encodes `events` as recorded on `stream` from version `first_version` and
/// position `(first_position, 0)` on, one apart, at `at`.
fn record<E: DomainEvent>(
    stream: &StreamId,
    first_version: u64,
    first_position: u64,
    at: DateTime<Utc>,
    events: impl IntoIterator<Item = E>,
) -> Vec<RecordedEvent> {
    let codec = EventCodec::<E>::new();
    (0u64..)
        .zip(events)
        .map(|(i, event)| {
            let new = codec
                .encode(&event, Metadata::new())
                .unwrap_or_else(|e| panic!("fixture event does not encode: {e}"));
            RecordedEvent {
                event_id: new.event_id,
                stream_id: stream.clone(),
                stream_version: first_version + i,
                position: Position::new(first_position + i, 0),
                event_type: new.event_type,
                schema_version: new.schema_version,
                payload: new.payload,
                metadata: new.metadata,
                recorded_at: at,
                tags: new.tags,
            }
        })
        .collect()
}

/// Given recorded events, applies the ones the projection accepts, in order,
/// inside `tx` — what a runner does, minus the checkpoint.
pub async fn project<P: Projection>(
    projection: &P,
    tx: &mut P::Tx,
    events: &[RecordedEvent],
) -> Result<(), ProjectionError> {
    for event in events {
        if projection.accepts(&event.event_type) {
            projection.apply(tx, event).await?;
        }
    }
    Ok(())
}

/// Given recorded events, then the read model equals or satisfies — a
/// projection's behaviour without a store or a runner.
///
/// [`given`](Self::given) records domain events as a store would: each stream's
/// versions follow on from 1, global positions increase by one per event, and
/// every event is recorded at the fixture's virtual time (2026-01-01T00:00:00Z
/// unless [`at`](Self::at) moves it). The `then_*` steps project the pending
/// events in order the way a runner does — events the projection does not
/// [`accept`](Projection::accepts) are skipped, but still move the checkpoint
/// — then read the model with a closure given the projection and its unit of
/// work. [`Projected::and`] continues with more history on the same model, so
/// an incremental run can be checked step by step.
///
/// ```
/// # use std::collections::BTreeMap;
/// # use std::sync::Mutex;
/// # use es_core::doc_support::counter::CounterEvent;
/// # use es_core::{Projection, ProjectionError, RecordedEvent, StreamId};
/// use es_core::projection::decode;
/// use es_core::testing::ProjectionFixture;
///
/// /// The value of every counter, by stream.
/// #[derive(Default)]
/// struct Totals(Mutex<BTreeMap<String, u64>>);
///
/// impl Projection for Totals {
///     type Tx = ();
///     fn name(&self) -> &str { "totals" }
///     async fn apply(&self, _: &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
///         let CounterEvent::Incremented { by } = decode(self.name(), event)?;
///         *self.0.lock().unwrap().entry(event.stream_id.to_string()).or_default() += u64::from(by);
///         Ok(())
///     }
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let (a, b) = (StreamId::new("counter-a").unwrap(), StreamId::new("counter-b").unwrap());
/// let read = |totals: &Totals, _: &mut ()| totals.0.lock().unwrap().clone();
/// ProjectionFixture::new(Totals::default())
///     .given(&a, [CounterEvent::Incremented { by: 2 }, CounterEvent::Incremented { by: 3 }])
///     .given(&b, [CounterEvent::Incremented { by: 1 }])
///     .then(read, BTreeMap::from([("counter-a".into(), 5), ("counter-b".into(), 1)]))
///     .await
///     .and()
///     .given(&a, [CounterEvent::Incremented { by: 10 }])
///     .then_satisfies(read, |totals| totals["counter-a"] == 15)
///     .await;
/// # });
/// ```
pub struct ProjectionFixture<P: Projection> {
    projection: P,
    tx: P::Tx,
    pending: Vec<RecordedEvent>,
    versions: HashMap<StreamId, u64>,
    next_position: u64,
    last_handled: Position,
    now: DateTime<Utc>,
}

impl<P: Projection> fmt::Debug for ProjectionFixture<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionFixture")
            .field("projection", &self.projection.name())
            .field("pending", &self.pending)
            .field("last_handled", &self.last_handled)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

impl<P: Projection> ProjectionFixture<P>
where
    P::Tx: Default,
{
    /// A fixture for `projection`, with a default unit of work (`()` for a
    /// projection that keeps its own model).
    pub fn new(projection: P) -> Self {
        Self::with_tx(projection, P::Tx::default())
    }
}

impl<P: Projection> ProjectionFixture<P> {
    /// A fixture for `projection` that applies events inside `tx` (a
    /// connection or transaction the test opened, say).
    pub fn with_tx(projection: P, tx: P::Tx) -> Self {
        Self {
            projection,
            tx,
            pending: Vec::new(),
            versions: HashMap::new(),
            next_position: 1,
            last_handled: Position::START,
            now: DateTime::<Utc>::from_timestamp(1_767_225_600, 0).unwrap_or_default(),
        }
    }

    /// Records the events given from now on at `now`.
    #[must_use]
    pub fn at(mut self, now: DateTime<Utc>) -> Self {
        self.now = now;
        self
    }

    /// Records these domain events on `stream`, after the events given so far:
    /// the stream's next versions and the log's next positions.
    ///
    /// # Panics
    /// When an event does not encode (a test fixture bug).
    #[must_use]
    pub fn given<E: DomainEvent>(
        mut self,
        stream: &StreamId,
        events: impl IntoIterator<Item = E>,
    ) -> Self {
        let version = self.versions.entry(stream.clone()).or_insert(0);
        let batch = record(stream, *version + 1, self.next_position, self.now, events);
        let count = batch.len() as u64;
        *version += count;
        self.next_position += count;
        self.pending.extend(batch);
        self
    }

    /// Adds events recorded elsewhere (by [`recorded`], or read from a store),
    /// as they are. Later [`given`](Self::given) events follow them: their
    /// versions and positions continue after these.
    #[must_use]
    pub fn given_recorded(mut self, events: impl IntoIterator<Item = RecordedEvent>) -> Self {
        for event in events {
            let version = self.versions.entry(event.stream_id.clone()).or_insert(0);
            *version = (*version).max(event.stream_version);
            self.next_position = self.next_position.max(event.position.major() + 1);
            self.pending.push(event);
        }
        self
    }

    /// The events given and not projected yet.
    pub fn pending(&self) -> &[RecordedEvent] {
        &self.pending
    }

    /// Projects the pending events, in order, as a runner does; returns the
    /// projected model, or the first error the projection returned.
    ///
    /// # Panics
    /// When the given positions do not strictly increase (a fixture bug: a
    /// runner never sees such a log).
    pub async fn project(mut self) -> Result<Projected<P>, ProjectionError> {
        let mut applied = 0;
        let mut skipped = 0;
        for event in std::mem::take(&mut self.pending) {
            assert!(
                event.position > self.last_handled,
                "given event {} at {} does not follow {}",
                event.event_id,
                event.position,
                self.last_handled
            );
            if self.projection.accepts(&event.event_type) {
                self.projection.apply(&mut self.tx, &event).await?;
                applied += 1;
            } else {
                skipped += 1;
            }
            self.last_handled = event.position;
        }
        Ok(Projected {
            fixture: self,
            applied,
            skipped,
        })
    }

    /// Projects the pending events and asserts the model `read` returns
    /// equals `expected`; continues.
    ///
    /// # Panics
    /// When the projection fails or the model differs.
    pub async fn then<M>(self, read: impl FnOnce(&P, &mut P::Tx) -> M, expected: M) -> Projected<P>
    where
        M: fmt::Debug + PartialEq,
    {
        let mut projected = self.projected().await;
        let model = read(&projected.fixture.projection, &mut projected.fixture.tx);
        assert_eq!(model, expected, "the read model differs");
        projected
    }

    /// Projects the pending events and asserts the model `read` returns
    /// satisfies `check`; continues.
    ///
    /// # Panics
    /// When the projection fails or `check` returns `false`.
    pub async fn then_satisfies<M>(
        self,
        read: impl FnOnce(&P, &mut P::Tx) -> M,
        check: impl FnOnce(&M) -> bool,
    ) -> Projected<P>
    where
        M: fmt::Debug,
    {
        let mut projected = self.projected().await;
        let model = read(&projected.fixture.projection, &mut projected.fixture.tx);
        assert!(
            check(&model),
            "the read model does not satisfy the check: {model:?}"
        );
        projected
    }

    /// Projects the pending events and asserts the projection fails with an
    /// error matching `check`.
    ///
    /// # Panics
    /// When every event projects, or the error does not match.
    pub async fn then_error(self, check: impl FnOnce(&ProjectionError) -> bool) {
        match self.project().await {
            Ok(projected) => panic!(
                "expected the projection to fail; it applied {} events",
                projected.applied
            ),
            Err(error) => assert!(check(&error), "the projection failed otherwise: {error:?}"),
        }
    }

    async fn projected(self) -> Projected<P> {
        self.project()
            .await
            .unwrap_or_else(|e| panic!("the projection failed: {e}"))
    }
}

/// A [`ProjectionFixture`] after its pending events were projected.
pub struct Projected<P: Projection> {
    fixture: ProjectionFixture<P>,
    applied: usize,
    skipped: usize,
}

impl<P: Projection> fmt::Debug for Projected<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Projected")
            .field("fixture", &self.fixture)
            .field("applied", &self.applied)
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl<P: Projection> Projected<P> {
    /// The projection (and the model it keeps, if it keeps one).
    pub fn projection(&self) -> &P {
        &self.fixture.projection
    }

    /// The unit of work the events were applied in, to query the model.
    pub fn tx(&mut self) -> &mut P::Tx {
        &mut self.fixture.tx
    }

    /// How many events this step handed to [`Projection::apply`].
    pub fn applied(&self) -> usize {
        self.applied
    }

    /// How many events this step skipped because the projection does not
    /// accept their type.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The checkpoint a runner would store with the model now: the
    /// projection's name and the last position handled (applied or skipped).
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            name: self.fixture.projection.name().to_owned(),
            position: self.fixture.last_handled,
        }
    }

    /// Continues with more history on the same model.
    pub fn and(self) -> ProjectionFixture<P> {
        self.fixture
    }

    /// The projection and its unit of work.
    pub fn into_parts(self) -> (P, P::Tx) {
        (self.fixture.projection, self.fixture.tx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::doc_support::counter::CounterEvent;
    use crate::doc_support::reminder::ReminderInput;

    /// Remembers what it was given, and refuses an increment of 13.
    #[derive(Default)]
    struct Seen(Mutex<Vec<(String, u64, Position)>>);

    impl Seen {
        fn read(&self, _: &mut ()) -> Vec<(String, u64, Position)> {
            self.0.lock().map(|seen| seen.clone()).unwrap_or_default()
        }
    }

    impl Projection for Seen {
        type Tx = ();

        fn name(&self) -> &str {
            "seen"
        }

        fn accepts(&self, event_type: &str) -> bool {
            event_type == "Incremented"
        }

        async fn apply(&self, (): &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
            let CounterEvent::Incremented { by } = EventCodec::<CounterEvent>::new()
                .decode(event)
                .map_err(|e| ProjectionError::invalid("seen", event, e))?;
            if by == 13 {
                return Err(ProjectionError::invalid("seen", event, "unlucky"));
            }
            self.0.lock().unwrap().push((
                event.stream_id.to_string(),
                event.stream_version,
                event.position,
            ));
            Ok(())
        }
    }

    fn stream(id: &str) -> StreamId {
        StreamId::new(id).unwrap()
    }

    fn inc(by: u32) -> CounterEvent {
        CounterEvent::Incremented { by }
    }

    #[tokio::test]
    async fn given_events_are_recorded_in_order_and_projected_once() {
        let (a, b) = (stream("counter-a"), stream("counter-b"));
        let projected = ProjectionFixture::new(Seen::default())
            .given(&a, [inc(1), inc(2)])
            .given(&b, [ReminderInput::Started])
            .given(&b, [inc(3)])
            .then(
                Seen::read,
                vec![
                    ("counter-a".into(), 1, Position::new(1, 0)),
                    ("counter-a".into(), 2, Position::new(2, 0)),
                    // The skipped event still took version 1 and position 3.
                    ("counter-b".into(), 2, Position::new(4, 0)),
                ],
            )
            .await;
        assert_eq!((projected.applied(), projected.skipped()), (3, 1));
        assert_eq!(
            projected.checkpoint(),
            Checkpoint {
                name: "seen".into(),
                position: Position::new(4, 0)
            }
        );
        // The next step applies only the new events, and given events follow
        // on from events recorded elsewhere.
        let c = stream("counter-c");
        let projected = projected
            .and()
            .given_recorded(recorded(&c, 10, [inc(4)]))
            .given(&c, [inc(5)])
            .then_satisfies(Seen::read, |seen| {
                seen.len() == 5
                    && seen[3] == ("counter-c".into(), 1, Position::new(10, 0))
                    && seen[4] == ("counter-c".into(), 2, Position::new(11, 0))
            })
            .await;
        assert_eq!(projected.applied(), 2);
    }

    #[tokio::test]
    async fn a_failing_event_is_the_error() {
        ProjectionFixture::new(Seen::default())
            .given(&stream("counter-a"), [inc(1), inc(13)])
            .then_error(|e| e.to_string().contains("unlucky"))
            .await;
    }

    #[tokio::test]
    #[should_panic(expected = "the read model differs")]
    async fn a_different_model_fails_the_test() {
        ProjectionFixture::new(Seen::default())
            .given(&stream("counter-a"), [inc(1)])
            .then(Seen::read, Vec::new())
            .await;
    }

    #[tokio::test]
    #[should_panic(expected = "does not follow")]
    async fn positions_that_go_back_are_a_fixture_bug() {
        let a = stream("counter-a");
        let _ = ProjectionFixture::new(Seen::default())
            .given_recorded(recorded(&a, 5, [inc(1)]))
            .given_recorded(recorded(&a, 2, [inc(2)]))
            .project()
            .await;
    }
}
