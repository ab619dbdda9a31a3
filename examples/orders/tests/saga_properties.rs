//! Property test of the order saga: a simulated world (the real `Order`,
//! `Product` and `Payment` aggregates behind toy services) delivers the
//! saga's commands and the resulting events in random order, with random
//! duplicates, a customer cancellation and the payment deadline at random
//! moments. Whatever happens, the order must end Completed or Cancelled with
//! consistent side effects, and every step (so every compensation) is issued
//! at most once.

#![allow(clippy::unwrap_used, clippy::needless_pass_by_value)] // A simulation harness: a panic is the report.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use es_core::saga::CommandRecord;
use es_core::{
    Aggregate, EventStore, InMemoryEventStore, ManualClock, Message, Metadata, SagaManager,
    StreamId,
};
use orders::inventory::{Product, ProductCommand};
use orders::messages::{self, topics, NotificationKind, OrderLine};
use orders::order::{Order, OrderCommand, OrderEvent, OrderStatus, PlaceOrder};
use orders::payment::{GatewayAnswer, Payment, PaymentCommand, PaymentState};
use orders::saga::{OrderSaga, SagaCommand, SagaInput, PAYMENT_DEADLINE};
use orders::Money;
use proptest::prelude::*;
use uuid::Uuid;

#[derive(Clone, Copy, Debug)]
enum Card {
    Approves,
    Declines,
    Silent,
    /// Approves, but only after the deadline fired.
    Late,
}

#[derive(Clone, Debug)]
struct Scenario {
    seed: u64,
    stock: u64,
    quantity: u32,
    card: Card,
    /// The step at which the customer cancels, if they do.
    cancel_at: Option<usize>,
    /// The step at which the payment deadline passes.
    timeout_at: usize,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<u64>(),
        0u64..4,
        1u32..3,
        prop_oneof![
            Just(Card::Approves),
            Just(Card::Declines),
            Just(Card::Silent),
            Just(Card::Late)
        ],
        proptest::option::of(0usize..30),
        0usize..40,
    )
        .prop_map(
            |(seed, stock, quantity, card, cancel_at, timeout_at)| Scenario {
                seed,
                stock,
                quantity,
                card,
                cancel_at,
                timeout_at,
            },
        )
}

enum Item {
    ToSaga(Message),
    ToService(Message),
}

struct World {
    manager: SagaManager<OrderSaga>,
    store: Arc<dyn EventStore>,
    clock: ManualClock,
    order_id: Uuid,
    order: Order,
    product: Product,
    payment: Payment,
    card: Card,
    released: bool,
    late_payment: Option<Message>,
    seen: HashSet<Uuid>,
    notified: Vec<NotificationKind>,
    saga_version: u64,
    queue: Vec<(Item, u8)>,
}

fn now() -> DateTime<Utc> {
    "2026-01-01T00:00:00Z".parse().unwrap()
}

impl World {
    fn input(&self, input: &SagaInput) -> Message {
        let topic = match input {
            SagaInput::OrderCreated(_)
            | SagaInput::OrderInventoryConfirmed(_)
            | SagaInput::OrderPaymentConfirmed(_)
            | SagaInput::OrderCompleted(_)
            | SagaInput::OrderCancelled(_) => topics::ORDER,
            SagaInput::InventoryReserved(_) | SagaInput::InventoryReservationFailed(_) => {
                topics::INVENTORY
            }
            SagaInput::PaymentSucceeded(_) | SagaInput::PaymentDeclined(_) => topics::PAYMENT,
            // The services of this world refuse nothing (their `unwrap`s
            // assert it), so no refusal is ever emitted.
            SagaInput::CommandRefused(_) => unreachable!("no service here refuses"),
        };
        Message::encode(
            topic,
            input,
            Metadata::new().with_correlation_id(self.order_id),
        )
        .unwrap()
    }

    fn emit(&mut self, input: SagaInput) {
        let m = self.input(&input);
        self.queue.push((Item::ToSaga(m), 0));
    }

    fn order_event(&mut self, command: OrderCommand) {
        if let Ok(events) = self.order.handle(command) {
            for e in events {
                self.order.apply(&e);
                match e {
                    OrderEvent::OrderPaymentConfirmed(m) => {
                        self.emit(SagaInput::OrderPaymentConfirmed(m))
                    }
                    OrderEvent::OrderCompleted(m) => self.emit(SagaInput::OrderCompleted(m)),
                    OrderEvent::OrderCancelled(m) => self.emit(SagaInput::OrderCancelled(m)),
                    OrderEvent::OrderCreated(m) => self.emit(SagaInput::OrderCreated(m)),
                    OrderEvent::OrderInventoryConfirmed(m) => {
                        self.emit(SagaInput::OrderInventoryConfirmed(m))
                    }
                }
            }
        }
    }

