#![doc = include_str!("../README.md")]

pub mod demo;
pub mod distributed;
mod error;
pub mod http;
pub mod inventory;
pub mod load;
pub mod messages;
pub mod money;
pub mod notification;
pub mod order;
pub mod payment;
pub mod query;
pub mod saga;
pub mod system;
pub mod telemetry;

pub use error::{Error, Result};
pub use money::Money;
pub use system::{Backends, Config, System};

use es_core::{Outcome, RepositoryError};

/// How many recently used aggregate states each repository, and saga
/// instances the saga manager, keeps in memory (`with_state_cache`,
/// `with_instance_cache`): a command then reads only the events appended
/// since, not the whole stream. Another instance of a service writing the
/// same streams is seen in that tail, so caching is safe when scaled out.
pub const CACHED_STATES: usize = 10_000;

/// The bus outcome of a command executed on an aggregate: done or refused by
/// the domain is an ack (a refusal is logged: the saga learns the state from
/// the events); contention and store failures are retried; a payload that
/// cannot be decoded is dead-lettered.
pub(crate) fn outcome_of<T, E: std::error::Error + 'static>(
    result: std::result::Result<T, RepositoryError<E>>,
    service: &'static str,
) -> Outcome {
    match result {
        Ok(_) => Outcome::Ack,
        Err(RepositoryError::Rejected(reason)) => {
            tracing::info!(service, %reason, "command refused by the domain");
            Outcome::Ack
        }
        Err(e @ RepositoryError::Codec(_)) => Outcome::dead_letter(e),
        Err(e) => Outcome::retry(e),
    }
}
