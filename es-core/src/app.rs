//! An application's composition root: its backends, the command handlers,
//! consumers and sagas it runs on them, the relay that feeds its bus, and
//! one stop for all of it.
//!
//! An [`App`] is built on a store, a bus and a checkpoint store — in memory
//! with [`App::in_memory`], on PostgreSQL and RabbitMQ with the umbrella
//! crate's `es::production::app` — and the wiring code that follows is the
//! same for both:
//!
//! ```
//! # use es_core::doc_support::counter::{Counter, CounterMessage};
//! use es_core::{App, CommandHandler, Message, Metadata};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), es_core::BusError> {
//! let mut app = App::in_memory("counters");
//! let counters = app.repository::<Counter>();
//! app.commands("counters", "counter_commands", CommandHandler::new(counters.clone(), CounterMessage::route))
//!     .await?;
//! app.start();
//! let command = CounterMessage::Increment { counter: "c1".into(), by: 2 };
//! let message = Message::encode("counter_commands", &command, Metadata::new()).unwrap();
//! app.bus().publish(&[message]).await?;
//! # for _ in 0..500 {
//! #     if counters.load("c1").await.unwrap().state.value == 2 { break }
//! #     tokio::time::sleep(std::time::Duration::from_millis(2)).await;
//! # }
//! assert_eq!(counters.load("c1").await.unwrap().state.value, 2);
//! app.stop().await;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;

use crate::relay::{route_without_saga_state, Route};
use crate::{
    Aggregate, BusError, CancellationToken, CheckpointStore, Clock, DeadlineScheduler, DomainEvent,
    EventBus, EventCodec, EventStore, InMemoryBus, InMemoryCheckpointStore, InMemoryEventStore,
    MessageHandler, Relay, RelayError, Repository, Saga, SagaHandler, SagaManager, Schema,
    Subscription, SubscriptionHandle, SystemClock, Upcasters,
};

/// How long a supervised task waits before it runs again after a failure.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

/// How often an [`App`]'s deadline schedulers look at the clock by default.
pub const DEFAULT_DEADLINE_TICK: Duration = Duration::from_millis(250);

/// A relay an [`App`] can run: [`Relay`] in memory, es-rabbit's leader-elected
/// `RabbitRelay` in production. Object-safe.
#[async_trait]
pub trait RunRelay: Send + Sync + 'static {
    /// Relays until `stop` is cancelled or the relay fails.
    async fn run(&self, stop: CancellationToken) -> Result<(), RelayError>;
}

#[async_trait]
impl RunRelay for Relay {
    async fn run(&self, stop: CancellationToken) -> Result<(), RelayError> {
        Self::run(self, stop).await
    }
}

/// What the wiring asks of an [`App`]'s relay, known once every saga and
/// command handler is wired: the route (the sagas' state stays in the store)
/// and the command topics, which must reach a consumer (a message to one of
/// them that no queue takes is an error, not a silent drop).
#[derive(Clone)]
pub struct RelayPlan {
    /// The route, [`route_without_saga_state`] of the app's sagas.
    pub route: Route,
    /// The command topics of the app's command handlers.
    pub mandatory_topics: Vec<String>,
}

impl fmt::Debug for RelayPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayPlan")
            .field("mandatory_topics", &self.mandatory_topics)
            .finish_non_exhaustive()
    }
}

/// Builds an [`App`]'s relay from its [`RelayPlan`].
pub type RelayFactory = Box<dyn FnOnce(RelayPlan) -> Arc<dyn RunRelay> + Send>;

/// An application's composition root (see the [module](self) docs).
///
/// Wire it (repositories, [`commands`](Self::commands),
/// [`saga`](Self::saga), [`consume`](Self::consume),
/// [`supervise`](Self::supervise)), then [`start`](Self::start) its relay,
/// and [`stop`](Self::stop) it all at the end. Consumers start consuming as
/// they are wired, the relay only once started, so no message is published
/// before its queues exist.
pub struct App {
    name: String,
    store: Arc<dyn EventStore>,
    bus: Arc<dyn EventBus>,
    checkpoints: Arc<dyn CheckpointStore>,
    clock: Arc<dyn Clock>,
    schema: Schema,
    relay: Option<RelayFactory>,
    sagas: Vec<&'static str>,
    command_topics: BTreeSet<String>,
    consumers: Vec<SubscriptionHandle>,
    tasks: Vec<JoinHandle<()>>,
    stop: CancellationToken,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("name", &self.name)
            .field("sagas", &self.sagas)
            .field("command_topics", &self.command_topics)
            .field("started", &self.relay.is_none())
            .finish_non_exhaustive()
    }
}

