//! The command handler that executes command messages on a repository.

use std::fmt;

use async_trait::async_trait;

use super::outcome_of;
use crate::bus::{Delivery, MessageHandler, Outcome};
use crate::{Aggregate, DomainEvent, EventCodec, Repository};

/// A [`MessageHandler`] that executes command messages on a
/// [`Repository`]: it decodes each message as an `M` (what cannot be decoded
/// is dead-lettered), maps it with `route` to the aggregate's id and its
/// domain command (`None`: not a command this handler takes, dead-lettered),
/// and executes that once per message id
/// ([`Repository::execute_once`]) with the metadata
/// `message.metadata.caused_by(message.message_id)`. The bus outcome is
/// [`outcome_of`]'s.
///
/// A command the aggregate refuses writes no event. So that the sender
/// still learns of it, the handler records the refusal in the aggregate's
/// stream as a [`CommandRefused`](super::CommandRefused) record (see there), which the relay
/// publishes as a `CommandRefused` message on the aggregate's topic and a
/// saga can take as an input. Turn that off with
/// [`record_refusals(false)`](Self::record_refusals).
///
/// ```
/// # use es_core::doc_support::counter::{Counter, CounterMessage};
/// use std::sync::Arc;
/// use es_core::command::CommandHandler;
/// use es_core::{Delivery, InMemoryEventStore, Message, MessageHandler, Metadata, Outcome, Repository};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let counters = Repository::<Counter>::new(Arc::new(InMemoryEventStore::new()));
/// let handler = CommandHandler::new(counters.clone(), CounterMessage::route);
/// let command = CounterMessage::Increment { counter: "c1".into(), by: 2 };
/// let message = Message::encode("counter_commands", &command, Metadata::new()).unwrap();
/// let delivery = Delivery { message, attempt: 1 };
/// assert_eq!(handler.handle(&delivery).await, Outcome::Ack);
/// // Delivered again: nothing changes twice.
/// assert_eq!(handler.handle(&delivery).await, Outcome::Ack);
/// assert_eq!(counters.load("c1").await.unwrap().state.value, 2);
/// # }
/// ```
pub struct CommandHandler<A: Aggregate, M, F> {
    repository: Repository<A>,
    codec: EventCodec<M>,
    route: F,
    record_refusals: bool,
}

impl<A: Aggregate, M, F> fmt::Debug for CommandHandler<A, M, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandHandler")
            .field("repository", &self.repository)
            .field("record_refusals", &self.record_refusals)
            .finish_non_exhaustive()
    }
}

impl<A, M, F, Id> CommandHandler<A, M, F>
where
    A: Aggregate,
    M: DomainEvent,
    F: Fn(M) -> Option<(Id, A::Command)> + Send + Sync + 'static,
    Id: fmt::Display,
{
    /// A handler executing on `repository` the domain command `route` maps
    /// each command message to, on the aggregate it names.
    pub fn new(repository: Repository<A>, route: F) -> Self {
        Self {
            repository,
            codec: EventCodec::new(),
            route,
            record_refusals: true,
        }
    }

    /// Decodes command messages through this codec (and its upcasters).
    #[must_use]
    pub fn with_codec(mut self, codec: EventCodec<M>) -> Self {
        self.codec = codec;
        self
    }

    /// Whether refusals are recorded as [`CommandRefused`](super::CommandRefused) records (on by
    /// default). Off, a refusal is only logged.
    #[must_use]
    pub fn record_refusals(mut self, record: bool) -> Self {
        self.record_refusals = record;
        self
    }

    /// The repository.
    pub fn repository(&self) -> &Repository<A> {
        &self.repository
    }
}

