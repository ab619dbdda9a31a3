//! The suite's own domain: bank accounts, and a transfer saga that debits one
//! account, credits another, and refunds the first when the credit is refused.
//!
//! Every command on an account records its outcome as an event (a refusal
//! too), so a command handled twice is recognised by its derived event ids,
//! and the saga learns every outcome from the log.

use chrono::{DateTime, Utc};
use es_core::{Aggregate, DomainEvent, Metadata, Reaction, Received, Saga};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The topic the saga's commands to accounts travel on.
pub const ACCOUNT_COMMANDS: &str = "account_commands";
/// The consumer group of the account service (the saga's commands).
pub const ACCOUNTS_GROUP: &str = "accounts";
/// The consumer group of the transfer saga (the accounts' events).
pub const SAGA_GROUP: &str = "transfers";

/// An account's events. Amounts are integer cents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountEvent {
    /// Opened with a first deposit; a frozen account refuses credits.
    Opened {
        /// The first deposit.
        initial: i64,
        /// Whether it refuses credits.
        frozen: bool,
    },
    /// Its owner asked for a transfer to another account.
    TransferRequested {
        /// The transfer (and the saga's id).
        transfer_id: Uuid,
        /// The account debited.
        from: Uuid,
        /// The account credited.
        to: Uuid,
        /// How much.
        amount: i64,
    },
    /// Debited for a transfer.
    Debited {
        /// The transfer.
        transfer_id: Uuid,
        /// How much.
        amount: i64,
    },
    /// A debit refused: not enough money.
    DebitRefused {
        /// The transfer.
        transfer_id: Uuid,
    },
    /// Credited by a transfer.
    Credited {
        /// The transfer.
        transfer_id: Uuid,
        /// How much.
        amount: i64,
    },
    /// A credit refused: the account is frozen.
    CreditRefused {
        /// The transfer.
        transfer_id: Uuid,
    },
    /// A debit given back: the transfer's credit was refused.
    Refunded {
        /// The transfer.
        transfer_id: Uuid,
        /// How much.
        amount: i64,
    },
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Opened { .. } => "Opened",
            Self::TransferRequested { .. } => "TransferRequested",
            Self::Debited { .. } => "Debited",
            Self::DebitRefused { .. } => "DebitRefused",
            Self::Credited { .. } => "Credited",
            Self::CreditRefused { .. } => "CreditRefused",
            Self::Refunded { .. } => "Refunded",
        }
    }
}

impl AccountEvent {
    /// The change this event makes to the balance.
    pub fn balance_change(&self) -> i64 {
        match self {
            Self::Opened { initial, .. } => *initial,
            Self::Debited { amount, .. } => -amount,
            Self::Credited { amount, .. } | Self::Refunded { amount, .. } => *amount,
            Self::TransferRequested { .. }
            | Self::DebitRefused { .. }
            | Self::CreditRefused { .. } => 0,
        }
    }

    /// Whether the event changes the balance (the events the balances
    /// projection takes).
    pub fn moves_money(event_type: &str) -> bool {
        matches!(event_type, "Opened" | "Debited" | "Credited" | "Refunded")
    }
}

/// The commands an account takes: from its owner (open, request) and from
/// the saga over the bus (debit, credit, refund).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountCommand {
    /// Opens the account.
    Open {
        /// The first deposit.
        initial: i64,
        /// Whether it refuses credits.
        frozen: bool,
    },
    /// Asks for a transfer from this account.
    RequestTransfer {
        /// The transfer.
        transfer_id: Uuid,
        /// This account.
        from: Uuid,
        /// The account credited.
        to: Uuid,
        /// How much.
        amount: i64,
    },
    /// Debits the account, or refuses when the balance is too small.
    Debit {
        /// The account.
        account: Uuid,
        /// The transfer.
        transfer_id: Uuid,
        /// How much.
        amount: i64,
    },
    /// Credits the account, or refuses when it is frozen.
    Credit {
        /// The account.
        account: Uuid,
        /// The transfer.
        transfer_id: Uuid,
        /// How much.
        amount: i64,
    },
    /// Gives a debit back.
    Refund {
        /// The account.
        account: Uuid,
        /// The transfer.
        transfer_id: Uuid,
        /// How much.
        amount: i64,
    },
}

impl DomainEvent for AccountCommand {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Open { .. } => "Open",
            Self::RequestTransfer { .. } => "RequestTransfer",
            Self::Debit { .. } => "Debit",
            Self::Credit { .. } => "Credit",
            Self::Refund { .. } => "Refund",
        }
    }
}

