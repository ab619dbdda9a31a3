//! Acknowledgements in batches: one `basic.ack` with `multiple` for every
//! delivery of a channel that is settled, up to the first one still being
//! handled.
//!
//! A consumer handles its deliveries concurrently, so they finish out of
//! order; a multiple ack of tag `t` settles every unsettled delivery up to
//! `t`, so it is sent only for a `t` below every delivery still in hand.
//! The acks wait for nothing: each is sent as soon as the one before it has
//! gone out, covering whatever finished meanwhile, so a lone delivery is
//! acked at once and a busy channel sends one ack for many.

use std::collections::BTreeSet;

use lapin::options::BasicAckOptions;
use lapin::Channel;
use metrics::SharedString;
use tokio::sync::mpsc;

use crate::error::bounded;
use crate::telemetry;

/// What the consumer tells the acker about a delivery tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tag {
    /// Delivered and in hand (told in delivery order, before handling).
    Delivered(u64),
    /// Handled: to be acked.
    Done(u64),
    /// Settled otherwise (rejected), or left to be redelivered.
    Settled(u64),
}

/// Which tags are in hand and which wait for their ack.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    in_hand: BTreeSet<u64>,
    done: BTreeSet<u64>,
}

impl Pending {
    pub(crate) fn note(&mut self, tag: Tag) {
        match tag {
            Tag::Delivered(t) => {
                self.in_hand.insert(t);
            }
            Tag::Done(t) => {
                self.in_hand.remove(&t);
                self.done.insert(t);
            }
            Tag::Settled(t) => {
                self.in_hand.remove(&t);
            }
        }
    }

    /// The tag to ack with `multiple`, and how many deliveries that acks:
    /// the highest done tag below every tag still in hand.
    pub(crate) fn next_ack(&mut self) -> Option<(u64, usize)> {
        let below = match self.in_hand.first() {
            Some(&first) => self.done.range(..first).next_back().copied(),
            None => self.done.last().copied(),
        }?;
        let rest = self.done.split_off(&(below + 1));
        let acked = std::mem::replace(&mut self.done, rest).len();
        Some((below, acked))
    }
}

/// Acks the deliveries of `channel` as `tags` reports them, until every
/// sender is gone; then acks what is left and returns. Stops acking (and
/// returns) when an ack cannot be sent: the channel is gone, and the broker
/// redelivers what it did not ack.
pub(crate) async fn ack_in_batches(
    channel: &Channel,
    mut tags: mpsc::UnboundedReceiver<Tag>,
    limit: std::time::Duration,
    group: SharedString,
) {
    let mut pending = Pending::default();
    while let Some(tag) = tags.recv().await {
        pending.note(tag);
        while let Ok(tag) = tags.try_recv() {
            pending.note(tag);
        }
        let Some((tag, count)) = pending.next_ack() else {
            continue;
        };
        let sent = bounded(
            limit,
            "basic.ack",
            channel.basic_ack(tag, BasicAckOptions { multiple: true }),
        )
        .await;
        if let Err(error) = sent {
            tracing::debug!(%error, delivery_tag = tag, "acking failed; the broker redelivers");
            return;
        }
        metrics::counter!(telemetry::ACKED, "group" => group.clone()).increment(count as u64);
        metrics::counter!(telemetry::ACKS_SENT, "group" => group.clone()).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn acks_stop_below_the_first_delivery_in_hand() {
        let mut pending = Pending::default();
        for t in 1..=4 {
            pending.note(Tag::Delivered(t));
        }
        pending.note(Tag::Done(2));
        pending.note(Tag::Done(3));
        assert_eq!(pending.next_ack(), None, "1 is still in hand");
        pending.note(Tag::Settled(1));
        assert_eq!(pending.next_ack(), Some((3, 2)));
        assert_eq!(pending.next_ack(), None);
        pending.note(Tag::Done(4));
        assert_eq!(pending.next_ack(), Some((4, 1)));
    }

    proptest! {
        /// Whatever order deliveries finish in, an ack never covers a
        /// delivery still in hand, and every done delivery is acked once
        /// nothing is in hand.
        #[test]
        fn an_ack_never_covers_a_delivery_in_hand(
            finish in Just((1u64..=40).collect::<Vec<_>>()).prop_shuffle(),
            rejected in proptest::collection::hash_set(1u64..=40, 0..8),
        ) {
            let mut pending = Pending::default();
            let mut in_hand: BTreeSet<u64> = (1..=40).collect();
            for t in 1..=40 {
                pending.note(Tag::Delivered(t));
            }
            let mut acked = BTreeSet::new();
            for t in finish {
                in_hand.remove(&t);
                pending.note(if rejected.contains(&t) { Tag::Settled(t) } else { Tag::Done(t) });
                if let Some((up_to, _)) = pending.next_ack() {
                    prop_assert!(in_hand.iter().all(|h| *h > up_to), "acked {up_to} over {in_hand:?}");
                    acked.extend((1..=up_to).filter(|x| !rejected.contains(x)));
                }
            }
            let done: BTreeSet<u64> = (1..=40).filter(|x| !rejected.contains(x)).collect();
            prop_assert_eq!(acked, done);
        }
    }
}
