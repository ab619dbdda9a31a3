//! The whole pipeline, assembled the same way on any [`Backend`]: accounts
//! written through a repository, the store's log relayed to the bus, the
//! transfer saga and the account service consuming it, and the balances
//! projection following the log.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use es_core::{
    CancellationToken, Delivery, EventBus, EventCodec, EventStore, MessageHandler, Metadata,
    Outcome, Repository, RepositoryError, RetryPolicy, SagaHandler, SagaManager, Subscription,
    SubscriptionHandle, SystemClock,
};
use es_projections::ProjectionHandle;
use futures::StreamExt;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::balances::{self, Balances};
use crate::bank::{
    Account, AccountCommand, AccountEvent, Transfer, TransferInput, TransferStatus, ACCOUNTS_GROUP,
    ACCOUNT_COMMANDS, SAGA_GROUP,
};
use crate::eventually;

/// How a consumer that dies before its ack looks to the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// The handler never returns: the broker gets the message back when the
    /// consumer's connection goes.
    Hang,
    /// The message comes back for another attempt (an in-process bus has no
    /// connection to lose: this is what a broker would do).
    Redeliver,
}

/// What a pipeline is built on: the store, the bus, the relay, and the
/// projection's runner, with the means to break each of them.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// What the backends are, for failure messages.
    fn name(&self) -> &'static str;
    /// The event store.
    fn store(&self) -> Arc<dyn EventStore>;
    /// The bus the consumers subscribe on.
    fn consumer_bus(&self) -> Arc<dyn EventBus>;
    /// What a consumer that dies before its ack does on this bus.
    fn crash(&self) -> Crash;
    /// The consumer groups' settings.
    fn subscription(&self, group: &str, bindings: &[&str]) -> Subscription {
        Subscription::new(group, bindings.iter().copied())
            .with_prefetch(16)
            .with_max_attempts(100)
            .with_retry_delay(Duration::from_millis(20))
    }
    /// Declares the groups, so that nothing relayed before the consumers
    /// start is lost.
    async fn declare(&self, subscriptions: &[Subscription]) {
        let bus = self.consumer_bus();
        for subscription in subscriptions {
            bus.declare(subscription)
                .await
                .unwrap_or_else(|e| panic!("declaring {}: {e}", subscription.group));
        }
    }
    /// Starts a relay from its stored checkpoint.
    fn spawn_relay(&self, stop: CancellationToken) -> JoinHandle<()>;
    /// Starts the projection's runner (from its checkpoint, or from the start
    /// with an empty model when the model is not durable).
    async fn spawn_projection(&self) -> ProjectionHandle;
    /// The read model as it stands.
    async fn read_model(&self) -> Balances;
    /// Messages waiting in a group's queue (0 when the bus cannot tell).
    async fn queue_depth(&self, group: &str) -> u64;
    /// Messages a group set aside as dead letters.
    async fn dead_letters(&self, group: &str) -> u64;
    /// Drops the consumers' broker connection (consumers reconnect).
    async fn drop_consumer_connection(&self);
    /// Drops the publishing broker connection (the relay reconnects).
    async fn drop_publisher_connection(&self);
    /// Cuts the projection's database connections; returns how many.
    async fn cut_projection_connections(&self) -> u64;
    /// Removes what the backend created (schemas, queues).
    async fn cleanup(&self, subscriptions: &[Subscription]);
}

/// The switches of the faults injected in the handlers.
#[derive(Debug, Default)]
pub struct Faults {
    /// Percentage (by message id) of deliveries handled twice in a row.
    pub duplicate_percent: AtomicU32,
    /// While on, consumers die: before their handler commits, or after it
    /// committed and before the ack.
    pub crashing: AtomicBool,
    /// Deliveries handled a second time.
    pub duplicated: AtomicU64,
    /// Deliveries whose consumer died before the ack.
    pub crashed: AtomicU64,
}

impl Faults {
    fn duplicates(&self, id: Uuid) -> bool {
        let percent = self.duplicate_percent.load(Ordering::SeqCst);
        percent > 0 && u32::from(id.as_bytes()[15]) * 100 / 256 < percent
    }
}

/// A handler with the faults of [`Faults`] around it.
struct Faulty {
    inner: Arc<dyn MessageHandler>,
    faults: Arc<Faults>,
    crash: Crash,
}

