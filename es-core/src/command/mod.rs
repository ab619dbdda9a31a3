//! Commands from the bus: decoding a command message, executing it as caused
//! by that message, and answering the bus.
//!
//! A service that takes commands from the bus must do three things for each
//! message, and the adapters here do them once for every service:
//!
//! - execute with `message.metadata.caused_by(message.message_id)`, so the
//!   events it writes carry the conversation's correlation id and name the
//!   message as their cause (a saga finds its instance by them);
//! - execute with the message id as command id
//!   ([`Repository::execute_once`](crate::Repository::execute_once)), so a
//!   redelivered or resent message changes nothing twice;
//! - answer the bus by what happened ([`outcome_of`]): done or refused by the
//!   domain is an ack, a failure that may pass is retried, one that fails
//!   the same way every time is dead-lettered.
//!
//! [`CommandHandler`] does all of it on a [`Repository`],
//! given a function from the command message to the aggregate's id and
//! domain command; it also records refusals ([`CommandRefused`]), so that a
//! saga learns of a command its aggregate refused. A service that does more
//! than execute one command implements [`CommandService`] and is fed by
//! [`Commands`]; it records its refusals with [`refusal_outcome`] (or
//! answers a repository's result with [`recorded_outcome`]).
//!
//! ```
//! # use es_core::doc_support::counter::{Counter, CounterMessage};
//! use std::sync::Arc;
//! use es_core::command::CommandHandler;
//! use es_core::{InMemoryEventStore, MessageHandler, Repository};
//!
//! let counters = Repository::<Counter>::new(Arc::new(InMemoryEventStore::new()));
//! // A `CounterMessage` names its counter and means one `CounterCommand`.
//! let handler = CommandHandler::new(counters, CounterMessage::route);
//! let _: Arc<dyn MessageHandler> = Arc::new(handler);
//! ```

mod handler;
mod refused;
mod service;

pub use handler::CommandHandler;
pub use refused::{CommandRefused, COMMAND_REFUSED};
pub use service::{CommandService, Commands};

use std::fmt;

use crate::bus::{Message, Outcome};
use crate::{Aggregate, Metadata, Repository, RepositoryError};

/// The bus outcome of a command executed on an aggregate: done or refused by
/// the domain is an ack (a refusal is logged at info, its reason escaped);
/// contention and store failures that may pass are retried; what fails the
/// same way every time (an event that cannot be encoded, a write the store
/// refuses as such) is dead-lettered at once.
///
/// `service` names the service in the refusal's log line.
pub fn outcome_of<T, E: std::error::Error + 'static>(
    result: Result<T, RepositoryError<E>>,
    service: &'static str,
) -> Outcome {
    match result {
        Ok(_) => Outcome::Ack,
        Err(RepositoryError::Rejected(reason)) => {
            log_refusal(service, &reason);
            Outcome::Ack
        }
        Err(e) if e.is_retryable() => Outcome::retry(e),
        Err(e) => Outcome::dead_letter(e),
    }
}

/// The bus outcome of a command `message` that aggregate `id` of
/// `repository` refused for `reason`: the refusal is logged and recorded in
/// the aggregate's stream as a [`CommandRefused`] record (once per message
/// id), which the relay's default route publishes as
/// `<category>.CommandRefused` in the command's conversation, so that the
/// saga that sent it learns of it. Recorded, the message is acked; a store
/// failure is retried when it may pass, else dead-lettered.
///
/// `metadata` is what the command's events would have carried: the
/// message's, caused by it.
pub async fn refusal_outcome<A: Aggregate>(
    repository: &Repository<A>,
    id: impl fmt::Display,
    message: &Message,
    metadata: &Metadata,
    reason: &A::Error,
) -> Outcome {
    log_refusal(A::TYPE, reason);
    let refused = CommandRefused::of(message, reason);
    match repository
        .record_refusal(id, message.message_id, &refused, metadata)
        .await
    {
        Ok(_) => Outcome::Ack,
        Err(e) if e.is_deterministic() => Outcome::dead_letter(e),
        Err(e) => Outcome::retry(e),
    }
}

/// [`outcome_of`] for a command executed on aggregate `id` of `repository`,
/// except that a refusal is recorded ([`refusal_outcome`]) rather than only
/// logged.
pub async fn recorded_outcome<A: Aggregate, T>(
    repository: &Repository<A>,
    id: impl fmt::Display,
    message: &Message,
    metadata: &Metadata,
    result: Result<T, RepositoryError<A::Error>>,
) -> Outcome {
    match result {
        Err(RepositoryError::Rejected(reason)) => {
            refusal_outcome(repository, id, message, metadata, &reason).await
        }
        result => outcome_of(result, A::TYPE),
    }
}

/// Decodes a command message through `codec`; what cannot be decoded is
/// answered with a dead letter (it fails the same way on every delivery),
/// and a command an upcaster dropped with an ack.
fn decode<M: crate::DomainEvent>(
    codec: &crate::EventCodec<M>,
    message: &crate::Message,
) -> Result<M, Outcome> {
    match codec.decode_one(
        &message.message_type,
        message.schema_version,
        &message.payload,
    ) {
        Ok(Some(command)) => Ok(command),
        Ok(None) => {
            tracing::debug!(message_type = %message.message_type, "command dropped by an upcaster");
            Err(Outcome::Ack)
        }
        Err(error) => Err(Outcome::dead_letter(error)),
    }
}

/// Logs a refusal at info. The reason is escaped (`Debug`), never spliced
/// raw: it may carry text a client or a stored event chose.
fn log_refusal(service: &'static str, reason: &dyn std::fmt::Display) {
    tracing::info!(service, reason = ?reason.to_string(), "command refused by the domain");
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use crate::{Outcome, RepositoryError};

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
