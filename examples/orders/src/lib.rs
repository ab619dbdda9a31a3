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

use es_core::{
    Aggregate, Delivery, DomainEvent, EventCodec, EventStore, Message, MessageHandler, Metadata,
    Outcome, Repository, RepositoryError, RetryPolicy,
};

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
/// product is raced for by many orders at once: many quick, short retries).
pub(crate) fn repository<A: Aggregate>(store: Arc<dyn EventStore>) -> Repository<A> {
    Repository::new(store)
        .with_retry(RetryPolicy {
            max_attempts: 64,
            base_delay: Duration::from_micros(200),
            max_delay: Duration::from_millis(20),
        })
        .with_state_cache(CACHED_STATES)
}

/// A service that takes commands from the bus.
#[async_trait::async_trait]
pub(crate) trait CommandService: Send + Sync + 'static {
    /// The commands it takes.
    type Command: DomainEvent;
    /// Executes `command`, carried by `message`. The events it writes carry
    /// `metadata`: the message's conversation, caused by the message.
    async fn execute(
        &self,
        command: Self::Command,
        message: &Message,
        metadata: &Metadata,
    ) -> Outcome;
}

/// Feeds a `CommandService` from the bus: decodes each message through the
/// command type's codec (what cannot be decoded is dead-lettered) and
/// executes it, caused by the message.
#[derive(Debug)]
pub struct Commands<S>(pub Arc<S>);

#[async_trait::async_trait]
impl<S: CommandService> MessageHandler for Commands<S> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let m = &delivery.message;
        match EventCodec::<S::Command>::new().decode_parts(
            &m.message_type,
            m.schema_version,
            &m.payload,
        ) {
            Ok(command) => {
                let metadata = m.metadata.caused_by(m.message_id);
                self.0.execute(command, m, &metadata).await
            }
            Err(e) => Outcome::dead_letter(e),
        }
    }
}

/// The bus outcome of a command executed on an aggregate: done or refused by
/// the domain is an ack (a refusal is logged: the saga learns the state from
/// the events); contention and store failures that may pass are retried;
/// what fails the same way every time (an event that cannot be encoded, a
/// write the store refuses as such) is dead-lettered at once.
pub(crate) fn outcome_of<T, E: std::error::Error + 'static>(
    result: std::result::Result<T, RepositoryError<E>>,
    service: &'static str,
) -> Outcome {
    match result {
        Ok(_) => Outcome::Ack,
        Err(RepositoryError::Rejected(reason)) => {
            // Escaped (Debug), never spliced raw: the reason may carry
            // text a client or a stored event chose.
            tracing::info!(service, reason = ?reason.to_string(), "command refused by the domain");
            Outcome::Ack
        }
        Err(e) if e.is_retryable() => Outcome::retry(e),
        Err(e) => Outcome::dead_letter(e),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use es_core::{Outcome, RepositoryError};

    /// A writer into a shared buffer, for a test's log lines.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Refusal(String);

    /// A refusal whose reason carries a line break and a terminal escape is
    /// logged as one line, the reason escaped: no forged line, no colour.
    #[test]
    fn a_refusal_reason_cannot_forge_a_log_line() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let hostile = "gone\n2026-01-01T00:00:00Z  INFO orders: payment approved \u{1b}[31m";
        let outcome = tracing::subscriber::with_default(subscriber, || {
            super::outcome_of::<(), _>(
                Err(RepositoryError::Rejected(Refusal(hostile.to_owned()))),
                "order",
            )
        });
        assert_eq!(outcome, Outcome::Ack);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains(r"gone\n2026"), "{text}");
    }
}
