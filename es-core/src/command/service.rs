//! Services that take commands from the bus, and the handler that feeds one.

use std::sync::Arc;

use async_trait::async_trait;

use crate::bus::{Delivery, Message, MessageHandler, Outcome};
use crate::{DomainEvent, EventCodec, Metadata};

/// A service that takes commands from the bus and does more than execute
/// each on one aggregate (for that, [`CommandHandler`](super::CommandHandler)
/// is enough). [`Commands`] feeds it.
#[async_trait]
pub trait CommandService: Send + Sync + 'static {
    /// The commands it takes.
    type Command: DomainEvent;

    /// The codec [`Commands`] decodes its command messages through. Without
    /// upcasters by default; a service whose command types have old
    /// versions answers one reading through the app's schema
    /// ([`App::codec`](crate::App::codec)), so that an old-shape command
    /// still on the bus is upcast, and one an upcaster drops is acked.
    fn codec(&self) -> EventCodec<Self::Command> {
        EventCodec::new()
    }

    /// Executes `command`, carried by `message`. The events it writes carry
    /// `metadata`: the message's conversation, caused by the message. Use
    /// `message.message_id` as the command id
    /// ([`Repository::execute_once`](crate::Repository::execute_once)) and
    /// [`outcome_of`](super::outcome_of) for the answer.
    async fn execute(
        &self,
        command: Self::Command,
        message: &Message,
        metadata: &Metadata,
    ) -> Outcome;
}

/// Feeds a [`CommandService`] from the bus: decodes each message through the
/// service's [`codec`](CommandService::codec) (what cannot be decoded is
/// dead-lettered, what an upcaster dropped acked) and executes it, caused by
/// the message.
#[derive(Debug)]
pub struct Commands<S>(pub Arc<S>);

#[async_trait]
impl<S: CommandService> MessageHandler for Commands<S> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let m = &delivery.message;
        match super::decode(&self.0.codec(), m) {
            Ok(command) => {
                let metadata = m.metadata.caused_by(m.message_id);
                self.0.execute(command, m, &metadata).await
            }
            Err(outcome) => outcome,
        }
    }
}