impl AccountCommand {
    /// The account a command from the saga is for.
    pub fn account(&self) -> Option<Uuid> {
        match self {
            Self::Debit { account, .. }
            | Self::Credit { account, .. }
            | Self::Refund { account, .. } => Some(*account),
            Self::Open { .. } | Self::RequestTransfer { .. } => None,
        }
    }
}

/// Why an account refused a command outright (nothing recorded).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// Opened twice.
    #[error("the account is open already")]
    AlreadyOpen,
    /// Not opened.
    #[error("no such account")]
    NotOpen,
    /// A zero or negative amount, or a transfer to itself.
    #[error("invalid transfer")]
    Invalid,
}

/// A bank account.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Account {
    /// Opened.
    pub open: bool,
    /// Refuses credits.
    pub frozen: bool,
    /// The balance in cents.
    pub balance: i64,
}

impl Aggregate for Account {
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = AccountError;
    const TYPE: &'static str = "account";

    fn apply(&mut self, event: &AccountEvent) {
        if let AccountEvent::Opened { frozen, .. } = event {
            self.open = true;
            self.frozen = *frozen;
        }
        self.balance += event.balance_change();
    }

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        if let AccountCommand::Open { initial, frozen } = command {
            if self.open {
                return Err(AccountError::AlreadyOpen);
            }
            return Ok(vec![AccountEvent::Opened { initial, frozen }]);
        }
        if !self.open {
            return Err(AccountError::NotOpen);
        }
        Ok(vec![match command {
            AccountCommand::Open { .. } => unreachable!("handled above"),
            AccountCommand::RequestTransfer {
                transfer_id,
                from,
                to,
                amount,
            } => {
                if amount <= 0 || from == to {
                    return Err(AccountError::Invalid);
                }
                AccountEvent::TransferRequested {
                    transfer_id,
                    from,
                    to,
                    amount,
                }
            }
            AccountCommand::Debit {
                transfer_id,
                amount,
                ..
            } if self.balance >= amount => AccountEvent::Debited {
                transfer_id,
                amount,
            },
            AccountCommand::Debit { transfer_id, .. } => AccountEvent::DebitRefused { transfer_id },
            AccountCommand::Credit { transfer_id, .. } if self.frozen => {
                AccountEvent::CreditRefused { transfer_id }
            }
            AccountCommand::Credit {
                transfer_id,
                amount,
                ..
            } => AccountEvent::Credited {
                transfer_id,
                amount,
            },
            AccountCommand::Refund {
                transfer_id,
                amount,
                ..
            } => AccountEvent::Refunded {
                transfer_id,
                amount,
            },
        }])
    }
}

/// The transfer saga's own events: where the transfer stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferEvent {
    /// Started: debiting `from`.
    Started {
        /// The account debited.
        from: Uuid,
        /// The account credited.
        to: Uuid,
        /// How much.
        amount: i64,
    },
    /// The debit was refused: nothing moved.
    Refused,
    /// Debited: crediting `to`.
    Debited,
    /// Credited: done.
    Completed,
    /// The credit was refused: refunding `from`.
    Compensating,
    /// Refunded: done, nothing moved in the end.
    Compensated,
}

impl DomainEvent for TransferEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Started { .. } => "Started",
            Self::Refused => "Refused",
            Self::Debited => "Debited",
            Self::Completed => "Completed",
            Self::Compensating => "Compensating",
            Self::Compensated => "Compensated",
        }
    }
}

/// Where a transfer stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransferStatus {
    /// Not started.
    #[default]
    New,
    /// Waiting for the debit.
    Debiting,
    /// Waiting for the credit.
    Crediting,
    /// Waiting for the refund.
    Compensating,
    /// The debit was refused.
    Refused,
    /// Debited and credited.
    Completed,
    /// Debited, credit refused, refunded.
    Compensated,
}

impl TransferStatus {
    /// Whether the transfer has nothing left to do.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Refused | Self::Completed | Self::Compensated)
    }
}

/// The transfer saga's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Where it stands.
    pub status: TransferStatus,
    /// The account debited.
    pub from: Uuid,
    /// The account credited.
    pub to: Uuid,
    /// How much.
    pub amount: i64,
}

