use std::collections::BTreeSet;
use std::fmt;

use crate::{Decision, DomainEvent, Tag};

/// Given the events in the store, when a decision, then events or a
/// rejection. The decision folds only the given events its query selects
/// (by their [`DomainEvent::event_type`] and [`DomainEvent::tags`]), as a
/// store would give it, so the fixture tests the query too.
///
/// ```
/// # use es_core::doc_support::coupon::{Redeem, CouponEvent, CouponError};
/// use es_core::testing::DecisionFixture;
/// let redeemed = CouponEvent::Redeemed { coupon: "SPRING".into(), customer: 1 };
/// // Another customer's redemption is outside this decision's boundary.
/// DecisionFixture::given([redeemed.clone()])
///     .when(&Redeem { coupon: "SPRING".into(), customer: 2 })
///     .then_events([CouponEvent::Redeemed { coupon: "SPRING".into(), customer: 2 }]);
/// DecisionFixture::given([redeemed])
///     .when(&Redeem { coupon: "SPRING".into(), customer: 1 })
///     .then_rejected(|e| matches!(e, CouponError::AlreadyRedeemed));
/// ```
#[derive(Debug)]
pub struct DecisionFixture<E> {
    history: Vec<E>,
}

impl<E: DomainEvent> DecisionFixture<E> {
    /// The store holds these events, in this order.
    pub fn given(history: impl IntoIterator<Item = E>) -> Self {
        Self {
            history: history.into_iter().collect(),
        }
    }

    /// Folds the given events `decision`'s query selects and decides.
    ///
    /// # Panics
    ///
    /// When a given event names an invalid tag.
    pub fn when<D: Decision<Event = E>>(self, decision: &D) -> DecisionOutcome<D> {
        let query = decision.query();
        let mut state = D::State::default();
        let mut folded = 0;
        for event in &self.history {
            let tags: BTreeSet<Tag> = event
                .tags()
                .unwrap_or_else(|e| panic!("a given event has an invalid tag: {e}"))
                .into_iter()
                .collect();
            if query.matches(event.event_type(), &tags) {
                decision.evolve(&mut state, event);
                folded += 1;
            }
        }
        DecisionOutcome {
            folded,
            result: decision.decide(&state),
        }
    }
}

/// The outcome of [`DecisionFixture::when`].
pub struct DecisionOutcome<D: Decision> {
    folded: usize,
    result: Result<Vec<D::Event>, D::Rejection>,
}

impl<D: Decision> fmt::Debug for DecisionOutcome<D>
where
    D::Event: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionOutcome")
            .field("folded", &self.folded)
            .field("result", &self.result)
            .finish()
    }
}

impl<D: Decision> DecisionOutcome<D>
where
    D::Event: fmt::Debug + PartialEq,
{
    /// Asserts the decision produced exactly these events.
    #[track_caller]
    pub fn then_events(self, expected: impl IntoIterator<Item = D::Event>) {
        let expected: Vec<D::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => assert_eq!(events, expected, "the decision produced other events"),
            Err(error) => {
                panic!("expected events {expected:?}, the decision was rejected: {error}")
            }
        }
    }

    /// Asserts the decision was rejected with a rejection matching `check`.
    #[track_caller]
    pub fn then_rejected(self, check: impl FnOnce(&D::Rejection) -> bool) {
        match self.result {
            Ok(events) => panic!("expected a rejection, the decision produced {events:?}"),
            Err(error) => assert!(
                check(&error),
                "the decision was rejected otherwise: {error:?}"
            ),
        }
    }

    /// How many of the given events the query selected.
    pub fn folded(&self) -> usize {
        self.folded
    }

    /// The raw result, for checks the helpers do not cover.
    pub fn result(self) -> Result<Vec<D::Event>, D::Rejection> {
        self.result
    }
}
