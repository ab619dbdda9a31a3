#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod aggregate;
pub mod app;
pub mod bus;
pub mod catch_up;
pub mod checkpoint;
pub mod clock;
pub mod command;
pub mod dcb;
#[doc(hidden)]
pub mod doc_support;
pub mod envelope;
pub mod event;
pub mod inbox;
pub mod leader;
pub mod memory;
pub mod metadata;
pub mod otel;
pub mod payload;
pub mod position;
pub mod projection;
mod redact;
pub mod relay;
pub mod replica;
pub mod repository;
pub mod saga;
pub mod snapshot;
mod state_cache;
pub mod store;
pub mod stream;
#[cfg(any(test, feature = "testing"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
pub mod trace;
mod unit_of_work;

pub use aggregate::{Aggregate, Refused};
pub use app::{supervise, App, RelayFactory, RelayPlan, RunRelay, SagaWiring};
pub use bus::{
    BusError, DeadLetter, Delivery, EventBus, Message, MessageHandler, Outcome, Subscription,
    SubscriptionHandle,
};
pub use checkpoint::CheckpointStore;
pub use clock::{Clock, ManualClock, SystemClock};
pub use command::{CommandHandler, CommandRefused, CommandService, Commands};
pub use dcb::{
    AppendCondition, DcbStore, Decided, Decision, DecisionError, DecisionRunner, InvalidTag, Query,
    QueryItem, QueryPage, Tag,
};
pub use envelope::{derived_id, AppendResult, NewEvent, RecordedEvent, StreamEvent};
/// `#[derive(DomainEvent)]`: `event_type()` from serde's variant names,
/// `schema_version()` from `#[event(version = N)]` (see es-derive).
#[cfg(feature = "derive")]
#[cfg_attr(docsrs, doc(cfg(feature = "derive")))]
pub use es_derive::DomainEvent;
pub use event::{
    CodecError, Decoded, DomainEvent, EventCodec, Schema, SchemaBuilder, SchemaError, Upcast,
    Upcaster, Upcasters,
};
pub use inbox::Inbox;
pub use leader::{LeaderLock, LeaderRelay, Leadership, LocalLeaderLock};
pub use memory::{
    InMemoryBus, InMemoryCheckpointStore, InMemoryEventStore, InMemoryInbox, InMemorySnapshotStore,
};
pub use metadata::Metadata;
pub use payload::{InvalidPayload, Payload};
pub use position::{ParsePositionError, Position};
pub use projection::{Checkpoint, Projection, ProjectionError};
pub use redact::redact_url;
pub use relay::{Relay, RelayError};
pub use repository::{Committed, Loaded, Repository, RepositoryError, RetryPolicy};
pub use saga::{
    DeadlineScheduler, LocalAggregate, PendingDeadline, Reaction, Received, Saga, SagaError,
    SagaHandler, SagaManager, SagaOutcome,
};
pub use snapshot::{Snapshot, SnapshotPolicy, SnapshotStore};
pub use store::{AppendWriter, BoxError, EventStore, StoreError, StreamAppend};
pub use stream::{ExpectedVersion, InvalidStreamId, StreamId};
/// The stop signal every long-running task of these crates (relays,
/// consumers, the deadline scheduler, projection runners) takes: it stops once
/// the token is cancelled. Re-exported so that no second dependency is needed.
pub use tokio_util::sync::CancellationToken;
pub use trace::{InvalidTraceParent, TraceParent};
pub use unit_of_work::UnitOfWork;

/// Everything an application usually needs, in one `use`.
pub mod prelude {
    pub use crate::{
        Aggregate, Clock, DomainEvent, EventBus, EventStore, ExpectedVersion, Message,
        MessageHandler, Metadata, NewEvent, Outcome, Position, Projection, Reaction, Received,
        RecordedEvent, Refused, Repository, Saga, StreamId, Subscription,
    };
}

/// Compile-time check that the backend traits stay usable as `Arc<dyn _>`.
#[allow(dead_code)]
fn _object_safe(
    _store: std::sync::Arc<dyn EventStore>,
    _snapshots: std::sync::Arc<dyn SnapshotStore>,
    _bus: std::sync::Arc<dyn EventBus>,
    _handler: std::sync::Arc<dyn MessageHandler>,
    _checkpoints: std::sync::Arc<dyn CheckpointStore>,
    _inbox: std::sync::Arc<dyn Inbox>,
    _clock: std::sync::Arc<dyn Clock>,
) {
}
