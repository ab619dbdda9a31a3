//! The bus conformance suite: the guarantees of [`EventBus`], as checks any
//! bus runs through a [`BusFixture`]. The in-memory bus and es-rabbit's
//! RabbitMQ bus run the same checks (in the workspace's `es-tests`).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use es_core::testing::bus_conformance::{run_all, BusFixture};
//! use es_core::{DeadLetter, EventBus, InMemoryBus, Subscription};
//!
//! struct Memory(InMemoryBus);
//!
//! #[async_trait]
//! impl BusFixture for Memory {
//!     fn bus(&self) -> Arc<dyn EventBus> {
//!         Arc::new(self.0.clone())
//!     }
//!     async fn dead_letters(&self, group: &str) -> Vec<DeadLetter> {
//!         self.0.dead_letters(group)
//!     }
//!     async fn cleanup(&self, _: &[Subscription], _: &[String]) {}
//! }
//!
//! run_all(&Memory(InMemoryBus::new())).await;
//! # });
//! ```
//!
//! What both buses promise, and so what is checked: delivery at least once
//! (a consumer that stops leaves what it did not handle to the next);
//! attempts counted from 1, a retried message delivered again until its
//! attempts run out, then dead-lettered with the handler's reason; a
//! dead-letter answer ends deliveries at once; a handler that panics gets
//! the message again; one copy per group, shared
//! by the group's competing consumers; and, for one consumer with prefetch
//! 1, a group's messages in publish order (neither bus orders deliveries
//! handled concurrently, across consumers or within a prefetch window).
//!
//! Each check uses its own topics and groups, so one fixture serves them
//! all. Bindings start with their topic, as RabbitMQ requires.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::{
    CancellationToken, DeadLetter, Delivery, EventBus, Message, MessageHandler, Metadata, Outcome,
    Payload, Subscription, SubscriptionHandle,
};

/// A bus under test, with what the trait does not offer.
#[async_trait]
pub trait BusFixture: Send + Sync {
    /// The bus.
    fn bus(&self) -> Arc<dyn EventBus>;
    /// Every message `group` dead-lettered so far.
    async fn dead_letters(&self, group: &str) -> Vec<DeadLetter>;
    /// Removes the groups and topics a check created.
    async fn cleanup(&self, subscriptions: &[Subscription], topics: &[String]);
}

/// How long a check waits for what must come.
const PATIENCE: Duration = Duration::from_secs(30);

/// Runs every check on `fixture`.
pub async fn run_all(fixture: &dyn BusFixture) {
    every_message_is_delivered(fixture).await;
    a_stopped_consumer_leaves_the_rest_to_the_next(fixture).await;
    one_consumer_receives_in_publish_order(fixture).await;
    retries_count_attempts_then_dead_letter(fixture).await;
    a_retried_message_that_succeeds_is_not_dead_lettered(fixture).await;
    a_dead_letter_answer_is_final(fixture).await;
    a_panicking_handler_gets_the_message_again(fixture).await;
    competing_consumers_share_the_work(fixture).await;
    each_group_gets_its_copy(fixture).await;
}

