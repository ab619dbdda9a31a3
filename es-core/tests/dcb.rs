//! Dynamic consistency boundaries on the in-memory store: the DCB
//! conformance suite, the races (1,000 rounds of 32 racers), and the
//! decision runner.

#![allow(clippy::unwrap_used)] // test helpers panic on failure, like the tests

use std::sync::Arc;

use es_core::doc_support::coupon::{CouponError, CouponEvent, Redeem};
use es_core::testing::conformance::unique_stream;
use es_core::testing::dcb_conformance;
use es_core::{
    DcbStore, DecisionError, DecisionRunner, EventStore, InMemoryEventStore, Metadata, Position,
    Query, QueryItem, RetryPolicy, Tag,
};
use tokio::sync::Barrier;

fn store() -> Arc<dyn DcbStore> {
    Arc::new(InMemoryEventStore::new())
}

#[tokio::test]
async fn the_dcb_conformance_suite() {
    dcb_conformance::run_all(|| async { store() }).await;
}

/// 32 racers on one (type, tag) with one marker, 1,000 times: exactly one
/// commit and 31 `BoundaryMoved` every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racers_on_one_boundary_a_thousand_rounds() {
    let tally = dcb_conformance::racers_on_one_boundary(store(), 1_000).await;
    assert_eq!(tally.committed, 1_000);
    assert_eq!(tally.moved, 31_000);
    assert_eq!(tally.violations, 0);
}

/// 32 racers on disjoint tags, 1,000 times: all commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racers_on_disjoint_boundaries_a_thousand_rounds() {
    let tally = dcb_conformance::racers_on_disjoint_boundaries(store(), 1_000).await;
    assert_eq!(tally.committed, 32_000);
    assert_eq!(tally.moved, 0);
}

/// 32 runners redeem one coupon for one customer at once: one redeems, the
/// others decide again on the new facts and are rejected; another
/// customer's redemption is outside the boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_decision_runner_retries_a_moved_boundary_and_decides_again() {
    let store = store();
    let runner = DecisionRunner::<CouponEvent>::new(Arc::clone(&store)).with_retry(RetryPolicy {
        max_attempts: 50,
        ..RetryPolicy::default()
    });
    let barrier = Arc::new(Barrier::new(32));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let runner = runner.clone();
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let redeem = Redeem {
                coupon: "SPRING".into(),
                customer: 1,
            };
            runner
                .execute(&unique_stream("redemption"), &redeem, Metadata::new())
                .await
        }));
    }
    let (mut redeemed, mut rejected) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(decided) => {
                assert_eq!(decided.events.len(), 1);
                redeemed += 1;
            }
            Err(DecisionError::Rejected(CouponError::AlreadyRedeemed)) => rejected += 1,
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!((redeemed, rejected), (1, 31));

    let other = Redeem {
        coupon: "SPRING".into(),
        customer: 2,
    };
    let decided = runner
        .execute(&unique_stream("redemption"), &other, Metadata::new())
        .await
        .unwrap();
    assert_eq!(decided.attempts, 1);
    let coupon = Query::from(QueryItem::tagged(Tag::of("coupon", "SPRING").unwrap()));
    let page = store.read(&coupon, Position::START, 100).await.unwrap();
    assert_eq!(page.events.len(), 2);
    // The codec stored the events' tags.
    assert!(page.events[1]
        .tags
        .contains(&Tag::of("customer", 2).unwrap()));
    assert_eq!(store.head().await.unwrap(), page.marker);
}

/// With no retries, a moved boundary is contention for the caller.
#[tokio::test]
async fn without_retries_a_moved_boundary_is_contention() {
    let redeem = Redeem {
        coupon: "X".into(),
        customer: 9,
    };
    // A runner whose store moves the boundary between its read and its
    // append: the interloper appends right after every read.
    let interloper = Arc::new(Meddler {
        inner: InMemoryEventStore::new(),
        mode: Mode::MovesAfterRead,
    });
    let runner = DecisionRunner::<CouponEvent>::new(interloper.clone() as Arc<dyn DcbStore>)
        .with_retry(RetryPolicy::none());
    match runner
        .execute(&unique_stream("redemption"), &redeem, Metadata::new())
        .await
    {
        Err(DecisionError::Contention { attempts: 1 }) => {}
        other => panic!("{other:?}"),
    }
}

