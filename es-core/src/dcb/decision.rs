//! [`Decision`]: a command decided on the events its query selects, and
//! [`DecisionRunner`], which reads, decides and appends on the marker.

use std::fmt;
use std::sync::Arc;

use crate::{
    AppendCondition, CodecError, DcbStore, DomainEvent, EventCodec, Metadata, Position, Query,
    RetryPolicy, StoreError, StreamId,
};

/// How many events the runner reads per call to the store.
const PAGE: usize = 1_000;

/// A decision over a dynamic consistency boundary: which events it depends
/// on ([`Decision::query`]), how they fold into the state it decides on,
/// and the decision itself. Like an aggregate's, `evolve` and `decide` are
/// pure: no I/O.
///
/// The events it decides should carry the tags its query selects by (see
/// [`DomainEvent::tags`]): then a second decision of the same kind sees
/// them, and a concurrent one fails with
/// [`StoreError::BoundaryMoved`] and decides again.
pub trait Decision: Send + Sync {
    /// The events it reads and decides.
    type Event: DomainEvent;
    /// What it folds the events into.
    type State: Default + Send;
    /// Why it refuses.
    type Rejection: std::error::Error + Send + Sync + 'static;

    /// The events it depends on.
    fn query(&self) -> Query;

    /// Evolves the state by one event the query selected.
    fn evolve(&self, state: &mut Self::State, event: &Self::Event);

    /// The events to append, or a refusal, given the state.
    fn decide(&self, state: &Self::State) -> Result<Vec<Self::Event>, Self::Rejection>;
}

/// Why a decision was not appended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecisionError<R: std::error::Error + 'static> {
    /// The decision refused. Nothing was written.
    #[error("decision rejected: {0}")]
    Rejected(#[source] R),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An event could not be encoded or a stored one decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Every attempt found its boundary moved by a concurrent writer.
    #[error("gave up after {attempts} attempts: the consistency boundary kept moving")]
    Contention {
        /// How many attempts were made.
        attempts: u32,
    },
}

/// The outcome of a decision that was appended (or produced nothing).
#[derive(Clone, Debug, PartialEq)]
pub struct Decided<E> {
    /// The events decided (empty when the decision produced none; nothing
    /// was appended then).
    pub events: Vec<E>,
    /// The position of the last event written; for an empty decision, the
    /// marker it was decided on.
    pub position: Position,
    /// The attempts it took, the first included.
    pub attempts: u32,
}

/// Runs [`Decision`]s against a [`DcbStore`]: reads the events the query
/// selects, folds them, decides, and appends the events to the given stream
/// on the read's marker. When the boundary moved in between
/// ([`StoreError::BoundaryMoved`]) it reads and decides again, up to the
/// [`RetryPolicy`]'s attempts with jittered backoff, as
/// [`Repository`](crate::Repository) does on a wrong expected version.
pub struct DecisionRunner<E: DomainEvent> {
    store: Arc<dyn DcbStore>,
    codec: EventCodec<E>,
    retry: RetryPolicy,
}

impl<E: DomainEvent> fmt::Debug for DecisionRunner<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionRunner")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl<E: DomainEvent> Clone for DecisionRunner<E> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            codec: self.codec.clone(),
            retry: self.retry,
        }
    }
}

impl<E: DomainEvent> DecisionRunner<E> {
    /// A runner on `store` with the default codec and retry policy.
    pub fn new(store: Arc<dyn DcbStore>) -> Self {
        Self {
            store,
            codec: EventCodec::new(),
            retry: RetryPolicy::default(),
        }
    }

    /// Decodes stored events with `codec` (and its upcasters).
    #[must_use]
    pub fn with_codec(mut self, codec: EventCodec<E>) -> Self {
        self.codec = codec;
        self
    }

    /// Retries a moved boundary as `retry` says.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Reads, decides and appends `decision`'s events to `stream`, each with
    /// `metadata`. A decision that writes nothing (a rejection, or no
    /// events) is answered only once an empty append on the read's
    /// condition confirms that no matching event came after the read;
    /// otherwise it is decided again, as after a moved boundary.
    pub async fn execute<D>(
        &self,
        stream: &StreamId,
        decision: &D,
        metadata: Metadata,
    ) -> Result<Decided<E>, DecisionError<D::Rejection>>
    where
        D: Decision<Event = E>,
    {
        let query = decision.query();
        let attempts = self.retry.max_attempts.max(1);
        for attempt in 1..=attempts {
            let (state, marker) = self.fold(decision, &query).await?;
            let condition = AppendCondition::after(query.clone(), marker);
            // A decision that writes nothing (a rejection, or nothing to
            // do) stands only if its read missed nothing: a read may stop
            // short of committed events (held back behind an older
            // transaction still running). Appending nothing on the
            // condition checks that no matching event came after the read.
            let events = match decision.decide(&state) {
                Ok(events) if !events.is_empty() => events,
                nothing => match self.store.append_if(stream, Vec::new(), condition).await {
                    Ok(_) => {
                        return nothing
                            .map(|events| Decided {
                                events,
                                position: marker,
                                attempts: attempt,
                            })
                            .map_err(DecisionError::Rejected)
                    }
                    Err(StoreError::BoundaryMoved { .. }) if attempt < attempts => {
                        tracing::debug!(%stream, attempt, "decided on a read that missed events; deciding again");
                        continue;
                    }
                    Err(StoreError::BoundaryMoved { .. }) => break,
                    Err(e) => return Err(e.into()),
                },
            };
            let batch = events
                .iter()
                .map(|e| self.codec.encode(e, metadata.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            match self.store.append_if(stream, batch, condition).await {
                Ok(result) => {
                    return Ok(Decided {
                        events,
                        position: result.position,
                        attempts: attempt,
                    })
                }
                Err(StoreError::BoundaryMoved { .. }) if attempt < attempts => {
                    tracing::debug!(%stream, attempt, "consistency boundary moved; deciding again");
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                }
                Err(StoreError::BoundaryMoved { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Err(DecisionError::Contention { attempts })
    }

    /// The state the query's events fold into, and the marker of the read.
    async fn fold<D>(
        &self,
        decision: &D,
        query: &Query,
    ) -> Result<(D::State, Position), DecisionError<D::Rejection>>
    where
        D: Decision<Event = E>,
    {
        let mut state = D::State::default();
        let mut marker = Position::START;
        loop {
            let page = self.store.read(query, marker, PAGE).await?;
            for recorded in &page.events {
                for event in self.codec.decode_all(recorded)? {
                    decision.evolve(&mut state, &event);
                }
            }
            marker = page.marker;
            if page.events.len() < PAGE {
                return Ok((state, marker));
            }
        }
    }
}
