//! The test kit (feature `testing`): given/when/then fixtures for aggregates,
//! sagas and projections, and the backend conformance suite every
//! [`EventStore`](crate::EventStore) implementation runs.

mod aggregate;
pub mod conformance;
mod projection;
mod saga;

pub use aggregate::{AggregateFixture, AggregateOutcome};
pub use projection::{project, recorded, recorded_at, Projected, ProjectionFixture};
pub use saga::{SagaFixture, SagaStep};
