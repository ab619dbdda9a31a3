//! The embedded backends: real implementations kept in process memory.
//!
//! They give the same guarantees as the production backends (concurrency
//! checks, idempotent appends, ordering, catch-up and live subscriptions,
//! ack / retry / dead-letter) and are what the embedded default runs on. They
//! keep nothing across restarts.

mod bus;
mod log;
mod sharded;
mod store;

pub use bus::InMemoryBus;
pub use store::{
    InMemoryCheckpointStore, InMemoryEventStore, InMemoryInbox, InMemorySnapshotStore,
};
