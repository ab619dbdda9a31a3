//! The DCB conformance suite: every guarantee of [`DcbStore`], as functions
//! any implementation calls from its own tests (the in-memory and
//! PostgreSQL stores both do).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use es_core::{DcbStore, InMemoryEventStore};
//! es_core::testing::dcb_conformance::run_all(|| async {
//!     Arc::new(InMemoryEventStore::new()) as Arc<dyn DcbStore>
//! })
//! .await;
//! # });
//! ```
//!
//! Each check uses fresh tags and streams, so one store may serve them all.
//! A failed check panics with what it saw.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Barrier;
use uuid::Uuid;

use super::conformance::{event, next_event, unique_stream};
use crate::dcb::read_all_matching;
use crate::{
    AppendCondition, DcbStore, ExpectedVersion, NewEvent, Position, Query, QueryItem,
    RecordedEvent, StoreError, StreamAppend, Tag,
};

/// Runs every check, each on a store from `new_store`; the races run
/// `race_rounds` rounds.
pub async fn run_all<F, Fut>(mut new_store: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<dyn DcbStore>>,
{
    tags_round_trip(new_store().await).await;
    query_matching_rules(new_store().await).await;
    read_pages_and_marker(new_store().await).await;
    condition_after_marker(new_store().await).await;
    plain_tagged_append_moves_the_boundary(new_store().await).await;
    idempotent_conditional_reappend(new_store().await).await;
    racers_on_one_boundary(new_store().await, 20).await;
    racers_on_disjoint_boundaries(new_store().await, 5).await;
    overlapping_boundaries_keep_their_invariants(new_store().await).await;
    query_subscription_catches_up_then_goes_live(new_store().await).await;
    query_subscription_follows_concurrent_writers(new_store().await).await;
}

/// A fresh tag of `kind`.
pub fn unique_tag(kind: &str) -> Tag {
    Tag::of(kind, Uuid::now_v7().simple()).unwrap_or_else(|e| panic!("test tag: {e}"))
}

/// The test event `n` of type `event_type` carrying `tags`.
pub fn tagged_event(n: u64, event_type: &str, tags: &[&Tag]) -> NewEvent {
    let mut new = event(n).with_tags(tags.iter().map(|t| (*t).clone()));
    new.event_type = event_type.into();
    new
}

fn ids(events: &[RecordedEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.event_id).collect()
}

async fn read_everything(store: &dyn DcbStore, query: &Query) -> (Vec<RecordedEvent>, Position) {
    let page = read_all_matching(store, query, Position::START, 3)
        .await
        .unwrap_or_else(|e| panic!("read by query failed: {e}"));
    (page.events, page.marker)
}

/// Tags are stored with an event and given back by every read.
pub async fn tags_round_trip(store: Arc<dyn DcbStore>) {
    let (a, b) = (unique_tag("a"), unique_tag("b"));
    let stream = unique_stream("dcb");
    let new = tagged_event(1, "Tagged", &[&a, &b]);
    let plain = event(2);
    store
        .append(&stream, ExpectedVersion::NoStream, vec![new.clone(), plain])
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let stored = store
        .read_stream(&stream, 1, 10)
        .await
        .unwrap_or_else(|e| panic!("read_stream failed: {e}"));
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].tags, new.tags);
    assert!(stored[1].tags.is_empty());
    let log = super::conformance::whole_log(&*store, Position::START).await;
    let logged = log
        .iter()
        .find(|e| e.event_id == new.event_id)
        .unwrap_or_else(|| panic!("event missing from read_all"));
    assert_eq!(logged.tags, new.tags);
    let (matched, _) = read_everything(&*store, &Query::from(QueryItem::tagged(a))).await;
    assert_eq!(ids(&matched), vec![new.event_id]);
    assert_eq!(matched[0].tags, new.tags);
    assert_eq!(matched[0].stream_id, stream);
    assert_eq!(matched[0].stream_version, 1);
}

