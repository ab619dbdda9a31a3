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

impl OrderItemView {
    /// An order line as the API shows it.
    pub(crate) fn of(line: &crate::messages::OrderLine) -> Self {
        Self {
            product_id: line.product_id,
            product_name: line.product_name.clone(),
            unit_price: line.unit_price,
            quantity: line.quantity,
        }
    }
}

/// An order, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderView {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer_email: String,
    /// The lines ordered, with their prices.
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

/// What a name in the search index is: a customer's email or a product
/// name, each with the orders that carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Customer,
    Product,
}

/// A name a search word is a word of.
type Named = (Kind, String);

#[derive(Debug, Default)]
struct Model {
    orders: HashMap<Uuid, OrderView>,
    by_created: BTreeSet<Key>,
    by_customer: HashMap<String, BTreeSet<Key>>,
    by_status: HashMap<OrderStatus, BTreeSet<Key>>,
    /// The orders with a line of each product name.
    by_product: HashMap<String, BTreeSet<Key>>,
    /// Each lower-case word of the customers' emails and of the product
    /// names, and the customers and names it is a word of. A word is indexed
    /// when its customer or name is first seen, not once per order.
    words: BTreeMap<String, std::collections::HashSet<Named>>,
    stats: BTreeMap<OrderStatus, StatusStats>,
}

/// The words search matches an order by: the email whole, its alphanumeric
/// parts, and each product name's words, lower-case; as the PostgreSQL
/// read model's text search indexes them.
fn words_of(text: &str, whole: bool) -> impl Iterator<Item = String> + '_ {
    let lower = whole.then(|| text.to_lowercase());
    lower.into_iter().chain(
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase),
    )
}

