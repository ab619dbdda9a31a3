#![doc = include_str!("../README.md")]

pub mod auth;
mod backends;
pub mod demo;
pub mod distributed;
mod error;
pub mod http;
pub mod inventory;
pub mod messages;
pub mod money;
mod node;
mod notification;
pub mod order;
pub mod payment;
pub mod query;
pub mod saga;
pub mod schema;
pub mod system;
pub mod telemetry;
mod topology;
mod validate;

pub use backends::Backends;
pub use error::{Error, Result};
pub use money::Money;
pub use node::{Node, Service};
pub use system::{Config, System};

use std::sync::Arc;
use std::time::Duration;

use es_core::{Aggregate, EventStore, Repository, RetryPolicy};

/// How many recently used aggregate states each repository, and saga
/// instances the saga manager, keeps in memory (`with_state_cache`,
/// `with_instance_cache`): a command or reaction on a cached one is decided
/// without reading and appended expecting the cached version. Another
/// instance of a service writing the same streams makes that append fail, and
/// the command is decided again on the tail, so caching is safe when scaled
/// out.
pub(crate) const CACHED_STATES: usize = 10_000;

/// A repository as every service of both deployments uses it: the state cache
/// of [`CACHED_STATES`] and a retry policy for hot aggregates (a popular
/// product is raced for by many orders at once: many quick, short retries),
/// decoding through the event schema.
pub(crate) fn repository<A: Aggregate>(
    store: Arc<dyn EventStore>,
    schema: &es_core::Schema,
) -> Repository<A> {
    Repository::new(store)
        .with_codec(schema.codec())
        .with_retry(RetryPolicy {
            max_attempts: 64,
            base_delay: Duration::from_micros(200),
            max_delay: Duration::from_millis(20),
        })
        .with_state_cache(CACHED_STATES)
}