/// What the saga reacts to: the accounts' events, named as they are stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferInput {
    /// A transfer asked for.
    TransferRequested {
        /// The transfer.
        transfer_id: Uuid,
        /// The account debited.
        from: Uuid,
        /// The account credited.
        to: Uuid,
        /// How much.
        amount: i64,
    },
    /// Debited.
    Debited {
        /// The transfer.
        transfer_id: Uuid,
        /// How much.
        amount: i64,
    },
    /// Debit refused.
    DebitRefused {
        /// The transfer.
        transfer_id: Uuid,
    },
    /// Credited.
    Credited {
        /// The transfer.
        transfer_id: Uuid,
        /// How much.
        amount: i64,
    },
    /// Credit refused.
    CreditRefused {
        /// The transfer.
        transfer_id: Uuid,
    },
    /// Refunded.
    Refunded {
        /// The transfer.
        transfer_id: Uuid,
        /// How much.
        amount: i64,
    },
}

impl DomainEvent for TransferInput {
    fn event_type(&self) -> &'static str {
        match self {
            Self::TransferRequested { .. } => "TransferRequested",
            Self::Debited { .. } => "Debited",
            Self::DebitRefused { .. } => "DebitRefused",
            Self::Credited { .. } => "Credited",
            Self::CreditRefused { .. } => "CreditRefused",
            Self::Refunded { .. } => "Refunded",
        }
    }
}

impl TransferInput {
    /// The `<topic>.<type>` routing keys of the saga's inputs.
    pub const BINDINGS: [&'static str; 6] = [
        "account.TransferRequested",
        "account.Debited",
        "account.DebitRefused",
        "account.Credited",
        "account.CreditRefused",
        "account.Refunded",
    ];

    fn transfer_id(&self) -> Uuid {
        match self {
            Self::TransferRequested { transfer_id, .. }
            | Self::Debited { transfer_id, .. }
            | Self::DebitRefused { transfer_id }
            | Self::Credited { transfer_id, .. }
            | Self::CreditRefused { transfer_id }
            | Self::Refunded { transfer_id, .. } => *transfer_id,
        }
    }
}

impl Saga for Transfer {
    type Event = TransferEvent;
    type Input = TransferInput;
    type Command = AccountCommand;
    const TYPE: &'static str = "transfer";

    fn saga_id(input: &TransferInput, _: &Metadata) -> Option<Uuid> {
        Some(input.transfer_id())
    }

    fn apply(&mut self, event: &TransferEvent) {
        self.status = match event {
            TransferEvent::Started { from, to, amount } => {
                self.from = *from;
                self.to = *to;
                self.amount = *amount;
                TransferStatus::Debiting
            }
            TransferEvent::Refused => TransferStatus::Refused,
            TransferEvent::Debited => TransferStatus::Crediting,
            TransferEvent::Completed => TransferStatus::Completed,
            TransferEvent::Compensating => TransferStatus::Compensating,
            TransferEvent::Compensated => TransferStatus::Compensated,
        };
    }

    fn react(
        &self,
        input: &TransferInput,
        _: Received<'_>,
    ) -> Reaction<TransferEvent, AccountCommand> {
        use TransferStatus as S;
        let transfer_id = input.transfer_id();
        match (self.status, input) {
            (
                S::New,
                TransferInput::TransferRequested {
                    from, to, amount, ..
                },
            ) => Reaction::none()
                .event(TransferEvent::Started {
                    from: *from,
                    to: *to,
                    amount: *amount,
                })
                .send(
                    ACCOUNT_COMMANDS,
                    AccountCommand::Debit {
                        account: *from,
                        transfer_id,
                        amount: *amount,
                    },
                ),
            (S::Debiting, TransferInput::Debited { .. }) => {
                Reaction::none().event(TransferEvent::Debited).send(
                    ACCOUNT_COMMANDS,
                    AccountCommand::Credit {
                        account: self.to,
                        transfer_id,
                        amount: self.amount,
                    },
                )
            }
            (S::Debiting, TransferInput::DebitRefused { .. }) => {
                Reaction::none().event(TransferEvent::Refused)
            }
            (S::Crediting, TransferInput::Credited { .. }) => {
                Reaction::none().event(TransferEvent::Completed)
            }
            (S::Crediting, TransferInput::CreditRefused { .. }) => {
                Reaction::none().event(TransferEvent::Compensating).send(
                    ACCOUNT_COMMANDS,
                    AccountCommand::Refund {
                        account: self.from,
                        transfer_id,
                        amount: self.amount,
                    },
                )
            }
            (S::Compensating, TransferInput::Refunded { .. }) => {
                Reaction::none().event(TransferEvent::Compensated)
            }
            // Anything else is a late copy of an input already acted on.
            _ => Reaction::none(),
        }
    }

    fn on_deadline(&self, _: &str, _: DateTime<Utc>) -> Reaction<TransferEvent, AccountCommand> {
        Reaction::none()
    }
}