#[async_trait]
impl<A, M, F, Id> MessageHandler for CommandHandler<A, M, F>
where
    A: Aggregate,
    A::Command: Clone + Send + Sync,
    M: DomainEvent,
    F: Fn(M) -> Option<(Id, A::Command)> + Send + Sync + 'static,
    Id: fmt::Display,
{
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let m = &delivery.message;
        let message = match super::decode(&self.codec, m) {
            Ok(message) => message,
            Err(outcome) => return outcome,
        };
        let (id, command) = match (self.route)(message) {
            Some((id, command)) => (id.to_string(), command),
            None => {
                return Outcome::dead_letter(format_args!(
                    "{} is not a command for {}",
                    m.message_type,
                    A::TYPE
                ))
            }
        };
        let metadata = m.metadata.caused_by(m.message_id);
        let result = self
            .repository
            .execute_once(&id, m.message_id, command, &metadata)
            .await;
        if self.record_refusals {
            super::recorded_outcome(&self.repository, &id, m, &metadata, result).await
        } else {
            outcome_of(result, A::TYPE)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::command::{CommandRefused, COMMAND_REFUSED};
    use crate::doc_support::counter::{Counter, CounterCommand, CounterMessage};
    use crate::relay::default_route;
    use crate::{derived_id, EventStore, InMemoryEventStore, Message, Metadata, StreamId};

    fn setup() -> (Arc<InMemoryEventStore>, Repository<Counter>) {
        let store = Arc::new(InMemoryEventStore::new());
        let repository = Repository::<Counter>::new(Arc::clone(&store) as _).with_state_cache(16);
        (store, repository)
    }

    fn delivery(by: u32) -> Delivery {
        let command = CounterMessage::Increment {
            counter: "c1".into(),
            by,
        };
        let metadata = Metadata::new().with_correlation_id(uuid::Uuid::now_v7());
        let message = Message::encode("counter_commands", &command, metadata).unwrap();
        Delivery {
            message,
            attempt: 1,
        }
    }

    async fn stream(store: &InMemoryEventStore) -> Vec<crate::RecordedEvent> {
        store
            .read_stream(&StreamId::new("counter-c1").unwrap(), 1, 100)
            .await
            .unwrap()
    }

    /// A refused command leaves one refusal record, with the id its first
    /// event would have had; delivered again, it is a duplicate; the
    /// aggregate loads past it; the relay publishes it as a
    /// `CommandRefused` message in the command's conversation.
    #[tokio::test]
    async fn a_refusal_is_recorded_once_and_relayed() {
        let (store, counters) = setup();
        let handler = CommandHandler::new(counters.clone(), CounterMessage::route);
        let refused = delivery(0);
        assert_eq!(handler.handle(&refused).await, Outcome::Ack);
        assert_eq!(handler.handle(&refused).await, Outcome::Ack);
        let records = stream(&store).await;
        assert_eq!(records.len(), 1);
        let record = &records[0];
        assert_eq!(&*record.event_type, COMMAND_REFUSED);
        let id = refused.message.message_id;
        assert_eq!(record.event_id, derived_id(id, "counter-c1", 0));
        assert_eq!(record.metadata.causation_id, Some(id));

        let message = default_route(record).unwrap();
        assert_eq!(message.routing_key(), CommandRefused::binding("counter"));
        assert_eq!(
            message.metadata.correlation_id,
            refused.message.metadata.correlation_id
        );
        let body: CommandRefused = message.payload.decode().unwrap();
        assert_eq!(body.reason, "cannot increment by zero");
        assert_eq!(
            body.command::<CounterMessage>().unwrap(),
            CounterMessage::Increment {
                counter: "c1".into(),
                by: 0
            }
        );

        // The aggregate loads past the record, and takes commands after it,
        // from its cache too.
        assert_eq!(handler.handle(&delivery(2)).await, Outcome::Ack);
        assert_eq!(handler.handle(&delivery(3)).await, Outcome::Ack);
        let loaded = counters.load("c1").await.unwrap();
        assert_eq!((loaded.state.value, loaded.version), (5, 3));
    }

    /// A command whose events are stored has no refusal recorded after it.
    #[tokio::test]
    async fn a_command_executed_is_never_also_refused() {
        let (store, counters) = setup();
        let id = uuid::Uuid::now_v7();
        counters
            .execute_once(
                "c1",
                id,
                CounterCommand::Increment { by: 1 },
                &Metadata::new(),
            )
            .await
            .unwrap();
        let refused = CommandRefused {
            command_type: "Increment".into(),
            schema_version: 1,
            command: crate::Payload::from_json("{}").unwrap(),
            reason: "late".into(),
        };
        let recorded = counters
            .record_refusal("c1", id, &refused, &Metadata::new())
            .await
            .unwrap();
        assert!(!recorded);
        assert_eq!(stream(&store).await.len(), 1);
    }

    /// Without refusal records a refusal writes nothing; a message that is
    /// not a command of the handler's type is dead-lettered.
    #[tokio::test]
    async fn refusals_can_go_unrecorded_and_strangers_are_dead_letters() {
        let (store, counters) = setup();
        let handler = CommandHandler::new(counters, CounterMessage::route).record_refusals(false);
        assert_eq!(handler.handle(&delivery(0)).await, Outcome::Ack);
        assert!(stream(&store).await.is_empty());
        let mut stranger = delivery(1);
        stranger.message.message_type = "Decrement".into();
        assert!(matches!(
            handler.handle(&stranger).await,
            Outcome::DeadLetter { .. }
        ));
    }
}