/// A test message `{"n": n}` with a fresh id.
fn message(topic: &str, message_type: &str, n: u64) -> Message {
    Message {
        message_id: Uuid::now_v7(),
        topic: topic.into(),
        message_type: message_type.into(),
        schema_version: 1,
        payload: Payload::from_trusted_json(format!(r#"{{"n":{n}}}"#)),
        metadata: Metadata::new(),
        source: None,
    }
}

/// Waits, polling, until `check` answers true; panics naming `what` after
/// [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A topic and a group name no other check uses.
fn unique(what: &str) -> String {
    format!("{what}{}", &Uuid::new_v4().simple().to_string()[..8])
}

/// What a handler saw: per delivery, the message's number and attempt.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(u64, u32)>>>);

impl Seen {
    fn push(&self, delivery: &Delivery) {
        let n = delivery
            .message
            .payload
            .to_value()
            .ok()
            .and_then(|v| v["n"].as_u64())
            .expect("a test message");
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((n, delivery.attempt));
    }

    fn all(&self) -> Vec<(u64, u32)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn numbers(&self) -> Vec<u64> {
        self.all().into_iter().map(|(n, _)| n).collect()
    }

    fn distinct(&self) -> usize {
        let mut numbers = self.numbers();
        numbers.sort_unstable();
        numbers.dedup();
        numbers.len()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// A handler that records each delivery and answers `answer(delivery)`.
fn recorder(
    seen: &Seen,
    answer: impl Fn(&Delivery) -> Outcome + Send + Sync + 'static,
) -> Arc<dyn MessageHandler> {
    let seen = seen.clone();
    let answer = Arc::new(answer);
    Arc::new(move |delivery: Delivery| {
        let seen = seen.clone();
        let answer = Arc::clone(&answer);
        async move {
            seen.push(&delivery);
            answer(&delivery)
        }
    })
}

async fn publish(fixture: &dyn BusFixture, topic: &str, kind: &str, numbers: std::ops::Range<u64>) {
    let messages: Vec<_> = numbers.map(|n| message(topic, kind, n)).collect();
    fixture
        .bus()
        .publish(&messages)
        .await
        .unwrap_or_else(|e| panic!("publishing to {topic}: {e}"));
}

async fn subscribe(
    fixture: &dyn BusFixture,
    subscription: &Subscription,
    handler: Arc<dyn MessageHandler>,
) -> SubscriptionHandle {
    fixture
        .bus()
        .subscribe(subscription.clone(), handler)
        .await
        .unwrap_or_else(|e| panic!("subscribing {}: {e}", subscription.group))
}

/// Every message published to a bound group is delivered.
pub async fn every_message_is_delivered(fixture: &dyn BusFixture) {
    let topic = unique("c");
    let group = Subscription::new(unique("g"), [format!("{topic}.*")]).with_prefetch(8);
    fixture.bus().declare(&group).await.expect("declare");
    publish(fixture, &topic, "Noted", 0..200).await;
    let seen = Seen::default();
    let handle = subscribe(fixture, &group, recorder(&seen, |_| Outcome::Ack)).await;
    eventually("200 messages delivered", || async {
        seen.distinct() == 200
    })
    .await;
    handle.stop().await;
    let mut numbers = seen.numbers();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers, (0..200).collect::<Vec<_>>());
    assert!(seen.all().iter().all(|&(_, attempt)| attempt == 1));
    fixture.cleanup(&[group], &[topic]).await;
}

/// A consumer stopped halfway leaves the messages it did not handle in the
/// group's queue; the next consumer gets them.
pub async fn a_stopped_consumer_leaves_the_rest_to_the_next(fixture: &dyn BusFixture) {
    let topic = unique("c");
    let group = Subscription::new(unique("g"), [format!("{topic}.*")]).with_prefetch(1);
    fixture.bus().declare(&group).await.expect("declare");
    publish(fixture, &topic, "Noted", 0..100).await;
    let first = Seen::default();
    // The first consumer handles ten, then holds the eleventh until it is
    // stopped: a consumer stopped halfway, whatever the bus's speed.
    let gate = CancellationToken::new();
    let handler = {
        let (seen, gate) = (first.clone(), gate.clone());
        Arc::new(move |delivery: Delivery| {
            let (seen, gate) = (seen.clone(), gate.clone());
            async move {
                seen.push(&delivery);
                if seen.len() > 10 {
                    gate.cancelled().await;
                }
                Outcome::Ack
            }
        })
    };
    let handle = subscribe(fixture, &group, handler).await;
    eventually("a first consumer handled some", || async {
        first.len() > 10
    })
    .await;
    drop(handle);
    gate.cancel();
    let handled_first = first.distinct();
    assert!(
        handled_first < 100,
        "the first consumer was not stopped halfway"
    );
    let second = Seen::default();
    let handle = subscribe(fixture, &group, recorder(&second, |_| Outcome::Ack)).await;
    eventually("the rest delivered to the next consumer", || async {
        let mut all = first.numbers();
        all.extend(second.numbers());
        all.sort_unstable();
        all.dedup();
        all.len() == 100
    })
    .await;
    handle.stop().await;
    fixture.cleanup(&[group], &[topic]).await;
}

/// One consumer with prefetch 1 receives a group's messages in the order
/// they were published, whatever their routing keys.
pub async fn one_consumer_receives_in_publish_order(fixture: &dyn BusFixture) {
    let topic = unique("c");
    let group = Subscription::new(unique("g"), [format!("{topic}.*")]).with_prefetch(1);
    fixture.bus().declare(&group).await.expect("declare");
    // Two routing keys, interleaved, in several publishes.
    for chunk in 0..10u64 {
        let messages: Vec<_> = (chunk * 10..chunk * 10 + 10)
            .map(|n| message(&topic, if n % 2 == 0 { "Even" } else { "Odd" }, n))
            .collect();
        fixture.bus().publish(&messages).await.expect("publish");
    }
    let seen = Seen::default();
    let handle = subscribe(fixture, &group, recorder(&seen, |_| Outcome::Ack)).await;
    eventually("100 messages delivered", || async { seen.len() >= 100 }).await;
    handle.stop().await;
    assert_eq!(seen.numbers(), (0..100).collect::<Vec<_>>());
    fixture.cleanup(&[group], &[topic]).await;
}

/// A message whose handler keeps asking for a retry is delivered exactly
/// `max_attempts` times, attempts numbered 1, 2, ..., then dead-lettered with
/// the handler's reason and the attempts made.
pub async fn retries_count_attempts_then_dead_letter(fixture: &dyn BusFixture) {
    let topic = unique("c");
    let group = Subscription::new(unique("g"), [format!("{topic}.*")])
        .with_prefetch(4)
        .with_max_attempts(3)
        .with_retry_delay(Duration::from_millis(20));
    fixture.bus().declare(&group).await.expect("declare");
    let seen = Seen::default();
    let handle = subscribe(
        fixture,
        &group,
        recorder(&seen, |_| Outcome::retry("not today")),
    )
    .await;
    publish(fixture, &topic, "Failing", 0..5).await;
    eventually("5 dead letters", || async {
        fixture.dead_letters(&group.group).await.len() >= 5
    })
    .await;
    handle.stop().await;
    let dead = fixture.dead_letters(&group.group).await;
    let mut attempts: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (n, attempt) in seen.all() {
        attempts.entry(n).or_default().push(attempt);
    }
    for n in 0..5 {
        let mut got = attempts.remove(&n).unwrap_or_default();
        got.sort_unstable();
        assert_eq!(got, vec![1, 2, 3], "attempts of message {n}");
    }
    assert_eq!(dead.len(), 5);
    for letter in &dead {
        assert_eq!(letter.attempts, 3, "{letter:?}");
        assert!(letter.reason.contains("not today"), "{letter:?}");
        let message = letter.message.as_ref().expect("a decodable dead letter");
        assert_eq!(&*message.topic, topic.as_str());
    }
    fixture.cleanup(&[group], &[topic]).await;
}

/// A message retried twice and then handled is not dead-lettered.
pub async fn a_retried_message_that_succeeds_is_not_dead_lettered(fixture: &dyn BusFixture) {
    let topic = unique("c");
    let group = Subscription::new(unique("g"), [format!("{topic}.*")])
        .with_prefetch(4)
        .with_max_attempts(5)
        .with_retry_delay(Duration::from_millis(20));
    fixture.bus().declare(&group).await.expect("declare");
    let seen = Seen::default();
    let handle = subscribe(
        fixture,
        &group,
        recorder(&seen, |d| {
            if d.attempt < 3 {
                Outcome::retry("later")
            } else {
                Outcome::Ack
            }
        }),
    )
    .await;
    publish(fixture, &topic, "Flaky", 0..3).await;
    eventually("3 messages handled at their third attempt", || async {
        seen.all().iter().filter(|&&(_, a)| a == 3).count() == 3
    })
    .await;
    handle.stop().await;
    assert_eq!(seen.len(), 9, "{:?}", seen.all());
    assert!(fixture.dead_letters(&group.group).await.is_empty());
    fixture.cleanup(&[group], &[topic]).await;
}

/// A handler's dead-letter answer sets the message aside at once, with the
/// reason: it is not delivered again.
pub async fn a_dead_letter_answer_is_final(fixture: &dyn BusFixture) {
    let topic = unique("c");
    let group = Subscription::new(unique("g"), [format!("{topic}.*")])
        .with_prefetch(1)
        .with_max_attempts(5)
        .with_retry_delay(Duration::from_millis(20));
    fixture.bus().declare(&group).await.expect("declare");
    let seen = Seen::default();
    let handle = subscribe(
        fixture,
        &group,
        recorder(&seen, |d| {
            if d.message.message_type.as_ref() == "Poison" {
                Outcome::dead_letter("poison")
            } else {
                Outcome::Ack
            }
        }),
    )
    .await;
    // The poison, then, once it is dead-lettered, a sentinel: with one
    // consumer and prefetch 1, a redelivered poison would come before it.
    publish(fixture, &topic, "Poison", 0..1).await;
    eventually("the poison dead-lettered", || async {
        !fixture.dead_letters(&group.group).await.is_empty()
    })
    .await;
    publish(fixture, &topic, "Sentinel", 1..2).await;
    eventually("the sentinel handled", || async {
        seen.numbers().contains(&1)
    })
    .await;
    handle.stop().await;
    assert_eq!(seen.all(), vec![(0, 1), (1, 1)]);
    let dead = fixture.dead_letters(&group.group).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "poison");
    assert_eq!(dead[0].attempts, 1);
    fixture.cleanup(&[group], &[topic]).await;
}

/// A handler that panics has not handled the message: it is delivered
/// again, as the next attempt, and the consumer goes on.
pub async fn a_panicking_handler_gets_the_message_again(fixture: &dyn BusFixture) {
    let topic = unique("c");
    let group = Subscription::new(unique("g"), [format!("{topic}.*")])
        .with_prefetch(1)
        .with_max_attempts(5)
        .with_retry_delay(Duration::from_millis(20));
    fixture.bus().declare(&group).await.expect("declare");
    let seen = Seen::default();
    let handle = subscribe(
        fixture,
        &group,
        recorder(&seen, |d| {
            if d.attempt == 1 {
                // A panic, without the panic hook's report.
                std::panic::resume_unwind(Box::new("the handler fails on a first attempt"));
            }
            Outcome::Ack
        }),
    )
    .await;
    publish(fixture, &topic, "Crashing", 0..3).await;
    eventually("3 messages handled at their second attempt", || async {
        seen.all().iter().filter(|&&(_, a)| a == 2).count() == 3
    })
    .await;
    handle.stop().await;
    let mut all = seen.all();
    all.sort_unstable();
    assert_eq!(all, vec![(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]);
    assert!(fixture.dead_letters(&group.group).await.is_empty());
    fixture.cleanup(&[group], &[topic]).await;
}

/// Two consumers of one group share its messages: each handles some, and
/// together each message once.
pub async fn competing_consumers_share_the_work(fixture: &dyn BusFixture) {
    let topic = unique("c");
    let group = Subscription::new(unique("g"), [format!("{topic}.*")]).with_prefetch(2);
    fixture.bus().declare(&group).await.expect("declare");
    let (a, b) = (Seen::default(), Seen::default());
    // Slow handlers, so that neither consumer can take everything.
    let slow = |seen: &Seen| {
        let seen = seen.clone();
        Arc::new(move |delivery: Delivery| {
            let seen = seen.clone();
            async move {
                seen.push(&delivery);
                tokio::time::sleep(Duration::from_millis(5)).await;
                Outcome::Ack
            }
        }) as Arc<dyn MessageHandler>
    };
    let first = subscribe(fixture, &group, slow(&a)).await;
    let second = subscribe(fixture, &group, slow(&b)).await;
    publish(fixture, &topic, "Work", 0..100).await;
    eventually("100 messages handled", || async {
        a.len() + b.len() >= 100
    })
    .await;
    first.stop().await;
    second.stop().await;
    assert!(
        a.len() > 0 && b.len() > 0,
        "one consumer did everything: {} / {}",
        a.len(),
        b.len()
    );
    let mut all = a.numbers();
    all.extend(b.numbers());
    all.sort_unstable();
    assert_eq!(
        all,
        (0..100).collect::<Vec<_>>(),
        "a message handled twice or never"
    );
    fixture.cleanup(&[group], &[topic]).await;
}

/// Every group bound to a key gets its own copy of each message; a message
/// of a key a group is not bound to does not reach it.
pub async fn each_group_gets_its_copy(fixture: &dyn BusFixture) {
    let topic = unique("c");
    let all = Subscription::new(unique("g"), [format!("{topic}.*")]).with_prefetch(1);
    let only = Subscription::new(unique("g"), [format!("{topic}.Wanted")]).with_prefetch(1);
    for group in [&all, &only] {
        fixture.bus().declare(group).await.expect("declare");
    }
    let messages: Vec<_> = (0..20)
        .map(|n| message(&topic, if n % 4 == 0 { "Unwanted" } else { "Wanted" }, n))
        .collect();
    fixture.bus().publish(&messages).await.expect("publish");
    let (seen_all, seen_only) = (Seen::default(), Seen::default());
    let h1 = subscribe(fixture, &all, recorder(&seen_all, |_| Outcome::Ack)).await;
    let h2 = subscribe(fixture, &only, recorder(&seen_only, |_| Outcome::Ack)).await;
    eventually("both groups handled theirs", || async {
        seen_all.len() >= 20 && seen_only.len() >= 15
    })
    .await;
    h1.stop().await;
    h2.stop().await;
    // In publish order (one consumer, prefetch 1): by the time the last
    // wanted message is handled, an unwanted one would have come before it.
    assert_eq!(seen_all.numbers(), (0..20).collect::<Vec<_>>());
    assert_eq!(
        seen_only.numbers(),
        (0..20).filter(|n| n % 4 != 0).collect::<Vec<_>>()
    );
    fixture.cleanup(&[all, only], &[topic]).await;
}
