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
