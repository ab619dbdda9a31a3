use std::fmt;

use crate::Aggregate;

/// Given a history, when a command, then events or an error.
///
/// ```
/// # use es_core::doc_support::counter::{Counter, CounterCommand, CounterEvent, CounterError};
/// use es_core::testing::AggregateFixture;
/// AggregateFixture::<Counter>::given([CounterEvent::Incremented { by: 2 }])
///     .when(CounterCommand::Increment { by: 3 })
///     .then_events([CounterEvent::Incremented { by: 3 }]);
/// AggregateFixture::<Counter>::given([])
///     .when(CounterCommand::Increment { by: 0 })
///     .then_error(|e| matches!(e, CounterError::ZeroStep));
/// ```
#[derive(Debug)]
pub struct AggregateFixture<A: Aggregate> {
    state: A,
}

impl<A: Aggregate> AggregateFixture<A> {
    /// The aggregate after these events.
    pub fn given(history: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::default();
        for event in history {
            state.apply(&event);
        }
        Self { state }
    }

    /// Decides a command.
    pub fn when(self, command: A::Command) -> AggregateOutcome<A> {
        let result = self.state.handle(command);
        AggregateOutcome {
            state: self.state,
            result,
        }
    }
}

/// The outcome of [`AggregateFixture::when`].
pub struct AggregateOutcome<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> fmt::Debug for AggregateOutcome<A>
where
    A::Event: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregateOutcome")
            .field("result", &self.result)
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate> AggregateOutcome<A>
where
    A::Event: fmt::Debug + PartialEq,
{
    /// Asserts the command produced exactly these events; returns the state
    /// after them.
    #[track_caller]
    pub fn then_events(self, expected: impl IntoIterator<Item = A::Event>) -> A {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "the command produced other events");
                let mut state = self.state;
                for event in &events {
                    state.apply(event);
                }
                state
            }
            Err(error) => panic!("expected events {expected:?}, the command was rejected: {error}"),
        }
    }

    /// Asserts the command was rejected with an error matching `check`.
    #[track_caller]
    pub fn then_error(self, check: impl FnOnce(&A::Error) -> bool) {
        match self.result {
            Ok(events) => panic!("expected a rejection, the command produced {events:?}"),
            Err(error) => assert!(
                check(&error),
                "the command was rejected otherwise: {error:?}"
            ),
        }
    }

    /// The raw result, for checks the helpers do not cover.
    pub fn result(self) -> Result<Vec<A::Event>, A::Error> {
        self.result
    }
}
