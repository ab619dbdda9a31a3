#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod error;
mod group;
pub mod lock;
mod schema;
mod store;
mod stores;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use config::PgConfig;
pub use error::{PgError, Result};
pub use group::{DEFAULT_MAX_GROUP, DEFAULT_MAX_IN_FLIGHT, MAX_GROUP_LIMIT};
pub use lock::{LeaderGuard, LeaderLock};
pub use schema::{migrate, MAX_SCHEMA_LEN};
pub use store::{Holdback, PgEventStore, DEFAULT_MAX_BATCH};
pub use stores::{PgCheckpointStore, PgInbox, PgSnapshotStore};

/// Re-exported so callers use the same sqlx as this crate.
pub use sqlx;
