//! Sagas (process managers): long-running conversations that react to
//! messages by changing their own event-sourced state, sending commands, and
//! setting deadlines, all in one atomic append.
//!
//! A [`Saga`] decides [`Reaction`]s; the [`SagaManager`] stores them in the
//! saga's stream as its own events and [`CommandRecord`]s / [`DeadlineRecord`]s;
//! the [`SagaHandler`] feeds it from the bus and the [`DeadlineScheduler`]
//! fires its deadlines. With a [`LocalAggregate`], the commands it sends to
//! an aggregate of its own process are executed in its own write, and that
//! aggregate's events reach it in the write that appends them.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{CodecError, DomainEvent, Metadata, Position, StoreError, StreamId};

mod deadline;
mod handler;
mod local;
mod manager;
mod reaction;
mod record;

pub use deadline::{DeadlineScheduler, DEFAULT_DEADLINE_CHECKPOINT_EVERY};
pub use handler::SagaHandler;
pub use local::{LocalAggregate, LocalRoute};
pub use manager::{PendingDeadline, SagaInstance, SagaManager};
pub use reaction::{Outgoing, Reaction};
pub use record::{CommandRecord, DeadlineRecord};

/// The stored type of a command a saga sent.
pub const COMMAND_RECORD: &str = "$command";
/// The stored type of a command a saga executed in its own write (a
/// [`LocalAggregate`]'s): a [`CommandRecord`] that is not relayed.
pub const COMMAND_EXECUTED: &str = "$command-executed";
/// The stored type of a deadline a saga set.
pub const DEADLINE_SET: &str = "$deadline";
/// The stored type of a deadline a saga cancelled.
pub const DEADLINE_CANCELLED: &str = "$deadline-cancelled";
/// The stored type of a deadline that fired.
pub const DEADLINE_FIRED: &str = "$deadline-fired";

/// A process manager keyed by a correlation id.
///
/// Like an aggregate, a saga is pure: `apply` folds its own events into its
/// state, and `react` / `on_deadline` decide, from the state, an input and the
/// time, a [`Reaction`]: new state events, commands to send, deadlines to set
/// or cancel. The [`SagaManager`] stores a reaction as one atomic append to the
/// saga's own stream (`<TYPE>-<saga id>`); the relay sends the commands from
/// there, and the [`DeadlineScheduler`] fires deadlines when they are due.
///
/// Inputs are deduplicated by message id, so a redelivered message changes
/// nothing; `react` must still cope with inputs arriving out of order.
pub trait Saga: Default + Send + Sync + 'static {
    /// The saga's own state changes.
    type Event: DomainEvent;
    /// The messages it reacts to.
    type Input: DomainEvent;
    /// The commands it sends.
    type Command: DomainEvent;

    /// The stream category of this saga type.
    const TYPE: &'static str;

    /// Which saga instance an input belongs to; `None` ignores the input. By
    /// default, the message's correlation id.
    fn saga_id(input: &Self::Input, metadata: &Metadata) -> Option<Uuid> {
        let _ = input;
        metadata.correlation_id
    }

    /// Evolves the state by one of its events.
    fn apply(&mut self, event: &Self::Event);

    /// Decides the reaction to an input, `received` at a time from a source.
    fn react(
        &self,
        input: &Self::Input,
        received: Received<'_>,
    ) -> Reaction<Self::Event, Self::Command>;

    /// Decides the reaction to a deadline it set, now due. By default,
    /// nothing: a saga that sets no deadlines need not implement it.
    fn on_deadline(&self, name: &str, now: DateTime<Utc>) -> Reaction<Self::Event, Self::Command> {
        let _ = (name, now);
        Reaction::none()
    }
}

/// What a saga knows of an input besides its content: when it is handled,
/// and which stream it is an event of.
///
/// ```
/// use chrono::Utc;
/// use es_core::{saga::Received, StreamId};
///
/// let account = StreamId::new("account-42").unwrap();
/// let received = Received::at(Utc::now()).from(&account);
/// assert_eq!(received.source.map(StreamId::entity_id), Some("42"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Received<'a> {
    /// The time of the saga's clock as it handles the input.
    pub now: DateTime<Utc>,
    /// The stream the input was appended to, when it is an event from a
    /// store: relayed (the bus message's [`source`](crate::Message::source)),
    /// or taken in the write of a [`LocalAggregate`]. `None` for a command,
    /// and for a message published other than by a relay.
    pub source: Option<&'a StreamId>,
}

impl<'a> Received<'a> {
    /// Received at `now`, from no known stream.
    pub fn at(now: DateTime<Utc>) -> Self {
        Self { now, source: None }
    }

    /// The same, from `source`.
    #[must_use]
    pub fn from(self, source: &'a StreamId) -> Self {
        Self {
            source: Some(source),
            ..self
        }
    }
}

/// Why a saga could not handle an input or a deadline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An input, event or record could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A stored saga record is malformed.
    #[error("malformed saga record {event_id} in {stream}: {reason}")]
    Record {
        /// The stream.
        stream: StreamId,
        /// The record.
        event_id: Uuid,
        /// What is wrong.
        reason: String,
    },
    /// Every attempt lost the race for the saga's stream.
    #[error("gave up after {attempts} attempts: saga stream {stream} kept changing")]
    Contention {
        /// The stream.
        stream: StreamId,
        /// Attempts made.
        attempts: u32,
    },
}

impl SagaError {
    /// Whether handling the same input again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store(e) => e.is_transient(),
            Self::Contention { .. } => true,
            Self::Codec(_) | Self::Record { .. } => false,
        }
    }
}

/// What handling an input or deadline did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SagaOutcome {
    /// The reaction was appended at this stream version and position.
    Reacted {
        /// The saga's stream version after it.
        version: u64,
        /// Its position in the log.
        position: Position,
    },
    /// The reaction was empty: nothing written.
    NoChange,
    /// The message was already handled: nothing written.
    Duplicate,
    /// The input belongs to no saga instance, or the deadline is not pending
    /// or not due yet.
    Ignored,
}

impl SagaOutcome {
    /// The outcome of a message handled as several inputs, `so_far` then
    /// `next`: the last reaction written, else a change over a duplicate
    /// over an ignored input.
    pub(crate) fn telling(so_far: Self, next: Self) -> Self {
        let rank = |outcome: &Self| match outcome {
            Self::Ignored => 0,
            Self::Duplicate => 1,
            Self::NoChange => 2,
            Self::Reacted { .. } => 3,
        };
        if rank(&next) >= rank(&so_far) {
            next
        } else {
            so_far
        }
    }
}