impl Faulty {
    /// The consumer dies here: nothing more is done, nothing is acked.
    async fn die(&self) -> Outcome {
        self.faults.crashed.fetch_add(1, Ordering::SeqCst);
        match self.crash {
            Crash::Hang => std::future::pending().await,
            Crash::Redeliver => Outcome::retry("the consumer died before its ack"),
        }
    }
}

#[async_trait]
impl MessageHandler for Faulty {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let id = delivery.message.message_id;
        // While crashing, half the deliveries (by id) die before the
        // handler commits, half after it committed and before the ack.
        let crashing = self.faults.crashing.load(Ordering::SeqCst);
        if crashing && id.as_bytes()[14].is_multiple_of(2) {
            return self.die().await;
        }
        let mut outcome = self.inner.handle(delivery).await;
        if outcome == Outcome::Ack && self.faults.duplicates(id) {
            self.faults.duplicated.fetch_add(1, Ordering::SeqCst);
            outcome = self.inner.handle(delivery).await;
        }
        if outcome == Outcome::Ack && self.faults.crashing.load(Ordering::SeqCst) {
            return self.die().await;
        }
        outcome
    }
}

/// The account service: executes the saga's commands, once per message.
struct AccountService {
    accounts: Repository<Account>,
}

#[async_trait]
impl MessageHandler for AccountService {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let m = &delivery.message;
        let command = match EventCodec::<AccountCommand>::new().decode_parts(
            &m.message_type,
            m.schema_version,
            &m.payload,
        ) {
            Ok(command) => command,
            Err(e) => return Outcome::dead_letter(e),
        };
        let Some(account) = command.account() else {
            return Outcome::dead_letter("not a command the bus carries");
        };
        let metadata = m.metadata.caused_by(m.message_id);
        match self
            .accounts
            .execute_once(account, m.message_id, command, &metadata)
            .await
        {
            Ok(_) => Outcome::Ack,
            Err(e @ (RepositoryError::Rejected(_) | RepositoryError::Codec(_))) => {
                Outcome::dead_letter(e)
            }
            Err(e) => Outcome::retry(e),
        }
    }
}

/// One account of a workload.
#[derive(Clone, Debug)]
pub struct AccountSpec {
    /// Its id.
    pub id: Uuid,
    /// The first deposit.
    pub initial: i64,
    /// Whether it refuses credits.
    pub frozen: bool,
}

/// One transfer of a workload.
#[derive(Clone, Debug)]
pub struct TransferSpec {
    /// Its id.
    pub id: Uuid,
    /// Index of the account debited.
    pub from: usize,
    /// Index of the account credited.
    pub to: usize,
    /// How much.
    pub amount: i64,
}

/// Accounts and the transfers among them.
#[derive(Clone, Debug)]
pub struct Workload {
    /// The accounts.
    pub accounts: Vec<AccountSpec>,
    /// The transfers.
    pub transfers: Vec<TransferSpec>,
}

impl Workload {
    /// `transfers` random transfers among `accounts` accounts of 1,000 each,
    /// the first `frozen` of which refuse credits; amounts up to 600, so that
    /// some debits are refused too.
    pub fn random(seed: u64, accounts: usize, frozen: usize, transfers: usize) -> Self {
        assert!(accounts >= 2 && frozen < accounts);
        let mut rng = fastrand::Rng::with_seed(seed);
        let accounts: Vec<AccountSpec> = (0..accounts)
            .map(|i| AccountSpec {
                id: Uuid::new_v4(),
                initial: 1_000,
                frozen: i < frozen,
            })
            .collect();
        let n = accounts.len();
        let transfers = (0..transfers)
            .map(|_| {
                let from = rng.usize(0..n);
                let to = (from + rng.usize(1..n)) % n;
                TransferSpec {
                    id: Uuid::new_v4(),
                    from,
                    to,
                    amount: rng.i64(1..=600),
                }
            })
            .collect();
        Self {
            accounts,
            transfers,
        }
    }
}

/// How the transfers of a run ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Debited and credited.
    pub completed: usize,
    /// Credit refused and refunded.
    pub compensated: usize,
    /// Debit refused.
    pub refused: usize,
}

/// The running pipeline.
pub struct Pipeline {
    backend: Arc<dyn Backend>,
    /// The store.
    pub store: Arc<dyn EventStore>,
    /// The accounts, as their owners' commands reach them.
    pub accounts: Repository<Account>,
    /// The transfer saga.
    pub saga: Arc<SagaManager<Transfer>>,
    /// The handlers' fault switches.
    pub faults: Arc<Faults>,
    subscriptions: Vec<Subscription>,
    relay: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
    consumers: tokio::sync::Mutex<Vec<SubscriptionHandle>>,
    projection: tokio::sync::Mutex<Option<ProjectionHandle>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("backend", &self.backend.name())
            .finish_non_exhaustive()
    }
}