impl App {
    /// An app named `name` (its relay's and schedulers' checkpoints are named
    /// after it) on these backends, with `relay` building its relay.
    pub fn new(
        name: impl Into<String>,
        store: Arc<dyn EventStore>,
        bus: Arc<dyn EventBus>,
        checkpoints: Arc<dyn CheckpointStore>,
        relay: RelayFactory,
    ) -> Self {
        Self {
            name: name.into(),
            store,
            bus,
            checkpoints,
            clock: Arc::new(SystemClock),
            schema: Schema::default(),
            relay: Some(relay),
            sagas: Vec::new(),
            command_topics: BTreeSet::new(),
            consumers: Vec::new(),
            tasks: Vec::new(),
            stop: CancellationToken::new(),
        }
    }

    /// An app on the in-memory store, bus and checkpoints, relayed by a
    /// [`Relay`].
    pub fn in_memory(name: impl Into<String>) -> Self {
        let name = name.into();
        let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        let bus: Arc<dyn EventBus> = Arc::new(InMemoryBus::new());
        let checkpoints: Arc<dyn CheckpointStore> = Arc::new(InMemoryCheckpointStore::default());
        let relay: RelayFactory = {
            let (name, store, bus, checkpoints) = (
                name.clone(),
                Arc::clone(&store),
                Arc::clone(&bus),
                Arc::clone(&checkpoints),
            );
            Box::new(move |plan: RelayPlan| {
                Arc::new(Relay::new(name, store, bus, checkpoints).with_route(plan.route))
                    as Arc<dyn RunRelay>
            })
        };
        Self::new(name, store, bus, checkpoints, relay)
    }

    /// Uses `clock` for the sagas and their deadlines (a
    /// [`ManualClock`](crate::ManualClock) in tests).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Decodes every event and message the app's repositories and sagas
    /// read through `schema` (built, and so checked, at start-up).
    #[must_use]
    pub fn with_schema(mut self, schema: Schema) -> Self {
        self.schema = schema;
        self
    }

    /// The schema the app decodes through.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// A codec for `E` reading through the app's schema: for the projections,
    /// handlers and decisions wired beside the app.
    pub fn codec<E: DomainEvent>(&self) -> EventCodec<E> {
        self.schema.codec()
    }

    /// The app's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The bus.
    pub fn bus(&self) -> &Arc<dyn EventBus> {
        &self.bus
    }

