//! The test kit (feature `testing`): given/when/then fixtures for aggregates,
//! sagas and projections, the backend conformance suite every
//! [`EventStore`](crate::EventStore) implementation runs, and the one every
//! [`EventBus`](crate::EventBus) implementation runs.

mod aggregate;
pub mod bus_conformance;
pub mod conformance;
mod projection;
mod saga;

pub use aggregate::{AggregateFixture, AggregateOutcome};
pub use projection::{project, recorded, recorded_at, Projected, ProjectionFixture};
pub use saga::{SagaFixture, SagaStep};
