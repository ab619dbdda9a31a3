//! The test kit (feature `testing`): given/when/then fixtures for
//! aggregates, decisions, sagas and projections; a golden corpus of stored
//! event samples; the backend conformance
//! suites every [`EventStore`](crate::EventStore) and
//! [`DcbStore`](crate::DcbStore) implementation runs; and the one every
//! [`EventBus`](crate::EventBus) implementation runs.

mod aggregate;
pub mod bus_conformance;
pub mod conformance;
pub mod dcb_conformance;
mod decision;
mod golden;
mod projection;
mod saga;

pub use aggregate::{AggregateFixture, AggregateOutcome};
pub use decision::{DecisionFixture, DecisionOutcome};
pub use golden::{GoldenCorpus, GoldenError, GoldenReport, RECORD_VAR};
pub use projection::{project, recorded, recorded_at, Projected, ProjectionFixture};
pub use saga::{SagaFixture, SagaStep};