    /// The checkpoint store.
    pub fn checkpoints(&self) -> &Arc<dyn CheckpointStore> {
        &self.checkpoints
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// A token cancelled when the app stops: give it to the tasks spawned
    /// beside the app.
    pub fn stop_signal(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// A repository of `A` on the app's store, decoding through the app's
    /// schema.
    pub fn repository<A: Aggregate>(&self) -> Repository<A> {
        Repository::new(Arc::clone(&self.store)).with_codec(self.codec())
    }

    /// Consumes `subscription` with `handler` until the app stops.
    pub async fn consume(
        &mut self,
        subscription: Subscription,
        handler: Arc<dyn MessageHandler>,
    ) -> Result<(), BusError> {
        let consumer = self.bus.subscribe(subscription, handler).await?;
        self.consumers.push(consumer);
        Ok(())
    }

    /// Consumes every message of `topic` in the group `group` with `handler`
    /// (a [`CommandHandler`](crate::CommandHandler) or a
    /// [`Commands`](crate::Commands)), and makes `topic` mandatory for the
    /// relay.
    pub async fn commands(
        &mut self,
        group: impl Into<String>,
        topic: &str,
        handler: impl MessageHandler + 'static,
    ) -> Result<(), BusError> {
        self.command_topics.insert(topic.to_owned());
        let subscription = Subscription::new(group, [format!("{topic}.*")]);
        self.consume(subscription, Arc::new(handler)).await
    }

    /// Starts wiring the saga `S`, consumed by the group `group`.
    pub fn saga<S: Saga>(&mut self, group: impl Into<String>) -> SagaWiring<'_, S> {
        let manager = SagaManager::new(Arc::clone(&self.store), Arc::clone(&self.clock))
            .with_input_codec(self.codec())
            .with_event_codec(self.codec());
        SagaWiring {
            app: self,
            group: group.into(),
            categories: Vec::new(),
            manager,
            deadline_tick: Some(DEFAULT_DEADLINE_TICK),
        }
    }

    /// Runs `task` until the app stops, again after [`RESTART_DELAY`] each
    /// time it fails (the failure is logged), and not again once it returns
    /// `Ok`.
    pub fn supervise<F, Fut, E>(&mut self, name: &'static str, task: F)
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send,
        E: fmt::Display,
    {
        self.tasks
            .push(supervise(name, self.stop.child_token(), task));
    }

    /// Starts the relay, with the routes and mandatory topics of what is
    /// wired so far. Once only: later calls do nothing.
    pub fn start(&mut self) {
        let Some(factory) = self.relay.take() else {
            return;
        };
        let plan = RelayPlan {
            route: route_without_saga_state(&self.sagas),
            mandatory_topics: self.command_topics.iter().cloned().collect(),
        };
        let relay = factory(plan);
        self.supervise("relay", move |stop| {
            let relay = Arc::clone(&relay);
            async move { relay.run(stop).await }
        });
    }

    /// Stops the relay and every supervised task, then the consumers, and
    /// waits for them. (Dropped instead, the app stops them without
    /// waiting.)
    pub async fn stop(mut self) {
        self.stop.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        for consumer in std::mem::take(&mut self.consumers) {
            consumer.stop().await;
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A saga being wired into an [`App`]: [`App::saga`], then
/// [`start`](Self::start).
///
/// The saga takes the events of the stream categories named by
/// [`inputs_from`](Self::inputs_from) whose types are its input's variants
/// (`<category>.<type>` for each of `S::Input::EVENT_TYPES`, and for each
/// older stored name the app's schema upcasts into them only: a renamed
/// type), in its own consumer group; its deadlines are fired by a
/// [`DeadlineScheduler`] with a checkpoint; its state events stay in the
/// store.
#[must_use = "a saga is wired only once started"]
pub struct SagaWiring<'a, S: Saga> {
    app: &'a mut App,
    group: String,
    categories: Vec<String>,
    manager: SagaManager<S>,
    deadline_tick: Option<Duration>,
}

impl<S: Saga> fmt::Debug for SagaWiring<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaWiring")
            .field("saga", &S::TYPE)
            .field("group", &self.group)
            .field("categories", &self.categories)
            .finish_non_exhaustive()
    }
}

impl<S: Saga> SagaWiring<'_, S> {
    /// Takes inputs from the streams of `category` (an aggregate's
    /// [`TYPE`](Aggregate::TYPE), the topic its events are relayed to).
    pub fn inputs_from(mut self, category: impl Into<String>) -> Self {
        self.categories.push(category.into());
        self
    }

    /// Configures the saga's manager (an instance cache, a local aggregate,
    /// codecs with upcasters).
    pub fn manager(mut self, configure: impl FnOnce(SagaManager<S>) -> SagaManager<S>) -> Self {
        self.manager = configure(self.manager);
        self
    }

    /// Looks at the clock for due deadlines at least every `tick`
    /// ([`DEFAULT_DEADLINE_TICK`] unless set); `None` runs no scheduler,
    /// for a saga that sets no deadlines.
    pub fn deadline_tick(mut self, tick: Option<Duration>) -> Self {
        self.deadline_tick = tick;
        self
    }

    /// Subscribes the saga and starts its deadline scheduler; answers its
    /// manager (to load an instance, or start one by hand).
    ///
    /// # Errors
    ///
    /// [`BusError::InvalidSubscription`] when no category was named or the
    /// input type lists no variant (a hand-written
    /// [`DomainEvent`] without `EVENT_TYPES`), and what the bus answers to
    /// the subscription.
    pub async fn start(self) -> Result<Arc<SagaManager<S>>, BusError> {
        let types = input_types::<S::Input>(self.app.schema.upcasters());
        let bindings: Vec<String> = self
            .categories
            .iter()
            .flat_map(|category| types.iter().map(move |t| format!("{category}.{t}")))
            .collect();
        if bindings.is_empty() {
            return Err(BusError::InvalidSubscription {
                group: self.group,
                reason: format!(
                    "saga {} binds nothing: name its input categories with `inputs_from`, \
                     and derive `DomainEvent` on its input (or list `EVENT_TYPES`)",
                    S::TYPE
                ),
            });
        }
        let manager = Arc::new(self.manager);
        let handler = Arc::new(SagaHandler(Arc::clone(&manager)));
        self.app
            .consume(Subscription::new(self.group, bindings), handler)
            .await?;
        self.app.sagas.push(S::TYPE);
        if let Some(tick) = self.deadline_tick {
            let (checkpoints, name) = (
                Arc::clone(&self.app.checkpoints),
                format!("{}.{}.deadlines", self.app.name, S::TYPE),
            );
            let scheduled = Arc::clone(&manager);
            self.app.supervise("deadline scheduler", move |stop| {
                DeadlineScheduler::new(Arc::clone(&scheduled), tick)
                    .with_checkpoint(Arc::clone(&checkpoints), name.clone())
                    .run(stop)
            });
        }
        Ok(manager)
    }
}

/// The stored type names a saga taking `I` is bound to: `I`'s own, and
/// every older name one of whose upcaster chains ends at one of them (a
/// renamed type, or one split into parts of which one at least is an
/// input), so that its old events still in the log reach the saga. The saga
/// handles the parts that are its inputs and leaves out the others; a name
/// whose chains all end elsewhere, or nowhere (dropped), is not bound.
fn input_types<I: DomainEvent>(upcasters: &Upcasters) -> Vec<String> {
    let renamed = upcasters.older_names(|ends| {
        ends.iter()
            .any(|(t, _)| I::EVENT_TYPES.contains(&t.as_str()))
    });
    let mut types: Vec<String> = I::EVENT_TYPES.iter().map(|t| (*t).to_owned()).collect();
    types.extend(
        renamed
            .into_iter()
            .filter(|name| !I::EVENT_TYPES.contains(&name.as_str())),
    );
    types
}

/// Spawns `task` and runs it until `stop` is cancelled, again after
/// [`RESTART_DELAY`] each time it fails (logged as a warning with `name`),
/// and not again once it returns `Ok`.
pub fn supervise<F, Fut, E>(
    name: &'static str,
    stop: CancellationToken,
    mut task: F,
) -> JoinHandle<()>
where
    F: FnMut(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: fmt::Display,
{
    tokio::spawn(async move {
        loop {
            match task(stop.clone()).await {
                Ok(()) => return,
                Err(error) => tracing::warn!(task = name, %error, "failed; restarting"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RESTART_DELAY) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_supervised_task_runs_again_after_a_failure_and_not_after_success() {
        tokio::time::pause();
        let runs = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&runs);
        let task = supervise("flaky", CancellationToken::new(), move |_stop| {
            let run = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if run < 2 {
                    Err("not yet")
                } else {
                    Ok(())
                }
            }
        });
        task.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    /// A saga is bound to its input's names and to the older names that
    /// read as one of them at least (a rename, a split with an input among
    /// its parts); not to a name split into other events only, nor to a
    /// dropped one.
    #[test]
    fn a_saga_is_bound_to_the_old_names_upcast_into_its_inputs() {
        use crate::doc_support::reminder::ReminderInput;
        use crate::Upcaster;
        let upcasters = Upcasters::new()
            .with(Upcaster::new("Begun", 1, Ok).renamed_to("Started"))
            .and_then(|u| {
                u.with(Upcaster::split(
                    "Paused",
                    1,
                    [("Stopped", 1), ("Other", 1)],
                    |_| Ok(Vec::new()),
                ))
            })
            .and_then(|u| {
                u.with(Upcaster::split("Archived", 1, [("Other", 1)], |_| {
                    Ok(Vec::new())
                }))
            })
            .and_then(|u| u.with(Upcaster::drop("Noise", 1)))
            .unwrap();
        assert_eq!(
            input_types::<ReminderInput>(&upcasters),
            ["Started", "Stopped", "Begun", "Paused"]
        );
    }

    #[tokio::test]
    async fn a_supervised_task_is_not_restarted_once_stopped() {
        tokio::time::pause();
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&runs);
        let task = supervise("failing", stop.clone(), move |_stop| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err("always") }
        });
        tokio::task::yield_now().await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