    /// Collects the commands the saga recorded since last time.
    async fn collect_commands(&mut self) {
        let stream = SagaManager::<OrderSaga>::stream_id(self.order_id);
        let new = self
            .store
            .read_stream(&stream, self.saga_version + 1, 1000)
            .await
            .unwrap();
        for recorded in new {
            self.saga_version = recorded.stream_version;
            if let Some(message) = es_core::relay::default_route(&recorded) {
                if recorded.event_type.as_ref() == es_core::saga::COMMAND_RECORD {
                    self.queue.push((Item::ToService(message), 0));
                }
            }
        }
    }

    async fn deliver(&mut self, item: &Item) {
        match item {
            Item::ToSaga(m) => {
                self.manager.handle(m).await.unwrap();
                self.collect_commands().await;
            }
            Item::ToService(m) => {
                // Services execute a message at most once (execute_once / inbox).
                if !self.seen.insert(m.message_id) {
                    return;
                }
                let command: SagaCommand = es_core::EventCodec::new()
                    .decode_parts(&m.message_type, m.schema_version, &m.payload)
                    .unwrap();
                self.service(command);
            }
        }
    }

    fn service(&mut self, command: SagaCommand) {
        let order_id = self.order_id;
        match command {
            SagaCommand::ReserveInventory(c) => {
                if self.released {
                    return;
                }
                let q = c.lines[0].quantity;
                match self.product.handle(ProductCommand::Reserve {
                    order_id,
                    quantity: q,
                }) {
                    Ok(events) => {
                        events.iter().for_each(|e| self.product.apply(e));
                        self.emit(SagaInput::InventoryReserved(messages::InventoryReserved {
                            order_id,
                            lines: c.lines,
                        }));
                    }
                    Err(e) => self.emit(SagaInput::InventoryReservationFailed(
                        messages::InventoryReservationFailed {
                            order_id,
                            reason: e.to_string(),
                        },
                    )),
                }
            }
            SagaCommand::ReleaseInventory(_) => {
                self.released = true;
                let events = self
                    .product
                    .handle(ProductCommand::Release { order_id })
                    .unwrap();
                events.iter().for_each(|e| self.product.apply(e));
            }
            SagaCommand::CommitInventory(_) => {
                let events = self
                    .product
                    .handle(ProductCommand::Commit { order_id })
                    .unwrap();
                events.iter().for_each(|e| self.product.apply(e));
            }
            SagaCommand::ProcessPayment(c) => {
                let approved = GatewayAnswer::Approved {
                    transaction_id: "txn_1".into(),
                };
                let answer = match self.card {
                    Card::Approves | Card::Late => approved,
                    Card::Declines => GatewayAnswer::Declined {
                        reason: "declined".into(),
                    },
                    Card::Silent => return,
                };
                let events = self
                    .payment
                    .handle(PaymentCommand::Record {
                        order_id,
                        amount: c.amount,
                        answer,
                    })
                    .unwrap();
                for e in events {
                    self.payment.apply(&e);
                    let input = match e {
                        orders::payment::PaymentEvent::PaymentSucceeded(m) => {
                            SagaInput::PaymentSucceeded(m)
                        }
                        orders::payment::PaymentEvent::PaymentDeclined(m) => {
                            SagaInput::PaymentDeclined(m)
                        }
                        orders::payment::PaymentEvent::PaymentRefunded(_) => continue,
                    };
                    if matches!(self.card, Card::Late) {
                        self.late_payment = Some(self.input(&input));
                    } else {
                        self.emit(input);
                    }
                }
            }
            SagaCommand::RefundPayment(_) => {
                let events = self.payment.handle(PaymentCommand::Refund).unwrap();
                events.iter().for_each(|e| self.payment.apply(e));
            }
            SagaCommand::ConfirmOrderInventory(_) => {
                self.order_event(OrderCommand::ConfirmInventory)
            }
            SagaCommand::ConfirmOrderPayment(c) => self.order_event(OrderCommand::ConfirmPayment {
                transaction_id: c.transaction_id,
            }),
            SagaCommand::CompleteOrder(_) => self.order_event(OrderCommand::Complete { at: now() }),
            SagaCommand::CancelOrder(c) => self.order_event(OrderCommand::Cancel {
                reason: c.reason,
                by_customer: false,
                at: now(),
            }),
            SagaCommand::NotifyCustomer(c) => self.notified.push(c.kind),
        }
    }

    async fn time_out(&mut self) {
        self.clock.advance(Duration::from_secs(31));
        self.manager
            .fire_deadline(self.order_id, PAYMENT_DEADLINE)
            .await
            .unwrap();
        self.collect_commands().await;
        if let Some(m) = self.late_payment.take() {
            self.queue.push((Item::ToSaga(m), 0));
        }
    }
}

