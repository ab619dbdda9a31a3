//! The order service: places and cancels orders, executes the saga's order
//! commands, and keeps a read model of the inventory's catalog for pricing.

mod catalog;
pub mod domain;
mod http;
pub(crate) mod promotion;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use es_core::{
    Aggregate as _, AppendWriter, Clock, DeadlineScheduler, LocalAggregate, Message, Metadata,
    Outcome, Position, Repository, RepositoryError, SagaHandler, SagaManager, TraceParent,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

pub use catalog::{Catalog, CatalogEntry};
pub(crate) use catalog::{CatalogHandler, CatalogTable};
pub use domain::{Order, OrderCommand, OrderError, OrderEvent, OrderStatus, PlaceOrder};
pub(crate) use http::OrderApi;
pub use http::{router, Cancelled};

use crate::distributed::Owner;
use crate::messages::{message_enum, topics, OrderLine};
use crate::node::{Service, Wiring};
use crate::saga::{OrderSaga, SagaCommand, TimedSaga};
use crate::topology::{self, groups};
use crate::{Error, Result};
use es_core::command::{outcome_of, CommandService, Commands};

/// The most lines an order may have.
pub(crate) const MAX_ITEMS: usize = 100;
/// The largest quantity of one line.
pub(crate) const MAX_QUANTITY: i64 = 10_000;

/// A request to place an order, as the API takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {
    /// Who places it.
    #[schema(example = "ada@example.com")]
    pub customer_email: String,
    /// What to order (prices come from the catalog).
    pub items: Vec<OrderItemRequest>,
    /// How to pay.
    pub payment: PaymentRequest,
    /// A promotion code, which a customer redeems once across all their
    /// orders (a second order with it is refused with 409).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "SPRING-10")]
    pub promotion_code: Option<String>,
}

/// One line of a [`PlaceOrderRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderItemRequest {
    /// The product.
    pub product_id: Uuid,
    /// How many (at least 1).
    #[schema(example = 2)]
    pub quantity: i64,
}

/// How to pay an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentRequest {
    /// The card token: `tok_ok` succeeds, `tok_decline` is declined,
    /// `tok_timeout` never answers, `tok_delay_<ms>` succeeds after that long.
    #[schema(example = "tok_ok")]
    pub card_token: String,
}

/// What placing an order answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlacedOrder {
    /// The order.
    pub order_id: Uuid,
    /// Always `Pending`: the rest happens asynchronously.
    #[schema(value_type = String, example = "Pending")]
    pub status: OrderStatus,
    /// The store position of the order's creation; pass it as
    /// `?min_position=` to read your own write.
    #[schema(value_type = String, example = "42.0")]
    pub position: Position,
}

message_enum! {
    /// The commands the order service takes from the bus.
    pub enum OrderCommandMessage {
        /// Confirm stock.
        ConfirmOrderInventory,
        /// Confirm payment.
        ConfirmOrderPayment,
        /// Complete the paid order.
        CompleteOrder,
        /// Cancel the order (compensation).
        CancelOrder,
    }
}

const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x2c4f_7a10_8e3b_4f5d_9c21_6b0e_3a7d_1f48);

/// The checkpoint of the order saga's deadline scheduler.
pub(crate) const DEADLINES_CHECKPOINT: &str = "order_saga_deadlines";

/// The order service and its saga, as a process runs them.
#[derive(Clone, Debug)]
pub struct Wired {
    /// The order service.
    pub service: Arc<OrderService>,
    /// The saga's manager.
    pub saga: Arc<SagaManager<OrderSaga>>,
}