/// A read that stops short of a committed event (as one held back behind
/// an older transaction still running does) makes a decision reject what
/// it would accept: the runner checks that its read missed nothing before
/// it answers a rejection, and decides again on a read that sees it.
#[tokio::test]
async fn a_rejection_decided_on_a_read_that_missed_events_is_decided_again() {
    use es_core::doc_support::coupon::Redeem;
    let lagging = Arc::new(Meddler {
        inner: InMemoryEventStore::new(),
        mode: Mode::HidesNewest(std::sync::atomic::AtomicUsize::new(0)),
    });
    let store = lagging.clone() as Arc<dyn DcbStore>;
    let runner = DecisionRunner::<CouponEvent>::new(Arc::clone(&store));
    let redeem = Redeem {
        coupon: "SUMMER".into(),
        customer: 3,
    };
    runner
        .execute(&unique_stream("redemption"), &redeem, Metadata::new())
        .await
        .unwrap();
    // The next read misses the redemption: the decision would redeem
    // again, and its append on the read's marker is refused; then it is
    // rejected on a full read.
    if let Mode::HidesNewest(reads) = &lagging.mode {
        reads.store(1, std::sync::atomic::Ordering::SeqCst);
    }
    match runner
        .execute(&unique_stream("redemption"), &redeem, Metadata::new())
        .await
    {
        Err(DecisionError::Rejected(CouponError::AlreadyRedeemed)) => {}
        other => panic!("{other:?}"),
    }
    // A decision that rejects on a read missing an event that would make
    // it accept: "issue" needs the coupon's redemption by customer 3 to
    // have happened (the inverse rule), and the read hides it.
    let needs_redemption = RedeemedBefore(redeem.clone());
    if let Mode::HidesNewest(reads) = &lagging.mode {
        reads.store(1, std::sync::atomic::Ordering::SeqCst);
    }
    let decided = DecisionRunner::<CouponEvent>::new(store)
        .execute(
            &unique_stream("receipt"),
            &needs_redemption,
            Metadata::new(),
        )
        .await
        .unwrap();
    assert_eq!(decided.attempts, 2);
    assert!(decided.events.is_empty());
}

/// Decides nothing when `0` was redeemed, and rejects otherwise: a rule
/// that a read missing the redemption gets wrong.
struct RedeemedBefore(es_core::doc_support::coupon::Redeem);

impl es_core::Decision for RedeemedBefore {
    type Event = CouponEvent;
    type State = bool;
    type Rejection = CouponError;

    fn query(&self) -> Query {
        self.0.query()
    }

    fn evolve(&self, redeemed: &mut bool, event: &CouponEvent) {
        self.0.evolve(redeemed, event);
    }

    fn decide(&self, redeemed: &bool) -> Result<Vec<CouponEvent>, CouponError> {
        if *redeemed {
            Ok(Vec::new())
        } else {
            Err(CouponError::AlreadyRedeemed)
        }
    }
}

/// A store that meddles with reads by query.
#[derive(Debug)]
struct Meddler {
    inner: InMemoryEventStore,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    /// After every read by query, appends to another stream an event of the
    /// query's type carrying the tags of its first item: the boundary of
    /// every decision made on the read has moved.
    MovesAfterRead,
    /// The next this many reads by query leave out their page's newest
    /// event, with a marker before it.
    HidesNewest(std::sync::atomic::AtomicUsize),
}

#[async_trait::async_trait]
impl EventStore for Meddler {
    async fn append(
        &self,
        stream: &es_core::StreamId,
        expected: es_core::ExpectedVersion,
        events: Vec<es_core::NewEvent>,
    ) -> Result<es_core::AppendResult, es_core::StoreError> {
        self.inner.append(stream, expected, events).await
    }
    async fn append_streams(
        &self,
        parts: Vec<es_core::StreamAppend>,
    ) -> Result<Vec<es_core::AppendResult>, es_core::StoreError> {
        self.inner.append_streams(parts).await
    }
    async fn read_stream(
        &self,
        stream: &es_core::StreamId,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<es_core::RecordedEvent>, es_core::StoreError> {
        self.inner
            .read_stream(stream, from_version, max_count)
            .await
    }
    async fn read_all(
        &self,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<es_core::RecordedEvent>, es_core::StoreError> {
        self.inner.read_all(after, max_count).await
    }
    async fn stream_version(&self, stream: &es_core::StreamId) -> Result<u64, es_core::StoreError> {
        self.inner.stream_version(stream).await
    }
    async fn head(&self) -> Result<Position, es_core::StoreError> {
        self.inner.head().await
    }
    fn subscribe_all(
        &self,
        after: Position,
    ) -> futures::stream::BoxStream<'static, Result<es_core::RecordedEvent, es_core::StoreError>>
    {
        self.inner.subscribe_all(after)
    }
}

#[async_trait::async_trait]
impl DcbStore for Meddler {
    async fn read(
        &self,
        query: &Query,
        after: Position,
        max_count: usize,
    ) -> Result<es_core::QueryPage, es_core::StoreError> {
        let mut page = self.inner.read(query, after, max_count).await?;
        if let Mode::HidesNewest(reads) = &self.mode {
            let hide = reads
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok();
            if hide && page.events.pop().is_some() {
                page.marker = page.events.last().map_or(after, |e| e.position);
            }
            return Ok(page);
        }
        let item = &query.items()[0];
        let mut event = dcb_conformance::tagged_event(0, "CouponRedeemed", &[]);
        event.tags = item.tags().clone();
        self.inner
            .append(
                &unique_stream("other"),
                es_core::ExpectedVersion::Any,
                vec![event],
            )
            .await?;
        Ok(page)
    }
    async fn append_if(
        &self,
        stream: &es_core::StreamId,
        events: Vec<es_core::NewEvent>,
        condition: es_core::AppendCondition,
    ) -> Result<es_core::AppendResult, es_core::StoreError> {
        self.inner.append_if(stream, events, condition).await
    }
    fn subscribe(
        &self,
        query: Query,
        after: Position,
    ) -> futures::stream::BoxStream<'static, Result<es_core::RecordedEvent, es_core::StoreError>>
    {
        self.inner.subscribe(query, after)
    }
}
