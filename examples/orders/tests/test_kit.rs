//! The order system's decisions through es-core's test kit: given / when /
//! then on the `Order` aggregate, and on the order saga with a virtual clock
//! (no store, no bus, no waiting).

use std::time::Duration;

use chrono::{DateTime, Utc};
use es_core::testing::{AggregateFixture, SagaFixture};
use orders::messages::{self, topics, NotificationKind, OrderLine, StockLine};
use orders::order::{Order, OrderCommand, OrderError, OrderEvent, OrderStatus};
use orders::saga::{OrderSaga, SagaCommand, SagaInput, PAYMENT_DEADLINE};
use orders::Money;
use uuid::Uuid;

const ORDER: Uuid = Uuid::from_u128(0x0123);
const PRODUCT: Uuid = Uuid::from_u128(0x0456);
const EMAIL: &str = "ada@example.com";
/// The payment window the orders are placed with.
const PAYMENT_WINDOW: Duration = Duration::from_secs(30);

fn placed_at() -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_767_225_600, 0).unwrap_or_default()
}

fn created() -> messages::OrderCreated {
    messages::OrderCreated {
        order_id: ORDER,
        customer_email: EMAIL.into(),
        items: vec![OrderLine {
            product_id: PRODUCT,
            product_name: "Widget".into(),
            unit_price: Money::from_minor(12_50),
            quantity: 2,
        }],
        total: Money::from_minor(25_00),
        card_token: "tok_visa".into(),
        payment_timeout_ms: PAYMENT_WINDOW.as_millis() as u64,
        placed_at: placed_at(),
    }
}

fn stock() -> Vec<StockLine> {
    vec![StockLine {
        product_id: PRODUCT,
        quantity: 2,
    }]
}

fn payment_confirmed() -> messages::OrderPaymentConfirmed {
    messages::OrderPaymentConfirmed {
        order_id: ORDER,
        transaction_id: "tx-1".into(),
    }
}

fn completed() -> messages::OrderCompleted {
    messages::OrderCompleted {
        order_id: ORDER,
        customer_email: EMAIL.into(),
        completed_at: placed_at(),
    }
}

fn reserved() -> SagaInput {
    SagaInput::InventoryReserved(messages::InventoryReserved {
        order_id: ORDER,
        lines: stock(),
    })
}

// ---- the Order aggregate ----

#[test]
fn a_pending_order_confirms_its_inventory() {
    let order = AggregateFixture::<Order>::given([OrderEvent::OrderCreated(created())])
        .when(OrderCommand::ConfirmInventory)
        .then_events([OrderEvent::OrderInventoryConfirmed(
            messages::OrderInventoryConfirmed { order_id: ORDER },
        )]);
    assert_eq!(order.status, Some(OrderStatus::InventoryConfirmed));
    assert_eq!(order.total, Money::from_minor(25_00));
}

#[test]
fn a_pending_order_cannot_be_completed() {
    AggregateFixture::<Order>::given([OrderEvent::OrderCreated(created())])
        .when(OrderCommand::Complete { at: placed_at() })
        .then_error(|e| {
            *e == OrderError::IllegalTransition {
                action: "complete",
                status: OrderStatus::Pending,
            }
        });
}

#[test]
fn a_completed_order_cannot_be_cancelled() {
    AggregateFixture::<Order>::given([
        OrderEvent::OrderCreated(created()),
        OrderEvent::OrderInventoryConfirmed(messages::OrderInventoryConfirmed { order_id: ORDER }),
        OrderEvent::OrderPaymentConfirmed(payment_confirmed()),
        OrderEvent::OrderCompleted(completed()),
    ])
    .when(OrderCommand::Cancel {
        reason: "changed my mind".into(),
        by_customer: true,
        at: placed_at(),
    })
    .then_error(|e| {
        *e == OrderError::IllegalTransition {
            action: "cancel",
            status: OrderStatus::Completed,
        }
    });
}

// ---- the order saga, on a virtual clock ----

#[test]
fn a_new_order_is_sent_to_inventory() {
    SagaFixture::<OrderSaga>::at(placed_at())
        .when(SagaInput::OrderCreated(created()))
        .then_sent([(
            topics::INVENTORY_COMMANDS,
            SagaCommand::ReserveInventory(messages::ReserveInventory {
                order_id: ORDER,
                lines: stock(),
            }),
        )]);
}

#[test]
fn reserved_stock_charges_the_card_and_opens_the_payment_window() {
    let saga = SagaFixture::<OrderSaga>::at(placed_at())
        .given([SagaInput::OrderCreated(created())])
        .when(reserved())
        .then_sent([
            (
                topics::ORDER_COMMANDS,
                SagaCommand::ConfirmOrderInventory(messages::ConfirmOrderInventory {
                    order_id: ORDER,
                }),
            ),
            (
                topics::PAYMENT_COMMANDS,
                SagaCommand::ProcessPayment(messages::ProcessPayment {
                    order_id: ORDER,
                    amount: Money::from_minor(25_00),
                    card_token: "tok_visa".into(),
                }),
            ),
        ]);
    let window = chrono::Duration::from_std(PAYMENT_WINDOW).unwrap_or_default();
    assert_eq!(
        saga.pending_deadlines().get(PAYMENT_DEADLINE),
        Some(&(placed_at() + window))
    );
}

