//! [`Query`]: which events a decision reads and which ones move its
//! boundary; [`AppendCondition`] and [`QueryPage`].

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::{Position, RecordedEvent, Tag};

/// One alternative of a [`Query`]: events of one of its types (any type
/// when it names none) that carry all of its tags.
///
/// An item names at least one tag (its constructor takes the first): a tag
/// is what the stores index and what the PostgreSQL store locks, so a
/// boundary is always drawn around tagged events. A boundary over every
/// event of a type is a stream.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct QueryItem {
    types: BTreeSet<Arc<str>>,
    tags: BTreeSet<Tag>,
    /// The smallest of `tags`.
    first: Tag,
}

impl QueryItem {
    /// Events of any type carrying `tag`.
    pub fn tagged(tag: Tag) -> Self {
        Self {
            types: BTreeSet::new(),
            tags: BTreeSet::from([tag.clone()]),
            first: tag,
        }
    }

    /// Also requires `tag`: an event matches only if it carries every tag of
    /// the item.
    #[must_use]
    pub fn and_tag(mut self, tag: Tag) -> Self {
        if tag < self.first {
            self.first = tag.clone();
        }
        self.tags.insert(tag);
        self
    }

    /// Only events of these types (added to those named before).
    #[must_use]
    pub fn of_types<T: Into<Arc<str>>>(mut self, types: impl IntoIterator<Item = T>) -> Self {
        self.types.extend(types.into_iter().map(Into::into));
        self
    }

    /// The event types it selects; empty for any type.
    pub fn types(&self) -> &BTreeSet<Arc<str>> {
        &self.types
    }

    /// The tags an event must all carry (at least one).
    pub fn tags(&self) -> &BTreeSet<Tag> {
        &self.tags
    }

    /// The smallest of its tags: the one the stores look an item up by
    /// (every matching event carries it).
    pub fn first_tag(&self) -> &Tag {
        &self.first
    }

    /// Whether an event of `event_type` carrying `tags` matches.
    pub fn matches(&self, event_type: &str, tags: &BTreeSet<Tag>) -> bool {
        (self.types.is_empty() || self.types.contains(event_type)) && self.tags.is_subset(tags)
    }
}

/// The events a decision depends on: those matching any of its items. An
/// empty query matches nothing.
///
/// ```
/// use es_core::{Query, QueryItem, Tag};
/// let coupon = Tag::of("coupon", "SPRING").unwrap();
/// let customer = Tag::of("customer", "42").unwrap();
/// // Redemptions of this coupon by this customer, or its revocation.
/// let query = Query::from(
///     QueryItem::tagged(coupon.clone())
///         .and_tag(customer.clone())
///         .of_types(["CouponRedeemed"]),
/// )
/// .or(QueryItem::tagged(coupon.clone()).of_types(["CouponRevoked"]));
/// let both = [coupon.clone(), customer].into_iter().collect();
/// assert!(query.matches("CouponRedeemed", &both));
/// assert!(!query.matches("CouponRedeemed", &[coupon.clone()].into_iter().collect()));
/// assert!(query.matches("CouponRevoked", &[coupon].into_iter().collect()));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Query {
    items: Vec<QueryItem>,
}

impl Query {
    /// The query matching nothing.
    pub fn none() -> Self {
        Self::default()
    }

    /// The query matching events that match any of `items`.
    pub fn any_of(items: impl IntoIterator<Item = QueryItem>) -> Self {
        Self {
            items: items.into_iter().collect(),
        }
    }

    /// Also matches events matching `item`.
    #[must_use]
    pub fn or(mut self, item: QueryItem) -> Self {
        self.items.push(item);
        self
    }

    /// Its items.
    pub fn items(&self) -> &[QueryItem] {
        &self.items
    }

    /// Whether it has no item (and so matches nothing).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether an event of `event_type` carrying `tags` matches.
    pub fn matches(&self, event_type: &str, tags: &BTreeSet<Tag>) -> bool {
        self.items.iter().any(|i| i.matches(event_type, tags))
    }

    /// Whether a recorded event matches.
    pub fn matches_event(&self, event: &RecordedEvent) -> bool {
        self.matches(&event.event_type, &event.tags)
    }
}

impl From<QueryItem> for Query {
    fn from(item: QueryItem) -> Self {
        Self { items: vec![item] }
    }
}

/// The condition of [`DcbStore::append_if`](crate::DcbStore::append_if):
/// the append fails with
/// [`StoreError::BoundaryMoved`](crate::StoreError::BoundaryMoved), writing
/// nothing, if an event matching `fail_if_events_match` is recorded after
/// `after` (anywhere in the log when `after` is `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendCondition {
    /// The events that must not have appeared.
    pub fail_if_events_match: Query,
    /// The consistency marker of the read the decision was made on
    /// ([`QueryPage::marker`]); `None` when nothing was read and no matching
    /// event may exist at all.
    pub after: Option<Position>,
}

impl AppendCondition {
    /// Fails if an event matching `query` was recorded after `marker`.
    pub fn after(query: Query, marker: Position) -> Self {
        Self {
            fail_if_events_match: query,
            after: Some(marker),
        }
    }

    /// Fails if any event matching `query` exists.
    pub fn none_exists(query: Query) -> Self {
        Self {
            fail_if_events_match: query,
            after: None,
        }
    }
}

/// What [`DcbStore::read`](crate::DcbStore::read) returns: matching events
/// in log order, and the consistency marker.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryPage {
    /// The matching events after the read's `after`, in log order.
    pub events: Vec<RecordedEvent>,
    /// How far the read saw: every matching event at or before it is in
    /// this page or before the read's `after`, and any matching event
    /// recorded later is after it. Read on from it, or pass it as
    /// [`AppendCondition::after`]. When the page is full (`max_count`
    /// events) it is the last event's position, so more may follow.
    pub marker: Position,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(s: &str) -> Tag {
        Tag::new(s).unwrap()
    }

    #[test]
    fn the_first_tag_is_the_smallest_whatever_the_order_added() {
        let item = QueryItem::tagged(tag("m:1"))
            .and_tag(tag("z:1"))
            .and_tag(tag("a:1"));
        assert_eq!(item.first_tag(), &tag("a:1"));
        assert_eq!(item.tags().first(), Some(item.first_tag()));
        assert_eq!(
            item,
            QueryItem::tagged(tag("a:1"))
                .and_tag(tag("m:1"))
                .and_tag(tag("z:1"))
        );
    }

    #[test]
    fn an_item_needs_all_its_tags_and_one_of_its_types() {
        let item = QueryItem::tagged(tag("a:1"))
            .and_tag(tag("b:1"))
            .of_types(["X"]);
        let both: BTreeSet<Tag> = [tag("a:1"), tag("b:1"), tag("c:1")].into();
        assert!(item.matches("X", &both));
        assert!(!item.matches("Y", &both));
        assert!(!item.matches("X", &[tag("a:1")].into()));
        assert!(!Query::none().matches("X", &both));
    }
}