/// An item selects by type (any when it names none) and by all of its
/// tags; a query is the union of its items, in log order, each event once;
/// an empty query matches nothing.
pub async fn query_matching_rules(store: Arc<dyn DcbStore>) {
    let (a, b, c) = (unique_tag("a"), unique_tag("b"), unique_tag("c"));
    let stream = unique_stream("dcb");
    let batch = vec![
        tagged_event(1, "X", &[&a]),
        tagged_event(2, "Y", &[&a, &b]),
        tagged_event(3, "X", &[&b]),
        tagged_event(4, "Z", &[&c]),
        tagged_event(5, "X", &[&a, &b, &c]),
    ];
    let id: Vec<Uuid> = batch.iter().map(|e| e.event_id).collect();
    store
        .append(&stream, ExpectedVersion::NoStream, batch)
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let cases = [
        (Query::from(QueryItem::tagged(a.clone())), vec![0, 1, 4]),
        (
            Query::from(QueryItem::tagged(a.clone()).of_types(["X"])),
            vec![0, 4],
        ),
        (
            Query::from(QueryItem::tagged(a.clone()).and_tag(b.clone())),
            vec![1, 4],
        ),
        (
            Query::from(QueryItem::tagged(b.clone()).of_types(["X", "Y"])),
            vec![1, 2, 4],
        ),
        (
            Query::from(QueryItem::tagged(c.clone()))
                .or(QueryItem::tagged(a.clone()).of_types(["Y"])),
            vec![1, 3, 4],
        ),
        (
            Query::from(QueryItem::tagged(a.clone())).or(QueryItem::tagged(b.clone())),
            vec![0, 1, 2, 4],
        ),
        (
            Query::from(QueryItem::tagged(c.clone()).of_types(["Y"])),
            vec![],
        ),
        (Query::none(), vec![]),
    ];
    for (query, expected) in cases {
        let (matched, _) = read_everything(&*store, &query).await;
        let want: Vec<Uuid> = expected.iter().map(|&i| id[i]).collect();
        assert_eq!(ids(&matched), want, "{query:?}");
        assert!(matched.iter().all(|e| query.matches_event(e)));
    }
}

/// A full page's marker is its last event, and reading on from it gives
/// the rest; a short page's marker covers the log read (at or after the
/// last event), and nothing matching is after it.
pub async fn read_pages_and_marker(store: Arc<dyn DcbStore>) {
    let a = unique_tag("a");
    let query = Query::from(QueryItem::tagged(a.clone()));
    let empty = store
        .read(&query, Position::START, 10)
        .await
        .unwrap_or_else(|e| panic!("read failed: {e}"));
    assert!(empty.events.is_empty());
    let stream = unique_stream("dcb");
    let batch: Vec<NewEvent> = (1..=5).map(|n| tagged_event(n, "X", &[&a])).collect();
    store
        .append(&stream, ExpectedVersion::NoStream, batch)
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let first = store
        .read(&query, Position::START, 2)
        .await
        .unwrap_or_else(|e| panic!("read failed: {e}"));
    assert_eq!(first.events.len(), 2);
    assert_eq!(Some(first.marker), first.events.last().map(|e| e.position));
    let rest = store
        .read(&query, first.marker, 10)
        .await
        .unwrap_or_else(|e| panic!("read failed: {e}"));
    assert_eq!(rest.events.len(), 3);
    let last = rest.events.last().map(|e| e.position);
    assert!(Some(rest.marker) >= last, "{:?} < {last:?}", rest.marker);
    let after = store
        .read(&query, rest.marker, 10)
        .await
        .unwrap_or_else(|e| panic!("read failed: {e}"));
    assert!(after.events.is_empty());
    assert!(after.marker >= rest.marker);
}

