//! The test kit (feature `testing`): given/when/then fixtures for aggregates,
//! sagas and projections, and the backend conformance suite every
//! [`EventStore`](crate::EventStore) implementation runs.

mod aggregate;
pub mod conformance;
mod projection;
mod saga;

pub use aggregate::{AggregateFixture, AggregateOutcome};
pub use projection::{project, recorded, recorded_at};
pub use saga::{SagaFixture, SagaStep};

/// Compile-time check that the backend traits stay usable as `Arc<dyn _>`.
#[allow(dead_code)]
fn _object_safe(
    _store: std::sync::Arc<dyn crate::EventStore>,
    _snapshots: std::sync::Arc<dyn crate::SnapshotStore>,
    _bus: std::sync::Arc<dyn crate::EventBus>,
    _handler: std::sync::Arc<dyn crate::MessageHandler>,
    _checkpoints: std::sync::Arc<dyn crate::CheckpointStore>,
    _inbox: std::sync::Arc<dyn crate::Inbox>,
    _clock: std::sync::Arc<dyn crate::Clock>,
) {
}
