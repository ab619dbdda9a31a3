//! A bank on es: accounts (open, deposit, withdraw, send), a transfer saga
//! that credits the receiver and refunds the sender when the credit is
//! refused, and a balances projection. The same wiring runs on the embedded
//! backends (`cargo run -p bank`) or on PostgreSQL and RabbitMQ
//! (`cargo run -p bank -- --postgres URL --rabbit URL`).
//!
//! A transfer: the sender's `Send` writes `Sent`, in the conversation of the
//! transfer's id; the saga sends `Credit` to the account service, whose
//! `Deposited` (or, for a frozen account, its `CommandRefused` record) comes
//! back to the saga by that conversation; a refusal makes it send `Refund`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use es::prelude::*;
use es::projections::{spawn_in_memory, ProjectionHandle};
use es::relay::route_without_saga_state;
use es::{BusError, EventCodec, ProjectionError, RepositoryError, SubscriptionHandle};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The topic of the saga's commands to the accounts.
const ACCOUNT_COMMANDS: &str = "account_commands";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
enum AccountEvent {
    Opened { frozen: bool },
    Deposited { amount: i64 },
    Withdrawn { amount: i64 },
    Sent { from: Uuid, to: Uuid, amount: i64 },
    Refunded { amount: i64 },
}

#[derive(Clone, Debug)]
enum AccountCommand {
    Open { frozen: bool },
    Deposit { amount: i64 },
    Withdraw { amount: i64 },
    Send { from: Uuid, to: Uuid, amount: i64 },
    Refund { amount: i64 },
}

/// Why an account refuses a command.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// Opened twice.
    #[error("the account is open already")]
    AlreadyOpen,
    /// Never opened.
    #[error("no such account")]
    NotOpen,
    /// A zero or negative amount.
    #[error("amounts are positive")]
    Invalid,
    /// A frozen account takes no deposits.
    #[error("the account is frozen")]
    Frozen,
    /// The balance is too small.
    #[error("not enough money")]
    Insufficient,
}

#[derive(Debug, Default)]
struct Account {
    open: bool,
    frozen: bool,
    balance: i64,
}

impl Aggregate for Account {
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = AccountError;
    const TYPE: &'static str = "account";

    fn apply(&mut self, event: &AccountEvent) {
        self.balance += balance_change(event);
        if let AccountEvent::Opened { frozen } = event {
            (self.open, self.frozen) = (true, *frozen);
        }
    }

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        use {AccountCommand as C, AccountError as Refused, AccountEvent as E};
        Ok(vec![match command {
            C::Open { .. } if self.open => return Err(Refused::AlreadyOpen),
            C::Open { frozen } => E::Opened { frozen },
            _ if !self.open => return Err(Refused::NotOpen),
            C::Deposit { amount }
            | C::Withdraw { amount }
            | C::Send { amount, .. }
            | C::Refund { amount }
                if amount <= 0 =>
            {
                return Err(Refused::Invalid)
            }
            C::Deposit { .. } if self.frozen => return Err(Refused::Frozen),
            C::Deposit { amount } => E::Deposited { amount },
            C::Refund { amount } => E::Refunded { amount },
            C::Withdraw { amount } | C::Send { amount, .. } if amount > self.balance => {
                return Err(Refused::Insufficient)
            }
            C::Withdraw { amount } => E::Withdrawn { amount },
            C::Send { from, to, amount } => E::Sent { from, to, amount },
        }])
    }
}

fn balance_change(event: &AccountEvent) -> i64 {
    match event {
        AccountEvent::Opened { .. } => 0,
        AccountEvent::Deposited { amount } | AccountEvent::Refunded { amount } => *amount,
        AccountEvent::Withdrawn { amount } | AccountEvent::Sent { amount, .. } => -amount,
    }
}

/// A transfer's saga, whose events are the states it moves to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
enum Transfer {
    #[default]
    Unknown,
    Crediting {
        from: Uuid,
        amount: i64,
    },
    Completed,
    Refunding,
    Refunded,
}

/// What the saga takes: accounts' events (and refusals) in its conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
enum TransferInput {
    Sent { from: Uuid, to: Uuid, amount: i64 },
    Deposited { amount: i64 },
    Refunded { amount: i64 },
    CommandRefused(CommandRefused),
}

/// What the saga asks of accounts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
enum TransferCommand {
    Credit { account: Uuid, amount: i64 },
    Refund { account: Uuid, amount: i64 },
}