/// `append_if` fails with `BoundaryMoved` and writes nothing when a
/// matching event is after the marker (or exists at all, with no marker);
/// it succeeds when only unmatched events (another tag, another type)
/// were appended since.
pub async fn condition_after_marker(store: Arc<dyn DcbStore>) {
    let (a, other) = (unique_tag("a"), unique_tag("a"));
    let query = Query::from(QueryItem::tagged(a.clone()).of_types(["Claimed"]));
    let stream = unique_stream("dcb");
    let first = store
        .append_if(
            &stream,
            vec![tagged_event(1, "Claimed", &[&a])],
            AppendCondition::none_exists(query.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("first conditional append failed: {e}"));
    assert!(first.written);
    assert_eq!(first.stream_version, 1);
    let again = store
        .append_if(
            &stream,
            vec![tagged_event(2, "Claimed", &[&a])],
            AppendCondition::none_exists(query.clone()),
        )
        .await;
    assert!(
        matches!(&again, Err(StoreError::BoundaryMoved { stream: s, after: None }) if s == &stream),
        "{again:?}"
    );
    let (_, marker) = read_everything(&*store, &query).await;
    // Unmatched events since the read: another tag, another type.
    store
        .append(
            &unique_stream("dcb"),
            ExpectedVersion::Any,
            vec![
                tagged_event(3, "Claimed", &[&other]),
                tagged_event(4, "Released", &[&a]),
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let second = store
        .append_if(
            &stream,
            vec![tagged_event(5, "Claimed", &[&a])],
            AppendCondition::after(query.clone(), marker),
        )
        .await
        .unwrap_or_else(|e| panic!("conditional append after unmatched events failed: {e}"));
    assert_eq!(second.stream_version, 2);
    let stale = store
        .append_if(
            &stream,
            vec![tagged_event(6, "Claimed", &[&a])],
            AppendCondition::after(query.clone(), marker),
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::BoundaryMoved { after: Some(m), .. }) if m == marker),
        "{stale:?}"
    );
    assert_eq!(store.stream_version(&stream).await.ok(), Some(2));
    let (matched, _) = read_everything(&*store, &query).await;
    assert_eq!(matched.len(), 2, "a refused append wrote nothing");
}

/// A tagged event appended by `append` or `append_streams` moves every
/// boundary whose query matches it.
pub async fn plain_tagged_append_moves_the_boundary(store: Arc<dyn DcbStore>) {
    for through_streams in [false, true] {
        let a = unique_tag("a");
        let query = Query::from(QueryItem::tagged(a.clone()));
        let (_, marker) = read_everything(&*store, &query).await;
        let plain = unique_stream("plain");
        let tagged = vec![tagged_event(1, "X", &[&a])];
        if through_streams {
            store
                .append_streams(vec![
                    StreamAppend::new(plain.clone(), ExpectedVersion::NoStream, tagged),
                    StreamAppend::new(
                        unique_stream("plain"),
                        ExpectedVersion::NoStream,
                        vec![event(2)],
                    ),
                ])
                .await
                .unwrap_or_else(|e| panic!("append_streams failed: {e}"));
        } else {
            store
                .append(&plain, ExpectedVersion::NoStream, tagged)
                .await
                .unwrap_or_else(|e| panic!("append failed: {e}"));
        }
        let result = store
            .append_if(
                &unique_stream("dcb"),
                vec![tagged_event(3, "X", &[&a])],
                AppendCondition::after(query.clone(), marker),
            )
            .await;
        assert!(
            matches!(result, Err(StoreError::BoundaryMoved { .. })),
            "append_streams: {through_streams}: {result:?}"
        );
    }
}

/// Re-sending a conditional append that committed (same ids, same stream,
/// its condition now stale) is an idempotent success that writes nothing.
pub async fn idempotent_conditional_reappend(store: Arc<dyn DcbStore>) {
    let a = unique_tag("a");
    let query = Query::from(QueryItem::tagged(a.clone()));
    let stream = unique_stream("dcb");
    let batch = vec![tagged_event(1, "X", &[&a]), tagged_event(2, "X", &[&a])];
    let condition = AppendCondition::none_exists(query.clone());
    let first = store
        .append_if(&stream, batch.clone(), condition.clone())
        .await
        .unwrap_or_else(|e| panic!("conditional append failed: {e}"));
    assert!(first.written);
    let again = store
        .append_if(&stream, batch.clone(), condition.clone())
        .await
        .unwrap_or_else(|e| panic!("re-sent conditional append failed: {e}"));
    assert!(!again.written);
    assert_eq!(again.stream_version, 2);
    assert_eq!(again.position, first.position);
    // A new id is decided by the condition.
    let moved = store
        .append_if(&stream, vec![tagged_event(3, "X", &[&a])], condition)
        .await;
    assert!(
        matches!(moved, Err(StoreError::BoundaryMoved { .. })),
        "{moved:?}"
    );
    let (matched, _) = read_everything(&*store, &query).await;
    assert_eq!(matched.len(), 2);
}

/// How a race of conditional appends ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaceTally {
    /// Rounds run.
    pub rounds: usize,
    /// Appends that committed, over all rounds.
    pub committed: usize,
    /// Appends refused with [`StoreError::BoundaryMoved`].
    pub moved: usize,
    /// Rounds whose outcome broke the guarantee.
    pub violations: usize,
}

