//! A bank on es: accounts (open, deposit, withdraw, send), a transfer saga
//! that credits the receiver and refunds the sender when the credit is
//! refused, and a balances projection. The same wiring runs on the embedded
//! backends (`cargo run -p bank`) or on PostgreSQL and RabbitMQ
//! (`cargo run -p bank -- --postgres URL --rabbit URL`).
//!
//! A transfer: the sender's `Send` writes `Sent`, in the conversation of the
//! transfer's id; the saga, which learns the sender from the stream `Sent`
//! was appended to, sends `Credit` to the account service, whose `Deposited`
//! (or, for a frozen account, its `CommandRefused` record) comes back to the
//! saga by that conversation; a refusal makes it send `Refund`.

use std::{collections::HashMap, sync::Arc, sync::Mutex, sync::PoisonError, time::Duration};

use es::prelude::*;
use es::projections::{spawn_in_memory, ProjectionHandle};
use es::{projection::decode, ProjectionError, RepositoryError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The topic of the saga's commands to the accounts.
const ACCOUNT_COMMANDS: &str = "account_commands";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
enum AccountEvent {
    Opened { frozen: bool },
    Deposited { amount: i64 },
    Withdrawn { amount: i64 },
    Sent { to: Uuid, amount: i64 },
    Refunded { amount: i64 },
}

/// What an account's owner (or the saga) asks of it; amounts in cents.
#[derive(Clone, Debug)]
#[allow(missing_docs)]
pub enum AccountCommand {
    Open { frozen: bool },
    Deposit { amount: i64 },
    Withdraw { amount: i64 },
    Send { to: Uuid, amount: i64 },
    Refund { amount: i64 },
}

/// What an account command answers: its value, or why the account refused
/// it (or its store failed).
pub type AccountResult<T> = Result<T, RepositoryError<AccountError>>;

/// Why an account refuses a command.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)] // the messages say it
pub enum AccountError {
    #[error("the account is open already")]
    AlreadyOpen,
    #[error("no such account")]
    NotOpen,
    #[error("amounts are positive")]
    Invalid,
    #[error("a frozen account takes no deposits")]
    Frozen,
    #[error("not enough money")]
    Insufficient,
}

#[derive(Debug, Default)]
struct Account {
    /// Whether it takes no deposits; `None` until it is opened.
    frozen: Option<bool>,
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
            self.frozen = Some(*frozen);
        }
    }

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        use {AccountCommand as C, AccountError as Refused, AccountEvent as E};
        let (event, amount) = match command {
            C::Open { .. } if self.frozen.is_some() => return Err(Refused::AlreadyOpen),
            C::Open { frozen } => return Ok(vec![E::Opened { frozen }]),
            _ if self.frozen.is_none() => return Err(Refused::NotOpen),
            C::Deposit { .. } if self.frozen == Some(true) => return Err(Refused::Frozen),
            C::Deposit { amount } => (E::Deposited { amount }, amount),
            C::Refund { amount } => (E::Refunded { amount }, amount),
            C::Withdraw { amount } => (E::Withdrawn { amount }, amount),
            C::Send { to, amount } => (E::Sent { to, amount }, amount),
        };
        if amount <= 0 {
            return Err(Refused::Invalid);
        }
        if self.balance + balance_change(&event) < 0 {
            return Err(Refused::Insufficient);
        }
        Ok(vec![event])
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
    Sent { to: Uuid, amount: i64 },
    Deposited { amount: i64 },
    Refunded { amount: i64 },
    CommandRefused(CommandRefused),
}

/// What the saga asks of accounts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
enum TransferCommand {
    Credit { to: Uuid, amount: i64 },
    Refund { to: Uuid, amount: i64 },
}

impl Saga for Transfer {
    type Event = Self;
    type Input = TransferInput;
    type Command = TransferCommand;
    const TYPE: &'static str = "transfer";

    fn apply(&mut self, event: &Self) {
        event.clone_into(self);
    }

