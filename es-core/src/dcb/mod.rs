//! Dynamic consistency boundaries (DCB): a decision reads the events a
//! [`Query`] selects by type and [`Tag`], and appends only if no event
//! matching that query was recorded since.
//!
//! An invariant that spans aggregates (a coupon redeemed once per customer,
//! a username unique) needs no saga and no reservation stream: the
//! decision's query draws its boundary, and [`DcbStore::append_if`] keeps it.
//!
//! - Events carry tags ([`NewEvent::tags`](crate::NewEvent::tags),
//!   [`NewEvent::tagged`](crate::NewEvent::tagged)), stored with them and
//!   given back on [`RecordedEvent::tags`](crate::RecordedEvent::tags).
//! - [`DcbStore::read`] returns the matching events and a consistency
//!   marker: the [`Position`] the read saw up to.
//! - [`DcbStore::append_if`] appends to a stream unless an event matching
//!   the condition's query was recorded after the marker:
//!   [`StoreError::BoundaryMoved`], nothing written.
//! - Stream appends and conditional appends share one log: a DCB append
//!   writes its events to the stream it names (at that stream's next
//!   versions, whatever they are), and a plain [`EventStore::append`] of a
//!   tagged event moves every boundary whose query matches it.
//! - A [`Decision`] declares its query, folds the matching events and
//!   decides; a [`DecisionRunner`] reads, decides and appends with the
//!   marker, retrying when the boundary moved.

mod decision;
mod query;
mod tag;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub use decision::{Decided, Decision, DecisionError, DecisionRunner};
pub use query::{AppendCondition, Query, QueryItem, QueryPage};
pub use tag::{InvalidTag, Tag, MAX_TAG_LEN};

use crate::{AppendResult, EventStore, NewEvent, Position, RecordedEvent, StoreError, StreamId};

/// An [`EventStore`] that also reads by [`Query`] and appends on a condition.
///
/// The guarantees every implementation gives (and
/// `es_core::testing::dcb_conformance` checks):
///
/// - `append_if` checks its condition and writes in one atomic step:
///   of any number of concurrent conditional appends whose queries match
///   each other's events and that carry the same marker, exactly one
///   commits; the others fail with [`StoreError::BoundaryMoved`] and write
///   nothing. Appends whose queries and events share no (type, tag) never
///   wait for or fail because of each other.
/// - Re-appending events whose ids are stored (the same batch on the same
///   stream) is an idempotent success (`written: false`), decided before the
///   condition, as [`EventStore::append`] decides it.
/// - Every tagged event moves the boundaries that match it, however it was
///   appended (`append`, `append_streams` or `append_if`).
/// - `read` and `subscribe` return matching events in log order and never
///   skip one, even one committed late by a slow concurrent writer.
///
/// The trait is object-safe: use it as `Arc<dyn DcbStore>`.
#[async_trait]
pub trait DcbStore: EventStore {
    /// Reads up to `max_count` events matching `query` after `after`, in
    /// log order, with the marker to append on or read on from.
    async fn read(
        &self,
        query: &Query,
        after: Position,
        max_count: usize,
    ) -> Result<QueryPage, StoreError>;

    /// Appends `events` to `stream` (after its last event, whatever its
    /// version) unless an event matching `condition` was recorded after its
    /// marker: then [`StoreError::BoundaryMoved`], and nothing is written.
    async fn append_if(
        &self,
        stream: &StreamId,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<AppendResult, StoreError>;

    /// Every event matching `query` after `after`: the history, then new
    /// events as they commit, in log order, never skipping or repeating one.
    /// Ends as [`EventStore::subscribe_all`] does.
    fn subscribe(
        &self,
        query: Query,
        after: Position,
    ) -> BoxStream<'static, Result<RecordedEvent, StoreError>>;
}

/// Compile-time check that [`DcbStore`] stays usable as `Arc<dyn DcbStore>`.
#[allow(dead_code)]
fn _object_safe(_store: std::sync::Arc<dyn DcbStore>) {}

/// Reads every event matching `query` after `after`, page by page: the
/// events and the marker of the last page.
pub async fn read_all_matching(
    store: &dyn DcbStore,
    query: &Query,
    after: Position,
    page_size: usize,
) -> Result<QueryPage, StoreError> {
    let page_size = page_size.max(1);
    let mut events = Vec::new();
    let mut marker = after;
    loop {
        let page = store.read(query, marker, page_size).await?;
        let full = page.events.len() >= page_size;
        events.extend(page.events);
        marker = page.marker;
        if !full {
            return Ok(QueryPage { events, marker });
        }
    }
}
