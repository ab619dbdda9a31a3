//! The query service's in-memory read model and the projection that builds it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError, RwLock};

use chrono::{DateTime, SubsecRound, Utc};
use es_core::{EventCodec, Projection, ProjectionError, RecordedEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::order::{Order, OrderEvent, OrderStatus};
use crate::Money;

/// One line of an order, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderItemView {
    /// The product.
    pub product_id: Uuid,
    /// Its name when ordered.
    pub product_name: String,
    /// Its price when ordered.
    #[schema(value_type = String, example = "12.50")]
    pub unit_price: Money,
    /// How many.
    pub quantity: u32,
}

/// An order, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderView {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_email: String,
    /// What.
    pub items: Vec<OrderItemView>,
    /// The total.
    #[schema(value_type = String, example = "25.00")]
    pub total: Money,
    /// Its status.
    #[schema(value_type = String, example = "Completed")]
    pub status: OrderStatus,
    /// When it was placed.
    pub created_at: DateTime<Utc>,
    /// When it completed.
    pub completed_at: Option<DateTime<Utc>>,
    /// Why it was cancelled.
    pub cancellation_reason: Option<String>,
}

/// Counts and revenue of one status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatusStats {
    /// Orders in this status.
    pub count: u64,
    /// The sum of their totals.
    #[schema(value_type = String, example = "125.00")]
    pub revenue: Money,
}

/// Counts and revenue by status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    /// Orders in all.
    pub total_orders: u64,
    /// Per status (every status is listed).
    pub by_status: BTreeMap<String, StatusStats>,
}

type Key = (DateTime<Utc>, Uuid);

#[derive(Debug, Default)]
struct Model {
    orders: HashMap<Uuid, OrderView>,
    by_created: BTreeSet<Key>,
    by_customer: HashMap<String, BTreeSet<Key>>,
    stats: BTreeMap<OrderStatus, StatusStats>,
}

impl Model {
    fn set_status(&mut self, order_id: Uuid, status: OrderStatus) -> Option<(OrderStatus, Money)> {
        let view = self.orders.get_mut(&order_id)?;
        let (old, total) = (view.status, view.total);
        view.status = status;
        let old_stats = self.stats.entry(old).or_default();
        old_stats.count = old_stats.count.saturating_sub(1);
        old_stats.revenue = old_stats.revenue.saturating_sub(total);
        let new_stats = self.stats.entry(status).or_default();
        new_stats.count += 1;
        new_stats.revenue = new_stats.revenue.saturating_add(total);
        Some((old, total))
    }
}

/// A page of orders.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderPage {
    /// The orders, newest first.
    pub orders: Vec<OrderView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The read model: order details, a customer's orders, counts and revenue by
/// status, search. Built by [`OrderProjection`].
#[derive(Debug, Default)]
pub struct OrderReadModel {
    model: RwLock<Model>,
    waiters: Mutex<HashMap<Uuid, Vec<oneshot::Sender<OrderStatus>>>>,
}

impl OrderReadModel {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Model> {
        self.model.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// One order.
    pub fn get(&self, order_id: Uuid) -> Option<OrderView> {
        self.read().orders.get(&order_id).cloned()
    }

    /// A receiver that gets the order's terminal status once it has one.
    pub fn terminal(&self, order_id: Uuid) -> oneshot::Receiver<OrderStatus> {
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked under the waiters' lock: the projection takes it to notify.
        match self.read().orders.get(&order_id).map(|o| o.status) {
            Some(status) if status.is_terminal() => {
                let _ = tx.send(status);
            }
            _ => waiters.entry(order_id).or_default().push(tx),
        }
        rx
    }

    /// Drops the waiters for `order_id` whose readers have gone (timed out),
    /// so that waiting on an order that never ends holds no memory after.
    pub fn forget_abandoned(&self, order_id: Uuid) {
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = waiters.get_mut(&order_id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                waiters.remove(&order_id);
            }
        }
    }

