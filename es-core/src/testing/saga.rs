use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::saga::{Outgoing, Reaction, Received};
use crate::{Saga, StreamId};

/// Given inputs, when an input or the passing of time, then commands, on a
/// virtual clock — a saga's decisions without a store or a bus.
///
/// Deadlines behave as under the [`SagaManager`](crate::SagaManager): setting a
/// pending name moves it, cancelling removes it, and a deadline fires once,
/// when the virtual clock passes it.
///
/// ```
/// # use es_core::doc_support::reminder::{Reminder, ReminderInput, ReminderCommand};
/// use es_core::testing::SagaFixture;
/// use std::time::Duration;
/// SagaFixture::<Reminder>::new()
///     .given([ReminderInput::Started])
///     .when_time_passes(Duration::from_secs(29))
///     .then_no_commands()
///     .when_time_passes(Duration::from_secs(1))
///     .then_sent([("people", ReminderCommand::Nudge)]);
/// ```
pub struct SagaFixture<S: Saga> {
    state: S,
    now: DateTime<Utc>,
    deadlines: BTreeMap<String, DateTime<Utc>>,
}

impl<S: Saga> fmt::Debug for SagaFixture<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaFixture")
            .field("now", &self.now)
            .field("deadlines", &self.deadlines)
            .finish_non_exhaustive()
    }
}

impl<S: Saga> Default for SagaFixture<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Saga> SagaFixture<S> {
    /// A new saga instance on a virtual clock at 2026-01-01T00:00:00Z.
    pub fn new() -> Self {
        Self::at(DateTime::<Utc>::from_timestamp(1_767_225_600, 0).unwrap_or_default())
    }

    /// A new saga instance on a virtual clock at `now`.
    pub fn at(now: DateTime<Utc>) -> Self {
        Self {
            state: S::default(),
            now,
            deadlines: BTreeMap::new(),
        }
    }

    /// Feeds these inputs, discarding what the saga sent.
    #[must_use]
    pub fn given(self, inputs: impl IntoIterator<Item = S::Input>) -> Self {
        self.feed(None, inputs)
    }

    /// Feeds these inputs as events of `source`, discarding what the saga
    /// sent.
    #[must_use]
    pub fn given_from(self, source: &StreamId, inputs: impl IntoIterator<Item = S::Input>) -> Self {
        self.feed(Some(source), inputs)
    }

    fn feed(
        mut self,
        source: Option<&StreamId>,
        inputs: impl IntoIterator<Item = S::Input>,
    ) -> Self {
        for input in inputs {
            let reaction = self.state.react(&input, self.received(source));
            self.commit(&reaction);
        }
        self
    }

    /// Feeds one input.
    #[allow(clippy::needless_pass_by_value)] // reads as "when <input>", like a message
    pub fn when(self, input: S::Input) -> SagaStep<S> {
        self.step(None, &input)
    }

    /// Feeds one input, as an event of `source`.
    #[allow(clippy::needless_pass_by_value)] // reads as "when <input>", like a message
    pub fn when_from(self, source: &StreamId, input: S::Input) -> SagaStep<S> {
        self.step(Some(source), &input)
    }

    fn step(mut self, source: Option<&StreamId>, input: &S::Input) -> SagaStep<S> {
        let reaction = self.state.react(input, self.received(source));
        self.commit(&reaction);
        SagaStep {
            fixture: self,
            reaction,
        }
    }

    fn received<'a>(&self, source: Option<&'a StreamId>) -> Received<'a> {
        Received {
            now: self.now,
            source,
        }
    }

    /// Moves the virtual clock and fires every deadline that falls due, in
    /// order of due time.
    pub fn when_time_passes(mut self, by: Duration) -> SagaStep<S> {
        let end = self.now + chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let mut total = Reaction::none();
        loop {
            let next = self
                .deadlines
                .iter()
                .filter(|(_, due)| **due <= end)
                .min_by_key(|(_, due)| **due)
                .map(|(name, due)| (name.clone(), *due));
            let Some((name, due)) = next else { break };
            self.now = self.now.max(due);
            self.deadlines.remove(&name);
            let mut reaction = self.state.on_deadline(&name, self.now);
            reaction.cancelled.retain(|n| n != &name);
            self.commit(&reaction);
            total.events.append(&mut reaction.events);
            total.commands.append(&mut reaction.commands);
            total.deadlines.append(&mut reaction.deadlines);
            total.cancelled.append(&mut reaction.cancelled);
        }
        self.now = end;
        SagaStep {
            fixture: self,
            reaction: total,
        }
    }

    /// The saga's state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The virtual time.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// Pending deadlines by name.
    pub fn pending_deadlines(&self) -> &BTreeMap<String, DateTime<Utc>> {
        &self.deadlines
    }

    fn commit(&mut self, reaction: &Reaction<S::Event, S::Command>) {
        for name in &reaction.cancelled {
            self.deadlines.remove(name);
        }
        for event in &reaction.events {
            self.state.apply(event);
        }
        for (name, due) in &reaction.deadlines {
            self.deadlines.insert(name.clone(), *due);
        }
    }
}