    fn react(&self, input: &TransferInput, received: Received) -> Reaction<Self, TransferCommand> {
        use {TransferCommand as C, TransferInput as I};
        let next = |state| Reaction::none().event(state);
        // Every input is an account's event: the sender is the stream of `Sent`.
        let account = received.source.and_then(|s| s.entity_id().parse().ok());
        match (self, input, account) {
            (Self::Unknown, &I::Sent { to, amount }, Some(from)) => {
                next(Self::Crediting { from, amount })
                    .send(ACCOUNT_COMMANDS, C::Credit { to, amount })
            }
            (Self::Crediting { .. }, I::Deposited { .. }, _) => next(Self::Completed),
            (&Self::Crediting { from, amount }, I::CommandRefused(_), _) => {
                next(Self::Refunding).send(ACCOUNT_COMMANDS, C::Refund { to: from, amount })
            }
            (Self::Refunding, I::Refunded { .. }, _) => next(Self::Refunded),
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
        if event.stream_id.category() == Account::TYPE {
            let change = balance_change(&decode(self.name(), event)?);
            let mut balances = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            *balances
                .entry(event.stream_id.entity_id().to_owned())
                .or_default() += change;
        }
        Ok(())
    }
}

/// A running bank: accounts, the transfer saga, the balances.
#[derive(Debug)]
pub struct Bank {
    app: App,
    accounts: Repository<Account>,
    transfers: Arc<SagaManager<Transfer>>,
    balances: Arc<Balances>,
    projection: ProjectionHandle,
}

impl Bank {
    /// The bank on `app`'s backends: `App::in_memory("bank")`, or
    /// PostgreSQL and RabbitMQ by [`es::production::connect`]. Wires the
    /// account service and the saga, then starts the relay and the projection.
    pub async fn start(mut app: App) -> Result<Self, es::BusError> {
        let accounts = app.repository::<Account>();
        // Every command of the saga is for an account: the one it names.
        let service = CommandHandler::new(accounts.clone(), |command| {
            Some(match command {
                TransferCommand::Credit { to, amount } => (to, AccountCommand::Deposit { amount }),
                TransferCommand::Refund { to, amount } => (to, AccountCommand::Refund { amount }),
            })
        });
        app.commands("accounts", ACCOUNT_COMMANDS, service).await?;
        let transfers = app.saga::<Transfer>("transfers").inputs_from(Account::TYPE);
        let transfers = transfers.start().await?;
        app.start();
        let balances = Arc::new(Balances::default());
        let projection = spawn_in_memory(Arc::clone(app.store()), Arc::clone(&balances));
        Ok(Self {
            app,
            accounts,
            transfers,
            balances,
            projection,
        })
    }

    /// Executes `command` on `account`; answers the id of the conversation
    /// it starts (for a `Send`, the transfer's: see [`settled`](Self::settled)).
    pub async fn execute(&self, account: Uuid, command: AccountCommand) -> AccountResult<Uuid> {
        let conversation = Uuid::now_v7();
        let metadata = Metadata::new().with_correlation_id(conversation);
        self.accounts.execute(account, command, &metadata).await?;
        Ok(conversation)
    }

    /// Waits until the transfer is done: true when the money moved, false
    /// when the sender was refunded.
    pub async fn settled(&self, transfer: Uuid) -> Result<bool, es::SagaError> {
        loop {
            match self.transfers.load(transfer).await?.state {
                Transfer::Completed => return Ok(true),
                Transfer::Refunded => return Ok(false),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// An account's balance in the read model, once it has caught up with
    /// everything written so far.
    pub async fn balance(&self, account: Uuid) -> Result<i64, es::projections::Error> {
        self.projection.catch_up(Duration::from_secs(30)).await?;
        let balances = self.balances.0.lock();
        let balances = balances.unwrap_or_else(PoisonError::into_inner);
        Ok(balances.get(&account.to_string()).copied().unwrap_or(0))
    }

    /// Stops the projection, the relay and the consumers.
    pub async fn stop(self) {
        let _ = self.projection.stop().await;
        self.app.stop().await;
    }
}