/// The longest any wait of the suite waits: it turns a hang into a failure.
pub const PATIENCE: Duration = Duration::from_secs(60);

fn repository(store: Arc<dyn EventStore>) -> Repository<Account> {
    Repository::new(store).with_retry(RetryPolicy {
        max_attempts: 200,
        base_delay: Duration::from_micros(200),
        max_delay: Duration::from_millis(20),
    })
}

impl Pipeline {
    /// Declares the groups and starts the consumers, the relay and the
    /// projection on `backend`.
    pub async fn start(backend: Arc<dyn Backend>) -> Self {
        let store = backend.store();
        let subscriptions = vec![
            backend.subscription(SAGA_GROUP, &TransferInput::BINDINGS),
            backend.subscription(ACCOUNTS_GROUP, &[&format!("{ACCOUNT_COMMANDS}.*")]),
        ];
        backend.declare(&subscriptions).await;
        let pipeline = Self {
            accounts: repository(Arc::clone(&store)),
            saga: Arc::new(SagaManager::new(Arc::clone(&store), Arc::new(SystemClock))),
            faults: Arc::new(Faults::default()),
            store,
            subscriptions,
            relay: Mutex::new(None),
            consumers: tokio::sync::Mutex::new(Vec::new()),
            projection: tokio::sync::Mutex::new(None),
            backend,
        };
        pipeline.start_consumers().await;
        pipeline.start_relay();
        pipeline.restart_projection().await;
        pipeline
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Starts the saga's and the account service's consumers.
    pub async fn start_consumers(&self) {
        let bus = self.backend.consumer_bus();
        let crash = self.backend.crash();
        let handlers: [Arc<dyn MessageHandler>; 2] = [
            Arc::new(SagaHandler(Arc::clone(&self.saga))),
            Arc::new(AccountService {
                accounts: repository(Arc::clone(&self.store)),
            }),
        ];
        let mut consumers = self.consumers.lock().await;
        for (subscription, inner) in self.subscriptions.iter().zip(handlers) {
            let handler = Arc::new(Faulty {
                inner,
                faults: Arc::clone(&self.faults),
                crash,
            });
            let handle = bus
                .subscribe(subscription.clone(), handler)
                .await
                .unwrap_or_else(|e| panic!("subscribing {}: {e}", subscription.group));
            consumers.push(handle);
        }
    }

    /// Kills the consumers: deliveries from now on die before or after
    /// their handler's commit, never acked; once `crashes` of them did (or
    /// `within` passed), the consumers are dropped and their connection cut.
    /// Returns how many died.
    pub async fn kill_consumers(&self, crashes: u64, within: Duration) -> u64 {
        let before = self.faults.crashed.load(Ordering::SeqCst);
        self.faults.crashing.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + within;
        while self.faults.crashed.load(Ordering::SeqCst) - before < crashes
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let handles = std::mem::take(&mut *self.consumers.lock().await);
        drop(handles);
        self.backend.drop_consumer_connection().await;
        self.faults.crashing.store(false, Ordering::SeqCst);
        self.faults.crashed.load(Ordering::SeqCst) - before
    }

    /// Starts the relay.
    pub fn start_relay(&self) {
        let stop = CancellationToken::new();
        let task = self.backend.spawn_relay(stop.clone());
        *self.relay.lock().unwrap_or_else(PoisonError::into_inner) = Some((stop, task));
    }

    /// Aborts the relay's task where it stands (as a crash would).
    pub async fn kill_relay(&self) {
        let running = self
            .relay
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let (_, task) = running.expect("the relay runs");
        assert!(
            !task.is_finished(),
            "the relay stopped before it was killed"
        );
        task.abort();
        match task.await {
            Err(e) if e.is_cancelled() => {}
            Err(e) => std::panic::resume_unwind(e.into_panic()),
            Ok(()) => panic!("the relay stopped by itself"),
        }
    }

    /// Stops the projection's runner, if running, and starts it again.
    pub async fn restart_projection(&self) {
        let mut projection = self.projection.lock().await;
        if let Some(running) = projection.take() {
            let _ = running.stop().await;
        }
        *projection = Some(self.backend.spawn_projection().await);
    }

    /// Opens the workload's accounts.
    pub async fn open(&self, workload: &Workload) {
        for account in &workload.accounts {
            self.accounts
                .execute_once(
                    account.id,
                    account.id,
                    AccountCommand::Open {
                        initial: account.initial,
                        frozen: account.frozen,
                    },
                    &Metadata::new(),
                )
                .await
                .unwrap_or_else(|e| panic!("opening {}: {e}", account.id));
        }
    }

    /// Asks for one transfer (its owner's command on the debited account).
    pub async fn request(&self, workload: &Workload, transfer: &TransferSpec) {
        let from = workload.accounts[transfer.from].id;
        let command = AccountCommand::RequestTransfer {
            transfer_id: transfer.id,
            from,
            to: workload.accounts[transfer.to].id,
            amount: transfer.amount,
        };
        let metadata = Metadata::new().with_correlation_id(transfer.id);
        self.accounts
            .execute_once(from, transfer.id, command, &metadata)
            .await
            .unwrap_or_else(|e| panic!("requesting transfer {}: {e}", transfer.id));
    }

    /// Waits until every transfer of `workload` has finished, the queues are
    /// empty and the projection has caught up with the log.
    pub async fn settle(&self, workload: &Workload) {
        let mut pending: Vec<Uuid> = workload.transfers.iter().map(|t| t.id).collect();
        let start = tokio::time::Instant::now();
        let mut rounds = 0u32;
        while !pending.is_empty() {
            rounds += 1;
            if rounds.is_multiple_of(20) {
                // A dead letter never finishes its transfer: say so now.
                self.assert_no_dead_letters().await;
            }
            let mut still = Vec::new();
            for id in pending {
                let instance = self
                    .saga
                    .load(id)
                    .await
                    .unwrap_or_else(|e| panic!("loading saga {id}: {e}"));
                if !instance.state.status.is_finished() {
                    still.push((id, instance.state.status));
                }
            }
            assert!(
                start.elapsed() < PATIENCE,
                "{} transfers unfinished on {} after {PATIENCE:?}, e.g. {:?}",
                still.len(),
                self.backend.name(),
                &still[..still.len().min(5)]
            );
            pending = still.into_iter().map(|(id, _)| id).collect();
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        for group in [SAGA_GROUP, ACCOUNTS_GROUP] {
            let backend = &self.backend;
            eventually(
                &format!("{group}'s queue drained"),
                PATIENCE,
                || async move { backend.queue_depth(group).await == 0 },
            )
            .await;
        }
        let head = self
            .store
            .head()
            .await
            .unwrap_or_else(|e| panic!("head: {e}"));
        let projection = self.projection.lock().await;
        let projection = projection.as_ref().expect("the projection runs");
        projection
            .wait_for(head, PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("projection on {}: {e}", self.backend.name()));
    }

    /// Checks every invariant of a settled run; panics with the first one
    /// broken.
    pub async fn check(&self, workload: &Workload) -> Summary {
        let backend = self.backend.name();
        let log = balances::read_log(&self.store).await;
        let codec = EventCodec::<AccountEvent>::new();
        // Per transfer: the account events that name it, with their stream.
        let mut effects: BTreeMap<Uuid, Vec<(String, AccountEvent)>> = BTreeMap::new();
        for event in log.iter().filter(|e| e.stream_id.category() == "account") {
            let decoded = codec
                .decode(event)
                .unwrap_or_else(|e| panic!("decoding {}: {e}", event.event_id));
            let transfer = match &decoded {
                AccountEvent::Opened { .. } => continue,
                AccountEvent::TransferRequested { transfer_id, .. }
                | AccountEvent::Debited { transfer_id, .. }
                | AccountEvent::DebitRefused { transfer_id }
                | AccountEvent::Credited { transfer_id, .. }
                | AccountEvent::CreditRefused { transfer_id }
                | AccountEvent::Refunded { transfer_id, .. } => *transfer_id,
            };
            effects
                .entry(transfer)
                .or_default()
                .push((event.stream_id.entity_id().to_owned(), decoded));
        }
        let mut expected: BTreeMap<Uuid, i64> = workload
            .accounts
            .iter()
            .map(|a| (a.id, a.initial))
            .collect();
        let mut summary = Summary::default();
        for t in &workload.transfers {
            let from = workload.accounts[t.from].id.to_string();
            let to = workload.accounts[t.to].id.to_string();
            let status = self
                .saga
                .load(t.id)
                .await
                .unwrap_or_else(|e| panic!("loading saga {}: {e}", t.id))
                .state
                .status;
            let seen: Vec<(String, &'static str)> = effects
                .get(&t.id)
                .map(|v| {
                    v.iter()
                        .map(|(stream, e)| (stream.clone(), es_core::DomainEvent::event_type(e)))
                        .collect()
                })
                .unwrap_or_default();
            let mut want = vec![(from.clone(), "TransferRequested")];
            match status {
                TransferStatus::Completed => {
                    summary.completed += 1;
                    want.push((from.clone(), "Debited"));
                    want.push((to.clone(), "Credited"));
                    *expected
                        .get_mut(&workload.accounts[t.from].id)
                        .expect("account") -= t.amount;
                    *expected
                        .get_mut(&workload.accounts[t.to].id)
                        .expect("account") += t.amount;
                }
                TransferStatus::Compensated => {
                    summary.compensated += 1;
                    want.push((from.clone(), "Debited"));
                    want.push((to.clone(), "CreditRefused"));
                    want.push((from.clone(), "Refunded"));
                }
                TransferStatus::Refused => {
                    summary.refused += 1;
                    want.push((from.clone(), "DebitRefused"));
                }
                other => panic!("transfer {} is {other:?} on {backend}", t.id),
            }
            // Each effect once: exactly these events, in this order (each
            // step waits for the one before).
            assert_eq!(
                seen, want,
                "transfer {} ({status:?}) on {backend}: the log holds other effects",
                t.id
            );
        }
        assert_eq!(
            effects.len(),
            workload.transfers.len(),
            "effects of transfers never asked for on {backend}"
        );
        let folded = balances::fold(&log);
        let total: i64 = folded.values().map(|(b, _)| b).sum();
        let initial: i64 = workload.accounts.iter().map(|a| a.initial).sum();
        assert_eq!(total, initial, "money not conserved on {backend}");
        for account in &workload.accounts {
            let stream = format!("account-{}", account.id);
            let (balance, _) = folded[&stream];
            assert_eq!(
                balance, expected[&account.id],
                "{stream} on {backend}: the balance is not what the completed transfers make it"
            );
            assert!(balance >= 0, "{stream} overdrawn on {backend}: {balance}");
        }
        let model = self.backend.read_model().await;
        assert_eq!(
            model, folded,
            "the read model on {backend} is not the fold of the log"
        );
        let projection = self.projection.lock().await;
        let parked = projection.as_ref().map_or(0, |p| p.dead_letters().len());
        assert_eq!(parked, 0, "the projection on {backend} parked events");
        self.assert_no_dead_letters().await;
        summary
    }

    async fn assert_no_dead_letters(&self) {
        for group in [SAGA_GROUP, ACCOUNTS_GROUP] {
            assert_eq!(
                self.backend.dead_letters(group).await,
                0,
                "{group} dead-lettered messages on {}",
                self.backend.name()
            );
        }
    }

    /// Stops everything and removes what the backend created.
    pub async fn shutdown(self) {
        let running = self
            .relay
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((stop, task)) = running {
            stop.cancel();
            if let Err(e) = task.await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        for handle in std::mem::take(&mut *self.consumers.lock().await) {
            handle.stop().await;
        }
        if let Some(projection) = self.projection.lock().await.take() {
            let _ = projection.stop().await;
        }
        self.backend.cleanup(&self.subscriptions).await;
    }
}

/// Runs `workload` on `backend` and checks every invariant: the one test
/// body every backend and every fault goes through. The transfers are asked
/// for in four waves; `disrupt` runs after each of the first three, while
/// the sagas of the wave before are under way. Then the run settles and is
/// checked.
pub async fn exercise<F, Fut>(
    backend: Arc<dyn Backend>,
    workload: &Workload,
    mut disrupt: F,
) -> Summary
where
    F: FnMut(Arc<Pipeline>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let pipeline = Arc::new(Pipeline::start(backend).await);
    pipeline.open(workload).await;
    let wave = workload.transfers.len().div_ceil(4).max(1);
    let waves: Vec<_> = workload.transfers.chunks(wave).collect();
    for (i, transfers) in waves.iter().enumerate() {
        futures::stream::iter(transfers.iter())
            .for_each_concurrent(32, |t| pipeline.request(workload, t))
            .await;
        if i + 1 < waves.len() {
            disrupt(Arc::clone(&pipeline)).await;
        }
    }
    pipeline.settle(workload).await;
    let summary = pipeline.check(workload).await;
    let pipeline = Arc::into_inner(pipeline).expect("the disruption let go of the pipeline");
    pipeline.shutdown().await;
    summary
}