#[test]
fn no_payment_in_30_seconds_releases_the_stock_cancels_and_notifies() {
    let saga = SagaFixture::<OrderSaga>::at(placed_at())
        .given([SagaInput::OrderCreated(created()), reserved()])
        // Nothing happens before the window closes ...
        .when_time_passes(PAYMENT_WINDOW - Duration::from_millis(1))
        .then_no_commands()
        // ... and when it does, the order is cancelled and its stock released.
        .when_time_passes(Duration::from_millis(1))
        .then_sent([
            (
                topics::ORDER_COMMANDS,
                SagaCommand::CancelOrder(messages::CancelOrder {
                    order_id: ORDER,
                    reason: "payment timed out".into(),
                }),
            ),
            (
                topics::INVENTORY_COMMANDS,
                SagaCommand::ReleaseInventory(messages::ReleaseInventory { order_id: ORDER }),
            ),
        ]);
    assert!(saga.state().timed_out);
    assert!(
        saga.pending_deadlines().is_empty(),
        "the deadline fired once"
    );
    let cancelled_at = saga.now();
    // Once the order is cancelled, the customer is told why.
    saga.when(SagaInput::OrderCancelled(messages::OrderCancelled {
        order_id: ORDER,
        customer_email: EMAIL.into(),
        reason: "payment timed out".into(),
        by_customer: false,
        cancelled_at,
    }))
    .then_sent([(
        topics::NOTIFICATION_COMMANDS,
        SagaCommand::NotifyCustomer(messages::NotifyCustomer {
            order_id: ORDER,
            email: EMAIL.into(),
            kind: NotificationKind::OrderCancelled,
            reason: Some("payment timed out".into()),
        }),
    )])
    // And the timeout never fires again.
    .when_time_passes(PAYMENT_WINDOW * 2)
    .then_no_commands();
}

#[test]
fn a_payment_in_time_closes_the_window() {
    let saga = SagaFixture::<OrderSaga>::at(placed_at())
        .given([SagaInput::OrderCreated(created()), reserved()])
        .when_time_passes(Duration::from_secs(10))
        .then_no_commands()
        .when(SagaInput::PaymentSucceeded(messages::PaymentSucceeded {
            order_id: ORDER,
            transaction_id: "tx-1".into(),
            amount: Money::from_minor(25_00),
        }))
        .then_no_commands();
    assert!(
        saga.pending_deadlines().is_empty(),
        "the payment closed the window"
    );
    saga.when_time_passes(PAYMENT_WINDOW).then_no_commands();
}

/// What the saga sent the inventory, refused by it for `reason`, as the relay
/// publishes the inventory's refusal record.
fn refused(command: &SagaCommand, reason: &str) -> SagaInput {
    let message = es_core::Message::encode(topics::INVENTORY_COMMANDS, command, Default::default())
        .expect("a saga command encodes");
    SagaInput::CommandRefused(messages::CommandRefused::of(&message, &reason))
}

#[test]
fn a_refused_step_fails_the_order_and_closes_the_payment_window() {
    let reserve = SagaCommand::ReserveInventory(messages::ReserveInventory {
        order_id: ORDER,
        lines: stock(),
    });
    let reason = "ReserveInventory refused: the reservation already failed";
    let saga = SagaFixture::<OrderSaga>::at(placed_at())
        .given([SagaInput::OrderCreated(created()), reserved()])
        .when(refused(&reserve, "the reservation already failed"))
        .then_sent([
            (
                topics::ORDER_COMMANDS,
                SagaCommand::CancelOrder(messages::CancelOrder {
                    order_id: ORDER,
                    reason: reason.into(),
                }),
            ),
            (
                topics::INVENTORY_COMMANDS,
                SagaCommand::ReleaseInventory(messages::ReleaseInventory { order_id: ORDER }),
            ),
        ]);
    assert_eq!(saga.state().failure().as_deref(), Some(reason));
    assert!(saga.pending_deadlines().is_empty(), "the window closed");
    // A second refusal (the release's, say) adds nothing.
    let release = SagaCommand::ReleaseInventory(messages::ReleaseInventory { order_id: ORDER });
    saga.when(refused(&release, "the reservation is already committed"))
        .then_no_commands();
}

#[test]
fn a_refusal_after_completion_changes_nothing() {
    let commit = SagaCommand::CommitInventory(messages::CommitInventory { order_id: ORDER });
    let saga = SagaFixture::<OrderSaga>::at(placed_at())
        .given([
            SagaInput::OrderCreated(created()),
            reserved(),
            SagaInput::PaymentSucceeded(messages::PaymentSucceeded {
                order_id: ORDER,
                transaction_id: "tx-1".into(),
                amount: Money::from_minor(25_00),
            }),
            SagaInput::OrderInventoryConfirmed(messages::OrderInventoryConfirmed {
                order_id: ORDER,
            }),
            SagaInput::OrderPaymentConfirmed(payment_confirmed()),
            SagaInput::OrderCompleted(completed()),
        ])
        .when(refused(&commit, "nothing is reserved to commit"))
        .then_no_commands();
    assert!(saga.state().completed);
    assert_eq!(saga.state().failure(), None);
    assert!(saga.state().refused.is_some(), "the refusal is kept");
}
