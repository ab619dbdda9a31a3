//! The record of a command its aggregate refused.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::Message;
use crate::{CodecError, DomainEvent, EventCodec, Payload, RecordedEvent};

/// The stored type of a [`CommandRefused`] record.
pub const COMMAND_REFUSED: &str = "$command-refused";

/// A command message its aggregate refused, as recorded in the aggregate's
/// stream by [`CommandHandler`](super::CommandHandler) (or any service, with
/// [`Repository::record_refusal`](crate::Repository::record_refusal)).
///
/// A refusal writes no event, so without this record a saga that sent the
/// command would never learn of it and could not compensate. The record:
///
/// - is stored as [`COMMAND_REFUSED`] in the refused aggregate's stream,
///   with the id its first event would have had (derived from the message
///   id): a redelivered message is answered as a duplicate, and the message
///   has one outcome, executed or refused, never both;
/// - is skipped by the repository when it loads the aggregate, but not by
///   projections: one that takes every event of the aggregate's category
///   names the types it takes ([`Projection::accepts`](crate::Projection::accepts));
/// - is published by the relay ([`default_route`](crate::relay::default_route))
///   as a message of type [`CommandRefused::MESSAGE_TYPE`] on the aggregate's
///   topic (its stream category), caused by the command message and in its
///   conversation (same correlation id).
///
/// A saga takes it as an input with a variant of that name holding this
/// struct, and binds `<aggregate type>.CommandRefused`
/// ([`CommandRefused::binding`]); [`CommandRefused::command`] gives the
/// refused command back, to find the saga instance and decide.
///
/// ```
/// use es_core::command::CommandRefused;
/// use es_core::DomainEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// enum TransferInput {
///     Debited { transfer_id: uuid::Uuid },
///     CommandRefused(CommandRefused),
/// }
///
/// impl DomainEvent for TransferInput {
///     fn event_type(&self) -> &'static str {
///         match self {
///             Self::Debited { .. } => "Debited",
///             Self::CommandRefused(_) => CommandRefused::MESSAGE_TYPE,
///         }
///     }
/// }
/// assert_eq!(CommandRefused::binding("account"), "account.CommandRefused");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRefused {
    /// The refused command's type name.
    pub command_type: String,
    /// Its schema version.
    pub schema_version: u32,
    /// Its payload.
    pub command: Payload,
    /// Why the aggregate refused it (its error's text).
    pub reason: String,
}

impl CommandRefused {
    /// The type of the message the relay publishes for a refusal.
    pub const MESSAGE_TYPE: &'static str = "CommandRefused";

    /// The refusal of the command `message` carries, for `reason`.
    pub fn of(message: &Message, reason: &dyn fmt::Display) -> Self {
        Self {
            command_type: message.message_type.to_string(),
            schema_version: message.schema_version,
            command: message.payload.clone(),
            reason: reason.to_string(),
        }
    }

    /// The refused command, decoded as a `C`.
    ///
    /// # Errors
    /// When it is not a `C` (another type, or a payload that does not fit).
    pub fn command<C: DomainEvent>(&self) -> Result<C, CodecError> {
        EventCodec::<C>::new().decode_parts(&self.command_type, self.schema_version, &self.command)
    }

    /// The routing key refusals of commands to the aggregate type (topic)
    /// `topic` are published under: `<topic>.CommandRefused`.
    pub fn binding(topic: &str) -> String {
        format!("{topic}.{}", Self::MESSAGE_TYPE)
    }

    /// The message the relay publishes for a stored refusal record: the
    /// record's payload as a [`MESSAGE_TYPE`](Self::MESSAGE_TYPE) message on
    /// the stream's category, with the record's id and metadata.
    pub fn message_from(recorded: &RecordedEvent) -> Message {
        let mut message = Message::from_event(recorded.stream_id.category(), recorded);
        message.message_type = Arc::from(Self::MESSAGE_TYPE);
        message
    }
}