/// Starts the order service in `w`: its commands, the saga (on the order
/// store, with its deadlines), the catalog it prices from, and its routes.
pub(crate) async fn wire(w: &mut Wiring) -> Result<Wired> {
    let store = w.backends.store(Service::Order).await?;
    let (catalog, feed) = w.backends.catalog(w.stop()).await?;
    let clock = Arc::clone(&w.config.clock);
    // The saga lives with the orders: its commands to them are executed in
    // its own write, and their events reach it in the write that appends
    // them; the service's own commands write through the saga for the same.
    let schema = w.backends.event_schema.clone();
    let orders = crate::repository::<Order>(Arc::clone(&store), &schema);
    let local = LocalAggregate::new(
        orders.clone(),
        &topology::SAGA_ORDER_INPUTS,
        local_route(Arc::clone(&clock)),
    );
    let saga = Arc::new(
        SagaManager::<OrderSaga>::new(Arc::clone(&store), Arc::clone(&clock))
            .with_input_codec(schema.codec())
            .with_event_codec(schema.codec())
            .with_instance_cache(crate::CACHED_STATES)
            .with_local(local),
    );
    let service = Arc::new(OrderService::new(
        orders.with_writer(Arc::clone(&saga) as Arc<dyn AppendWriter>),
        promotion::Promotions::new(w.backends.dcb_store(Service::Order).await?, &schema),
        catalog,
        clock,
        w.config.payment_timeout,
    ));
    w.consume(
        groups::SAGA,
        Arc::new(TimedSaga(SagaHandler(Arc::clone(&saga)))),
    )
    .await?;
    w.consume(groups::ORDER, Arc::new(Commands(Arc::clone(&service))))
        .await?;
    w.consume(groups::CATALOG, feed).await?;
    let (deadlines, tick) = (Arc::clone(&saga), w.config.deadline_tick);
    // The scheduler resumes from its checkpoint (just before the oldest
    // pending deadline) after a store failure or a restart, not from the
    // start of the log.
    let checkpoints = w.backends.checkpoints(Service::Order).await?;
    w.supervise("deadline scheduler", move |stop| {
        DeadlineScheduler::new(Arc::clone(&deadlines), tick)
            .with_checkpoint(Arc::clone(&checkpoints), DEADLINES_CHECKPOINT)
            .run(stop)
    });
    w.serve(Owner::Order, router(Arc::clone(&service)));
    w.relay(Service::Order, &store);
    Ok(Wired { service, saga })
}

/// The order service.
#[derive(Debug)]
pub struct OrderService {
    orders: Repository<Order>,
    promotions: promotion::Promotions,
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    payment_timeout: Duration,
}

impl OrderService {
    /// A service writing orders through `orders`, promotion codes' redemptions
    /// through `promotions`, pricing from `catalog`.
    pub(crate) fn new(
        orders: Repository<Order>,
        promotions: promotion::Promotions,
        catalog: Arc<Catalog>,
        clock: Arc<dyn Clock>,
        payment_timeout: Duration,
    ) -> Self {
        Self {
            orders,
            promotions,
            catalog,
            clock,
            payment_timeout,
        }
    }

    /// The catalog read model.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Places an order. With an idempotency key, the same key and request
    /// answer the first answer again and create nothing; the same key with
    /// another request is [`Error::IdempotencyKeyReused`].
    pub async fn place_order(
        &self,
        request: PlaceOrderRequest,
        idempotency_key: Option<&str>,
    ) -> Result<PlacedOrder> {
        self.place_order_traced(request, idempotency_key, None)
            .await
    }