impl TransferCommand {
    /// The account it is for, and what it means to it (every command is
    /// for an account: always `Some`).
    fn route(self) -> Option<(Uuid, AccountCommand)> {
        Some(match self {
            Self::Credit { account, amount } => (account, AccountCommand::Deposit { amount }),
            Self::Refund { account, amount } => (account, AccountCommand::Refund { amount }),
        })
    }
}

impl Saga for Transfer {
    type Event = Self;
    type Input = TransferInput;
    type Command = TransferCommand;
    const TYPE: &'static str = "transfer";

    fn apply(&mut self, event: &Self) {
        event.clone_into(self);
    }

    fn react(&self, input: &TransferInput, _: DateTime<Utc>) -> Reaction<Self, TransferCommand> {
        use TransferInput as I;
        match (self, input) {
            (Self::Unknown, &I::Sent { from, to, amount }) => Reaction::none()
                .event(Self::Crediting { from, amount })
                .send(
                    ACCOUNT_COMMANDS,
                    TransferCommand::Credit {
                        account: to,
                        amount,
                    },
                ),
            (Self::Crediting { .. }, I::Deposited { .. }) => {
                Reaction::none().event(Self::Completed)
            }
            (&Self::Crediting { from, amount }, I::CommandRefused(_)) => {
                Reaction::none().event(Self::Refunding).send(
                    ACCOUNT_COMMANDS,
                    TransferCommand::Refund {
                        account: from,
                        amount,
                    },
                )
            }
            (Self::Refunding, I::Refunded { .. }) => Reaction::none().event(Self::Refunded),
            _ => Reaction::none(),
        }
    }
}

/// The balances read model: per account, the sum of its money movements.
#[derive(Debug, Default)]
struct Balances(Mutex<HashMap<String, i64>>);

impl Projection for Balances {
    type Tx = ();

    fn name(&self) -> &str {
        "balances"
    }

    fn accepts(&self, event_type: &str) -> bool {
        AccountEvent::EVENT_TYPES.contains(&event_type)
    }

    async fn apply(&self, (): &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
        if event.stream_id.category() != Account::TYPE {
            return Ok(());
        }
        let decoded = EventCodec::<AccountEvent>::new().decode(event);
        let change = balance_change(&decoded.map_err(|e| ProjectionError::InvalidEvent {
            projection: self.name().to_owned(),
            event_id: event.event_id,
            position: event.position,
            reason: e.to_string(),
        })?);
        let mut balances = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *balances
            .entry(event.stream_id.entity_id().to_owned())
            .or_default() += change;
        Ok(())
    }
}