/// What one step of a [`SagaFixture`] decided.
pub struct SagaStep<S: Saga> {
    fixture: SagaFixture<S>,
    reaction: Reaction<S::Event, S::Command>,
}

impl<S: Saga> fmt::Debug for SagaStep<S>
where
    S::Event: fmt::Debug,
    S::Command: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaStep")
            .field("reaction", &self.reaction)
            .finish_non_exhaustive()
    }
}

impl<S: Saga> SagaStep<S> {
    /// The whole reaction.
    pub fn reaction(&self) -> &Reaction<S::Event, S::Command> {
        &self.reaction
    }

    /// The commands sent, with their topics.
    pub fn outgoing(&self) -> &[Outgoing<S::Command>] {
        &self.reaction.commands
    }

    /// Continues with the fixture.
    pub fn and(self) -> SagaFixture<S> {
        self.fixture
    }
}

impl<S: Saga> SagaStep<S>
where
    S::Command: fmt::Debug + PartialEq,
{
    /// Asserts exactly these commands were sent, in order; continues.
    #[track_caller]
    pub fn then_commands(self, expected: impl IntoIterator<Item = S::Command>) -> SagaFixture<S> {
        let expected: Vec<S::Command> = expected.into_iter().collect();
        let sent: Vec<&S::Command> = self.reaction.commands.iter().map(|o| &o.command).collect();
        assert_eq!(
            sent,
            expected.iter().collect::<Vec<_>>(),
            "the saga sent other commands"
        );
        self.fixture
    }

    /// Asserts exactly these commands were sent, in order, each to its
    /// topic; continues.
    #[track_caller]
    pub fn then_sent<'a>(
        self,
        expected: impl IntoIterator<Item = (&'a str, S::Command)>,
    ) -> SagaFixture<S> {
        let expected: Vec<(&str, S::Command)> = expected.into_iter().collect();
        let sent: Vec<(&str, &S::Command)> = self
            .reaction
            .commands
            .iter()
            .map(|o| (o.topic.as_str(), &o.command))
            .collect();
        assert_eq!(
            sent,
            expected
                .iter()
                .map(|(topic, command)| (*topic, command))
                .collect::<Vec<_>>(),
            "the saga sent other commands (topic, command)"
        );
        self.fixture
    }

    /// Asserts nothing was sent; continues.
    #[track_caller]
    pub fn then_no_commands(self) -> SagaFixture<S> {
        let sent: Vec<&S::Command> = self.reaction.commands.iter().map(|o| &o.command).collect();
        assert!(sent.is_empty(), "the saga sent {sent:?}");
        self.fixture
    }
}

impl<S: Saga> SagaStep<S>
where
    S::Event: fmt::Debug + PartialEq,
{
    /// Asserts exactly these state events were decided, in order; continues.
    #[track_caller]
    pub fn then_events(self, expected: impl IntoIterator<Item = S::Event>) -> SagaFixture<S> {
        let expected: Vec<S::Event> = expected.into_iter().collect();
        assert_eq!(
            self.reaction.events, expected,
            "the saga decided other events"
        );
        self.fixture
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::SagaFixture;
    use crate::doc_support::reminder::{Reminder, ReminderCommand, ReminderInput};

    #[test]
    fn then_sent_checks_the_topic_too() {
        let fixture = SagaFixture::<Reminder>::new().given([ReminderInput::Started]);
        let due = fixture.pending_deadlines().get("nudge").copied();
        assert_eq!(due, Some(fixture.now() + chrono::Duration::seconds(30)));
        let result = std::panic::catch_unwind(|| {
            fixture
                .when_time_passes(Duration::from_secs(30))
                .then_sent([("elsewhere", ReminderCommand::Nudge)]);
        });
        assert!(result.is_err(), "a command to another topic passed");
    }
}
