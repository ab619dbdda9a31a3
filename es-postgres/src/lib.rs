#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod checkpoint;
mod config;
mod error;
mod group_commit;
mod inbox;
pub mod lock;
mod schema;
mod snapshot;
mod sqlstate;
mod store;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use checkpoint::PgCheckpointStore;
pub use config::PgConfig;
pub use error::{Error, Result};
pub use group_commit::{DEFAULT_MAX_GROUP, DEFAULT_MAX_IN_FLIGHT, MAX_GROUP_LIMIT};
pub use inbox::PgInbox;
pub use lock::{PgLeaderLock, PgLeadership};
pub use schema::{migrate, MAX_SCHEMA_LEN};
pub use snapshot::PgSnapshotStore;
pub use store::{Holdback, NotifyStats, PgEventStore, DEFAULT_MAX_BATCH};

/// Re-exported so callers use the same sqlx as this crate.
pub use sqlx;
