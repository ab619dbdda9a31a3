//! What a saga decides: state events, commands and deadlines.

use chrono::{DateTime, Utc};

/// A command a saga sends, and where to.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing<C> {
    /// The topic (bounded context) that handles it.
    pub topic: String,
    /// The command.
    pub command: C,
}

/// What a saga decided: state events, commands, deadlines set and cancelled.
#[derive(Clone, Debug, PartialEq)]
pub struct Reaction<E, C> {
    /// State events, applied in order.
    pub events: Vec<E>,
    /// Commands to send.
    pub commands: Vec<Outgoing<C>>,
    /// Deadlines to set (name, due time); setting a pending name again moves it.
    pub deadlines: Vec<(String, DateTime<Utc>)>,
    /// Pending deadlines to cancel, by name.
    pub cancelled: Vec<String>,
}

impl<E, C> Default for Reaction<E, C> {
    fn default() -> Self {
        Self {
            events: Vec::new(),
            commands: Vec::new(),
            deadlines: Vec::new(),
            cancelled: Vec::new(),
        }
    }
}

impl<E, C> Reaction<E, C> {
    /// Nothing to do.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds a state event.
    #[must_use]
    pub fn event(mut self, event: E) -> Self {
        self.events.push(event);
        self
    }

    /// Adds a command for `topic`.
    #[must_use]
    pub fn send(mut self, topic: impl Into<String>, command: C) -> Self {
        self.commands.push(Outgoing {
            topic: topic.into(),
            command,
        });
        self
    }

    /// Sets a deadline.
    #[must_use]
    pub fn deadline(mut self, name: impl Into<String>, due: DateTime<Utc>) -> Self {
        self.deadlines.push((name.into(), due));
        self
    }

    /// Cancels a deadline.
    #[must_use]
    pub fn cancel(mut self, name: impl Into<String>) -> Self {
        self.cancelled.push(name.into());
        self
    }

    /// Whether the reaction does nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.commands.is_empty()
            && self.deadlines.is_empty()
            && self.cancelled.is_empty()
    }
}