    /// [`OrderService::place_order`] within the caller's trace: with a valid
    /// W3C `traceparent` (from the HTTP request, for example the gateway's
    /// span), the order's events carry that trace id, so the caller's span
    /// and every hop of the order are one trace. Without one, the order id is
    /// the trace id.
    pub(crate) async fn place_order_traced(
        &self,
        request: PlaceOrderRequest,
        idempotency_key: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<PlacedOrder> {
        let email = validate_email(&request.customer_email)?;
        let promotion = (request.promotion_code.as_deref())
            .map(promotion::Promotions::normalize)
            .transpose()?;
        if request.items.is_empty() {
            return Err(Error::validation(
                "items",
                "an order needs at least one item",
            ));
        }
        if request.items.len() > MAX_ITEMS {
            return Err(Error::validation(
                "items",
                format!("an order has at most {MAX_ITEMS} items"),
            ));
        }
        let token =
            crate::validate::required_text("payment.card_token", &request.payment.card_token, 100)?;
        crate::payment::check_card_token(&token)?;
        let mut lines: Vec<OrderLine> = Vec::with_capacity(request.items.len());
        for (i, item) in request.items.iter().enumerate() {
            if item.quantity <= 0 || item.quantity > MAX_QUANTITY {
                return Err(Error::validation(
                    format!("items[{i}].quantity"),
                    format!(
                        "must be between 1 and {MAX_QUANTITY}, got {}",
                        item.quantity
                    ),
                ));
            }
            let quantity = u32::try_from(item.quantity).unwrap_or(u32::MAX);
            if let Some(line) = lines.iter_mut().find(|l| l.product_id == item.product_id) {
                // Lines of one product are one line: the limit is on their sum.
                line.quantity = line.quantity.saturating_add(quantity);
                if i64::from(line.quantity) > MAX_QUANTITY {
                    return Err(Error::validation(
                        format!("items[{i}].quantity"),
                        format!(
                            "the lines of product {} add up to more than {MAX_QUANTITY}",
                            item.product_id
                        ),
                    ));
                }
                continue;
            }
            let entry = self
                .catalog
                .get_or_wait(item.product_id, Duration::from_millis(300))
                .await
                .ok_or(Error::UnknownProduct {
                    product_id: item.product_id,
                })?;
            lines.push(OrderLine {
                product_id: item.product_id,
                product_name: entry.name,
                unit_price: entry.price,
                quantity,
            });
        }
        // With a key, the order id comes from the key and the command id from
        // the key and the request: the same request again is recognised as a
        // duplicate by the repository, another request under the same key
        // finds the order already placed.
        let (order_id, command_id) = match idempotency_key {
            Some(key) => {
                if key.is_empty() || key.len() > 200 {
                    return Err(Error::validation(
                        "Idempotency-Key",
                        "must be 1 to 200 characters",
                    ));
                }
                let order_id = Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, key.as_bytes());
                let hash = request_hash(&request)?;
                (order_id, Uuid::new_v5(&order_id, hash.as_bytes()))
            }
            None => {
                let order_id = Uuid::now_v7();
                (order_id, order_id)
            }
        };
        let span =
            tracing::info_span!("order.place", correlation_id = %order_id, order_id = %order_id);
        // One trace per order: the caller's, or else one whose id is the
        // order id (the span's own when it is exported).
        let caller = traceparent.and_then(TraceParent::parse);
        let exported = es_core::otel::continue_trace(&span, caller);
        let _enter = span.enter();
        let traceparent = match (exported, caller) {
            (Some(own), _) => own,
            (None, Some(parent)) => parent.child(),
            // A trace whose id is the order id (never zero: a UUID v7 or v5).
            (None, None) => TraceParent::root_with_trace_id(order_id.as_u128())
                .unwrap_or_else(TraceParent::new_root),
        };
        let metadata = Metadata::new()
            .with_correlation_id(order_id)
            .with_causation_id(order_id)
            .with_traceparent(traceparent);
        // The code is redeemed before the order is placed, and given back if
        // the order is refused: a second order with it is refused at once.
        if let Some(code) = &promotion {
            (self.promotions)
                .decide(promotion::Step::Redeem, code, &email, order_id, &metadata)
                .await?;
        }
        let customer = email.clone();
        let command = OrderCommand::Place(PlaceOrder {
            order_id,
            customer_email: email,
            items: lines,
            card_token: token.to_owned(),
            payment_timeout_ms: u64::try_from(self.payment_timeout.as_millis()).unwrap_or(u64::MAX),
            at: self.clock.now(),
        });
        drop(_enter);
        let result = self
            .orders
            .create_once(order_id, command_id, command, &metadata)
            .await;
        match result {
            Ok(committed) if !committed.duplicate => {
                metrics::counter!("orders_placed_total").increment(1);
                tracing::info!(parent: &span, %order_id, position = %committed.position, "order placed");
                Ok(PlacedOrder {
                    order_id,
                    status: OrderStatus::Pending,
                    position: committed.position,
                })
            }
            Ok(_) => self.replay(order_id).await,
            Err(RepositoryError::Rejected(OrderError::AlreadyExists(_))) => {
                Err(Error::IdempotencyKeyReused {
                    key: idempotency_key.unwrap_or_default().to_owned(),
                })
            }
            Err(RepositoryError::Rejected(e)) => {
                if let Some(code) = &promotion {
                    (self.promotions)
                        .decide(
                            promotion::Step::Release,
                            code,
                            &customer,
                            order_id,
                            &metadata,
                        )
                        .await?;
                }
                Err(Error::validation("items", e.to_string()))
            }
            // Whether the order was written is not known: the redemption
            // stays with it, and a retry with the same idempotency key finds
            // both.
            Err(e) => Err(Error::from_repository(e)),
        }
    }

    /// The first answer to a request made again with its idempotency key.
    async fn replay(&self, order_id: Uuid) -> Result<PlacedOrder> {
        let stream = self.orders.stream_id(order_id)?;
        let first = self.orders.store().read_stream(&stream, 1, 1).await?;
        let Some(first) = first.into_iter().next() else {
            return Err(Error::internal("idempotent order has no history"));
        };
        Ok(PlacedOrder {
            order_id,
            status: OrderStatus::Pending,
            position: first.position,
        })
    }

    /// Cancels an order on the customer's request. Illegal when it is
    /// completed or already cancelled ([`Error::Conflict`]).
    pub async fn cancel_order(&self, order_id: Uuid, reason: String) -> Result<Position> {
        self.cancel_order_for(order_id, reason, None).await
    }

