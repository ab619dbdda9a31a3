//! Aggregates: pure decision functions over an event-sourced state.

use crate::DomainEvent;

/// An aggregate: a consistency boundary whose state is the fold of its events.
///
/// Both functions are pure. `apply` evolves the state by one event and cannot
/// fail (an event is a fact); `handle` decides which events a command produces,
/// or refuses it with a typed error. Neither does I/O: side effects such as
/// charging a card belong to services that react to the events.
pub trait Aggregate: Default + Send + Sync + 'static {
    /// The events of this aggregate.
    type Event: DomainEvent;
    /// The commands it decides on.
    type Command: Send;
    /// Why it refuses a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The stream category of this aggregate type: its streams are named
    /// `<TYPE>-<id>`.
    const TYPE: &'static str;

    /// Evolves the state by one event.
    fn apply(&mut self, event: &Self::Event);

    /// Decides the events a command produces, given the current state.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Whether `command` starts a new aggregate (opening an account, placing
    /// an order under a fresh id). [`Repository::execute`](crate::Repository::execute)
    /// then decides it on the empty state and appends expecting no stream,
    /// without reading first, as [`Repository::create`](crate::Repository::create)
    /// does: one round trip to the store when the stream is indeed new. When
    /// it exists after all, nothing is written and the command is decided
    /// again on the stream as read: a wrong answer costs one read, never a
    /// wrong decision. The default, `false`, reads first.
    fn creates(_command: &Self::Command) -> bool {
        false
    }

    /// Folds a history into a state.
    fn from_events<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self
    where
        Self::Event: 'a,
    {
        let mut state = Self::default();
        for event in events {
            state.apply(event);
        }
        state
    }
}

/// A refusal that is only a message: the [`Aggregate::Error`] of an
/// aggregate whose callers never branch on why a command was refused. Give
/// an aggregate a `thiserror` enum instead as soon as one does (a caller
/// that retries on one reason and reports another).
///
/// ```
/// use es_core::Refused;
/// let refused = Refused("no such account");
/// assert_eq!(refused.to_string(), "no such account");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub &'static str);