    /// How many readers wait for an order to end.
    pub fn waiting(&self) -> usize {
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Orders newest first, optionally of one customer and one status, from
    /// a cursor.
    pub fn list(
        &self,
        customer_email: Option<&str>,
        status: Option<OrderStatus>,
        limit: usize,
        cursor: Option<Key>,
    ) -> OrderPage {
        let model = self.read();
        let empty = BTreeSet::new();
        let index = match customer_email {
            Some(email) => model.by_customer.get(email).unwrap_or(&empty),
            None => &model.by_created,
        };
        let range = match cursor {
            Some(c) => index.range(..c),
            None => index.range(..),
        };
        let mut orders = Vec::new();
        let mut last = None;
        let mut more = false;
        for key in range.rev() {
            let Some(view) = model.orders.get(&key.1) else {
                continue;
            };
            if status.is_some_and(|s| s != view.status) {
                continue;
            }
            if orders.len() == limit {
                more = true;
                break;
            }
            orders.push(view.clone());
            last = Some(*key);
        }
        OrderPage {
            orders,
            next_cursor: if more { last.map(encode_cursor) } else { None },
        }
    }

    /// Orders whose customer email or a product name contains `q` (case
    /// insensitive), newest first.
    pub fn search(&self, q: &str, limit: usize) -> Vec<OrderView> {
        let q = q.to_lowercase();
        let model = self.read();
        model
            .by_created
            .iter()
            .rev()
            .filter_map(|(_, id)| model.orders.get(id))
            .filter(|o| {
                o.customer_email.contains(&q)
                    || o.items
                        .iter()
                        .any(|i| i.product_name.to_lowercase().contains(&q))
            })
            .take(limit)
            .cloned()
            .collect()
    }

    /// Counts and revenue by status.
    pub fn stats(&self) -> Stats {
        let model = self.read();
        let mut stats = Stats {
            total_orders: model.orders.len() as u64,
            by_status: BTreeMap::new(),
        };
        for status in OrderStatus::ALL {
            stats.by_status.insert(
                status.as_str().to_owned(),
                model.stats.get(&status).cloned().unwrap_or_default(),
            );
        }
        stats
    }

    fn notify(&self, order_id: Uuid, status: OrderStatus) {
        let waiters = self
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&order_id);
        for tx in waiters.into_iter().flatten() {
            let _ = tx.send(status);
        }
    }

    /// Applies one order event.
    pub fn apply(&self, event: &OrderEvent, recorded_at: DateTime<Utc>) {
        let mut model = self.model.write().unwrap_or_else(PoisonError::into_inner);
        let mut terminal = None;
        match event {
            OrderEvent::OrderCreated(e) => {
                if model.orders.contains_key(&e.order_id) {
                    return;
                }
                // To the microsecond, as the cursor carries it (and as
                // PostgreSQL keeps it): a finer key would sort orders of one
                // microsecond apart from what a cursor can name.
                let key = (e.created_at.trunc_subsecs(6), e.order_id);
                model.by_created.insert(key);
                model
                    .by_customer
                    .entry(e.customer_email.clone())
                    .or_default()
                    .insert(key);
                let stats = model.stats.entry(OrderStatus::Pending).or_default();
                stats.count += 1;
                stats.revenue = stats.revenue.saturating_add(e.total);
                model.orders.insert(
                    e.order_id,
                    OrderView {
                        order_id: e.order_id,
                        customer_email: e.customer_email.clone(),
                        items: e
                            .items
                            .iter()
                            .map(|l| OrderItemView {
                                product_id: l.product_id,
                                product_name: l.product_name.clone(),
                                unit_price: l.unit_price,
                                quantity: l.quantity,
                            })
                            .collect(),
                        total: e.total,
                        status: OrderStatus::Pending,
                        created_at: e.created_at,
                        completed_at: None,
                        cancellation_reason: None,
                    },
                );
            }
            OrderEvent::OrderInventoryConfirmed(e) => {
                model.set_status(e.order_id, OrderStatus::InventoryConfirmed);
            }
            OrderEvent::OrderPaymentConfirmed(e) => {
                model.set_status(e.order_id, OrderStatus::PaymentConfirmed);
            }
            OrderEvent::OrderCompleted(e) => {
                if model
                    .set_status(e.order_id, OrderStatus::Completed)
                    .is_some()
                {
                    if let Some(view) = model.orders.get_mut(&e.order_id) {
                        view.completed_at = Some(e.completed_at);
                        terminal = Some((e.order_id, OrderStatus::Completed, view.created_at));
                    }
                }
            }
            OrderEvent::OrderCancelled(e) => {
                if model
                    .set_status(e.order_id, OrderStatus::Cancelled)
                    .is_some()
                {
                    if let Some(view) = model.orders.get_mut(&e.order_id) {
                        view.cancellation_reason = Some(e.reason.clone());
                        terminal = Some((e.order_id, OrderStatus::Cancelled, view.created_at));
                    }
                }
            }
        }
        drop(model);
        if let Some((order_id, status, created_at)) = terminal {
            let outcome = if status == OrderStatus::Completed {
                "completed"
            } else {
                "cancelled"
            };
            metrics::counter!("orders_finished_total", "outcome" => outcome).increment(1);
            let seconds = (recorded_at - created_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics::histogram!("order_end_to_end_seconds", "outcome" => outcome)
                .record(seconds.max(0.0));
            self.notify(order_id, status);
        }
    }
}

/// Encodes a list cursor.
fn encode_cursor((at, id): Key) -> String {
    format!("{}_{}", at.timestamp_micros(), id.simple())
}

/// Decodes a list cursor.
pub fn decode_cursor(cursor: &str) -> Option<Key> {
    let (micros, id) = cursor.split_once('_')?;
    let at = DateTime::<Utc>::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, id.parse().ok()?))
}