/// The words of a search query, lower-case: each must be the start of one
/// of an order's words.
fn query_words(q: &str) -> Vec<String> {
    q.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether every query word starts a word of `view`.
fn matches(view: &OrderView, query: &[String]) -> bool {
    let words: Vec<String> = words_of(&view.customer_email, true)
        .chain(
            view.items
                .iter()
                .flat_map(|i| words_of(&i.product_name, false)),
        )
        .collect();
    query
        .iter()
        .all(|q| words.iter().any(|w| w.starts_with(q.as_str())))
}

/// The created-at key of an order, to the microsecond as cursors carry it
/// (and as PostgreSQL keeps it): a finer key would sort orders of one
/// microsecond apart from what a cursor can name.
fn key_of(created_at: DateTime<Utc>, order_id: Uuid) -> Key {
    (created_at.trunc_subsecs(6), order_id)
}

impl Model {
    /// Files an order's `key` under a customer's email or a product name,
    /// and indexes the name's words the first time the name is seen.
    fn file(&mut self, kind: Kind, name: &str, key: Key) {
        let index = match kind {
            Kind::Customer => &mut self.by_customer,
            Kind::Product => &mut self.by_product,
        };
        if let Some(orders) = index.get_mut(name) {
            orders.insert(key);
            return;
        }
        index.insert(name.to_owned(), BTreeSet::from([key]));
        for word in words_of(name, kind == Kind::Customer) {
            self.words
                .entry(word)
                .or_default()
                .insert((kind, name.to_owned()));
        }
    }

    /// Keys of orders newest first whose words include one starting with
    /// `prefix`: the union of the matching customers' and products' orders,
    /// merged without collecting them.
    fn newest_with_prefix<'a>(&'a self, prefix: &str) -> impl Iterator<Item = Key> + 'a {
        let mut sets: Vec<&'a BTreeSet<Key>> = Vec::new();
        let named: std::collections::HashSet<&Named> = self
            .words
            .range(prefix.to_owned()..)
            .take_while(|(word, _)| word.starts_with(prefix))
            .flat_map(|(_, named)| named.iter())
            .collect();
        for (kind, name) in named {
            let set = match kind {
                Kind::Customer => self.by_customer.get(name),
                Kind::Product => self.by_product.get(name),
            };
            sets.extend(set);
        }
        let mut heads: std::collections::BinaryHeap<(Key, usize)> =
            std::collections::BinaryHeap::new();
        let mut iters: Vec<_> = sets.iter().map(|s| s.iter().rev()).collect();
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some(k) = it.next() {
                heads.push((*k, i));
            }
        }
        let mut last = None;
        std::iter::from_fn(move || loop {
            let (key, i) = heads.pop()?;
            if let Some(k) = iters[i].next() {
                heads.push((*k, i));
            }
            if last != Some(key) {
                last = Some(key);
                return Some(key);
            }
        })
    }

    fn set_status(&mut self, order_id: Uuid, status: OrderStatus) -> Option<(OrderStatus, Money)> {
        let view = self.orders.get_mut(&order_id)?;
        let (old, total) = (view.status, view.total);
        view.status = status;
        let key = key_of(view.created_at, order_id);
        if let Some(set) = self.by_status.get_mut(&old) {
            set.remove(&key);
        }
        self.by_status.entry(status).or_default().insert(key);
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
/// status, search. Built by `OrderProjection`.
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
    pub(crate) fn forget_abandoned(&self, order_id: Uuid) {
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
        // The narrowest index: a customer's orders (filtered by status
        // below), the orders of one status, or all of them.
        let index = match (customer_email, status) {
            (Some(email), _) => model.by_customer.get(email).unwrap_or(&empty),
            (None, Some(status)) => model.by_status.get(&status).unwrap_or(&empty),
            (None, None) => &model.by_created,
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

    /// Orders newest first whose words (the customer's email, whole and
    /// its parts, and the product names' words) start with every word of
    /// `q`, case insensitive: as the PostgreSQL read model's text search.
    /// Candidates come from the word index, newest first, so the work is
    /// what the first word matches up to `limit`, not every order.
    pub fn search(&self, q: &str, limit: usize) -> Vec<OrderView> {
        let mut query = query_words(q);
        // The longest word is likely the rarest: it picks the candidates.
        query.sort_by_key(|w| std::cmp::Reverse(w.len()));
        let Some(first) = query.first() else {
            return Vec::new();
        };
        let model = self.read();
        model
            .newest_with_prefix(first)
            .filter_map(|(_, id)| model.orders.get(&id))
            .filter(|view| matches(view, &query))
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
                let key = key_of(e.placed_at, e.order_id);
                model.by_created.insert(key);
                model
                    .by_status
                    .entry(OrderStatus::Pending)
                    .or_default()
                    .insert(key);
                model.file(Kind::Customer, &e.customer_email, key);
                for line in &e.items {
                    model.file(Kind::Product, &line.product_name, key);
                }
                let stats = model.stats.entry(OrderStatus::Pending).or_default();
                stats.count += 1;
                stats.revenue = stats.revenue.saturating_add(e.total);
                model.orders.insert(
                    e.order_id,
                    OrderView {
                        order_id: e.order_id,
                        customer_email: e.customer_email.clone(),
                        items: e.items.iter().map(OrderItemView::of).collect(),
                        total: e.total,
                        status: OrderStatus::Pending,
                        created_at: e.placed_at,
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
pub(crate) fn decode_cursor(cursor: &str) -> Option<Key> {
    let (micros, id) = cursor.split_once('_')?;
    let at = DateTime::<Utc>::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, id.parse().ok()?))
}

/// The projection that keeps an [`OrderReadModel`] from the `order` streams.
#[derive(Debug)]
pub(crate) struct OrderProjection {
    model: std::sync::Arc<OrderReadModel>,
    codec: EventCodec<OrderEvent>,
}

impl OrderProjection {
    /// A projection into `model`, decoding through `codec`.
    pub(crate) fn new(
        model: std::sync::Arc<OrderReadModel>,
        codec: EventCodec<OrderEvent>,
    ) -> Self {
        Self { model, codec }
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
            .map_err(|e| ProjectionError::invalid(self.name(), event, e))?;
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
                placed_at: at + chrono::Duration::nanoseconds(nanos * 100),
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

    fn place(model: &OrderReadModel, email: &str, products: &[&str]) -> Uuid {
        let order_id = Uuid::now_v7();
        let created = OrderCreated {
            order_id,
            customer_email: email.into(),
            items: products
                .iter()
                .map(|name| crate::messages::OrderLine {
                    product_id: Uuid::now_v7(),
                    product_name: (*name).into(),
                    unit_price: Money::ZERO,
                    quantity: 1,
                })
                .collect(),
            total: Money::ZERO,
            card_token: "tok_ok".into(),
            payment_timeout_ms: 1_000,
            placed_at: Utc::now(),
        };
        model.apply(&OrderEvent::OrderCreated(created), Utc::now());
        order_id
    }

    /// Search matches the start of the email's and the product names'
    /// words, every query word, newest first, and never an order that does
    /// not match; the status index lists exactly the orders of a status as
    /// they move.
    #[test]
    fn search_and_status_lists_read_their_indexes() {
        let model = OrderReadModel::new();
        let gus = place(&model, "gus.grey@example.com", &["Brass Lamp"]);
        let ann = place(&model, "ann@shop.io", &["Lamp Shade", "Bulb"]);
        let gus_again = place(&model, "gus.grey@example.com", &["Bulb"]);
        let ids = |views: Vec<OrderView>| views.iter().map(|v| v.order_id).collect::<Vec<_>>();
        assert_eq!(ids(model.search("lamp", 10)), vec![ann, gus]);
        assert_eq!(ids(model.search("LAM", 10)), vec![ann, gus]);
        assert_eq!(ids(model.search("gus", 10)), vec![gus_again, gus]);
        assert_eq!(ids(model.search("gus lamp", 10)), vec![gus]);
        assert_eq!(ids(model.search("grey@example", 10)), vec![gus_again, gus]);
        assert_eq!(
            ids(model.search("gus.grey@example.com", 10)),
            vec![gus_again, gus]
        );
        assert_eq!(ids(model.search("bulb", 1)), vec![gus_again]);
        // Inside a word is not the start of one.
        assert!(model.search("amp", 10).is_empty());
        assert!(model.search("zebra", 10).is_empty());
        assert!(model.search(" -- ", 10).is_empty());

        let completed = OrderEvent::OrderCompleted(crate::messages::OrderCompleted {
            order_id: ann,
            customer_email: "ann@shop.io".into(),
            completed_at: Utc::now(),
        });
        model.apply(&completed, Utc::now());
        let listed = |status| ids(model.list(None, Some(status), 10, None).orders);
        assert_eq!(listed(OrderStatus::Pending), vec![gus_again, gus]);
        assert_eq!(listed(OrderStatus::Completed), vec![ann]);
        assert!(listed(OrderStatus::Cancelled).is_empty());
        let gus_pending = model.list(
            Some("gus.grey@example.com"),
            Some(OrderStatus::Pending),
            10,
            None,
        );
        assert_eq!(ids(gus_pending.orders), vec![gus_again, gus]);
    }
}