async fn run(s: Scenario) -> Result<(), TestCaseError> {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let clock = ManualClock::at(now());
    let order_id = Uuid::from_u128(u128::from(s.seed) | 1);
    let product_id = Uuid::from_u128(42);
    let mut product = Product::default();
    for e in product
        .handle(ProductCommand::Create {
            product_id,
            name: "Widget".into(),
            price: Money::from_minor(500),
            stock: s.stock,
        })
        .unwrap()
    {
        product.apply(&e);
    }
    let mut world = World {
        // As deployed: with the instance cache, so every reaction after the
        // first decides on the instance the previous one left.
        manager: SagaManager::new(Arc::clone(&store), Arc::new(clock.clone()))
            .with_instance_cache(16),
        store,
        clock,
        order_id,
        order: Order::default(),
        product,
        payment: Payment::default(),
        card: s.card,
        released: false,
        late_payment: None,
        seen: HashSet::new(),
        notified: Vec::new(),
        saga_version: 0,
        queue: Vec::new(),
    };
    world.order_event(OrderCommand::Place(PlaceOrder {
        order_id,
        customer_email: "a@b.c".into(),
        items: vec![OrderLine {
            product_id,
            product_name: "Widget".into(),
            unit_price: Money::from_minor(500),
            quantity: s.quantity,
        }],
        card_token: "tok".into(),
        payment_timeout_ms: 30_000,
        at: now(),
    }));
    let mut rng = fastrand::Rng::with_seed(s.seed);
    let (mut cancelled, mut timed_out) = (false, false);
    let mut step = 0;
    loop {
        if s.cancel_at == Some(step) && !cancelled {
            cancelled = true;
            world.order_event(OrderCommand::Cancel {
                reason: "customer".into(),
                by_customer: true,
                at: now(),
            });
        }
        if s.timeout_at == step && !timed_out {
            timed_out = true;
            world.time_out().await;
        }
        if world.queue.is_empty() {
            let pending = !world
                .manager
                .load(order_id)
                .await
                .unwrap()
                .deadlines
                .is_empty();
            if !timed_out || pending || world.late_payment.is_some() {
                // Nothing else happens until time passes the deadline.
                timed_out = true;
                world.time_out().await;
                step += 1;
                prop_assert!(step < 10_000, "the saga does not settle");
                continue;
            }
            break;
        }
        let i = rng.usize(..world.queue.len());
        let duplicate = world.queue[i].1 < 2 && rng.u8(..4) == 0;
        let item = if duplicate {
            world.queue[i].1 += 1;
            let (item, _) = &world.queue[i];
            match item {
                Item::ToSaga(m) => Item::ToSaga(m.clone()),
                Item::ToService(m) => Item::ToService(m.clone()),
            }
        } else {
            world.queue.swap_remove(i).0
        };
        world.deliver(&item).await;
        step += 1;
        prop_assert!(step < 10_000, "the saga does not settle");
    }

    // Every step (and so every compensation) was issued at most once.
    let stream = StreamId::new(format!("order_saga-{order_id}")).unwrap();
    let records = world.store.read_stream(&stream, 1, 10_000).await.unwrap();
    let mut commands: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        if r.event_type.as_ref() == es_core::saga::COMMAND_RECORD {
            let record: CommandRecord = r.payload.decode().unwrap();
            let mut name = record.command_type.clone();
            if name == "NotifyCustomer" {
                let n: messages::NotifyCustomer = record.payload.decode().unwrap();
                name = format!("Notify{:?}", n.kind);
            }
            *commands.entry(name).or_default() += 1;
        }
    }
    for (name, count) in &commands {
        prop_assert_eq!(*count, 1, "{} issued {} times: {:?}", name, count, commands);
    }
    let status = world.order.status;
    let issued = |name: &str| commands.contains_key(name);
    match status {
        Some(OrderStatus::Completed) => {
            let charged = matches!(world.payment.state, PaymentState::Authorised { .. });
            prop_assert!(charged, "completed but not charged");
            prop_assert_eq!(world.product.on_hand, s.stock - u64::from(s.quantity));
            prop_assert_eq!(world.product.reserved, 0);
            prop_assert_eq!(&world.notified, &vec![NotificationKind::OrderConfirmed]);
            prop_assert!(!issued("ReleaseInventory") && !issued("RefundPayment"));
        }
        Some(OrderStatus::Cancelled) => {
            prop_assert_eq!(world.product.on_hand, s.stock);
            prop_assert_eq!(world.product.reserved, 0, "stock still held");
            let kept = matches!(world.payment.state, PaymentState::Authorised { .. });
            prop_assert!(!kept, "a payment was kept for a cancelled order");
            prop_assert_eq!(&world.notified, &vec![NotificationKind::OrderCancelled]);
            prop_assert!(!issued("CommitInventory"));
            if matches!(s.card, Card::Late) && world.payment.state != PaymentState::None {
                prop_assert_eq!(&world.payment.state, &PaymentState::Refunded);
            }
        }
        other => prop_assert!(false, "not terminal: {:?}", other),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
    #[test]
    fn saga_ends_consistently_whatever_the_order_of_delivery(s in scenario()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(s))?;
    }
}

/// The case the issue names: the payment succeeds after the timeout already
/// cancelled the order, and is refunded.
#[tokio::test]
async fn late_payment_after_timeout_is_refunded() {
    run(Scenario {
        seed: 7,
        stock: 3,
        quantity: 1,
        card: Card::Late,
        cancel_at: None,
        timeout_at: 1000,
    })
    .await
    .unwrap();
}