/// `racers` conditional appends at once, all on the same marker, each to
/// its own stream: with `shared` they decide on one (type, tag) and their
/// events match each other's query, else each on its own tag. Returns how
/// many committed and how many found the boundary moved; panics on any
/// other error.
pub async fn race_round(store: &Arc<dyn DcbStore>, racers: usize, shared: bool) -> (usize, usize) {
    let shared_tag = unique_tag("coupon");
    let tags: Vec<Tag> = (0..racers)
        .map(|_| {
            if shared {
                shared_tag.clone()
            } else {
                unique_tag("coupon")
            }
        })
        .collect();
    let barrier = Arc::new(Barrier::new(racers));
    let mut tasks = Vec::with_capacity(racers);
    for (n, tag) in tags.into_iter().enumerate() {
        let store = Arc::clone(store);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let query = Query::from(QueryItem::tagged(tag.clone()).of_types(["Redeemed"]));
            let page = store
                .read(&query, Position::START, 10)
                .await
                .unwrap_or_else(|e| panic!("read failed: {e}"));
            assert!(page.events.is_empty());
            barrier.wait().await;
            store
                .append_if(
                    &unique_stream("redemption"),
                    vec![tagged_event(n as u64, "Redeemed", &[&tag])],
                    AppendCondition::after(query, page.marker),
                )
                .await
        }));
    }
    let (mut committed, mut moved) = (0, 0);
    for task in tasks {
        match task.await {
            Ok(Ok(_)) => committed += 1,
            Ok(Err(StoreError::BoundaryMoved { .. })) => moved += 1,
            Ok(Err(e)) => panic!("a racer failed: {e}"),
            Err(e) => panic!("a racer panicked: {e}"),
        }
    }
    (committed, moved)
}

/// Runs `rounds` rounds of [`race_round`] with 32 racers on one boundary:
/// every round exactly one commits and 31 find the boundary moved.
pub async fn racers_on_one_boundary(store: Arc<dyn DcbStore>, rounds: usize) -> RaceTally {
    race(store, rounds, true).await
}

/// Runs `rounds` rounds of [`race_round`] with 32 racers on disjoint tags:
/// all commit, none is refused.
pub async fn racers_on_disjoint_boundaries(store: Arc<dyn DcbStore>, rounds: usize) -> RaceTally {
    race(store, rounds, false).await
}

async fn race(store: Arc<dyn DcbStore>, rounds: usize, shared: bool) -> RaceTally {
    const RACERS: usize = 32;
    let mut tally = RaceTally::default();
    for _ in 0..rounds {
        let (committed, moved) = race_round(&store, RACERS, shared).await;
        let expected = if shared { (1, RACERS - 1) } else { (RACERS, 0) };
        tally.rounds += 1;
        tally.committed += committed;
        tally.moved += moved;
        if (committed, moved) != expected {
            tally.violations += 1;
        }
    }
    assert_eq!(
        tally.violations,
        0,
        "rounds with other than {} commits: {tally:?}",
        if shared { 1 } else { RACERS }
    );
    tally
}