/// The projection that keeps an [`OrderReadModel`] from the `order` streams.
#[derive(Debug)]
pub struct OrderProjection {
    model: std::sync::Arc<OrderReadModel>,
    codec: EventCodec<OrderEvent>,
}

impl OrderProjection {
    /// A projection into `model`.
    pub fn new(model: std::sync::Arc<OrderReadModel>) -> Self {
        Self {
            model,
            codec: EventCodec::new(),
        }
    }
}

impl Projection for OrderProjection {
    type Tx = ();

    fn name(&self) -> &str {
        "orders_read_model"
    }

    fn accepts(&self, event_type: &str) -> bool {
        super::is_order_event(event_type)
    }

    async fn apply(&self, (): &mut (), event: &RecordedEvent) -> Result<(), ProjectionError> {
        if event.stream_id.category() != <Order as es_core::Aggregate>::TYPE {
            return Ok(());
        }
        let decoded = self
            .codec
            .decode(event)
            .map_err(|e| ProjectionError::InvalidEvent {
                projection: self.name().to_owned(),
                event_id: event.event_id,
                position: event.position,
                reason: e.to_string(),
            })?;
        self.model.apply(&decoded, event.recorded_at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::OrderCreated;

    /// Orders created within one microsecond are all listed, page by page.
    #[test]
    fn a_cursor_pages_through_orders_of_one_microsecond() {
        let model = OrderReadModel::new();
        let at = DateTime::parse_from_rfc3339("2026-12-06T10:00:00.000000500Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut placed = BTreeSet::new();
        for nanos in 0..3 {
            let order_id = Uuid::now_v7();
            placed.insert(order_id);
            let created = OrderCreated {
                order_id,
                customer_email: "fay@example.com".into(),
                items: Vec::new(),
                total: Money::ZERO,
                card_token: "tok_ok".into(),
                payment_timeout_ms: 1_000,
                created_at: at + chrono::Duration::nanoseconds(nanos * 100),
            };
            model.apply(&OrderEvent::OrderCreated(created), at);
        }
        let mut listed = BTreeSet::new();
        let mut cursor = None;
        loop {
            let page = model.list(Some("fay@example.com"), None, 1, cursor);
            listed.extend(page.orders.iter().map(|o| o.order_id));
            match page.next_cursor {
                Some(next) => cursor = Some(decode_cursor(&next).unwrap()),
                None => break,
            }
        }
        assert_eq!(listed, placed);
    }
}