    /// Cancels the order as [`cancel_order`](Self::cancel_order) does, when
    /// it is `customer`'s (any order's when `None`): another customer's order
    /// is [`Error::Forbidden`] and nothing changes.
    ///
    /// # Errors
    /// As [`cancel_order`](Self::cancel_order), and [`Error::Forbidden`].
    pub(crate) async fn cancel_order_for(
        &self,
        order_id: Uuid,
        reason: String,
        customer: Option<&str>,
    ) -> Result<Position> {
        let reason = crate::validate::text("reason", &reason, 500)?;
        let reason = if reason.is_empty() {
            "cancelled by the customer".to_owned()
        } else {
            reason
        };
        let metadata = Metadata::new()
            .with_correlation_id(order_id)
            .with_causation_id(Uuid::now_v7());
        let command = OrderCommand::Cancel {
            reason,
            by_customer: true,
            at: self.clock.now(),
        };
        // The customer is checked on the state the decision is taken on.
        let decide = |order: &Order| match customer {
            Some(email) if order.status.is_some() && order.customer_email != email => {
                Err(OrderError::OtherCustomer)
            }
            _ => order.handle(command.clone()),
        };
        match self
            .orders
            .execute_with(order_id, &metadata, None, decide)
            .await
        {
            Ok(c) => Ok(c.position),
            Err(RepositoryError::Rejected(OrderError::NotFound)) => Err(Error::NotFound {
                what: format!("order {order_id}"),
            }),
            Err(RepositoryError::Rejected(OrderError::OtherCustomer)) => Err(Error::Forbidden {
                message: "the order is another customer's".into(),
            }),
            Err(RepositoryError::Rejected(e)) => Err(Error::Conflict {
                message: e.to_string(),
            }),
            Err(e) => Err(Error::from_repository(e)),
        }
    }
}

#[async_trait]
impl CommandService for OrderService {
    type Command = OrderCommandMessage;

    async fn execute(
        &self,
        command: Self::Command,
        message: &Message,
        metadata: &Metadata,
    ) -> Outcome {
        let (order_id, command) = order_command(command, self.clock.now());
        let result = self
            .orders
            .execute_once(order_id, message.message_id, command, metadata)
            .await;
        outcome_of(result, "order")
    }
}

/// The order and the domain command a command message means.
fn order_command(command: OrderCommandMessage, now: DateTime<Utc>) -> (Uuid, OrderCommand) {
    match command {
        OrderCommandMessage::ConfirmOrderInventory(c) => {
            (c.order_id, OrderCommand::ConfirmInventory)
        }
        OrderCommandMessage::ConfirmOrderPayment(c) => (
            c.order_id,
            OrderCommand::ConfirmPayment {
                transaction_id: c.transaction_id,
            },
        ),
        OrderCommandMessage::CompleteOrder(c) => (c.order_id, OrderCommand::Complete { at: now }),
        OrderCommandMessage::CancelOrder(c) => (
            c.order_id,
            OrderCommand::Cancel {
                reason: c.reason,
                by_customer: false,
                at: now,
            },
        ),
    }
}

/// The saga's commands to the order service, executed in the saga's own
/// write: the order and the domain command each means.
fn local_route(
    clock: Arc<dyn Clock>,
) -> impl Fn(&str, &SagaCommand) -> Option<(String, OrderCommand)> + Send + Sync + 'static {
    move |topic, command| {
        if topic != topics::ORDER_COMMANDS {
            return None;
        }
        let message = match command {
            SagaCommand::ConfirmOrderInventory(c) => {
                OrderCommandMessage::ConfirmOrderInventory(c.clone())
            }
            SagaCommand::ConfirmOrderPayment(c) => {
                OrderCommandMessage::ConfirmOrderPayment(c.clone())
            }
            SagaCommand::CompleteOrder(c) => OrderCommandMessage::CompleteOrder(c.clone()),
            SagaCommand::CancelOrder(c) => OrderCommandMessage::CancelOrder(c.clone()),
            _ => return None,
        };
        let (order_id, command) = order_command(message, clock.now());
        Some((order_id.to_string(), command))
    }
}

fn request_hash(request: &PlaceOrderRequest) -> Result<Uuid> {
    let canonical =
        serde_json::to_vec(request).map_err(|e| Error::caused("hashing the request", e))?;
    Ok(Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, &canonical))
}

/// Checks an email address's shape and normalises it (trimmed, lower case).
///
/// # Errors
/// [`Error::Validation`] naming `customer_email`.
pub fn validate_email(raw: &str) -> Result<String> {
    crate::validate::email("customer_email", raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            validate_email(" Ada@Example.com ").unwrap(),
            "ada@example.com"
        );
        for bad in [
            "", "a", "a@", "@b.c", "a@b", "a@b@c.d", "a b@c.d", "a@.c", "a@b..c",
        ] {
            assert!(validate_email(bad).is_err(), "{bad:?}");
        }
    }
}