/// Enrolments in courses of limited capacity by students of limited load,
/// decided concurrently on two overlapping boundaries each (the course's
/// and the student's, a query of two items): no course takes more than its
/// capacity, no student more than their limit, every decision either
/// commits or is refused with [`StoreError::BoundaryMoved`] (no deadlock,
/// no other error), and each one ends within its attempts.
pub async fn overlapping_boundaries_keep_their_invariants(store: Arc<dyn DcbStore>) {
    const COURSES: usize = 4;
    const STUDENTS: usize = 6;
    const CAPACITY: usize = 3;
    const LIMIT: usize = 2;
    const DECISIONS: usize = 48;
    let courses: Vec<Tag> = (0..COURSES).map(|_| unique_tag("course")).collect();
    let students: Vec<Tag> = (0..STUDENTS).map(|_| unique_tag("student")).collect();
    let barrier = Arc::new(Barrier::new(DECISIONS));
    let mut tasks = Vec::with_capacity(DECISIONS);
    for d in 0..DECISIONS {
        let store = Arc::clone(&store);
        let barrier = Arc::clone(&barrier);
        let course = courses[d % COURSES].clone();
        let student = students[(d * 7 + d / COURSES) % STUDENTS].clone();
        tasks.push(tokio::spawn(async move {
            let query = Query::from(QueryItem::tagged(course.clone()).of_types(["Enrolled"]))
                .or(QueryItem::tagged(student.clone()).of_types(["Enrolled"]));
            barrier.wait().await;
            for attempt in 1..=200u32 {
                let page = read_all_matching(&*store, &query, Position::START, 100)
                    .await
                    .unwrap_or_else(|e| panic!("read failed: {e}"));
                let in_course = page
                    .events
                    .iter()
                    .filter(|e| e.tags.contains(&course))
                    .count();
                let of_student = page
                    .events
                    .iter()
                    .filter(|e| e.tags.contains(&student))
                    .count();
                let taken = page
                    .events
                    .iter()
                    .any(|e| e.tags.contains(&course) && e.tags.contains(&student));
                if taken || in_course >= CAPACITY || of_student >= LIMIT {
                    return false;
                }
                let result = store
                    .append_if(
                        &unique_stream("enrolment"),
                        vec![tagged_event(d as u64, "Enrolled", &[&course, &student])],
                        AppendCondition::after(query.clone(), page.marker),
                    )
                    .await;
                match result {
                    Ok(_) => return true,
                    Err(StoreError::BoundaryMoved { .. }) => {
                        tokio::time::sleep(Duration::from_micros(
                            fastrand::u64(0..500) * u64::from(attempt.min(8)),
                        ))
                        .await;
                    }
                    Err(e) => panic!("an enrolment failed: {e}"),
                }
            }
            panic!("an enrolment kept finding its boundary moved");
        }));
    }
    let mut enrolled = 0;
    for task in tasks {
        if task
            .await
            .unwrap_or_else(|e| panic!("a decision panicked: {e}"))
        {
            enrolled += 1;
        }
    }
    let everyone = Query::any_of(courses.iter().map(|c| QueryItem::tagged(c.clone())));
    let (all, _) = read_everything(&*store, &everyone).await;
    assert_eq!(all.len(), enrolled);
    for course in &courses {
        let n = all.iter().filter(|e| e.tags.contains(course)).count();
        assert!(n <= CAPACITY, "{course} took {n} students");
    }
    for student in &students {
        let n = all.iter().filter(|e| e.tags.contains(student)).count();
        assert!(n <= LIMIT, "{student} took {n} courses");
    }
    let mut pairs: Vec<_> = all.iter().map(|e| e.tags.clone()).collect();
    pairs.sort();
    pairs.dedup();
    assert_eq!(
        pairs.len(),
        all.len(),
        "a student enrolled twice in a course"
    );
    assert!(enrolled > 0);
}

/// A query subscription gives the matching history, then matching events
/// as they commit, and nothing else.
pub async fn query_subscription_catches_up_then_goes_live(store: Arc<dyn DcbStore>) {
    let a = unique_tag("a");
    let query = Query::from(QueryItem::tagged(a.clone()));
    let stream = unique_stream("dcb");
    let history = vec![tagged_event(1, "X", &[&a]), event(2)];
    let first = history[0].event_id;
    store
        .append(&stream, ExpectedVersion::NoStream, history)
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let mut sub = store.subscribe(query, Position::START);
    assert_eq!(next_event(&mut sub).await.event_id, first);
    let live = vec![event(3), tagged_event(4, "Y", &[&a])];
    let second = live[1].event_id;
    store
        .append(&stream, ExpectedVersion::Exact(2), live)
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    assert_eq!(next_event(&mut sub).await.event_id, second);
}

/// Writers appending tagged and untagged events at once: a query
/// subscription sees every matching event exactly once, in log order.
pub async fn query_subscription_follows_concurrent_writers(store: Arc<dyn DcbStore>) {
    const WRITERS: u64 = 8;
    const EACH: u64 = 20;
    let a = unique_tag("a");
    let query = Query::from(QueryItem::tagged(a.clone()));
    let mut sub = store.subscribe(query.clone(), Position::START);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = Arc::clone(&store);
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let stream = unique_stream("w");
            for i in 0..EACH {
                let n = w * EACH + i;
                let new = if n.is_multiple_of(2) {
                    tagged_event(n, "X", &[&a])
                } else {
                    event(n)
                };
                store
                    .append(&stream, ExpectedVersion::Any, vec![new])
                    .await
                    .unwrap_or_else(|e| panic!("append failed: {e}"));
            }
        }));
    }
    for task in tasks {
        task.await
            .unwrap_or_else(|e| panic!("a writer panicked: {e}"));
    }
    let expected = (WRITERS * EACH / 2) as usize;
    let mut seen = Vec::with_capacity(expected);
    while seen.len() < expected {
        seen.push(next_event(&mut sub).await);
    }
    let (read, _) = read_everything(&*store, &query).await;
    assert_eq!(
        ids(&seen),
        ids(&read),
        "the subscription and the read disagree"
    );
    assert!(seen.windows(2).all(|w| w[0].position < w[1].position));
}
