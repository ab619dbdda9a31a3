//! Small fixtures the documentation examples share. Not part of the API.

/// A counter aggregate.
pub mod counter {
    use serde::{Deserialize, Serialize};

    use crate::{Aggregate, DomainEvent};

    /// The counter's events.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum CounterEvent {
        /// It went up.
        Incremented {
            /// By how much.
            by: u32,
        },
    }

    impl DomainEvent for CounterEvent {
        fn event_type(&self) -> &'static str {
            "Incremented"
        }
    }

    /// The counter's commands.
    #[derive(Clone, Debug)]
    pub enum CounterCommand {
        /// Add `by`.
        Increment {
            /// How much.
            by: u32,
        },
    }

    /// Why the counter refuses.
    #[derive(Debug, thiserror::Error)]
    pub enum CounterError {
        /// A step of zero.
        #[error("cannot increment by zero")]
        ZeroStep,
    }

    /// A counter.
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Counter {
        /// The value.
        pub value: u64,
    }

    impl Aggregate for Counter {
        type Event = CounterEvent;
        type Command = CounterCommand;
        type Error = CounterError;
        const TYPE: &'static str = "counter";

        fn apply(&mut self, event: &CounterEvent) {
            let CounterEvent::Incremented { by } = event;
            self.value += u64::from(*by);
        }

        fn handle(&self, command: CounterCommand) -> Result<Vec<CounterEvent>, CounterError> {
            let CounterCommand::Increment { by } = command;
            if by == 0 {
                return Err(CounterError::ZeroStep);
            }
            Ok(vec![CounterEvent::Incremented { by }])
        }
    }

    /// The counter's command as the bus carries it.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum CounterMessage {
        /// Add `by` to the counter `counter`.
        Increment {
            /// The counter's id.
            counter: String,
            /// How much.
            by: u32,
        },
    }

    impl DomainEvent for CounterMessage {
        fn event_type(&self) -> &'static str {
            "Increment"
        }
    }

    impl CounterMessage {
        /// The counter it is for, and the domain command it means.
        pub fn route(self) -> Option<(String, CounterCommand)> {
            let Self::Increment { counter, by } = self;
            Some((counter, CounterCommand::Increment { by }))
        }
    }
}

/// A saga that nudges 30 seconds after it starts unless it is stopped.
pub mod reminder {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Serialize};

    use crate::{DomainEvent, Reaction, Saga};

    /// Its inputs.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum ReminderInput {
        /// Start waiting.
        Started,
        /// Stop waiting.
        Stopped,
    }

    impl DomainEvent for ReminderInput {
        const EVENT_TYPES: &'static [&'static str] = &["Started", "Stopped"];

        fn event_type(&self) -> &'static str {
            match self {
                Self::Started => "Started",
                Self::Stopped => "Stopped",
            }
        }
    }

    impl ReminderInput {
        /// This input to saga `saga`, as a bus message on topic `reminders`
        /// (the correlation id names the saga).
        ///
        /// # Panics
        /// Never: the input always encodes.
        pub fn to(&self, saga: uuid::Uuid) -> crate::Message {
            crate::Message::encode(
                "reminders",
                self,
                crate::Metadata::new().with_correlation_id(saga),
            )
            .unwrap_or_else(|e| unreachable!("a reminder input encodes: {e}"))
        }
    }

    /// Its state changes.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum ReminderEvent {
        /// Waiting began.
        Waiting,
        /// It is over.
        Done,
    }

    impl DomainEvent for ReminderEvent {
        fn event_type(&self) -> &'static str {
            match self {
                Self::Waiting => "Waiting",
                Self::Done => "Done",
            }
        }
    }

    /// Its commands.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum ReminderCommand {
        /// Remind someone.
        Nudge,
    }

    impl DomainEvent for ReminderCommand {
        fn event_type(&self) -> &'static str {
            "Nudge"
        }
    }

    /// The saga's state.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Reminder {
        /// Whether it waits.
        pub waiting: bool,
        /// Whether it is over.
        pub done: bool,
    }

    impl Saga for Reminder {
        type Event = ReminderEvent;
        type Input = ReminderInput;
        type Command = ReminderCommand;
        const TYPE: &'static str = "reminder";

        fn apply(&mut self, event: &ReminderEvent) {
            match event {
                ReminderEvent::Waiting => self.waiting = true,
                ReminderEvent::Done => {
                    self.waiting = false;
                    self.done = true;
                }
            }
        }

        fn react(
            &self,
            input: &ReminderInput,
            received: crate::Received<'_>,
        ) -> Reaction<ReminderEvent, ReminderCommand> {
            match input {
                ReminderInput::Started if !self.waiting && !self.done => Reaction::none()
                    .event(ReminderEvent::Waiting)
                    .deadline("nudge", received.now + chrono::Duration::seconds(30)),
                ReminderInput::Stopped if self.waiting => {
                    Reaction::none().event(ReminderEvent::Done).cancel("nudge")
                }
                _ => Reaction::none(),
            }
        }

        fn on_deadline(
            &self,
            name: &str,
            _now: DateTime<Utc>,
        ) -> Reaction<ReminderEvent, ReminderCommand> {
            if name == "nudge" && self.waiting {
                Reaction::none()
                    .event(ReminderEvent::Done)
                    .send("people", ReminderCommand::Nudge)
            } else {
                Reaction::none()
            }
        }
    }
}

/// A coupon each customer may redeem once: a DCB decision.
pub mod coupon {
    use serde::{Deserialize, Serialize};

    use crate::{Decision, DomainEvent, InvalidTag, Query, QueryItem, Tag};

    /// The coupon's events.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum CouponEvent {
        /// A customer redeemed a coupon.
        #[serde(rename = "CouponRedeemed")]
        Redeemed {
            /// The coupon code.
            coupon: String,
            /// The customer.
            customer: u64,
        },
    }

    impl DomainEvent for CouponEvent {
        fn event_type(&self) -> &'static str {
            "CouponRedeemed"
        }

        fn tags(&self) -> Result<Vec<Tag>, InvalidTag> {
            let Self::Redeemed { coupon, customer } = self;
            Ok(vec![
                Tag::of("coupon", coupon)?,
                Tag::of("customer", customer)?,
            ])
        }
    }

    /// Why a redemption is refused.
    #[derive(Debug, thiserror::Error)]
    pub enum CouponError {
        /// This customer redeemed this coupon before.
        #[error("the coupon was already redeemed by this customer")]
        AlreadyRedeemed,
    }

    /// Redeem `coupon` for `customer`, once.
    #[derive(Clone, Debug)]
    pub struct Redeem {
        /// The coupon code.
        pub coupon: String,
        /// The customer.
        pub customer: u64,
    }

    impl Decision for Redeem {
        type Event = CouponEvent;
        type State = bool;
        type Rejection = CouponError;

        fn query(&self) -> Query {
            match (
                Tag::of("coupon", &self.coupon),
                Tag::of("customer", self.customer),
            ) {
                (Ok(coupon), Ok(customer)) => Query::from(
                    QueryItem::tagged(coupon)
                        .and_tag(customer)
                        .of_types(["CouponRedeemed"]),
                ),
                _ => Query::none(),
            }
        }

        fn evolve(&self, redeemed: &mut bool, _: &CouponEvent) {
            *redeemed = true;
        }

        fn decide(&self, redeemed: &bool) -> Result<Vec<CouponEvent>, CouponError> {
            if *redeemed {
                return Err(CouponError::AlreadyRedeemed);
            }
            Ok(vec![CouponEvent::Redeemed {
                coupon: self.coupon.clone(),
                customer: self.customer,
            }])
        }
    }
}