/// Why the bank could not start, or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An account refused, or its store failed.
    #[error(transparent)]
    Account(#[from] RepositoryError<AccountError>),
    /// The saga's store failed.
    #[error(transparent)]
    Saga(#[from] es::SagaError),
    /// The bus refused a subscription.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// PostgreSQL could not be reached or migrated.
    #[error(transparent)]
    Postgres(#[from] es::postgres::Error),
    /// RabbitMQ could not be reached.
    #[error(transparent)]
    Rabbit(#[from] es::rabbit::Error),
    /// The read model did not catch up.
    #[error(transparent)]
    Projection(#[from] es::projections::Error),
}

/// A running bank: accounts, the transfer saga, the balances.
#[derive(Debug)]
pub struct Bank {
    accounts: Repository<Account>,
    saga: Arc<SagaManager<Transfer>>,
    balances: Arc<Balances>,
    projection: ProjectionHandle,
    stop: CancellationToken,
    _consumers: [SubscriptionHandle; 2],
}

impl Bank {
    /// The bank on the in-memory store and bus.
    pub async fn embedded() -> Result<Self, Error> {
        let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        let bus = InMemoryBus::new();
        let checkpoints = Arc::new(InMemoryCheckpointStore::default());
        let relay = Relay::new(
            "bank",
            Arc::clone(&store),
            Arc::new(bus.clone()),
            checkpoints,
        )
        .with_route(route_without_saga_state(&[Transfer::TYPE]));
        Self::start(store, &bus, |stop| async move { relay.run(stop).await }).await
    }

    /// The bank on PostgreSQL (schema `namespace`, migrated) and RabbitMQ
    /// (exchanges and queues prefixed `namespace.`).
    pub async fn production(
        postgres: &str,
        rabbit: RabbitConfig,
        namespace: &str,
    ) -> Result<Self, Error> {
        let store = es::postgres::PgConfig::from_url(postgres)?
            .schema(namespace)
            .event_store()
            .await?;
        let bus = RabbitBus::connect(rabbit.with_prefix(format!("{namespace}."))).await?;
        let relay = es::production::relay(namespace, &store, &bus)
            .with_route(route_without_saga_state(&[Transfer::TYPE]))
            .with_mandatory_topics([ACCOUNT_COMMANDS]);
        Self::start(Arc::new(store), &bus, |stop| async move {
            relay.run(stop).await
        })
        .await
    }

    /// Subscribes the saga and the account service, then starts the relay
    /// and the projection.
    async fn start<F>(
        store: Arc<dyn EventStore>,
        bus: &dyn EventBus,
        relay: impl FnOnce(CancellationToken) -> F,
    ) -> Result<Self, Error>
    where
        F: std::future::Future<Output = Result<(), es::RelayError>> + Send + 'static,
    {
        let accounts = Repository::<Account>::new(Arc::clone(&store));
        let saga = Arc::new(SagaManager::<Transfer>::new(
            Arc::clone(&store),
            Arc::new(SystemClock),
        ));
        let inputs = TransferInput::EVENT_TYPES
            .iter()
            .map(|t| format!("{}.{t}", Account::TYPE));
        let account_service = CommandHandler::new(accounts.clone(), TransferCommand::route);
        let consumers = [
            bus.subscribe(
                Subscription::new("transfers", inputs),
                Arc::new(SagaHandler(Arc::clone(&saga))),
            )
            .await?,
            bus.subscribe(
                Subscription::new("accounts", [format!("{ACCOUNT_COMMANDS}.*")]),
                Arc::new(account_service),
            )
            .await?,
        ];
        let stop = CancellationToken::new();
        let relay = relay(stop.clone());
        tokio::spawn(async move {
            if let Err(error) = relay.await {
                tracing::error!(%error, "the relay stopped");
            }
        });
        let balances = Arc::new(Balances::default());
        let projection = spawn_in_memory(Arc::clone(&store), Arc::clone(&balances));
        Ok(Self {
            accounts,
            saga,
            balances,
            projection,
            stop,
            _consumers: consumers,
        })
    }

    async fn execute(
        &self,
        account: Uuid,
        command: AccountCommand,
        correlation: Uuid,
    ) -> Result<(), Error> {
        let metadata = Metadata::new().with_correlation_id(correlation);
        self.accounts.execute(account, command, &metadata).await?;
        Ok(())
    }

    /// Opens an account; a frozen one takes no deposits.
    pub async fn open(&self, frozen: bool) -> Result<Uuid, Error> {
        let account = Uuid::now_v7();
        self.execute(account, AccountCommand::Open { frozen }, account)
            .await?;
        Ok(account)
    }

    /// Deposits `amount` (in cents).
    pub async fn deposit(&self, account: Uuid, amount: i64) -> Result<(), Error> {
        self.execute(account, AccountCommand::Deposit { amount }, Uuid::now_v7())
            .await
    }

    /// Withdraws `amount` (in cents).
    pub async fn withdraw(&self, account: Uuid, amount: i64) -> Result<(), Error> {
        self.execute(account, AccountCommand::Withdraw { amount }, Uuid::now_v7())
            .await
    }

    /// Sends `amount` from `from` to `to`; answers the transfer's id, which
    /// names its conversation and its saga.
    pub async fn transfer(&self, from: Uuid, to: Uuid, amount: i64) -> Result<Uuid, Error> {
        let transfer = Uuid::now_v7();
        self.execute(from, AccountCommand::Send { from, to, amount }, transfer)
            .await?;
        Ok(transfer)
    }

    /// Waits until the transfer is done: true when the money moved, false
    /// when the sender was refunded.
    pub async fn settled(&self, transfer: Uuid) -> Result<bool, Error> {
        loop {
            match self.saga.load(transfer).await?.state {
                Transfer::Completed => return Ok(true),
                Transfer::Refunded => return Ok(false),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// An account's balance in the read model, once it has caught up with
    /// everything written so far.
    pub async fn balance(&self, account: Uuid) -> Result<i64, Error> {
        let head = self
            .accounts
            .store()
            .head()
            .await
            .map_err(RepositoryError::Store)?;
        self.projection
            .wait_for(head, Duration::from_secs(30))
            .await?;
        let balances = self
            .balances
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(balances
            .get(&account.to_string())
            .copied()
            .unwrap_or_default())
    }

    /// Stops the relay and the projection, then the consumers.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.projection.stop().await;
    }
}
